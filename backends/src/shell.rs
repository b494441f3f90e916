//! Quoting for a POSIX shell (X3): an SSH exec request is one string that the remote
//! user's shell parses, so every argv word is quoted here, at that boundary, and arrives
//! literally — `$(id)`, `a'b`, `x;y` and newlines included.

/// One word, quoted so that `sh` reads it back byte for byte. Words made only of
/// characters no shell treats specially stay bare (readable audit and logs); everything
/// else goes in single quotes, where nothing is special but the quote itself, which is
/// closed, escaped and reopened (`'\''`).
pub fn quote(word: &str) -> String {
    // No `~` or `#` in the set: a leading one is special.
    let plain = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&b));
    if plain {
        return word.to_string();
    }
    let mut out = String::with_capacity(word.len() + 2);
    out.push('\'');
    for c in word.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// An argv as one command line: each word quoted, separated by spaces.
pub fn join<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter().map(|w| quote(w.as_ref())).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs `printf '%s\0' <quoted words>` through `sh -c` and splits what it prints:
    /// the words the shell actually passed on.
    fn through_sh(argv: &[String]) -> Vec<String> {
        let line = format!("printf '%s\\0' {}", join(argv));
        let out = std::process::Command::new("sh").arg("-c").arg(&line).output().expect("sh runs");
        assert!(out.status.success(), "sh failed on {line:?}: {}", String::from_utf8_lossy(&out.stderr));
        let mut words: Vec<String> = out.stdout.split(|b| *b == 0).map(|w| String::from_utf8(w.to_vec()).expect("utf-8 back")).collect();
        words.pop(); // after the last NUL
        words
    }

    #[test]
    fn the_words_from_the_issue_arrive_literally() {
        let argv: Vec<String> =
            ["a'b", "$(id)", "x;y", "\"q\"", "", " ", "`uname`", "$HOME", "*", "~", "#c", "a\nb", "\\", "-n", "!", "é ü"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        assert_eq!(through_sh(&argv), argv);
    }

    #[test]
    fn plain_words_stay_bare() {
        assert_eq!(quote("ls"), "ls");
        assert_eq!(quote("/tmp/a-b_c.txt"), "/tmp/a-b_c.txt");
        assert_eq!(quote("a'b"), "'a'\\''b'");
        assert_eq!(quote(""), "''");
        assert_eq!(join(&["echo", "x y"]), "echo 'x y'");
    }

    /// Any byte a word of an argv can hold but NUL: ASCII controls, quotes, shell
    /// metacharacters, and any Unicode.
    fn word() -> impl Strategy<Value = String> {
        let pick = prop_oneof![
            4 => prop::sample::select(
                "'\"`$\\;&|<>(){}[]*?~#!= \t\n%^,.-_/:@+".chars().collect::<Vec<_>>()
            ),
            4 => (0x20u8..0x7f).prop_map(char::from),
            1 => (1u8..0x20).prop_map(char::from),
            1 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
        ];
        prop::collection::vec(pick, 0..24).prop_map(|cs| cs.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn any_argv_round_trips_through_sh(argv in prop::collection::vec(word(), 1..6)) {
            prop_assert_eq!(through_sh(&argv), argv);
        }
    }

    /// Through the quoting, a word is never a command: nothing the shell would run runs.
    #[test]
    fn an_injection_attempt_runs_nothing() {
        let dir = std::env::temp_dir().join(format!("molecule-quote-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("ran");
        let m = marker.display().to_string();
        let argv: Vec<String> =
            [format!("$(touch {m})"), format!("`touch {m}`"), format!("x; touch {m}"), format!("'; touch {m}; '")].into_iter().collect();
        assert_eq!(through_sh(&argv), argv);
        assert!(!marker.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
