//! The holding pages in a real browser: headless Chromium driven through chromedriver's W3C
//! WebDriver HTTP API. A visitor on the maintenance page sees the operator's message, sees an
//! update arrive without reloading, and is taken back to the page they asked for, by the page's
//! own script, once maintenance is switched off. A web app on another origin that calls the API
//! reads the holding answer when `cors_origins` lists it, and sees a network error otherwise.
//!
//! Needs `chromium` and `chromium-driver` (Debian packages, listed in `.ci/packages`). Without
//! them the test says so loudly and passes, except under `CI=true`, where it fails.
//!
//! With `INTERMISSION_SCREENSHOTS` set, it also writes `docs/maintenance-{desktop,phone}.png` and
//! `docs/outage-{desktop,phone}.png`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use intermission::control::protocol::Request as Ctl;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const SHOP_PAGE: &str =
    r#"<html><head><title>Shop</title></head><body><h1 id="app">The real shop</h1></body></html>"#;
const FIRST_MESSAGE: &str = "Upgrading the database — back by 10:00";
const SECOND_MESSAGE: &str = "Database upgraded, now checking everything — still back by 10:00";
/// The page polls every 10 s ± 20 %; this leaves room for three polls.
const PAGE_POLL_LIMIT: Duration = Duration::from_secs(40);
/// Any single WebDriver command.
const CALL_LIMIT: Duration = Duration::from_secs(30);

// ---- finding the browser ----------------------------------------------------------------------

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// chromedriver's path, or `None` when the browser test must be skipped (never under `CI=true`).
fn browser_or_skip() -> Option<PathBuf> {
    let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| find_in_path("chromedriver"));
    match driver {
        Some(d) if Path::new(CHROMIUM).is_file() => Some(d),
        _ => {
            let line = format!(
                "SKIPPED: browser test needs chromium and chromedriver \
                 (apt-get install chromium chromium-driver); {CHROMIUM} present: {}, \
                 chromedriver present: {}",
                Path::new(CHROMIUM).is_file(),
                driver.is_some()
            );
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{line} — and CI=true, so this is a failure"
            );
            // Straight to the process's stderr: `eprintln!` would be captured by the test
            // harness and never shown for a passing test.
            let bar = "=".repeat(78);
            let _ = writeln!(std::io::stderr(), "\n{bar}\n{line}\n{bar}\n");
            None
        }
    }
}

/// The port chromedriver started with `--port=0` listens on, from the line it prints once it
/// listens ("ChromeDriver was started successfully on port 35181."), within `limit`; `None`
/// when it exits first or says nothing of the kind. Its stdout is read to its end meanwhile,
/// so that it never waits on a full pipe.
fn driver_port(driver: &mut Child, limit: Duration) -> Option<u16> {
    use std::io::BufRead;
    let stdout = driver.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let port = line
                .strip_prefix("ChromeDriver was started successfully on port ")
                .and_then(|rest| rest.trim_end_matches('.').parse::<u16>().ok());
            if let Some(port) = port.filter(|&p| p != 0) {
                let _ = tx.send(port);
            }
        }
    });
    rx.recv_timeout(limit).ok()
}

// ---- a minimal WebDriver client -------------------------------------------------------------

/// chromedriver with one browser session. Dropping it deletes the session (the browser quits)
/// and kills chromedriver, also when the test panics.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: Option<String>,
    /// Chromium's profile and chromedriver's log.
    dir: tempfile::TempDir,
}

impl Browser {
    async fn start(chromedriver: &Path) -> Browser {
        // chromedriver given `--port=0` binds IPv6 first and then IPv4 on the port it got,
        // which another process may hold on IPv4: it then never says it started ("bind()
        // failed: Address already in use"). Another start picks another port.
        let mut tries = 0;
        let (driver, port, dir) = loop {
            tries += 1;
            let dir = tempfile::tempdir().expect("a temporary folder for the browser");
            let mut driver = spawn_driver(chromedriver, dir.path());
            let port = driver_port(&mut driver, Duration::from_secs(20));
            let log =
                std::fs::read_to_string(dir.path().join("chromedriver.log")).unwrap_or_default();
            if port.is_some() || tries == 3 || !log.contains("ERR_ADDRESS_IN_USE") {
                break (driver, port, dir);
            }
            kill_group(&mut driver);
        };
        let mut browser = Browser {
            driver,
            addr: ([127, 0, 0, 1], port.unwrap_or(0)).into(),
            session: None,
            dir,
        };
        if port.is_none() {
            panic!(
                "chromedriver did not say which port it listens on within 20 s ({tries} \
                 tries); its log:\n{}",
                browser.log()
            );
        }

        // Ready when GET /status says so.
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(v) = browser.call(Method::GET, "/status", None).await {
                if v["ready"] == true {
                    break;
                }
            }
            if let Ok(Some(status)) = browser.driver.try_wait() {
                panic!(
                    "chromedriver exited at start ({status}); its log:\n{}",
                    browser.log()
                );
            }
            assert!(
                Instant::now() < end,
                "chromedriver did not become ready within 20 s; its log:\n{}",
                browser.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let profile = browser.dir.path().join("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "timeouts": {"pageLoad": 20000, "script": 10000, "implicit": 0},
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-proxy-server",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let created = match tokio::time::timeout(
            Duration::from_secs(60),
            browser.call(Method::POST, "/session", Some(caps)),
        )
        .await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!("creating a browser session: {e}; log:\n{}", browser.log()),
            Err(_) => panic!(
                "creating a browser session took over 60 s; log:\n{}",
                browser.log()
            ),
        };
        let id = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {created}"))
            .to_owned();
        browser.session = Some(id);
        browser
    }

    fn log(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// One WebDriver command: its `value`, or the WebDriver error as text. Bounded by
    /// `CALL_LIMIT`.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json; charset=utf-8")
            .body(match &body {
                Some(v) => full(v.to_string()),
                None => empty(),
            })
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = client().request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(CALL_LIMIT, exchange)
            .await
            .map_err(|_| format!("{method} {path}: no answer within {CALL_LIMIT:?}"))??;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{method} {path}: {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if !status.is_success() || value.get("error").is_some() {
            return Err(format!(
                "{method} {path}: {status} {} — {}",
                value["error"],
                value["message"].as_str().unwrap_or_default()
            ));
        }
        Ok(value)
    }

    fn session_path(&self, rest: &str) -> String {
        format!(
            "/session/{}{rest}",
            self.session.as_deref().expect("a browser session")
        )
    }

    async fn session_call(&self, method: Method, rest: &str, body: Option<Value>) -> Value {
        let path = self.session_path(rest);
        match self.call(method, &path, body).await {
            Ok(v) => v,
            Err(e) => panic!("WebDriver: {e}"),
        }
    }

    async fn navigate(&self, url: &str) {
        self.session_call(Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body) in the page; `Err` while the page is being replaced.
    async fn try_exec(&self, script: &str) -> Result<Value, String> {
        let path = self.session_path("/execute/sync");
        self.call(
            Method::POST,
            &path,
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    async fn exec(&self, script: &str) -> Value {
        self.try_exec(script)
            .await
            .unwrap_or_else(|e| panic!("running {script:?} in the page: {e}"))
    }

    async fn set_window(&self, width: u32, height: u32) {
        self.session_call(
            Method::POST,
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await;
    }

    /// Sizes the window so that the page's viewport is `width`×`height` CSS pixels: the window
    /// rectangle includes the browser's frame, even headless, so it is corrected by what the
    /// page reports (`outerWidth` is no help: headless Chromium clamps it to 500 px).
    async fn set_viewport(&self, width: u32, height: u32) {
        let (mut w, mut h) = (i64::from(width), i64::from(height));
        for _ in 0..3 {
            self.set_window(w.clamp(100, 4000) as u32, h.clamp(100, 4000) as u32)
                .await;
            let inner = self
                .exec("return [window.innerWidth, window.innerHeight];")
                .await;
            let (iw, ih) = (
                inner[0].as_i64().unwrap_or(0),
                inner[1].as_i64().unwrap_or(0),
            );
            if (iw, ih) == (i64::from(width), i64::from(height)) {
                return;
            }
            w += i64::from(width) - iw;
            h += i64::from(height) - ih;
        }
    }

    /// A screenshot of the viewport, checked to be a PNG; returns it with its pixel size.
    async fn screenshot(&self) -> (Vec<u8>, u32, u32) {
        let v = self.session_call(Method::GET, "/screenshot", None).await;
        let png = base64_decode(v.as_str().expect("the screenshot as base64 text"))
            .expect("the screenshot is valid base64");
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 33 && &png[12..16] == b"IHDR",
            "the screenshot is not a PNG ({} bytes)",
            png.len()
        );
        let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
        (png, width, height)
    }
}

/// chromedriver on a port it picks (`--port=0`: a port found free here and let go could be
/// taken by another test before chromedriver binds it), logging into `dir`, in a process
/// group of its own, so that nothing it starts can outlive the test.
fn spawn_driver(chromedriver: &Path, dir: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let log =
        std::fs::File::create(dir.join("chromedriver.log")).expect("creating chromedriver's log");
    Command::new(chromedriver)
        .arg("--port=0")
        .arg(format!(
            "--log-path={}",
            dir.join("chromedriver.log").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("starting chromedriver")
}

/// Kills `driver` and anything left in its process group (a browser that did not quit), and
/// reaps it. Not reaped before, the group's id is still `driver`'s.
fn kill_group(driver: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", driver.id())])
        .stderr(Stdio::null())
        .status();
    let _ = driver.wait();
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("chromedriver's log (last lines):\n{}", self.log());
        }
        // Deleting the session makes chromedriver quit the browser. Plain blocking I/O: a Drop
        // cannot await, and this also works while unwinding.
        if let Some(id) = self.session.take() {
            let _ = raw_request(self.addr, "DELETE", &format!("/session/{id}"));
        }
        kill_group(&mut self.driver);
    }
}

/// A blocking HTTP/1.1 request with short timeouts, for `Drop`.
fn raw_request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    // The answer comes once the command is done; its head is enough (chromedriver may keep
    // the connection open after it).
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let data = clean
        .strip_suffix(b"==")
        .or_else(|| clean.strip_suffix(b"="));
    let data = data.unwrap_or(&clean);
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    for chunk in data.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= sextet(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

// ---- the page as the browser sees it ----------------------------------------------------------

/// What the test reads from the page in one go.
const PAGE_STATE: &str = r#"
const root = document.documentElement;
const msg = document.getElementById('message');
const note = document.getElementById('auto-note');
const until = document.getElementById('until-line');
const overrun = document.getElementById('overrun-line');
const app = document.getElementById('app');
const updates = document.getElementById('updates');
const visible = (el) => !!el && !el.hidden && el.getClientRects().length > 0
  && getComputedStyle(el).visibility !== 'hidden';
return {
  url: location.href,
  title: document.title,
  ready: document.readyState,
  lang: root.getAttribute('lang'),
  mode: root.getAttribute('data-mode'),
  message: msg ? msg.textContent : null,
  message_visible: visible(msg),
  auto_note_visible: visible(note),
  until_visible: visible(until),
  overrun_visible: visible(overrun),
  overrun_text: overrun ? overrun.textContent : null,
  ...(() => {
    const t = document.getElementById('until');
    if (!t) return {};
    const d = new Date(t.getAttribute('datetime'));
    const f = new Intl.DateTimeFormat(root.getAttribute('lang'), { year: 'numeric',
      month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', timeZoneName: 'short' });
    return {
      until_shown: t.textContent,
      until_up: f.format(new Date(Math.ceil(d.getTime() / 60000) * 60000)),
      until_down: f.format(d),
    };
  })(),
  updates: updates ? Array.from(updates.children).map((li) => li.textContent) : [],
  app: app ? app.textContent : null,
  marker: window.__intermissionTestMarker || null,
  width: window.innerWidth,
  height: window.innerHeight,
};
"#;

/// Polls the page until `cond` holds, for at most `limit`; panics with the last state seen.
async fn wait_for_page(
    browser: &Browser,
    limit: Duration,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < limit {
        // Errors are expected while the page reloads.
        match browser.try_exec(PAGE_STATE).await {
            Ok(state) if cond(&state) => {
                eprintln!(
                    "browser: {what} after {:.1} s",
                    start.elapsed().as_secs_f64()
                );
                return state;
            }
            Ok(state) => last = state,
            Err(e) => last = Value::String(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the browser did not show {what} within {limit:?}; last seen: {last:#}");
}

fn assert_holding_page(state: &Value, mode: &str, message: &str) {
    assert_eq!(
        state["lang"], "en",
        "not the English holding page: {state:#}"
    );
    assert_eq!(state["mode"], mode, "{state:#}");
    assert_eq!(state["message"], message, "{state:#}");
    assert_eq!(
        state["message_visible"], true,
        "the message is hidden: {state:#}"
    );
    assert_eq!(
        state["app"],
        Value::Null,
        "the upstream page is showing: {state:#}"
    );
}

/// Sizes the window, checks the viewport, and takes a screenshot; writes it to `docs/NAME.png`
/// when `INTERMISSION_SCREENSHOTS` is set.
async fn shoot(browser: &Browser, name: &str, width: u32, height: u32) {
    browser.set_viewport(width, height).await;
    let state = wait_for_page(browser, Duration::from_secs(5), "the resized page", |s| {
        s["ready"] == "complete" && s["width"] == width && s["height"] == height
    })
    .await;
    let (png, w, h) = browser.screenshot().await;
    eprintln!(
        "browser: screenshot {name}: {w}×{h} px, viewport {}×{}, {} bytes",
        state["width"],
        state["height"],
        png.len()
    );
    assert_eq!((w, h), (width, height), "screenshot {name}'s size");
    if std::env::var_os("INTERMISSION_SCREENSHOTS").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).expect("creating docs/");
        let path = docs.join(format!("{name}.png"));
        std::fs::write(&path, &png).expect("writing the screenshot");
        eprintln!("browser: wrote {}", path.display());
    }
}

// ---- the test -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_visitor_waits_on_the_holding_page_and_comes_back_by_itself() {
    let Some(chromedriver) = browser_or_skip() else {
        return;
    };
    let started = Instant::now();

    // The application: a shop page, counting how often it is asked for.
    let shop_hits = Arc::new(AtomicUsize::new(0));
    let hits = shop_hits.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let hits = hits.clone();
        async move {
            if req.uri().path() == "/healthz" {
                Response::new(full("ok"))
            } else if req.uri().path() == "/shop" {
                hits.fetch_add(1, Ordering::SeqCst);
                Response::builder()
                    .header("content-type", "text/html; charset=utf-8")
                    .body(full(SHOP_PAGE))
                    .unwrap()
            } else {
                Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(full("not found"))
                    .unwrap()
            }
        }
    })
    .await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[health]\npath = \"/healthz\"\n",
        up.url()
    ))
    .await;
    // An end 30 s past a whole minute, half an hour away: shown rounded up to the minute.
    let now = std::time::SystemTime::now();
    let whole = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 60 * 60;
    let end = std::time::UNIX_EPOCH + Duration::from_secs(whole + 30 * 60 + 30);
    let on = ctl(
        &proxy,
        Ctl::On {
            message: Some(FIRST_MESSAGE.into()),
            until: Some(humantime::format_rfc3339_seconds(end).to_string()),
            retry_after: None,
            reason: None,
        },
    )
    .await;
    assert!(on.ok, "maintenance on: {on:?}");

    let browser = Browser::start(&chromedriver).await;
    eprintln!(
        "browser: session ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The visitor asks for the shop and gets the holding page, with its script running.
    browser.navigate(&proxy.url("/shop")).await;
    let state = browser.exec(PAGE_STATE).await;
    assert_holding_page(&state, "maintenance", FIRST_MESSAGE);
    assert_eq!(state["title"], "Down for maintenance", "{state:#}");
    assert_eq!(
        state["until_visible"], true,
        "no expected end shown: {state:#}"
    );
    assert_eq!(
        state["auto_note_visible"], true,
        "status.js did not run (its note stays hidden): {state:#}"
    );
    // "Back by 10:31" for an end at 10:30:30: a promise that passes while `Retry-After` still
    // counts down would read as broken. As status.js writes it in the visitor's time.
    let shown = wait_for_page(&browser, PAGE_POLL_LIMIT, "the end rounded up", |s| {
        s["until_shown"] == s["until_up"]
    })
    .await;
    assert_ne!(shown["until_up"], shown["until_down"], "{shown:#}");
    assert_eq!(
        shop_hits.load(Ordering::SeqCst),
        0,
        "a held request reached the shop"
    );

    // An update reaches the open page through its own polling, without a reload.
    browser
        .exec("window.__intermissionTestMarker = 'same page'; return true;")
        .await;
    let update = ctl(
        &proxy,
        Ctl::Update {
            message: SECOND_MESSAGE.into(),
        },
    )
    .await;
    assert!(update.ok, "update: {update:?}");
    let state = wait_for_page(&browser, PAGE_POLL_LIMIT, "the updated message", |s| {
        s["message"] == SECOND_MESSAGE
    })
    .await;
    assert_holding_page(&state, "maintenance", SECOND_MESSAGE);
    assert_eq!(
        state["marker"], "same page",
        "the page was reloaded: {state:#}"
    );
    let updates = state["updates"].as_array().expect("the updates list");
    assert!(
        updates
            .first()
            .and_then(Value::as_str)
            .is_some_and(|u| u.contains(SECOND_MESSAGE)),
        "the newest update is not first in the list: {state:#}"
    );

    // Screenshots: the maintenance page, then the outage page's preview, at two sizes.
    shoot(&browser, "maintenance-desktop", 1280, 900).await;
    shoot(&browser, "maintenance-phone", 390, 844).await;
    browser
        .navigate(&proxy.url("/_intermission/preview?mode=outage"))
        .await;
    let state = browser.exec(PAGE_STATE).await;
    assert_eq!(state["lang"], "en", "{state:#}");
    assert_eq!(state["mode"], "outage", "{state:#}");
    assert_eq!(state["message_visible"], true, "{state:#}");
    shoot(&browser, "outage-desktop", 1280, 900).await;
    shoot(&browser, "outage-phone", 390, 844).await;
    let state = browser.exec(PAGE_STATE).await;
    assert!(
        state["url"]
            .as_str()
            .is_some_and(|u| u.ends_with("/_intermission/preview?mode=outage")),
        "the preview navigated away: {state:#}"
    );
    browser.set_window(1280, 900).await;

    // Back on the holding page; the operator switches maintenance off; the page's script
    // notices and brings the visitor to the shop, with nobody touching the browser.
    browser.navigate(&proxy.url("/shop")).await;
    let state = browser.exec(PAGE_STATE).await;
    assert_holding_page(&state, "maintenance", SECOND_MESSAGE);
    assert_eq!(
        shop_hits.load(Ordering::SeqCst),
        0,
        "a held request reached the shop"
    );

    // The work overruns its announced end: the open page, through its polling, stops
    // promising a time gone by and says it is taking longer. An end that is a whole minute
    // overruns at that time (within a minute: a test that waits).
    let (_, end) = whole_minute_ahead(Duration::from_secs(2));
    let again = ctl(
        &proxy,
        Ctl::On {
            message: None,
            until: Some(end),
            retry_after: None,
            reason: None,
        },
    )
    .await;
    assert!(again.ok, "a nearer announced end: {again:?}");
    browser
        .exec("window.__intermissionTestMarker = 'before the overrun'; return true;")
        .await;
    let limit = PAGE_POLL_LIMIT + Duration::from_secs(62);
    let state = wait_for_page(&browser, limit, "the overrun line", |s| {
        s["overrun_visible"] == true && s["until_visible"] == false
    })
    .await;
    assert_holding_page(&state, "maintenance", SECOND_MESSAGE);
    assert!(
        state["overrun_text"]
            .as_str()
            .is_some_and(|t| t.contains("taking longer than planned")),
        "{state:#}"
    );
    assert_eq!(
        state["marker"], "before the overrun",
        "the page was reloaded: {state:#}"
    );

    let off = ctl(&proxy, Ctl::Off).await;
    assert!(off.ok, "maintenance off: {off:?}");
    let state = wait_for_page(&browser, PAGE_POLL_LIMIT, "the real shop", |s| {
        s["app"] == "The real shop"
    })
    .await;
    assert_eq!(state["title"], "Shop", "{state:#}");
    assert!(
        state["url"].as_str().is_some_and(|u| u.ends_with("/shop")),
        "{state:#}"
    );
    assert!(
        shop_hits.load(Ordering::SeqCst) >= 1,
        "the shop page did not come from the upstream"
    );

    drop(browser);
    eprintln!(
        "browser: the whole test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The message and each update as the page lays them out: their text, the direction the browser
/// gives them, and the text as rendered (`innerText`, where collapsed line breaks are gone).
const RTL_STATE: &str = r#"
const box = (el) => ({
  text: el.textContent,
  direction: getComputedStyle(el).direction,
  rendered: el.innerText,
});
const msg = document.getElementById('message');
const items = Array.from(document.getElementById('updates').children).map((li) => {
  const t = li.querySelector('time');
  const node = Array.from(li.childNodes).reverse()
    .find((n) => n !== t && n.textContent.trim() !== '');
  return box(node.nodeType === Node.ELEMENT_NODE ? node : node.parentElement);
});
return { message: box(msg), items: items };
"#;

/// An operator writes in Hebrew or Arabic on a page whose own language reads left to right:
/// the message and each update, whether the server rendered it or the page's script added it,
/// read right to left, so that their punctuation and numbers stand where their readers expect
/// them ("ב-80%." not ".80%-ב"), and an update keeps its line breaks as the message does.
#[tokio::test(flavor = "multi_thread")]
async fn a_right_to_left_message_reads_right_to_left() {
    const HEBREW: &str = "עדכון: ההעברה הושלמה ב-80%.";
    const ARABIC: &str = "نحن نقوم بترقية قاعدة البيانات.\nسنعود الساعة 10:00!";
    let Some(chromedriver) = browser_or_skip() else {
        return;
    };
    let up = upstream(|_req: Request<Incoming>| async { Response::new(full("the app")) }).await;
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"{}\"]\n", up.url())).await;
    let on = ctl(&proxy, intermission_on(HEBREW)).await;
    assert!(on.ok, "maintenance on: {on:?}");

    let browser = Browser::start(&chromedriver).await;
    browser.navigate(&proxy.url("/")).await;
    let state = browser.exec(RTL_STATE).await;
    assert_eq!(state["message"]["text"], HEBREW, "{state:#}");
    assert_eq!(state["message"]["direction"], "rtl", "{state:#}");
    assert_eq!(state["items"][0]["text"], HEBREW, "{state:#}");
    assert_eq!(state["items"][0]["direction"], "rtl", "{state:#}");

    // An update the page's script adds as it polls reads the same way.
    let update = ctl(
        &proxy,
        Ctl::Update {
            message: ARABIC.into(),
        },
    )
    .await;
    assert!(update.ok, "update: {update:?}");
    wait_for_page(&browser, PAGE_POLL_LIMIT, "the Arabic update", |s| {
        s["message"] == ARABIC && s["updates"].as_array().is_some_and(|u| u.len() == 2)
    })
    .await;
    let state = browser.exec(RTL_STATE).await;
    assert_eq!(state["message"]["direction"], "rtl", "{state:#}");
    let items = state["items"].as_array().expect("the updates");
    assert_eq!(items.len(), 2, "{state:#}");
    assert_eq!(items[0]["text"], ARABIC, "{state:#}");
    assert_eq!(items[0]["direction"], "rtl", "{state:#}");
    assert!(
        items[0]["rendered"]
            .as_str()
            .is_some_and(|r| r.contains(".\nسنعود")),
        "the update's line break is gone: {state:#}"
    );
    assert_eq!(items[1]["text"], HEBREW, "{state:#}");
    assert_eq!(items[1]["direction"], "rtl", "{state:#}");
}

/// What the page's `fetch` of `url` (a JSON `POST` with credentials, which needs a preflight)
/// saw, as a web app's script sees it: the status, `Retry-After` and the problem's `detail`, or
/// the network error that hides them.
async fn cross_origin_call(browser: &Browser, url: &str) -> Value {
    let start = format!(
        "window.__call = null;
         fetch({url:?}, {{method: 'POST', credentials: 'include',
                          headers: {{'Content-Type': 'application/json'}}, body: '{{}}'}})
           .then(async r => {{ window.__call = {{status: r.status,
                retry: r.headers.get('Retry-After'), mode: r.headers.get('X-Intermission-Mode'),
                detail: (await r.json()).detail}}; }})
           .catch(e => {{ window.__call = {{failure: String(e)}}; }});
         return true;"
    );
    browser.exec(&start).await;
    let end = Instant::now() + CALL_LIMIT;
    loop {
        let seen = browser.exec("return window.__call;").await;
        if !seen.is_null() {
            return seen;
        }
        assert!(Instant::now() < end, "the call to {url} did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A web app served from another origin calls the API during maintenance: with its origin in
/// `cors_origins`, its script reads the 503, `Retry-After` and the operator's message (the
/// preflight answered, the call held); without, the browser hides the answer behind a
/// network error, which is what the app would show its users.
#[tokio::test(flavor = "multi_thread")]
async fn a_web_app_on_another_origin_reads_the_holding_answer() {
    let Some(chromedriver) = browser_or_skip() else {
        return;
    };
    // The web app's origin, and the API's upstream, which nothing must reach.
    let app = upstream(|_req: Request<Incoming>| async {
        Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            .body(full("<html><body>the app</body></html>"))
            .unwrap()
    })
    .await;
    let api_hits = Arc::new(AtomicUsize::new(0));
    let hits = api_hits.clone();
    let api = upstream(move |req: Request<Incoming>| {
        let hits = hits.clone();
        async move {
            if !is_health_check(&req) {
                hits.fetch_add(1, Ordering::SeqCst);
            }
            Response::new(full("{}"))
        }
    })
    .await;
    let origin = app.url();
    let upstream = format!("[upstream]\nservers = [\"{}\"]\n", api.url());
    let listed = spawn_proxy(&format!(
        "{upstream}[maintenance]\ncors_origins = [\"{origin}\"]\n"
    ))
    .await;
    let unlisted = spawn_proxy(&upstream).await;
    for proxy in [&listed, &unlisted] {
        let on = ctl(proxy, intermission_on(FIRST_MESSAGE)).await;
        assert!(on.ok, "maintenance on: {on:?}");
    }

    let browser = Browser::start(&chromedriver).await;
    browser.navigate(&format!("{origin}/")).await;
    let seen = cross_origin_call(&browser, &listed.url("/api/orders")).await;
    assert_eq!(seen["status"], 503, "{seen:#}");
    assert_eq!(seen["mode"], "maintenance", "{seen:#}");
    assert_eq!(seen["detail"], FIRST_MESSAGE, "{seen:#}");
    let retry: u64 = seen["retry"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    assert!(retry >= 1, "Retry-After not readable: {seen:#}");

    let hidden = cross_origin_call(&browser, &unlisted.url("/api/orders")).await;
    assert!(
        hidden["failure"]
            .as_str()
            .is_some_and(|e| e.contains("TypeError")),
        "an origin not listed should see only a network error: {hidden:#}"
    );
    assert_eq!(
        api_hits.load(Ordering::SeqCst),
        0,
        "a held call reached the API"
    );
}

/// A bare HTTP/1.1 server for `a_form_the_application_failed_is_not_sent_again`: `/healthz`
/// and a `GET` of `/form` or `/order` are answered, a `POST` is read whole and its connection
/// closed without an answer, as an application that crashes on it. Every request to `/order`
/// is noted, its method first.
async fn failing_form_app(orders: Arc<std::sync::Mutex<Vec<String>>>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let orders = orders.clone();
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buf = [0u8; 8192];
                let end = loop {
                    if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => data.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&data[..end]).into_owned();
                let length: usize = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse().ok())
                    .unwrap_or(0);
                while data.len() < end + length {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => data.extend_from_slice(&buf[..n]),
                    }
                }
                let line = head.lines().next().unwrap_or_default().to_owned();
                let mut words = line.split(' ');
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                if path == "/order" {
                    orders.lock().unwrap().push(method.to_owned());
                }
                let body = match (method, path) {
                    ("POST", _) => return, // dropped: closed without an answer
                    (_, "/healthz") => "ok".to_owned(),
                    (_, "/form") => "<html><body><form method=\"post\" action=\"/order\">\
                         <input name=\"item\" value=\"tv\"></form>\
                         <script>document.forms[0].submit()</script></body></html>"
                        .to_owned(),
                    (_, "/order") => {
                        "<html><head><title>Orders</title></head><body><h1 id=\"app\">Your \
                         orders</h1></body></html>"
                            .to_owned()
                    }
                    _ => "not here".to_owned(),
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// A form whose `POST` the application failed after it arrived gets the outage page (the
/// proxy never sends such a request twice), while the site as a whole stays `normal`. The
/// page's script takes the visitor back to the address they asked for: by `GET`. A reload
/// would have sent the form again, unasked, at every try, as many orders as tries.
#[tokio::test(flavor = "multi_thread")]
async fn a_form_the_application_failed_is_not_sent_again() {
    let Some(chromedriver) = browser_or_skip() else {
        return;
    };
    let orders = Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = failing_form_app(orders.clone()).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"http://{app}\"]\n[health]\npath = \"/healthz\"\n"
    ))
    .await;

    let browser = Browser::start(&chromedriver).await;
    browser.navigate(&proxy.url("/form")).await;
    // The form posts itself; the page's script then asks for /order again at once (the mode
    // is `normal`), and once more after 5 s if it lands on the holding page again.
    let asked = wait_until(Duration::from_secs(30), || {
        orders.lock().unwrap().len() >= 2
    })
    .await;
    let seen = orders.lock().unwrap().clone();
    assert!(asked, "/order was asked for {seen:?} only");
    assert_eq!(
        seen[..2],
        ["POST", "GET"],
        "the form was sent again by the holding page's script"
    );
    let state = wait_for_page(&browser, PAGE_POLL_LIMIT, "the orders page", |s| {
        s["app"] == "Your orders"
    })
    .await;
    assert!(
        state["url"].as_str().is_some_and(|u| u.ends_with("/order")),
        "{state:#}"
    );
    assert_eq!(
        orders
            .lock()
            .unwrap()
            .iter()
            .filter(|m| *m == "POST")
            .count(),
        1,
        "the form was sent again"
    );
}

/// An already open page whose `EventSource` reconnects while requests are held keeps
/// reconnecting (a 503 would close it for good, as the HTML standard has it), hears the
/// operator's message as an `intermission` event, and gets the application's events again
/// once maintenance is switched off, without a reload.
#[tokio::test(flavor = "multi_thread")]
async fn a_pages_event_source_outlasts_maintenance() {
    let Some(chromedriver) = browser_or_skip() else {
        return;
    };
    const PAGE: &str = r#"<html><body><script>
        window.__seen = [];
        window.__es = new EventSource('/events');
        __es.onmessage = e => __seen.push('app:' + e.data);
        __es.addEventListener('intermission',
            e => __seen.push('held:' + JSON.parse(e.data).detail));
        </script></body></html>"#;
    let app = upstream(|req: Request<Incoming>| async move {
        let (kind, body) = match req.uri().path() {
            // A stream that ends at once, so that the browser reconnects soon and often.
            "/events" => ("text/event-stream", "retry: 200\ndata: tick\n\n"),
            _ => ("text/html; charset=utf-8", PAGE),
        };
        Response::builder()
            .header("content-type", kind)
            .body(full(body))
            .unwrap()
    })
    .await;
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"{}\"]\n", app.url())).await;
    let browser = Browser::start(&chromedriver).await;
    browser.navigate(&proxy.url("/")).await;
    let seen = || async { browser.exec("return window.__seen.join('|');").await };
    let wait_for = |part: &'static str| async move {
        let end = Instant::now() + CALL_LIMIT;
        loop {
            let now = seen().await;
            if now.as_str().is_some_and(|s| s.contains(part)) {
                return now;
            }
            assert!(Instant::now() < end, "never saw {part}: {now}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_for("app:tick").await;
    let on = ctl(
        &proxy,
        Ctl::On {
            message: Some(FIRST_MESSAGE.into()),
            until: None,
            retry_after: Some("1s".into()),
            reason: None,
        },
    )
    .await;
    assert!(on.ok, "maintenance on: {on:?}");
    wait_for("held:").await;
    browser.exec("window.__seen = []; return true;").await;
    // Held more than once: it went on reconnecting after the first held answer.
    wait_for("held:").await;
    let state = browser.exec("return window.__es.readyState;").await;
    assert_ne!(state, json!(2), "the EventSource was closed for good");
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    browser.exec("window.__seen = []; return true;").await;
    // Within the second it was told to wait, whatever the hold's own `Retry-After`.
    wait_for("app:tick").await;
}

/// A holding page shown at a bypass link whose secret does not match (changed since, or
/// mistyped) takes its visitor to the site once it is back, as its note promises: its address
/// is under the reserved prefix, as the preview's is, and the page stayed there for good, where
/// asking for the link again would only get a bare `404`.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_bypass_link_comes_back_to_the_site() {
    let Some(chromedriver) = browser_or_skip() else {
        return;
    };
    let app = upstream(|_req: Request<Incoming>| async move {
        Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            .body(full(SHOP_PAGE))
            .unwrap()
    })
    .await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[maintenance]\nbypass_secret = \"the-current-secret-0123\"\n",
        app.url()
    ))
    .await;
    assert!(ctl(&proxy, intermission_on(FIRST_MESSAGE)).await.ok);
    let browser = Browser::start(&chromedriver).await;
    browser
        .navigate(&proxy.url("/_intermission/bypass/an-old-secret-0123456"))
        .await;
    let state = browser.exec(PAGE_STATE).await;
    assert_holding_page(&state, "maintenance", FIRST_MESSAGE);
    assert_eq!(state["auto_note_visible"], true, "{state:#}");
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    let state = wait_for_page(&browser, PAGE_POLL_LIMIT, "the real shop", |s| {
        s["app"] == "The real shop"
    })
    .await;
    assert_eq!(state["url"], proxy.url("/"), "{state:#}");
}

fn intermission_on(message: &str) -> Ctl {
    Ctl::On {
        message: Some(message.into()),
        until: None,
        retry_after: None,
        reason: None,
    }
}

#[test]
fn base64_decoding() {
    assert_eq!(base64_decode("").unwrap(), b"");
    assert_eq!(base64_decode("Zg==").unwrap(), b"f");
    assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
    assert_eq!(base64_decode("Zm9v").unwrap(), b"foo");
    assert_eq!(base64_decode("Zm9v\nYmFy").unwrap(), b"foobar");
    assert_eq!(base64_decode("iVBORw0KGgo=").unwrap(), b"\x89PNG\r\n\x1a\n");
    assert!(base64_decode("Zm9*").is_none());
}
