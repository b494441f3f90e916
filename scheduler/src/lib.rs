//! The scheduler (SPEC §5): fires one `sweep` job per sweeper per cron tick. Safe on any
//! number of replicas: a tick is claimed by inserting `(sweeper, tick)` into
//! `scheduler_ticks` in the transaction that enqueues its job ([`ticks`]), so each tick
//! fires once. Ticks missed while no scheduler ran, or while the database was away, are
//! not replayed: a scheduler fires only the latest tick due, and on start only ticks
//! after its start.

pub mod ticks;

use chrono::{DateTime, Utc};
use molecule_jobs::sweeper::{SweepArgs, Sweeper};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::watch;

/// One sweeper's schedule and the settings its jobs carry.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub cron: cron::Schedule,
    pub args: SweepArgs,
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// The sweepers that run (a sweeper set `off` is absent).
    pub schedules: Vec<Schedule>,
    /// How long fired ticks are remembered (longer than jobs are kept).
    pub tick_retention: Duration,
}

/// The default schedule of each sweeper (cron with a seconds field).
pub fn default_cron(s: Sweeper) -> &'static str {
    match s {
        Sweeper::ProvisionTimeout => "*/30 * * * * *",
        Sweeper::Orphans => "0 * * * * *",
        Sweeper::StaleTokens => "30 */5 * * * *",
        Sweeper::Health => "*/30 * * * * *",
        Sweeper::Hibernation => "0 */5 * * * *",
        Sweeper::A2aTtl => "*/30 * * * * *",
        Sweeper::Retention => "0 */10 * * * *",
    }
}

/// A schedule as an operator writes it, in UTC: `off`; a classic 5-field crontab line
/// (minute, hour, day of month, month, day of week 0–7 with 0 and 7 Sunday; it fires at
/// second 0); or a 6- or 7-field expression with seconds first and optionally a year, read
/// as the `cron` crate does (day of week 1–7, Sunday first, or names).
pub fn parse_cron(expr: &str) -> Result<Option<cron::Schedule>, String> {
    let expr = expr.trim();
    if expr.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let full = match fields.len() {
        5 => format!("0 {} {}", fields[..4].join(" "), crontab_weekdays(fields[4])?),
        6 | 7 => expr.to_string(),
        _ => return Err(format!("{expr:?}: a cron expression has 5, 6 or 7 fields (or write `off`)")),
    };
    cron::Schedule::from_str(&full).map(Some).map_err(|e| format!("{expr:?}: not a cron expression: {e}"))
}

/// A crontab day-of-week field (0–7, 0 and 7 Sunday) in the `cron` crate's numbering
/// (1–7, Sunday 1). Names and `*` pass through; step sizes after `/` are not days.
fn crontab_weekdays(field: &str) -> Result<String, String> {
    let day = |d: &str| -> Result<String, String> {
        match d.parse::<u8>() {
            Ok(n @ 0..=7) => Ok((n % 7 + 1).to_string()),
            Ok(_) => Err(format!("{field:?}: a day of week is 0 to 7")),
            Err(_) => Ok(d.to_string()), // a name, or `*`
        }
    };
    field
        .split(',')
        .map(|item| {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (item, None),
            };
            let range = match range.split_once('-') {
                Some((a, b)) => format!("{}-{}", day(a)?, day(b)?),
                None => day(range)?,
            };
            Ok(match step {
                Some(s) => format!("{range}/{s}"),
                None => range,
            })
        })
        .collect::<Result<Vec<_>, String>>()
        .map(|items| items.join(","))
}

/// The latest tick of `schedule` after `after` and no later than `now`: the one to fire.
/// Earlier ones in between were missed and are not replayed.
pub fn due_tick(schedule: &cron::Schedule, after: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    schedule.after(&after).take_while(|t| *t <= now).last()
}

pub async fn run(db: PgPool, cfg: SchedulerConfig, mut shutdown: watch::Receiver<bool>) {
    for s in &cfg.schedules {
        tracing::info!(sweeper = %s.args.sweeper, schedule = %s.cron, "scheduler: sweeper");
    }
    let start = Utc::now();
    let mut last: Vec<DateTime<Utc>> = vec![start; cfg.schedules.len()];
    let mut pruned_at: Option<DateTime<Utc>> = None;
    // After a failed fire: 1 s, doubling to 30 s, until one succeeds.
    let mut backoff = Duration::ZERO;
    loop {
        let now = Utc::now();
        let mut failed = false;
        for (s, last) in cfg.schedules.iter().zip(last.iter_mut()) {
            let Some(tick) = due_tick(&s.cron, *last, now) else { continue };
            // A sweep not run by its next tick is superseded by that tick's: it expires.
            let expires = s.cron.after(&tick).next();
            match ticks::fire(&db, &s.args, tick, expires).await {
                Ok(fired) => {
                    tracing::debug!(event = "sweep.fired", sweeper = %s.args.sweeper, %tick, ?fired);
                    *last = tick;
                }
                // Kept as it was: a later turn fires the latest tick then due.
                Err(e) => {
                    tracing::warn!(sweeper = %s.args.sweeper, error = %e, "cannot enqueue sweep; retrying");
                    failed = true;
                }
            }
        }
        backoff = if failed { (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(30)) } else { Duration::ZERO };
        if pruned_at.is_none_or(|p| now - p > chrono::Duration::hours(1)) {
            match ticks::prune(&db, cfg.tick_retention).await {
                Ok(_) => pruned_at = Some(now),
                Err(e) => tracing::warn!(error = %e, "cannot prune fired ticks"),
            }
        }
        // Until the earliest next tick, or the backoff after a failed fire.
        let next = cfg.schedules.iter().zip(&last).filter_map(|(s, l)| s.cron.after(l).next()).min();
        let wait = next
            .map(|t| (t - Utc::now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(Duration::from_secs(3600))
            .clamp(Duration::from_millis(50), Duration::from_secs(60))
            .max(backoff);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn schedules_parse_with_or_without_seconds_and_off() {
        assert!(parse_cron("off").unwrap().is_none());
        assert!(parse_cron("*/2 * * * * *").unwrap().is_some());
        assert!(parse_cron("*/5 * * * *").unwrap().is_some(), "5 fields: seconds 0");
        assert!(parse_cron("* * *").unwrap_err().contains("5, 6 or 7 fields"));
        assert!(parse_cron("61 * * * * *").is_err());
        for s in Sweeper::ALL {
            assert!(parse_cron(default_cron(s)).unwrap().is_some(), "{s}");
        }
    }

    /// A crontab's Monday-to-Friday is Monday to Friday (the crate counts Sunday as 1).
    #[test]
    fn classic_crontab_weekdays_mean_what_they_say() {
        let weekdays = parse_cron("0 3 * * 1-5").unwrap().unwrap();
        let fires: Vec<String> =
            weekdays.after(&Utc.with_ymd_and_hms(2026, 11, 29, 0, 0, 0).unwrap()).take(5).map(|t| t.format("%a").to_string()).collect();
        assert_eq!(fires, ["Mon", "Tue", "Wed", "Thu", "Fri"]);
        let sunday = parse_cron("0 3 * * 0").unwrap().unwrap();
        assert_eq!(sunday.after(&Utc.with_ymd_and_hms(2026, 11, 30, 0, 0, 0).unwrap()).next().unwrap().format("%a").to_string(), "Sun");
        assert_eq!(crontab_weekdays("7,1-2/1").unwrap(), "1,2-3/1");
        assert!(parse_cron("0 3 * * 8").is_err());
    }

    #[test]
    fn only_the_latest_missed_tick_fires() {
        let every_10s = parse_cron("*/10 * * * * *").unwrap().unwrap();
        let t = |s: u32| Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap() + chrono::Duration::seconds(s as i64);
        assert_eq!(due_tick(&every_10s, t(0), t(5)), None);
        assert_eq!(due_tick(&every_10s, t(0), t(10)), Some(t(10)));
        // A minute without firing (the database was away): one tick, the latest.
        assert_eq!(due_tick(&every_10s, t(0), t(65)), Some(t(60)));
        assert_eq!(due_tick(&every_10s, t(60), t(65)), None);
    }
}
