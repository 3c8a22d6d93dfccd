//! A real browser for tests: Debian's `chromium`, headless, driven over WebDriver by Debian's
//! `chromedriver` (on a loopback port, in a temp dir), through `fantoccini`. Each test starts
//! its own and stops it on drop. Screenshots go to `target/console-screenshots/`.

use fantoccini::{Client, ClientBuilder, Locator};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The zone the browser runs in: the console must show times in it.
pub const BROWSER_TZ: &str = "Asia/Tokyo";

/// A chromedriver with one Chromium session.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    child: Child,
    _dir: TempDir,
}

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Where screenshots go.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("console-screenshots")
}

impl Browser {
    /// Starts chromedriver and opens a headless Chromium session (1366x900, English, in
    /// [`BROWSER_TZ`]); panics with the driver's log if it does not come up.
    pub async fn start() -> Browser {
        let driver = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])
            .expect("chromedriver not found: install chromium-driver (scripts/test does)");
        let chromium = find(&["/usr/bin/chromium", "/usr/lib/chromium/chromium"])
            .expect("chromium not found: install chromium (scripts/test does)");
        let dir = tempfile::Builder::new()
            .prefix("rx-chrome")
            .tempdir()
            .unwrap();
        let log_path = dir.path().join("chromedriver.log");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        // A free port can be taken by another test before chromedriver binds it: then it
        // exits, and the next attempt takes another port.
        let mut attempt = 0;
        let (child, url) = loop {
            attempt += 1;
            let port = super::free_port();
            let log = std::fs::File::create(&log_path).unwrap();
            // Its own process group, so that the browsers it starts go with it.
            let mut child = Command::new(&driver)
                .process_group(0)
                .arg(format!("--port={port}"))
                .env("TZ", BROWSER_TZ)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn chromedriver");
            let url = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(60);
            let up = loop {
                let status = http.get(format!("{url}/status")).send().await;
                if status.is_ok_and(|r| r.status().is_success()) {
                    break true;
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if up {
                break (child, url);
            }
            assert!(
                attempt < 3,
                "chromedriver did not come up in 3 attempts: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        };
        let profile = dir.path().join("profile");
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                // The flags that keep Chromium off the network (the machine has none) and
                // working as root in a container.
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--lang=en-US",
                    "--window-size=1366,900", format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let caps = caps.as_object().unwrap().clone();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no Chromium session: {e}\n{}",
                    std::fs::read_to_string(dir.path().join("chromedriver.log"))
                        .unwrap_or_default()
                )
            });
        Browser {
            client,
            child,
            _dir: dir,
        }
    }

    /// Saves a screenshot of the page as `target/console-screenshots/NAME.png`.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// Waits (at most 20 s) for an element.
    pub async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} within 20 s: {e}"))
    }

    /// Waits (at most 20 s) until the element's text is `want`; the page is not reloaded.
    pub async fn wait_text(&self, css: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = match self.client.find(Locator::Css(css)).await {
                Ok(el) => el.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if text == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{css} says {text:?}, not {want:?}, after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The number of elements matching `css`.
    pub async fn count(&self, css: &str) -> usize {
        self.client.find_all(Locator::Css(css)).await.unwrap().len()
    }

    /// Text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        let el = self.client.find(Locator::Css(css)).await;
        el.unwrap_or_else(|e| panic!("no {css}: {e}"))
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver and the Chromium processes it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}
