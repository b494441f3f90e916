//! A headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`),
//! for tests that check what a person sees. Just the commands the tests use, over the
//! HTTP client the tests already have. Chromium is kept on loopback: every host name
//! but 127.0.0.1 fails to resolve and its background services are off.

use crate::{Proc, free_port};
use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

pub struct Browser {
    _driver: Proc,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    /// Starts chromedriver and one headless session. Panics with what to install when
    /// Chromium is missing (tests/run.sh installs it).
    pub async fn start() -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(std::path::Path::new(bin).exists(), "{bin} is missing: run tests/run.sh (apt-get install chromium chromium-driver)");
        }
        let port = free_port();
        let mut cmd = Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}")).arg("--allowed-ips=127.0.0.1");
        // A group of its own: the browsers it starts die with it (see Drop).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = Proc::spawn(cmd, "chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
        crate::eventually(Duration::from_secs(20), "chromedriver to answer /status", || {
            let http = http.clone();
            let url = format!("{base}/status");
            async move { http.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
        let profile = crate::temp_dir("chromium-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.display()),
                    // Loopback only (the network rule): no other name resolves, no proxy,
                    // none of the browser's own services.
                    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                    "--no-proxy-server", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-default-apps", "--disable-extensions", "--no-first-run",
                    "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--no-pings",
                    "--metrics-recording-only", "--safebrowsing-disable-auto-update"
                ]
            }
        }}});
        let mut b = Browser { _driver: driver, base, session: String::new(), http };
        let v = b.call("POST", "/session", Some(caps)).await;
        b.session = v["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
        b
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{}", self.base, path);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).header("content-type", "application/json").body(body.unwrap_or(json!({})).to_string()),
        };
        let res = req.send().await.unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let status = res.status();
        let text = res.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("webdriver {path}: {e}: {text}"));
        assert!(status.is_success(), "webdriver {method} {path}: {status}: {text}");
        v["value"].clone()
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", &self.at("/url"), Some(json!({"url": url}))).await;
    }

    pub async fn url(&self) -> String {
        self.call("GET", &self.at("/url"), None).await.as_str().unwrap_or_default().to_string()
    }

    /// The element matching a CSS selector (panics when none).
    pub async fn find(&self, css: &str) -> String {
        let v = self.call("POST", &self.at("/element"), Some(json!({"using": "css selector", "value": css}))).await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|id| id.as_str())
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    /// The rendered text of the element matching `css` — what a person reads there.
    pub async fn text(&self, css: &str) -> String {
        let el = self.find(css).await;
        self.call("GET", &self.at(&format!("/element/{el}/text")), None).await.as_str().unwrap_or_default().to_string()
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.call("POST", &self.at(&format!("/element/{el}/value")), Some(json!({"text": text}))).await;
    }

    pub async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.call("POST", &self.at(&format!("/element/{el}/click")), Some(json!({}))).await;
    }

    /// The cookies the browser holds for the current page (name, httpOnly, …).
    pub async fn cookies(&self) -> Vec<Value> {
        self.call("GET", &self.at("/cookie"), None).await.as_array().cloned().unwrap_or_default()
    }

    /// What the page's own scripts could read of the cookies.
    pub async fn script_visible_cookies(&self) -> String {
        let v = self.call("POST", &self.at("/execute/sync"), Some(json!({"script": "return document.cookie", "args": []}))).await;
        v.as_str().unwrap_or_default().to_string()
    }

    pub async fn quit(self) {
        let _ = self.http.delete(format!("{}{}", self.base, self.at(""))).send().await;
    }
}

impl Drop for Browser {
    /// Chromedriver and every browser it started, even when a test panics midway.
    fn drop(&mut self) {
        unsafe { libc::kill(-self._driver.pid(), libc::SIGKILL) };
    }
}
