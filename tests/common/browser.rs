//! A real headless Chromium for the dashboard tests, driven over WebDriver with `fantoccini`:
//! each test starts its own `chromedriver` on a free port, in a process group of its own so
//! that dropping the [`Browser`] (even on a panic) kills the driver and every Chromium process
//! it started. Debian's `chromium` and `chromium-driver` packages provide both (`.ci/run`
//! installs them); `CHROMEDRIVER` and `CHROME_BIN` point elsewhere if needed.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::elements::Element;
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use super::processes::wait_for;

const INSTALL: &str = "Debian's chromium and chromium-driver packages \
    (apt-get install -y chromium chromium-driver)";

/// How long the page gets to show what a test waits for (a job finishing included).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A Chromium session; the driver's process group is killed when dropped.
pub struct Browser {
    pub client: Client,
    driver: Child,
    /// chromedriver's own log, named in failure messages.
    pub log: PathBuf,
    /// Chromium's profile: its own, so that it goes with the browser (Chromium, killed with
    /// its driver, cannot remove the one it would make in the temporary directory).
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.profile);
        // The driver's log is kept for a failing test, which names it.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A port nothing listens on right now (the driver binds it a moment later).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("bound address").port()
}

/// Headless (the machine has no display), no sandbox (tests run as root), one fixed size and
/// language so screenshots and date fields look the same on every machine.
fn capabilities(profile: &std::path::Path) -> serde_json::Map<String, Value> {
    let mut options = json!({"args": [
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--window-size=1440,960", "--force-device-scale-factor=1", "--lang=en-US",
        format!("--user-data-dir={}", profile.display()),
    ]});
    if let Ok(binary) = std::env::var("CHROME_BIN") {
        options["binary"] = json!(binary);
    }
    let Value::Object(caps) = json!({"goog:chromeOptions": options}) else {
        unreachable!("an object literal")
    };
    caps
}

impl Browser {
    /// Starts chromedriver and opens a Chromium session on it; fails naming the packages to
    /// install when chromedriver is missing.
    pub async fn start() -> Self {
        let binary = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = free_port();
        let log = std::env::temp_dir().join(format!("settle-chromedriver-{port}.log"));
        let profile = std::env::temp_dir().join(format!("settle-chromium-{port}"));
        let driver = Command::new(&binary)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `{binary}` ({e}): the dashboard's browser test needs {INSTALL}")
            });
        let url = format!("http://127.0.0.1:{port}");
        let caps = capabilities(&profile);
        let client = wait_for(
            Duration::from_secs(20),
            "chromedriver to start Chromium",
            || {
                let (url, caps) = (url.clone(), caps.clone());
                async move {
                    ClientBuilder::new(HttpConnector::new())
                        .capabilities(caps)
                        .connect(&url)
                        .await
                        .ok()
                }
            },
        )
        .await;
        Self {
            client,
            driver,
            log,
            profile,
        }
    }

    /// A browser on the dashboard at `url` with `token` applied (typed, then Enter), as an
    /// operator signs in.
    pub async fn signed_in(url: &str, token: &str) -> Self {
        let browser = Self::start().await;
        browser.open(url).await;
        let keys = format!("{token}{}", fantoccini::key::Key::Enter);
        browser.type_into("#token", &keys).await;
        browser
    }

    pub async fn open(&self, url: &str) {
        self.client.goto(url).await.expect("open the page");
    }

    /// The element `css` selects, once it is on the page.
    pub async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css} on the page: {e}"))
    }

    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.expect("click");
    }

    /// Types `keys` (e.g. a token followed by `Key::Enter`) into the field `css`.
    pub async fn type_into(&self, css: &str, keys: &str) {
        self.find(css).await.send_keys(keys).await.expect("type");
    }

    /// Presses `key` on whatever holds the focus, as a keyboard does (WebDriver's typing into an
    /// element focuses it first, which would hide a focus the page lost).
    pub async fn press(&self, key: Key) {
        let keys = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: key.into() })
            .then(KeyAction::Up { value: key.into() });
        self.client
            .perform_actions(keys)
            .await
            .expect("press a key");
    }

    /// What holds the focus: a button's `data-action` (else an id, else a tag) and the job id of
    /// the row it is in, if any (`"cancel 7"`, `"token"`, `"BODY"`).
    pub async fn focused(&self) -> String {
        let script = "const e = document.activeElement; const row = e.closest('tr'); \
            return [e.dataset.action || e.id || e.tagName, row ? row.dataset.jobId : ''] \
            .join(' ').trim();";
        let focused = self.client.execute(script, vec![]).await;
        focused
            .expect("read the focus")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Fills an `<input type="date">` the way a person does: emptied, then its segments typed
    /// in the en-US order (month, day, year) the browser was started with. Focusing by typing
    /// (not by a click, which lands on whichever segment is under the pointer) starts at the
    /// month.
    pub async fn fill_date(&self, css: &str, iso_day: &str) {
        let [year, month, day] = iso_day.split('-').collect::<Vec<_>>()[..] else {
            panic!("{iso_day} is not YYYY-MM-DD")
        };
        let field = self.find(css).await;
        field.clear().await.expect("empty the date field");
        field
            .send_keys(&format!("{month}{day}{year}"))
            .await
            .expect("type the date");
        let value = field.prop("value").await.expect("read the date back");
        assert_eq!(
            value.as_deref(),
            Some(iso_day),
            "{css} holds the date typed"
        );
    }

    /// Waits until the button `css` reads `label` and can be clicked.
    pub async fn wait_button(&self, css: &str, label: &str) {
        let what = format!("{css} to be an enabled {label:?}");
        wait_for(PATIENCE, &what, || async {
            let button = self.client.find(Locator::Css(css)).await.ok()?;
            let enabled = button.is_enabled().await.ok()?;
            (enabled && button.text().await.ok()? == label).then_some(())
        })
        .await;
    }

    /// The visible text of `css`, or `None` while it is not on the page.
    pub async fn text(&self, css: &str) -> Option<String> {
        let element = self.client.find(Locator::Css(css)).await.ok()?;
        element.text().await.ok()
    }

    /// Waits until the text of `css` contains `expected`; returns the whole text.
    pub async fn wait_text(&self, css: &str, expected: &str) -> String {
        let what = format!("{css} to show {expected:?}");
        wait_for(PATIENCE, &what, || async {
            self.text(css).await.filter(|t| t.contains(expected))
        })
        .await
    }

    /// `sessionStorage[key]` of the page.
    pub async fn session_storage(&self, key: &str) -> Value {
        self.client
            .execute(
                "return sessionStorage.getItem(arguments[0]);",
                vec![json!(key)],
            )
            .await
            .expect("read sessionStorage")
    }

    /// How many elements `css` selects now.
    pub async fn count(&self, css: &str) -> usize {
        let found = self.client.find_all(Locator::Css(css)).await;
        found.expect("find elements").len()
    }

    /// The ids of the job rows (`data-job-id`), top to bottom.
    pub async fn job_ids(&self) -> Vec<i64> {
        let rows = self.client.find_all(Locator::Css("[data-job-id]")).await;
        let mut ids = Vec::new();
        for row in rows.expect("job rows") {
            if let Ok(Some(id)) = row.attr("data-job-id").await {
                ids.push(id.parse().expect("numeric data-job-id"));
            }
        }
        ids
    }

    /// The selector of job `id`'s row, to find things inside it.
    pub fn job_row(id: i64) -> String {
        format!("[data-job-id=\"{id}\"]")
    }

    /// Waits until job `id`'s row shows `status` in its status pill.
    pub async fn wait_job_status(&self, id: i64, status: &str) {
        let pill = format!("{} .pill", Self::job_row(id));
        self.wait_text(&pill, status).await;
    }

    /// Saves a screenshot as `name` in this test build's scratch directory under `target/`,
    /// checks it is a PNG with something in it, and prints where it is.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
        assert!(
            png.len() > 10_000,
            "a screenshot with content, not a blank page"
        );
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, &png).expect("save the screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }

    /// Ends the session (Chromium exits), then the driver.
    pub async fn close(self) {
        let client = self.client.clone();
        client.close().await.expect("close the browser");
    }
}
