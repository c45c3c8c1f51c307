//! The operators' side: metrics over the admin listener, and webhooks on every change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use intermission::control::protocol::Request as Ctl;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

/// `name{labels}` → value, from the text exposition format.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn metric(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no {key} in {:?}", m.keys().collect::<Vec<_>>()))
}

/// Whether the series has these labels, in any order.
fn find(m: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    m.iter()
        .find(|(k, _)| k.starts_with(&format!("{name}{{")) && labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name} with {labels:?}"))
}

async fn scrape(proxy: &Proxy) -> HashMap<String, f64> {
    let addr = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let resp = get(&format!("http://{addr}/metrics")).await;
    assert_eq!(resp.status(), 200);
    parse_metrics(&String::from_utf8_lossy(resp.body()))
}

/// `promtool check metrics`, Prometheus's own linter, reads what `/metrics` answers a client
/// that does not ask for OpenMetrics (the text format 0.0.4), and finds nothing to say: the
/// format, the names, the units and the help texts pass.
#[tokio::test(flavor = "multi_thread")]
async fn promtool_finds_nothing_to_say_about_the_metrics() {
    if !tool_present("promtool", "--version", "prometheus") {
        return;
    }
    let up = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        up.url()
    ))
    .await;
    assert_eq!(get(&proxy.url("/")).await.status(), 200);
    ctl(&proxy, Ctl::Status).await;
    let addr = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let resp = get(&format!("http://{addr}/metrics")).await;
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(resp.body())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_happened_to_requests_and_health() {
    let up = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let secret = "metrics-test-secret-0123";
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[health]\ninterval = \"1s\"\ntimeout = \"1s\"\nrise = 1\nfall = 2\n\
         [maintenance]\nbypass_secret = \"{secret}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        up.url()
    ))
    .await;
    let addr = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    assert_eq!(get(&format!("http://{addr}/healthz")).await.status(), 200);
    assert_eq!(get(&format!("http://{addr}/readyz")).await.status(), 200);

    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/")).await.status(), 200);
    }
    ctl(
        &proxy,
        Ctl::On {
            message: None,
            until: None,
            retry_after: None,
            reason: None,
        },
    )
    .await;
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("/")).await.status(), 503);
    }
    let link = get(&proxy.url(&format!("/_intermission/bypass/{secret}"))).await;
    let cookie = link.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let bypassed = send(
        Request::get(proxy.url("/"))
            .header("cookie", cookie)
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(bypassed.body(), "app");
    // The check at start has been made, and counted, before the counters are read.
    assert!(
        wait_until_async(|| async {
            ctl(&proxy, Ctl::Health).await.health.unwrap()[0]
                .last_check
                .is_some()
        })
        .await,
        "no health check was made"
    );

    let m = scrape(&proxy).await;
    assert_eq!(
        find(
            &m,
            "intermission_requests_total",
            &["outcome=\"forwarded\"", "mode=\"normal\""]
        ),
        3.0
    );
    assert_eq!(
        find(
            &m,
            "intermission_requests_total",
            &["outcome=\"held\"", "mode=\"maintenance\""]
        ),
        2.0
    );
    assert_eq!(
        find(
            &m,
            "intermission_requests_total",
            &["outcome=\"bypassed\"", "mode=\"maintenance\""]
        ),
        1.0
    );
    assert_eq!(
        find(
            &m,
            "intermission_requests_total",
            &["outcome=\"reserved\"", "mode=\"maintenance\""]
        ),
        1.0
    );
    assert_eq!(
        find(&m, "intermission_responses_total", &["class=\"5xx\""]),
        2.0
    );
    assert_eq!(
        metric(&m, "intermission_request_duration_seconds_count"),
        7.0
    );
    assert_eq!(
        find(&m, "intermission_mode", &["mode=\"maintenance\""]),
        1.0
    );
    assert_eq!(find(&m, "intermission_mode", &["mode=\"normal\""]), 0.0);
    assert_eq!(
        find(
            &m,
            "intermission_mode_transitions_total",
            &["from=\"normal\"", "to=\"maintenance\""]
        ),
        1.0
    );
    assert_eq!(
        find(
            &m,
            "intermission_control_commands_total",
            &["command=\"on\"", "result=\"ok\""]
        ),
        1.0
    );
    assert!(find(&m, "intermission_health_checks_total", &["result=\"ok\""]) >= 1.0);

    // A request the socket refuses counts as a failure of the command it names: a broken
    // script shows on `result="fail"`.
    {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let socket = proxy.dir.path().join("intermission.sock");
        let mut s =
            tokio::io::BufReader::new(tokio::net::UnixStream::connect(&socket).await.unwrap());
        for line in [
            "{\"cmd\":\"on\",\"message\":5}\n",
            "{\"cmd\":\"nope\"}\n",
            "not json\n",
        ] {
            s.get_mut().write_all(line.as_bytes()).await.unwrap();
            let mut answer = String::new();
            s.read_line(&mut answer).await.unwrap();
            assert!(answer.contains("\"ok\":false"), "{answer}");
        }
    }
    let refused = |m: &HashMap<String, f64>| {
        find(
            m,
            "intermission_control_commands_total",
            &["command=\"on\"", "result=\"fail\""],
        )
    };
    let unknown = |m: &HashMap<String, f64>| {
        find(
            m,
            "intermission_control_commands_total",
            &["command=\"unknown\"", "result=\"fail\""],
        )
    };
    let mut m = scrape(&proxy).await;
    // Counted by the controller, after the answer.
    for _ in 0..250 {
        if refused(&m) == 1.0 && unknown(&m) == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = scrape(&proxy).await;
    }
    assert_eq!(refused(&m), 1.0);
    assert!(
        !m.keys().any(|k| k.contains("nope")),
        "an unknown command is no label"
    );
    // Requests that name no known command are counted under one fixed label.
    assert_eq!(unknown(&m), 2.0);

    // A reload keeps the counters.
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    let m = scrape(&proxy).await;
    assert_eq!(
        find(
            &m,
            "intermission_requests_total",
            &["outcome=\"forwarded\"", "mode=\"normal\""]
        ),
        3.0
    );

    // A health flip shows in the per-server gauge, and is counted: a server out and back
    // between two scrapes would not show in the gauge.
    let server = format!("server=\"{}\"", up.url());
    let marked_down =
        |m: &HashMap<String, f64>| find(m, "intermission_upstream_marked_down_total", &[&server]);
    assert_eq!(marked_down(&m), 0.0);
    ctl(&proxy, Ctl::Off).await;
    up.stop();
    // Two failed checks a second apart take it out; the bound leaves room for a loaded machine.
    let end = Instant::now() + Duration::from_secs(10);
    let mut down = false;
    while Instant::now() < end && !down {
        let m = scrape(&proxy).await;
        down = find(
            &m,
            "intermission_upstream_healthy",
            &[&format!("server=\"{}\"", up.url())],
        ) == 0.0
            && find(&m, "intermission_mode", &["mode=\"outage\""]) == 1.0;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(down, "the health flip did not show in the metrics");
    let m = scrape(&proxy).await;
    assert!(find(&m, "intermission_health_checks_total", &["result=\"fail\""]) >= 1.0);
    assert_eq!(marked_down(&m), 1.0);
}

/// Waits until `ctl health` shows the first server `healthy`; whether it did.
async fn health_shows(proxy: &Proxy, healthy: bool) -> bool {
    wait_until_async(|| async {
        ctl(proxy, Ctl::Health).await.health.unwrap()[0].healthy == Some(healthy)
    })
    .await
}

/// A webhook receiver that records what it gets, optionally failing or hanging.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>,
    _up: Upstream,
}

async fn receiver(fail: Arc<AtomicBool>, hang: bool) -> Receiver {
    receiver_held(fail, hang, None).await
}

/// `receiver`, that also holds each request, once read, until `gate` opens (when given).
async fn receiver_held(
    fail: Arc<AtomicBool>,
    hang: bool,
    gate: Option<tokio::sync::watch::Receiver<bool>>,
) -> Receiver {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let (sink, fail, mut gate) = (sink.clone(), fail.clone(), gate.clone());
        async move {
            if hang {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            if let Some(gate) = gate.as_mut() {
                let _ = gate.wait_for(|open| *open).await;
            }
            if fail.load(Ordering::SeqCst) {
                return Response::builder().status(500).body(full("no")).unwrap();
            }
            sink.lock().unwrap().push((parts.headers, body));
            Response::new(full("ok"))
        }
    })
    .await;
    Receiver {
        url: format!("{}/hook", up.url()),
        got,
        _up: up,
    }
}

fn events(r: &Receiver) -> Vec<serde_json::Value> {
    r.got
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| serde_json::from_slice(b).unwrap())
        .collect()
}

async fn wait_events(r: &Receiver, n: usize) -> Vec<serde_json::Value> {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if r.got.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    events(r)
}

/// A proxy for an application answering `app`, with one JSON webhook to `hook`.
async fn hooked_proxy() -> (Upstream, Receiver, Proxy) {
    let app = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let hook = receiver(Arc::new(AtomicBool::new(false)), false).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[[notify]]\nurl = \"{}\"\n",
        app.url(),
        hook.url
    ))
    .await;
    (app, hook, proxy)
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_follow_every_change_in_order_and_are_signed() {
    let app = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let json_hook = receiver(Arc::new(AtomicBool::new(false)), false).await;
    let slack_hook = receiver(Arc::new(AtomicBool::new(false)), false).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[health]\ninterval = \"1s\"\ntimeout = \"1s\"\nrise = 1\nfall = 2\n\
         [[notify]]\nurl = \"{}\"\nsecret = \"hook-secret\"\n[[notify]]\nurl = \"{}\"\nformat = \"slack\"\n\
         headers = {{ Authorization = \"Basic dXNlcjpwYXNz\" }}\n",
        app.url(),
        json_hook.url,
        slack_hook.url
    ))
    .await;
    ctl(
        &proxy,
        Ctl::On {
            message: Some("Database upgrade".into()),
            until: None,
            retry_after: None,
            reason: Some("INC-7".into()),
        },
    )
    .await;
    ctl(
        &proxy,
        Ctl::Update {
            message: "Halfway there".into(),
        },
    )
    .await;
    // Running late: a new end is news of its own.
    ctl(
        &proxy,
        Ctl::On {
            message: None,
            until: Some("+90m".into()),
            retry_after: None,
            reason: None,
        },
    )
    .await;
    ctl(&proxy, Ctl::Off).await;
    app.stop();
    let got = wait_events(&json_hook, 5).await;
    app.restart().await;
    let got = if got.len() >= 5 {
        wait_events(&json_hook, 6).await
    } else {
        got
    };
    let kinds: Vec<(String, String, String)> = got
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_owned(),
                e["previous_mode"].as_str().unwrap().to_owned(),
                e["mode"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [
        ("mode_changed", "normal", "maintenance"),
        ("message_updated", "maintenance", "maintenance"),
        ("until_changed", "maintenance", "maintenance"),
        ("mode_changed", "maintenance", "normal"),
        ("mode_changed", "normal", "outage"),
        ("mode_changed", "outage", "normal"),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(kinds, want);
    let first = &got[0];
    assert_eq!(first["message"], "Database upgrade");
    assert_eq!(first["reason"], "INC-7");
    assert!(first["by"].as_str().is_some() && first["instance"].as_str().is_some());
    assert!(first["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(got[1]["message"], "Halfway there");
    assert!(got[2]["until"].as_str().is_some(), "{got:#?}");
    assert_eq!(got[2]["message"], "Halfway there");
    // Each all-clear says when the episode it ends began: how long it lasted.
    assert_eq!(got[3]["since"], got[0]["since"], "{got:#?}");
    assert_eq!(got[5]["since"], got[4]["since"], "{got:#?}");
    assert!(got[5]["since"].as_str().is_some(), "{got:#?}");
    let slack = wait_events(&slack_hook, 6).await;
    assert!(
        slack[2]["text"]
            .as_str()
            .unwrap()
            .contains("now expected to end by "),
        "{slack:#?}"
    );
    let all_clear = slack[5]["text"].as_str().unwrap();
    assert!(
        all_clear.contains("back to normal after an outage of "),
        "{all_clear}"
    );

    // Each body is signed with HMAC-SHA256 of the raw bytes.
    for (headers, body) in json_hook.got.lock().unwrap().iter() {
        let sig = headers["x-intermission-signature"].to_str().unwrap();
        let hex = sig.strip_prefix("sha256=").unwrap();
        let mac: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"hook-secret");
        assert!(
            ring::hmac::verify(&key, body, &mac).is_ok(),
            "bad signature"
        );
    }
    // A receiver behind a password gets it with every event, the others nothing of it.
    for (headers, _) in slack_hook.got.lock().unwrap().iter() {
        assert_eq!(headers["authorization"], "Basic dXNlcjpwYXNz");
    }
    for (headers, _) in json_hook.got.lock().unwrap().iter() {
        assert!(headers.get("authorization").is_none());
    }
    // The Slack receiver gets readable sentences.
    let slack = wait_events(&slack_hook, 6).await;
    let text = slack[0]["text"].as_str().unwrap();
    assert!(
        text.contains("Maintenance") && text.contains("Database upgrade"),
        "{text}"
    );
    assert!(slack_hook.got.lock().unwrap()[0]
        .0
        .get("x-intermission-signature")
        .is_none());
}

/// A mode that force-open changes is announced as force-open's doing: "back to normal after
/// an outage" alone would read as a recovery while the servers are still down.
#[tokio::test(flavor = "multi_thread")]
async fn force_open_says_it_in_the_webhook() {
    let app = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let hook = receiver(Arc::new(AtomicBool::new(false)), false).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[health]\ninterval = \"1s\"\ntimeout = \"1s\"\nrise = 1\nfall = 2\n\
         [[notify]]\nurl = \"{}\"\nformat = \"slack\"\n",
        app.url(),
        hook.url
    ))
    .await;
    app.stop();
    wait_mode(&proxy, "outage", Duration::from_secs(10)).await;
    assert!(ctl(&proxy, Ctl::ForceOpen { enabled: true }).await.ok);
    let got = wait_events(&hook, 2).await;
    let text = got
        .get(1)
        .and_then(|e| e["text"].as_str())
        .unwrap_or_default();
    assert!(
        text.contains("back to normal") && text.contains("force-open on"),
        "{got:?}"
    );
}

/// Maintenance switched off while the application is still down leaves the site in `outage`:
/// the webhook says why no server is healthy, not only who switched maintenance off, which
/// would read as the operator's doing.
#[tokio::test(flavor = "multi_thread")]
async fn maintenance_off_into_an_outage_says_why_in_the_webhook() {
    let app = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let hook = receiver(Arc::new(AtomicBool::new(false)), false).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[health]\ninterval = \"1s\"\ntimeout = \"1s\"\nrise = 1\nfall = 2\n\
         [[notify]]\nurl = \"{}\"\n",
        app.url(),
        hook.url
    ))
    .await;
    assert!(ctl(&proxy, on(Some("Database upgrade"))).await.ok);
    app.stop();
    assert!(health_shows(&proxy, false).await);
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    let got = wait_events(&hook, 2).await;
    let last = got.get(1).cloned().unwrap_or_default();
    assert_eq!(last["mode"], "outage", "{got:?}");
    let reason = last["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("maintenance off")
            && reason.contains("no upstream server is healthy")
            && reason.contains(&app.url()),
        "{got:?}"
    );
}

/// SPEC §2: webhooks are called on every change of message, and a reload changes the message
/// of a maintenance switched on without one (SPEC §3).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_changes_the_message_shown_is_notified() {
    let app = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let hook = receiver(Arc::new(AtomicBool::new(false)), false).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[maintenance]\nmessage = \"First words\"\n\
         [[notify]]\nurl = \"{}\"\n",
        app.url(),
        hook.url
    ))
    .await;
    let on = Ctl::On {
        message: None,
        until: None,
        retry_after: None,
        reason: None,
    };
    assert!(ctl(&proxy, on).await.ok);
    assert_eq!(wait_events(&hook, 1).await[0]["message"], "First words");
    let path = proxy.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // A reload that leaves the message as it is says nothing.
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    std::fs::write(&path, text.replace("First words", "Second words")).unwrap();
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    let got = wait_events(&hook, 2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1]["event"], "message_updated");
    assert_eq!(got[1]["mode"], "maintenance");
    assert_eq!(got[1]["message"], "Second words");
    // An operator's own message is not the config's to change: nothing to tell.
    assert!(
        ctl(
            &proxy,
            Ctl::Update {
                message: "Ours".into()
            }
        )
        .await
        .ok
    );
    std::fs::write(&path, text.replace("First words", "Third words")).unwrap();
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    let kinds: Vec<_> = wait_events(&hook, 4)
        .await
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        [
            "mode_changed",
            "message_updated",
            "message_updated",
            "mode_changed"
        ],
        "the update and the off, nothing for the last reload"
    );
}

/// A webhook receiver that holds every request until `open` is set, then answers 200.
async fn gated_receiver(open: tokio::sync::watch::Receiver<bool>) -> Receiver {
    receiver_held(Arc::new(AtomicBool::new(false)), false, Some(open)).await
}

/// `intermission_webhook_deliveries_total` of one webhook and result, as `/metrics` writes it.
fn deliveries(webhook: &str, result: &str) -> String {
    format!("intermission_webhook_deliveries_total{{webhook=\"{webhook}\",result=\"{result}\"}}")
}

fn queue_length(webhook: &str) -> String {
    format!("intermission_webhook_queue_length{{webhook=\"{webhook}\"}}")
}

/// Maintenance switched on and off 20 times within a second, while the receiver holds the
/// first delivery: every change is told, none coalesced, in the order it happened, once the
/// receiver takes them; meanwhile the queue metric shows them all waiting.
#[tokio::test(flavor = "multi_thread")]
async fn fast_toggling_is_told_change_by_change_in_order() {
    let app = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let (open, gate) = tokio::sync::watch::channel(false);
    let slow = gated_receiver(gate).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[notify]]\nurl = \"{}\"\n",
        app.url(),
        slow.url
    ))
    .await;
    let began = Instant::now();
    for i in 0..20 {
        assert!(ctl(&proxy, on(Some(&format!("m{i}")))).await.ok);
        assert!(ctl(&proxy, Ctl::Off).await.ok);
    }
    eprintln!("40 changes in {:?}", began.elapsed());
    assert_eq!(
        series_reaches(&proxy, &queue_length("0"), 40.0).await,
        Some(40.0)
    );
    assert!(slow.got.lock().unwrap().is_empty());
    open.send_replace(true);
    let got = wait_events(&slow, 40).await;
    let told: Vec<(String, String)> = got
        .iter()
        .map(|e| {
            assert_eq!(e["event"], "mode_changed", "{e}");
            let mode = e["mode"].as_str().unwrap().to_owned();
            (mode, e["message"].as_str().unwrap_or("").to_owned())
        })
        .collect();
    // A return to normal carries no message.
    let want: Vec<(String, String)> = (0..20)
        .flat_map(|i| {
            [
                ("maintenance".to_owned(), format!("m{i}")),
                ("normal".to_owned(), String::new()),
            ]
        })
        .collect();
    assert_eq!(told, want);
    assert_eq!(
        series_reaches(&proxy, &queue_length("0"), 0.0).await,
        Some(0.0)
    );
    assert_eq!(
        series(&proxy, &deliveries("0", "delivered")).await,
        Some(40.0)
    );
}

/// With several webhooks, the metrics say which one fails and how much each holds: each is
/// labelled by its `name`, else its index; a reload that removes one removes its series, and
/// those it keeps keep their counts.
#[tokio::test(flavor = "multi_thread")]
async fn webhook_metrics_tell_each_webhook_apart_and_follow_reloads() {
    let app = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let fine = receiver(Arc::new(AtomicBool::new(false)), false).await;
    let dead = refusing();
    let (open, gate) = tokio::sync::watch::channel(false);
    let slow = gated_receiver(gate).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[notify]]\nname = \"alerts\"\nurl = \"{}\"\n\
         [[notify]]\nurl = \"http://{}/hook\"\n\
         [[notify]]\nname = \"status-page\"\nurl = \"{}\"\ntimeout = \"60s\"\n",
        app.url(),
        fine.url,
        dead.addr,
        slow.url
    ))
    .await;
    // Shown from the start, at zero, under their labels.
    for webhook in ["alerts", "1", "status-page"] {
        assert_eq!(
            series(&proxy, &deliveries(webhook, "failed")).await,
            Some(0.0)
        );
        assert_eq!(series(&proxy, &queue_length(webhook)).await, Some(0.0));
    }
    assert!(ctl(&proxy, on(Some("Database upgrade"))).await.ok);
    for message in ["Halfway there", "Nearly done"] {
        let update = Ctl::Update {
            message: message.into(),
        };
        assert!(ctl(&proxy, update).await.ok);
    }
    assert_eq!(
        series_reaches(&proxy, &deliveries("alerts", "delivered"), 3.0).await,
        Some(3.0)
    );
    assert_eq!(
        series_reaches(&proxy, &queue_length("alerts"), 0.0).await,
        Some(0.0)
    );
    // The one that hangs holds all three, the one being tried included.
    assert_eq!(
        series_reaches(&proxy, &queue_length("status-page"), 3.0).await,
        Some(3.0)
    );
    // The one that refuses connections is being tried again: nothing delivered, all held.
    assert_eq!(
        series_reaches(&proxy, &queue_length("1"), 3.0).await,
        Some(3.0)
    );
    assert_eq!(
        series(&proxy, &deliveries("1", "delivered")).await,
        Some(0.0)
    );
    assert_eq!(
        series(&proxy, &deliveries("status-page", "delivered")).await,
        Some(0.0)
    );
    open.send_replace(true);
    assert_eq!(
        series_reaches(&proxy, &deliveries("status-page", "delivered"), 3.0).await,
        Some(3.0)
    );
    assert_eq!(
        series_reaches(&proxy, &queue_length("status-page"), 0.0).await,
        Some(0.0)
    );
    assert_eq!(wait_events(&slow, 3).await.len(), 3);

    let lost = "intermission_webhook_removed_dropped_total";
    assert_eq!(
        series(&proxy, lost).await,
        Some(0.0),
        "shown from the start"
    );
    // The dead one removed: its series go; the others keep their counts. What it had not
    // delivered (two queued, one between two tries) is counted apart, not lost with them.
    let dead_entry = format!("[[notify]]\nurl = \"http://{}/hook\"\n", dead.addr);
    edit_config(&proxy, |text| text.replace(&dead_entry, ""));
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    let admin = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let text =
        String::from_utf8_lossy(get(&format!("http://{admin}/metrics")).await.body()).into_owned();
    let removed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("webhook=\"1\""))
        .collect();
    assert!(removed.is_empty(), "{removed:?}");
    assert_eq!(series_reaches(&proxy, lost, 3.0).await, Some(3.0));
    assert_eq!(
        series(&proxy, &deliveries("alerts", "delivered")).await,
        Some(3.0)
    );
    assert_eq!(
        series(&proxy, &deliveries("status-page", "delivered")).await,
        Some(3.0)
    );
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    assert_eq!(
        series_reaches(&proxy, &deliveries("alerts", "delivered"), 4.0).await,
        Some(4.0)
    );
    assert_eq!(
        series_reaches(&proxy, &deliveries("status-page", "delivered"), 4.0).await,
        Some(4.0)
    );
    assert_eq!(series(&proxy, &queue_length("1")).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_webhook_slows_nothing_down() {
    let app = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let hanging = receiver(Arc::new(AtomicBool::new(false)), true).await;
    let failing = receiver(Arc::new(AtomicBool::new(true)), false).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[[notify]]\nurl = \"{}\"\ntimeout = \"30s\"\n[[notify]]\nurl = \"{}\"\n",
        app.url(),
        hanging.url,
        failing.url
    ))
    .await;
    let start = Instant::now();
    for i in 0..20 {
        let r = ctl(
            &proxy,
            Ctl::On {
                message: Some(format!("message {i}")),
                until: None,
                retry_after: None,
                reason: None,
            },
        )
        .await;
        assert!(r.ok);
        assert_eq!(get(&proxy.url("/")).await.status(), 503);
    }
    // Generous for a shared machine, and far below one delivery timeout (30 s) or the retries.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "control and held answers waited on webhooks: {:?}",
        start.elapsed()
    );
}

/// A new end is told when the end clients are shown changes while maintenance stays on, and
/// only then: not for the `on` that starts maintenance with one, not for the same end given
/// again; and when an operator's end takes over a window's.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_end_is_told_when_the_end_shown_changes() {
    let (_app, hook, proxy) = hooked_proxy().await;
    let at = |secs: u64| {
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(secs))
            .to_string()
    };
    let on_until = |until: String| Ctl::On {
        message: None,
        until: Some(until),
        retry_after: None,
        reason: None,
    };
    let (first, later) = (at(3600), at(7200));
    assert!(ctl(&proxy, on_until(first.clone())).await.ok);
    assert!(ctl(&proxy, on_until(first)).await.ok, "the same end again");
    assert!(ctl(&proxy, on_until(later.clone())).await.ok);
    assert!(ctl(&proxy, on_until(String::new())).await.ok, "taken back");
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    let r = ctl(
        &proxy,
        Ctl::ScheduleAdd {
            start: "+0s".into(),
            end: "+1h".into(),
            message: None,
        },
    )
    .await;
    assert!(r.ok, "{r:?}");
    let taken_over = at(5400);
    assert!(ctl(&proxy, on_until(taken_over.clone())).await.ok);
    let got = wait_events(&hook, 6).await;
    let kinds: Vec<&str> = got.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "mode_changed",
            "until_changed",
            "until_changed",
            "mode_changed",
            "schedule_started",
            "until_changed"
        ],
        "{got:#?}"
    );
    assert_eq!(got[1]["until"], later.as_str());
    assert_eq!(got[2]["until"], serde_json::Value::Null, "{:#?}", got[2]);
    assert_eq!(got[5]["until"], taken_over.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn schedule_windows_tell_when_they_start_and_end() {
    let (_app, hook, proxy) = hooked_proxy().await;
    // A window that starts at once, and ends a second later.
    let r = ctl(
        &proxy,
        Ctl::ScheduleAdd {
            start: "+0s".into(),
            end: "+1s".into(),
            message: Some("Short window".into()),
        },
    )
    .await;
    assert!(r.ok, "{r:?}");
    let got = wait_events(&hook, 2).await;
    let kinds: Vec<&str> = got.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["schedule_started", "schedule_ended"]);
    // Both name the window, by the id `schedule list` shows (a fresh state's first is 1).
    assert_eq!(
        (got[0]["window"].as_u64(), got[1]["window"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(got[0]["mode"], "maintenance");
    assert_eq!(got[0]["message"], "Short window");
    assert_eq!(got[1]["mode"], "normal");
}

/// `off` during a window is maintenance off (SPEC §1 "planned maintenance off"; §3 a window
/// is planned maintenance): the window does not take over again with its own end as a new
/// pending one, told by no `until_changed`; it ends, told as the operator's doing, traffic
/// flows again, and the windows after it stay scheduled.
#[tokio::test(flavor = "multi_thread")]
async fn off_during_a_window_ends_maintenance_and_the_window() {
    let (_app, hook, proxy) = hooked_proxy().await;
    let add = |start: &str, end: &str| Ctl::ScheduleAdd {
        start: start.into(),
        end: end.into(),
        message: Some("Window words".into()),
    };
    assert!(ctl(&proxy, add("+0s", "+1h")).await.ok);
    assert!(ctl(&proxy, add("+2h", "+3h")).await.ok);
    let r = ctl(
        &proxy,
        Ctl::On {
            message: Some("Taking longer".into()),
            until: Some("+90m".into()),
            retry_after: None,
            reason: None,
        },
    )
    .await;
    assert!(r.ok, "{r:?}");
    let r = ctl(&proxy, Ctl::Off).await;
    assert!(r.ok, "{r:?}");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("maintenance window 1")),
        "{r:?}"
    );
    let state = r.state.unwrap();
    assert_eq!(state.mode.as_str(), "normal", "{state:?}");
    assert!(state.until.is_none(), "{state:?}");
    assert_eq!(get(&proxy.url("/")).await.body(), "app");
    let left: Vec<u64> = state.schedules.iter().map(|w| w.id).collect();
    assert_eq!(left, [2], "the later window stays");
    let got = wait_events(&hook, 4).await;
    let kinds: Vec<&str> = got.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "schedule_started",
            "message_updated",
            "until_changed",
            "schedule_ended"
        ],
        "{got:#?}"
    );
    let ended = &got[3];
    assert_eq!(ended["window"], 1, "{ended}");
    assert_eq!(ended["mode"], "normal", "{ended}");
    assert_eq!(ended["previous_mode"], "maintenance", "{ended}");
    assert!(ended["by"].is_string(), "the operator's doing: {ended}");
    assert_eq!(ended["reason"], "maintenance off", "{ended}");
}

/// Windows put end to end are one maintenance: its `since` stays the first window's start
/// across the edge, in `status`, the held answers and every event (each window's start and end
/// is still told), its `until` is the last one's end from the moment that one is added (told
/// as a new end, `until_changed`), and the all-clear counts the whole of it.
#[tokio::test(flavor = "multi_thread")]
async fn windows_end_to_end_keep_one_since() {
    let (_app, hook, proxy) = hooked_proxy().await;
    let add = |start: &str, end: &str| Ctl::ScheduleAdd {
        start: start.into(),
        end: end.into(),
        message: None,
    };
    // Long enough that the second is added before the first ends, on a busy machine too.
    let r = ctl(&proxy, add("+0s", "+3s")).await;
    assert!(r.ok, "{r:?}");
    let first = r.state.unwrap().schedules.remove(0);
    let since = first.start.rfc3339();
    let r = ctl(&proxy, add(&first.end.rfc3339(), "+1h")).await;
    assert!(r.ok, "{r:?}");
    let second = r.window.unwrap();
    let until = second.end.rfc3339();
    // Added while the first holds: its end is the maintenance's end at once.
    let shown = r.state.unwrap();
    assert_eq!(shown.until.map(|t| t.rfc3339()), Some(until.clone()));
    let got = wait_events(&hook, 4).await;
    let told: Vec<(&str, Option<u64>)> = got
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), e["window"].as_u64()))
        .collect();
    assert_eq!(
        told,
        [
            ("schedule_started", Some(1)),
            ("until_changed", None),
            ("schedule_ended", Some(1)),
            ("schedule_started", Some(2))
        ],
        "{got:#?}"
    );
    for e in &got {
        assert_eq!(e["mode"], "maintenance", "{e}");
        assert_eq!(e["since"], since.as_str(), "{e}");
    }
    for e in &got[1..] {
        assert_eq!(e["until"], until.as_str(), "{e}");
    }
    let status = ctl(&proxy, Ctl::Status).await.state.unwrap();
    assert_eq!(status.since.map(|t| t.rfc3339()), Some(since.clone()));
    let held: serde_json::Value = json(&get(&proxy.url("/")).await);
    assert_eq!(held["since"], since.as_str(), "{held}");
    // An operator's `on` during the second window carries the same maintenance on.
    assert!(ctl(&proxy, on(Some("Longer"))).await.ok);
    let status = ctl(&proxy, Ctl::Status).await.state.unwrap();
    assert_eq!(status.since.map(|t| t.rfc3339()), Some(since.clone()));
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    // The `on` is told as one or two events (its message, and the end shown, taken back),
    // so the one back to normal is waited for by what it says, not by a count.
    let back_to_normal = || events(&hook).into_iter().find(|e| e["mode"] == "normal");
    assert!(wait_until(Duration::from_secs(10), || back_to_normal().is_some()).await);
    let back = back_to_normal().unwrap();
    assert_eq!(back["since"], since.as_str(), "{back}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_removed_by_reload_leaves_the_metrics() {
    let a = upstream(|_req: Request<Incoming>| async { Response::new(full("a")) }).await;
    let b = upstream(|_req: Request<Incoming>| async { Response::new(full("b")) }).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        a.url()
    ))
    .await;
    let has = |m: &HashMap<String, f64>, url: &str| {
        m.keys().any(|k| k.contains(&format!("server=\"{url}\"")))
    };
    assert!(has(&scrape(&proxy).await, &a.url()));
    edit_config(&proxy, |text| text.replace(&a.url(), &b.url()));
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    let m = scrape(&proxy).await;
    assert!(!has(&m, &a.url()), "the removed server is still reported");
    assert!(has(&m, &b.url()));
}

/// A server that hangs on one page while its health check answers: the requests that time
/// out on it and are sent again to the other server reach their clients whole, over HTTP/1.1
/// (the relay) and HTTP/2 (hyper) alike, so only the metrics can show them, by server and
/// reason, from zero. A `POST`, never sent twice, gets the outage answer, counted the same.
#[tokio::test(flavor = "multi_thread")]
async fn failures_on_a_server_are_counted_whether_retried_or_not() {
    let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = arrived.clone();
    let hangs = upstream(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            if req.uri().path() == "/page" {
                seen.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            Response::new(full("hangs"))
        }
    })
    .await;
    let answers = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\", \"{}\"]\nresponse_timeout = \"200ms\"\n\
         [health]\ninterval = \"1h\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        hangs.url(),
        answers.url()
    ))
    .await;
    let failures = |m: &HashMap<String, f64>, up: &Upstream, reason: &str| {
        let server = format!("server=\"{}\"", up.url());
        let reason = format!("reason=\"{reason}\"");
        find(
            m,
            "intermission_upstream_failures_total",
            &[&server, &reason],
        )
    };
    let retries = |m: &HashMap<String, f64>, up: &Upstream| {
        let server = format!("server=\"{}\"", up.url());
        find(m, "intermission_upstream_retries_total", &[&server])
    };
    let m = scrape(&proxy).await;
    for up in [&hangs, &answers] {
        for reason in ["connect", "timeout", "error"] {
            assert_eq!(failures(&m, up, reason), 0.0, "{reason}");
        }
        assert_eq!(retries(&m, up), 0.0);
    }

    for _ in 0..4 {
        assert_eq!(get(&proxy.url("/page")).await.body(), "app");
        let resp = h2c_client()
            .request(Request::get(proxy.url("/page")).body(empty()).unwrap())
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "app");
    }
    let timed_out = arrived.load(Ordering::SeqCst);
    assert!(
        timed_out >= 2,
        "round-robin sent none to the hanging server"
    );
    let m = scrape(&proxy).await;
    assert_eq!(failures(&m, &hangs, "timeout"), timed_out as f64);
    assert_eq!(retries(&m, &hangs), timed_out as f64);
    assert_eq!(failures(&m, &hangs, "connect"), 0.0);
    assert_eq!(failures(&m, &answers, "timeout"), 0.0);
    assert_eq!(retries(&m, &answers), 0.0);

    // Round-robin: one of two lands on the hanging server.
    let mut posts = 0;
    while arrived.load(Ordering::SeqCst) == timed_out && posts < 4 {
        let post = Request::post(proxy.url("/page")).body(full("x")).unwrap();
        let status = send(post).await.status();
        assert!(status == 200 || status == 503, "{status}");
        posts += 1;
    }
    assert_eq!(arrived.load(Ordering::SeqCst), timed_out + 1);
    let m = scrape(&proxy).await;
    assert_eq!(failures(&m, &hangs, "timeout"), (timed_out + 1) as f64);
    assert_eq!(
        retries(&m, &hangs),
        timed_out as f64,
        "a POST is not sent twice"
    );
}

/// An upstream whose `/slow` requests, counted as they arrive, are answered "done" once the
/// sender says `true`; anything else (health checks) at once.
async fn slow_upstream() -> (
    Upstream,
    tokio::sync::watch::Sender<bool>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = arrived.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let mut release = release_rx.clone();
        let seen = seen.clone();
        async move {
            if req.uri().path() == "/slow" {
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = release.wait_for(|r| *r).await;
            }
            Response::new(full("done"))
        }
    })
    .await;
    (up, release_tx, arrived)
}

#[tokio::test(flavor = "multi_thread")]
async fn during_a_drain_readyz_says_not_ready_and_new_connections_are_refused() {
    let (up, release_tx, arrived) = slow_upstream().await;
    let mut proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        up.url()
    ))
    .await;
    let admin = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let readyz = format!("http://{admin}/readyz");
    assert_eq!(get(&readyz).await.status(), 200);

    let url = proxy.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    assert!(
        wait_until(Duration::from_secs(5), || arrived.load(Ordering::SeqCst)
            == 1)
        .await,
        "the slow request never reached the upstream"
    );
    let running = proxy.running.take().unwrap();
    let shutdown = tokio::spawn(running.shutdown());

    let mut said = None;
    for _ in 0..250 {
        let resp = get(&readyz).await;
        if resp.status() == 503 {
            said = Some(resp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let said = said.expect("readyz never said not ready during the drain");
    assert_eq!(said.body(), "not ready");
    if let Ok(s) = tokio::net::TcpStream::connect(proxy.addr).await {
        panic!(
            "a new connection was accepted during the drain: {:?} -> {:?}",
            s.local_addr(),
            s.peer_addr()
        );
    }
    assert!(!shutdown.is_finished(), "the drain waits for the request");

    release_tx.send_replace(true);
    let resp = in_flight.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.body(), "done");
    assert!(shutdown.await.unwrap(), "every connection finished in time");
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err(),
        "the admin listener closes last"
    );
}

/// Connections take turns on the workers: a drain must wait for the requests on every one of
/// them, not only on the thread that runs the shutdown.
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_waits_for_requests_on_every_worker() {
    let (up, release_tx, arrived) = slow_upstream().await;
    let mut proxy = spawn_proxy(&format!(
        "[proxy]\nthreads = 2\n[upstream]\nservers = [\"{}\"]\n",
        up.url()
    ))
    .await;
    // Four connections, one request each: two on each worker.
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let url = proxy.url("/slow");
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), || arrived.load(Ordering::SeqCst)
            == 4)
        .await,
        "the requests never all reached the upstream"
    );
    let running = proxy.running.take().unwrap();
    let shutdown = tokio::spawn(running.shutdown());
    // The steps of a shutdown before its drain show nothing a test can wait on; 200 ms gives
    // them room. Had the second worker's runtime ended with the listeners (as it once did),
    // its requests would be cut off by then, and the drain over.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!shutdown.is_finished(), "the drain waits for every request");
    release_tx.send_replace(true);
    for request in in_flight {
        let resp = request.await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.body(), "done");
    }
    assert!(shutdown.await.unwrap(), "every connection finished in time");
}

/// The workers are started once: a reload that asks for another number keeps the running one
/// (and says so), since the pools are sized by it. So is the admin listener.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_keeps_the_number_of_threads_and_the_admin_listener() {
    let up = upstream(|_req: Request<Incoming>| async { Response::new(full("a")) }).await;
    let proxy = spawn_proxy(&format!(
        "[proxy]\nthreads = 2\n[upstream]\nservers = [\"{}\"]\n[maintenance]\nmessage = \"one\"\n[admin]\nlisten = \"127.0.0.2:0\"\n",
        up.url()
    ))
    .await;
    edit_config(&proxy, |text| {
        text.replace("threads = 2", "threads = 3")
            .replace("message = \"one\"", "message = \"two\"")
            .replace("127.0.0.2:0", "127.0.0.3:0")
    });
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    let config = &proxy.running.as_ref().unwrap().state().load().config;
    assert_eq!(config.maintenance.message, "two", "the reload was applied");
    assert_eq!(
        config.proxy.threads, 2,
        "the running number of threads stays"
    );
    assert_eq!(
        config.admin.listen,
        Some("127.0.0.2:0".parse().unwrap()),
        "the running admin listener stays"
    );
    for _ in 0..4 {
        assert_eq!(get(&proxy.url("/")).await.body(), "a");
    }
}

/// Waits (bounded) until the wall clock has passed `t`.
async fn until_past(t: std::time::SystemTime) {
    for _ in 0..7000 {
        if std::time::SystemTime::now() > t {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the clock never passed {t:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn what_happened_while_the_proxy_was_down_is_told_at_start() {
    let app = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let hook = receiver(Arc::new(AtomicBool::new(false)), false).await;
    let config = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[upstream]\nservers = [\"{}\"]\n[[notify]]\nurl = \"{}\"\n",
        app.url(),
        hook.url
    );
    // Stops the proxy, waits until `t` has passed, and starts it again on the same state.
    let down_until = |mut proxy: Proxy, t: std::time::SystemTime| {
        let config = config.clone();
        async move {
            assert!(proxy.running.take().unwrap().shutdown().await);
            until_past(t).await;
            spawn_proxy_in(proxy.dir, &config).await
        }
    };
    let proxy = spawn_proxy_in(tempfile::tempdir().unwrap(), &config).await;

    // A window that ends while the proxy is down.
    let r = ctl(
        &proxy,
        Ctl::ScheduleAdd {
            start: "+0s".into(),
            end: "+1s".into(),
            message: None,
        },
    )
    .await;
    let window = r.state.unwrap();
    let (start, end) = (window.since.unwrap(), window.until.unwrap().0);
    assert_eq!(wait_events(&hook, 1).await[0]["event"], "schedule_started");
    let proxy = down_until(proxy, end).await;
    let got = wait_events(&hook, 2).await;
    assert_eq!(got[1]["event"], "schedule_ended", "{got:?}");
    assert_eq!(got[1]["window"], 1, "{got:?}");
    assert_eq!(got[1]["mode"], "normal");
    assert_eq!(got[1]["previous_mode"], "maintenance", "the window held it");
    // As the running proxy would have told it at the end: when the window began and ended,
    // not `null` and the time of the restart.
    assert_eq!(got[1]["since"], start.rfc3339(), "{got:?}");
    assert_eq!(
        got[1]["at"],
        intermission::time::Timestamp(end).rfc3339(),
        "{got:?}"
    );
    assert!(
        got[1]["until"].is_null() && got[1]["message"].is_null(),
        "{got:?}"
    );
    assert_eq!(proxy_mode(&proxy).await, "normal");

    // An announced end that passes while the proxy is down: a whole minute, which overruns
    // at that very time (within a minute: a test that waits).
    let (_, end) = whole_minute_ahead(Duration::from_secs(1));
    let r = ctl(
        &proxy,
        Ctl::On {
            message: Some("upgrade".into()),
            until: Some(end),
            retry_after: None,
            reason: None,
        },
    )
    .await;
    let until = r.state.unwrap().until.unwrap().0;
    assert_eq!(wait_events(&hook, 3).await[2]["event"], "mode_changed");
    let proxy = down_until(proxy, until).await;
    let got = wait_events(&hook, 4).await;
    assert_eq!(got[3]["event"], "until_overrun", "{got:?}");
    assert!(got[3]["window"].is_null(), "{got:?}");
    assert_eq!(got[3]["mode"], "maintenance");
    assert_eq!(proxy_mode(&proxy).await, "maintenance");

    // A window that starts while the proxy is down took over from `normal`, not from the
    // mode the start publishes (its own).
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    assert_eq!(wait_events(&hook, 5).await[4]["mode"], "normal");
    let r = ctl(
        &proxy,
        Ctl::ScheduleAdd {
            start: "+1s".into(),
            end: "+10m".into(),
            message: None,
        },
    )
    .await;
    assert!(r.ok, "{r:?}");
    let start = std::time::SystemTime::now() + Duration::from_secs(1);
    let proxy = down_until(proxy, start).await;
    let got = wait_events(&hook, 6).await;
    assert_eq!(got[5]["event"], "schedule_started", "{got:?}");
    assert_eq!(got[5]["mode"], "maintenance");
    assert_eq!(got[5]["previous_mode"], "normal");
    assert_eq!(proxy_mode(&proxy).await, "maintenance");

    // An `on` given during the window was not in force before it: told again after a
    // restart, the window still took over from `normal`.
    assert!(ctl(&proxy, on(Some("Longer than planned"))).await.ok);
    let told = events(&hook).len();
    let proxy = down_until(proxy, std::time::SystemTime::now()).await;
    let mut again = None;
    for _ in 0..500 {
        again = events(&hook)[told..]
            .iter()
            .find(|e| e["event"] == "schedule_started")
            .cloned();
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = again.expect("the window in force was not told again at start");
    assert_eq!(again["previous_mode"], "normal", "{again}");
    drop(proxy);
}

/// An application, a JSON and a Slack receiver, and a proxy in front of them whose config
/// (`restartable`) a test may start again in the proxy's folder.
async fn restartable_proxy() -> (Upstream, Receiver, Receiver, String, Proxy) {
    let app = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let hook = receiver(Arc::new(AtomicBool::new(false)), false).await;
    let slack = receiver(Arc::new(AtomicBool::new(false)), false).await;
    let config = restartable(&app, &hook, &slack);
    let proxy = spawn_proxy_in(tempfile::tempdir().unwrap(), &config).await;
    (app, hook, slack, config, proxy)
}

/// A proxy for `app` whose checks decide within a second, with a JSON and a Slack webhook,
/// and what restarts it on the same state file once the wall clock has passed `t`.
fn restartable(app: &Upstream, json: &Receiver, slack: &Receiver) -> String {
    format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[upstream]\nservers = [\"{}\"]\n\
         [health]\ninterval = \"300ms\"\ntimeout = \"300ms\"\nrise = 1\nfall = 1\n\
         [[notify]]\nurl = \"{}\"\n[[notify]]\nurl = \"{}\"\nformat = \"slack\"\n",
        app.url(),
        json.url,
        slack.url
    )
}

/// The outage told by the first webhook event, with `since` as `ctl status`, the public
/// status document and the state file say it: saved when it is told, so that a kill -9
/// leaves it as a clean stop does.
async fn outage_told(proxy: &Proxy, hook: &Receiver) -> serde_json::Value {
    let got = wait_events(hook, 1).await;
    assert_eq!(got[0]["event"], "mode_changed", "{got:?}");
    assert_eq!(got[0]["mode"], "outage", "{got:?}");
    assert_eq!(got[0]["previous_mode"], "normal", "{got:?}");
    let since = got[0]["since"].clone();
    assert!(since.is_string(), "{got:?}");
    let status = ctl(proxy, Ctl::Status).await.state.unwrap();
    assert_eq!(
        status.since.map(|t| t.rfc3339()),
        since.as_str().map(str::to_owned)
    );
    let saved = std::fs::read(proxy.dir.path().join("intermission-state.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    assert_eq!(saved["outage_since"], since, "{saved}");
    since
}

/// An outage a reload brings about (the one healthy server taken off the list, the others
/// known to be down) has a start like any other: `since` in the event that tells it, in
/// `ctl status` and in the state file, so that the return to normal says how long it lasted
/// and a restart tells it again as the same outage. It had none, everywhere.
#[tokio::test(flavor = "multi_thread")]
async fn an_outage_a_reload_brings_about_has_a_start() {
    let live = upstream(|_req: Request<Incoming>| async { Response::new(full("live")) }).await;
    let dead = upstream(|_req: Request<Incoming>| async { Response::new(full("dead")) }).await;
    dead.stopped().await;
    let hook = receiver(Arc::new(AtomicBool::new(false)), false).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\", \"{}\"]\n\
         [health]\ninterval = \"300ms\"\ntimeout = \"300ms\"\nrise = 1\nfall = 1\n\
         [[notify]]\nurl = \"{}\"\n",
        live.url(),
        dead.url(),
        hook.url
    ))
    .await;
    assert!(
        wait_until_async(|| async {
            ctl(&proxy, Ctl::Health).await.health.unwrap()[1].healthy == Some(false)
        })
        .await
    );
    assert_eq!(proxy_mode(&proxy).await, "normal");
    edit_config(&proxy, |text| {
        text.replace(&format!("\"{}\", ", live.url()), "")
    });
    let r = ctl(&proxy, Ctl::Reload).await;
    assert_eq!(
        r.state.map(|s| s.mode.as_str().to_owned()).as_deref(),
        Some("outage")
    );
    let since = outage_told(&proxy, &hook).await;
    let reason = events(&hook)[0]["reason"].as_str().unwrap().to_owned();
    let why = format!(
        "config reloaded; no upstream server is healthy ({}: ",
        dead.url()
    );
    assert!(reason.starts_with(&why), "{reason}");
    let held: serde_json::Value = json(&get(&proxy.url("/")).await);
    assert_eq!(held["since"], since, "{held}");

    dead.restart().await;
    let got = wait_events(&hook, 2).await;
    assert_eq!(got[1]["mode"], "normal", "{got:?}");
    assert_eq!(got[1]["since"], since, "how long it lasted: {got:?}");
}

/// Stops the proxy once the clock is past a second after now (so that a `since` of the
/// restart would read another second than one of the outage), and starts it again on the
/// same state file.
async fn restart_a_second_later(mut proxy: Proxy, config: &str) -> Proxy {
    let later = std::time::SystemTime::now() + Duration::from_secs(1);
    assert!(proxy.running.take().unwrap().shutdown().await);
    until_past(later).await;
    spawn_proxy_in(proxy.dir, config).await
}

/// Restarted while the application is still down, the proxy tells the same outage: `since`
/// is when it began, in `status`, the public JSON and the event it tells again (as it tells
/// a window in force again), not the time of the restart, which read as a second outage.
#[tokio::test(flavor = "multi_thread")]
async fn an_outage_that_goes_on_across_a_restart_keeps_its_start() {
    let (app, hook, _slack, config, proxy) = restartable_proxy().await;
    app.stop();
    let since = outage_told(&proxy, &hook).await;

    let proxy = restart_a_second_later(proxy, &config).await;
    wait_mode(&proxy, "outage", Duration::from_secs(5)).await;
    let status = ctl(&proxy, Ctl::Status).await.state.unwrap();
    assert_eq!(
        status.since.map(|t| t.rfc3339()),
        since.as_str().map(str::to_owned)
    );
    let public: serde_json::Value = json(&get(&proxy.url("/_intermission/status")).await);
    assert_eq!(public["since"], since, "{public}");
    let held: serde_json::Value = json(&get(&proxy.url("/")).await);
    assert_eq!(held["since"], since, "{held}");
    let got = wait_events(&hook, 2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1]["event"], "mode_changed", "{got:?}");
    assert_eq!(got[1]["mode"], "outage", "{got:?}");
    assert_eq!(got[1]["previous_mode"], "normal", "as first told: {got:?}");
    assert_eq!(
        got[1]["since"], since,
        "the outage's start, not the restart's"
    );

    // Once it is over, the next outage is a new one.
    app.restart().await;
    let got = wait_events(&hook, 3).await;
    assert_eq!(got[2]["mode"], "normal", "{got:?}");
    assert_eq!(got[2]["since"], since, "{got:?}");
    app.stop();
    let got = wait_events(&hook, 4).await;
    assert_eq!(got[3]["mode"], "outage", "{got:?}");
    assert_ne!(got[3]["since"], since, "{got:?}");
    drop(proxy);
}

/// Restarted once the application is back, the proxy tells the end of the outage the
/// previous instance told (which nothing else would ever tell, leaving alerting and status
/// pages on `outage`), with `since` its start, so that the Slack sentence says how long it
/// lasted; the state file forgets it.
#[tokio::test(flavor = "multi_thread")]
async fn an_outage_that_ended_across_a_restart_is_told_over() {
    let (app, hook, slack, config, proxy) = restartable_proxy().await;
    app.stop();
    let since = outage_told(&proxy, &hook).await;
    assert_eq!(wait_events(&slack, 1).await.len(), 1);

    app.restart().await;
    let proxy = restart_a_second_later(proxy, &config).await;
    let got = wait_events(&hook, 2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1]["event"], "mode_changed", "{got:?}");
    assert_eq!(got[1]["mode"], "normal", "{got:?}");
    assert_eq!(got[1]["previous_mode"], "outage", "{got:?}");
    assert_eq!(got[1]["since"], since, "{got:?}");
    let reason = got[1]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&app.url()), "{got:?}");
    let text = wait_events(&slack, 2).await[1]["text"].clone();
    let text = text.as_str().unwrap_or_default();
    // How long it lasted, from its start: " of 1 s" (or 2), where no start said nothing.
    assert!(
        text.contains("is back to normal after an outage of ") && !text.contains(" of 0 s"),
        "{text}"
    );
    let status = ctl(&proxy, Ctl::Status).await.state.unwrap();
    assert_eq!(status.mode.as_str(), "normal");
    assert!(status.since.is_none(), "{status:?}");
    let saved = std::fs::read(proxy.dir.path().join("intermission-state.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    assert!(saved["outage_since"].is_null(), "{saved}");

    // Told once: a restart after it has nothing to tell.
    let proxy = restart_a_second_later(proxy, &config).await;
    assert!(health_shows(&proxy, true).await);
    assert_eq!(events(&hook).len(), 2, "{:?}", events(&hook));
    drop(proxy);
}

/// Maintenance switched on during an outage wins over it, and is what receivers were told
/// last: a restart, the application still down, tells nothing new, and the outage `off` then
/// shows began when the application went down, as it would have without the restart. Once it
/// is back, the end of an outage receivers no longer believe in is not told.
#[tokio::test(flavor = "multi_thread")]
async fn maintenance_over_an_outage_across_a_restart_keeps_the_outages_start() {
    let (app, hook, _slack, config, proxy) = restartable_proxy().await;
    app.stop();
    let since = outage_told(&proxy, &hook).await;
    assert!(ctl(&proxy, on(Some("Restoring the database"))).await.ok);
    assert_eq!(wait_events(&hook, 2).await[1]["mode"], "maintenance");

    let proxy = restart_a_second_later(proxy, &config).await;
    assert!(health_shows(&proxy, false).await);
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    let got = wait_events(&hook, 3).await;
    assert_eq!(got.len(), 3, "nothing told at the restart: {got:?}");
    assert_eq!(got[2]["mode"], "outage", "{got:?}");
    assert_eq!(got[2]["previous_mode"], "maintenance", "{got:?}");
    assert_eq!(got[2]["since"], since, "{got:?}");

    // Maintenance again, and the application back while the proxy is down.
    assert!(ctl(&proxy, on(Some("Restoring the database"))).await.ok);
    assert_eq!(wait_events(&hook, 4).await[3]["mode"], "maintenance");
    app.restart().await;
    let proxy = restart_a_second_later(proxy, &config).await;
    assert!(health_shows(&proxy, true).await);
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    let got = wait_events(&hook, 5).await;
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(got[4]["mode"], "normal", "{got:?}");
    assert_eq!(got[4]["previous_mode"], "maintenance", "{got:?}");
    drop(proxy);
}

/// A restartable proxy whose application is down, its outage told, and a window from
/// `start` to `end` added: the application, its JSON webhook, config, the proxy and the
/// window's times.
async fn a_window_in_an_outage(
    start: &str,
    end: &str,
) -> (
    Upstream,
    Receiver,
    String,
    Proxy,
    (std::time::SystemTime, std::time::SystemTime),
) {
    let (app, hook, _slack, config, proxy) = restartable_proxy().await;
    app.stop();
    outage_told(&proxy, &hook).await;
    let r = ctl(
        &proxy,
        Ctl::ScheduleAdd {
            start: start.into(),
            end: end.into(),
            message: None,
        },
    )
    .await;
    assert!(r.ok, "{r:?}");
    let window = r.state.unwrap().next_window.unwrap();
    (app, hook, config, proxy, (window.start.0, window.end.0))
}

/// A window that begins while the proxy is down during an outage took over from `outage`,
/// as a running proxy would have told it: the start tells it so, not from the `normal` of
/// servers counted healthy until their first checks.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_that_began_during_an_outage_while_down_took_over_from_it() {
    let (_app, hook, config, proxy, (start, _)) = a_window_in_an_outage("+4s", "+1h").await;
    let mut proxy = proxy;
    assert!(proxy.running.take().unwrap().shutdown().await);
    // The window began while the proxy was down, not before its stop: else the restart's
    // path would go untested.
    assert_eq!(events(&hook).len(), 1, "{:#?}", events(&hook));
    until_past(start).await;
    let proxy = spawn_proxy_in(proxy.dir, &config).await;
    let got = wait_events(&hook, 2).await;
    assert_eq!(got[1]["event"], "schedule_started", "{got:#?}");
    assert_eq!(got[1]["previous_mode"], "outage", "{got:#?}");
    drop(proxy);
}

/// A window that ended while the proxy was down, in an outage going on since before the stop,
/// is told as ending in that outage, not in a return to normal: at the restart the servers
/// count healthy until their first checks, and what held at the window's end was the outage
/// the state file kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_that_ended_while_down_during_an_outage_ends_in_it() {
    for back in [false, true] {
        let (app, hook, config, proxy, (_, end)) = a_window_in_an_outage("+1s", "+3s").await;
        let got = wait_events(&hook, 2).await;
        assert_eq!(got[1]["event"], "schedule_started", "{got:#?}");
        let mut proxy = proxy;
        assert!(proxy.running.take().unwrap().shutdown().await);
        // The window ended while the proxy was down, not before its stop.
        assert_eq!(events(&hook).len(), 2, "{:#?}", events(&hook));
        until_past(end).await;
        if back {
            app.restart().await;
        }
        let proxy = spawn_proxy_in(proxy.dir, &config).await;
        let got = wait_events(&hook, 4).await;
        assert_eq!(got[2]["event"], "schedule_ended", "{got:#?}");
        assert_eq!(got[2]["mode"], "outage", "{got:#?}");
        // With the outage's start, as a running proxy tells an outage.
        assert_eq!(got[2]["since"], got[0]["since"], "{got:#?}");
        // The outage was told last: its end, found at the first check, is told too, or a
        // status page would show an outage that is over. Still down, it is told again.
        let (mode, previous) = if back {
            ("normal", "outage")
        } else {
            ("outage", "normal")
        };
        assert_eq!(got.len(), 4, "{got:#?}");
        assert_eq!(got[3]["event"], "mode_changed", "{got:#?}");
        assert_eq!(got[3]["mode"], mode, "{got:#?}");
        assert_eq!(got[3]["previous_mode"], previous, "{got:#?}");
        drop(proxy);
    }
}

/// An outage first told from `maintenance` (the operator's `off` showed it) is told again
/// after a restart as it was told, not as a new one from `normal`.
#[tokio::test(flavor = "multi_thread")]
async fn an_outage_shown_by_off_is_told_again_from_maintenance() {
    let (app, hook, _slack, config, proxy) = restartable_proxy().await;
    assert!(ctl(&proxy, on(Some("Restoring the database"))).await.ok);
    assert_eq!(wait_events(&hook, 1).await[0]["mode"], "maintenance");
    app.stop();
    assert!(health_shows(&proxy, false).await);
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    let got = wait_events(&hook, 2).await;
    assert_eq!(got[1]["mode"], "outage", "{got:#?}");
    assert_eq!(got[1]["previous_mode"], "maintenance", "{got:#?}");
    let since = got[1]["since"].clone();

    let proxy = restart_a_second_later(proxy, &config).await;
    let got = wait_events(&hook, 3).await;
    assert_eq!(got.len(), 3, "{got:#?}");
    assert_eq!(got[2]["event"], "mode_changed", "{got:#?}");
    assert_eq!(got[2]["mode"], "outage", "{got:#?}");
    assert_eq!(
        got[2]["previous_mode"], "maintenance",
        "as first told: {got:#?}"
    );
    assert_eq!(got[2]["since"], since, "{got:#?}");
    drop(proxy);
}

/// A request hyper cannot read never reaches the gateway, but its client gets a 4xx: that
/// answer is counted as the requests intermission refuses itself are.
#[tokio::test]
async fn requests_too_malformed_to_read_are_counted() {
    let proxy =
        spawn_proxy("[proxy]\nmax_header_bytes = 8192\n[admin]\nlisten = \"127.0.0.1:0\"\n").await;
    let limit = Duration::from_secs(10);
    let bad = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n",
        limit,
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let mut large = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    large.extend_from_slice(&[b'b'; 10_000]);
    large.extend_from_slice(b"\r\n\r\n");
    let large = raw_exchange(proxy.addr, &large, limit).await;
    assert!(large.starts_with("HTTP/1.1 431"), "{large}");
    // On a keep-alive connection that has parked after its first answer, too.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    one_answer(&mut s, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let parked = wait_until_async(|| async {
        metric(&scrape(&proxy).await, "intermission_parked_connections") == 1.0
    })
    .await;
    assert!(parked, "the connection never parked");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n")
        .await
        .unwrap();
    let mut after = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut after)).await;
    let after = String::from_utf8_lossy(&after);
    assert!(after.starts_with("HTTP/1.1 400"), "{after}");
    let counted = wait_until_async(|| async {
        let m = scrape(&proxy).await;
        // Under whichever mode the health checks had reached by then.
        let reserved: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("intermission_requests_total{"))
            .filter(|(k, _)| k.contains("outcome=\"reserved\""))
            .map(|(_, v)| v)
            .sum();
        let client_errors = find(&m, "intermission_responses_total", &["class=\"4xx\""]);
        reserved == 3.0 && client_errors == 3.0
    })
    .await;
    assert!(counted, "a request hyper refused is not counted");
    // Nobody timed them: the latency histogram holds only the request the gateway answered.
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(&m, "intermission_request_duration_seconds_count"),
        1.0
    );
}

/// An HTTP/2 request head over `max_header_bytes` is answered `431` by h2 itself, before
/// hyper or the gateway sees a request: counted as an HTTP/1.1 head hyper refuses is, with
/// the requests intermission refuses itself, where it was counted nowhere, and once: the
/// stream's reset that follows is not counted as one for a malformed request. Whether h2 names
/// its `:status` by a literal or by its table, and after a table size update (a client that
/// changed the table's size); the connection goes on.
#[tokio::test]
async fn an_http2_head_h2_refuses_as_too_large_is_counted() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&format!(
        "[proxy]\nmax_header_bytes = 8192\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\nservers = [\"{}\"]\n",
        up.url()
    ))
    .await;
    let reserved_and_4xx = || async {
        let m = scrape(&proxy).await;
        let reserved: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("intermission_requests_total{"))
            .filter(|(k, _)| k.contains("outcome=\"reserved\""))
            .map(|(_, v)| v)
            .sum();
        let client_errors: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("intermission_responses_total{"))
            .filter(|(k, _)| k.contains("class=\"4xx\""))
            .map(|(_, v)| v)
            .sum();
        (reserved, client_errors)
    };
    let mut told = 0.0;
    for table in [None, Some(0), Some(1024)] {
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let mut builder = h2::client::Builder::new();
        if let Some(size) = table {
            builder.header_table_size(size);
        }
        let (client, conn) = builder.handshake::<_, Bytes>(tcp).await.unwrap();
        tokio::spawn(conn);
        let ask = |big: bool| {
            let (mut client, url) = (client.clone(), proxy.url("/"));
            async move {
                let mut req = Request::get(url).body(()).unwrap();
                if big {
                    let value = http::HeaderValue::from_str(&"b".repeat(10_000)).unwrap();
                    req.headers_mut().insert("x-big", value);
                }
                client = client.ready().await.unwrap();
                // The large one as an upload's head, its stream left open: h2 then resets it
                // after its answer.
                let (resp, _upload) = client.send_request(req, !big).unwrap();
                tokio::time::timeout(Duration::from_secs(10), resp)
                    .await
                    .unwrap()
                    .map(|r| r.status().as_u16())
            }
        };
        for _ in 0..2 {
            // h2 resets the stream after its answer; the answer may come first, or only the
            // reset may be read.
            let got = ask(true).await;
            assert!(matches!(got, Ok(431) | Err(_)), "{table:?}: {got:?}");
            told += 1.0;
            assert_eq!(
                ask(false).await.unwrap(),
                200,
                "{table:?}: the connection goes on"
            );
        }
        let counted = wait_until_async(|| async { reserved_and_4xx().await == (told, told) }).await;
        assert!(
            counted,
            "{table:?}: {:?}, not {told}",
            reserved_and_4xx().await
        );
        // Once: the reset h2 sends after its `431` is that refusal, not a malformed request
        // (the answers that followed were written after it).
        let resets = "intermission_http2_client_stream_resets_total{reason=\"protocol_error\"}";
        assert_eq!(scrape(&proxy).await.get(resets), Some(&0.0), "{table:?}");
    }
}

/// A client that keeps the admin listener's 64 connections open (idle, or reconnecting as
/// each is closed) cannot shut the scrapers and probes out: a new connection takes the place
/// of the oldest.
#[tokio::test]
async fn a_full_admin_listener_makes_room_for_a_scrape() {
    let proxy = spawn_proxy("[admin]\nlisten = \"127.0.0.1:0\"\n").await;
    let addr = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    for round in 0..3 {
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            client().request(
                Request::get(format!("http://{addr}/readyz"))
                    .body(empty())
                    .unwrap(),
            ),
        )
        .await
        .expect("the probe hung")
        .unwrap_or_else(|e| panic!("round {round}: the probe was turned away: {e}"));
        assert_eq!(resp.status(), 200);
        // The client opens one more for each the listener closed.
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
}
