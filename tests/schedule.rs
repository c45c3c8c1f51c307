//! Scheduled maintenance windows: they switch on and off by themselves, survive restarts,
//! and refuse what makes no sense.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Request, Response};
use hyper::body::Incoming;
use intermission::control::protocol::Request as Ctl;
use std::time::Duration;
use support::*;

async fn app() -> Upstream {
    upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await
}

fn add(start: &str, end: &str, message: Option<&str>) -> Ctl {
    Ctl::ScheduleAdd {
        start: start.into(),
        end: end.into(),
        message: message.map(str::to_owned),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_window_switches_maintenance_on_and_off_by_itself() {
    let up = app().await;
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"{}\"]\n", up.url())).await;
    let r = ctl(
        &proxy,
        add("+1s", "+3s", Some("Scheduled database upgrade")),
    )
    .await;
    assert!(r.ok, "{r:?}");
    let status = ctl(&proxy, Ctl::Status).await.state.unwrap();
    assert_eq!(status.mode.as_str(), "normal");
    let next = status.next_window.expect("the next window is shown");
    assert_eq!(
        status.schedules,
        vec![next.clone()],
        "status lists the schedules"
    );
    assert_eq!(next.message.as_deref(), Some("Scheduled database upgrade"));
    let public: serde_json::Value = json(&get(&proxy.url("/_intermission/status")).await);
    assert_eq!(
        public["next_window"]["message"],
        "Scheduled database upgrade"
    );
    assert!(
        public["next_window"].get("by").is_none(),
        "who scheduled it is not public"
    );
    assert_eq!(get(&proxy.url("/")).await.body(), "app");

    wait_mode(&proxy, "maintenance", Duration::from_secs(5)).await;
    let resp = get(&proxy.url("/")).await;
    assert_eq!(resp.status(), 503);
    let v: serde_json::Value = json(&resp);
    assert_eq!(v["detail"], "Scheduled database upgrade");
    assert_eq!(v["until"], next.end.rfc3339());
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry <= 3,
        "Retry-After counts down to the window's end: {retry}"
    );

    wait_mode(&proxy, "normal", Duration::from_secs(6)).await;
    assert_eq!(get(&proxy.url("/")).await.body(), "app");
    let list = ctl(&proxy, Ctl::ScheduleList).await.schedules.unwrap();
    assert!(list.is_empty(), "an ended window is removed: {list:?}");
}

/// The controller wakes at each window edge; a control request that lands on the very moment
/// of an edge must not make it skip that edge (the window would never start, or never end).
#[tokio::test(flavor = "multi_thread")]
async fn window_edges_are_kept_under_a_stream_of_control_requests() {
    let up = app().await;
    let proxy = std::sync::Arc::new(
        spawn_proxy(&format!("[upstream]\nservers = [\"{}\"]\n", up.url())).await,
    );
    assert!(ctl(&proxy, add("+1s", "+2s", Some("busy window"))).await.ok);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pollers = Vec::new();
    for _ in 0..4 {
        let (proxy, done) = (proxy.clone(), done.clone());
        pollers.push(tokio::spawn(async move {
            let mut modes = Vec::new();
            // Bounded: the window lasts 2 s; 20 s of polling is far more than the test needs.
            let end = std::time::Instant::now() + Duration::from_secs(20);
            while !done.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < end
            {
                let mode = proxy_mode(&proxy).await;
                if modes.last() != Some(&mode) {
                    modes.push(mode);
                }
            }
            modes
        }));
    }
    wait_mode(&proxy, "maintenance", Duration::from_secs(5)).await;
    wait_mode(&proxy, "normal", Duration::from_secs(5)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in pollers {
        let modes = p.await.unwrap();
        assert!(
            modes.len() <= 3,
            "the mode went normal, maintenance, normal once: {modes:?}"
        );
    }
}

#[tokio::test]
async fn windows_that_make_no_sense_are_refused() {
    let proxy = spawn_proxy("").await;
    assert!(ctl(&proxy, add("+1h", "+2h", None)).await.ok);
    let cases = [
        (add("+90m", "+3h", None), "overlaps"),
        (add("+3h", "+2h", None), "after start"),
        (
            add("2001-01-01T00:00:00Z", "2001-01-01T01:00:00Z", None),
            "past",
        ),
        (add("soon", "+2h", None), "start"),
        (add("+5h", "+6h", Some("  ")), "empty"),
        // Past the year 9999, which RFC 3339 cannot write.
        (add("+1s", "+2999999d", None), "more than a year ahead"),
        (
            add("+9999999d", "+99999999d", None),
            "more than a year ahead",
        ),
    ];
    for (req, why) in cases {
        let r = ctl(&proxy, req).await;
        let e = r.error.unwrap_or_else(|| panic!("accepted: {why}"));
        assert_eq!(e.code, "bad_request", "{why}");
        assert!(e.message.contains(why), "{why}: {}", e.message);
    }
    // Refusals name the times as read, in UTC: a local time given the offset of the wrong
    // side of a change of daylight saving time (Paris, spring forward: 02:30 does not exist
    // there, and 03:30 is summer time) is seen for what it is, not as a puzzle.
    let as_read = [
        (
            add(
                "2027-03-28T02:30:00+01:00",
                "2027-03-28T03:30:00+02:00",
                None,
            ),
            "end must be after start (read as 2027-03-28T01:30:00Z and 2027-03-28T01:30:00Z",
        ),
        (
            add(
                "2001-01-01T00:00:00+05:00",
                "2001-01-01T01:00:00+05:00",
                None,
            ),
            "start is in the past (read as 2000-12-31T19:00:00Z; it is ",
        ),
    ];
    for (req, why) in as_read {
        let r = ctl(&proxy, req).await;
        let e = r.error.unwrap_or_else(|| panic!("accepted: {why}"));
        assert_eq!(e.code, "bad_request", "{why}");
        assert!(e.message.contains(why), "{why}: {}", e.message);
    }
    // A second 60 (a leap second), which the system clock does not count, is refused with the
    // time likely meant, where it was read as the minute's second 59.
    let later = intermission::time::Timestamp(
        std::time::SystemTime::now() + Duration::from_secs(2 * 86_400),
    )
    .rfc3339();
    let minute = intermission::time::parse_rfc3339(&format!("{}00Z", &later[..17])).unwrap();
    let meant = intermission::time::Timestamp(minute + Duration::from_secs(60)).rfc3339();
    let r = ctl(&proxy, add("+1d", &format!("{}60Z", &later[..17]), None)).await;
    let e = r.error.expect("a second 60 is refused");
    assert!(
        e.code == "bad_request" && e.message.contains("leap second") && e.message.contains(&meant),
        "{}",
        e.message
    );
    // The refusals left the control plane working.
    assert!(ctl(&proxy, Ctl::Status).await.ok);
    let r = ctl(&proxy, Ctl::ScheduleRemove { id: 42 }).await;
    assert_eq!(r.error.unwrap().code, "not_found");
    let list = ctl(&proxy, Ctl::ScheduleList).await.schedules.unwrap();
    assert_eq!(list.len(), 1);
    assert!(ctl(&proxy, Ctl::ScheduleRemove { id: list[0].id }).await.ok);
    assert!(ctl(&proxy, Ctl::ScheduleList)
        .await
        .schedules
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operators_on_outlasts_the_window() {
    let up = app().await;
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"{}\"]\n", up.url())).await;
    ctl(&proxy, add("+0s", "+1s", Some("window"))).await;
    wait_mode(&proxy, "maintenance", Duration::from_secs(5)).await;
    ctl(
        &proxy,
        Ctl::On {
            message: Some("Taking longer".into()),
            until: None,
            retry_after: None,
            reason: None,
        },
    )
    .await;
    // The window ends; the operator's switch holds.
    let mut listed = 1;
    for _ in 0..200 {
        listed = ctl(&proxy, Ctl::ScheduleList)
            .await
            .schedules
            .unwrap()
            .len();
        if listed == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(listed, 0);
    assert_eq!(proxy_mode(&proxy).await, "maintenance");
    let v: serde_json::Value = json(&get(&proxy.url("/")).await);
    assert_eq!(v["detail"], "Taking longer");
    ctl(&proxy, Ctl::Off).await;
    assert_eq!(proxy_mode(&proxy).await, "normal");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operators_on_without_words_shows_the_windows_message_until_it_ends() {
    let up = app().await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[maintenance]\nmessage = \"Configured words\"\n",
        up.url()
    ))
    .await;
    ctl(&proxy, add("+0s", "+5s", Some("Window words"))).await;
    wait_mode(&proxy, "maintenance", Duration::from_secs(5)).await;
    ctl(&proxy, on(None)).await;
    // SPEC §3: the operator's message, else the window's, else the configured one.
    let v: serde_json::Value = json(&get(&proxy.url("/")).await);
    assert_eq!(v["detail"], "Window words");
    let mut detail = v["detail"].clone();
    for _ in 0..400 {
        detail = json::<serde_json::Value>(&get(&proxy.url("/")).await)["detail"].clone();
        if detail != "Window words" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        detail, "Configured words",
        "once the window is over, the operator's switch shows the configured message"
    );
    assert_eq!(proxy_mode(&proxy).await, "maintenance");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_window_survives_a_restart_in_its_middle() {
    let up = app().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[upstream]\nservers = [\"{}\"]\n", up.url());
    let mut proxy = ProxyProcess::start(dir.path(), &config);
    let r = proxy
        .ctl(&add("+0s", "+10m", Some("Long window")))
        .await
        .unwrap();
    assert!(r.ok);
    proxy.signal("KILL");
    proxy.wait_exit(Duration::from_secs(10)).unwrap();
    let proxy = ProxyProcess::start(dir.path(), &config);
    let resp = get(&proxy.url("/")).await;
    assert_eq!(resp.status(), 503, "the window is in force again at once");
    let v: serde_json::Value = json(&resp);
    assert_eq!(v["detail"], "Long window");
}

/// Windows put end to end at the times `schedule list` shows touch, as the SPEC's "touching is
/// not overlapping" has it. A relative time's fraction of a second was kept but not shown: the
/// window listed as ending at 10:00:00 held until 10:00:00.4, so one put at that end was
/// refused as overlapping it (and one ending at a listed start left a gap, see `mode.rs`).
#[tokio::test]
async fn windows_put_end_to_end_at_their_listed_times_touch() {
    let proxy = spawn_proxy("").await;
    let r = ctl(&proxy, add("+1h", "+2h", Some("middle"))).await;
    assert!(r.ok, "{r:?}");
    let middle = r.state.unwrap().schedules.remove(0);
    let (start, end) = (middle.start.rfc3339(), middle.end.rfc3339());
    let after = ctl(&proxy, add(&end, "+3h", Some("after"))).await;
    assert!(after.ok, "at the listed end: {:?}", after.error);
    let before = ctl(&proxy, add("+30m", &start, Some("before"))).await;
    assert!(before.ok, "at the listed start: {:?}", before.error);
    let list = ctl(&proxy, Ctl::ScheduleList).await.schedules.unwrap();
    let messages: Vec<_> = list.iter().filter_map(|w| w.message.as_deref()).collect();
    assert_eq!(messages, ["before", "middle", "after"]);
}

/// `schedule_add` names the window it made: among windows already scheduled, the listing in
/// its answer did not say which was new, and `schedule remove` needs its id. `ctl` says it
/// first, and the log names it with the times it is kept at (rounded up to whole seconds),
/// where it wrote the times asked for, cut to the second: one second ahead of the window's.
#[tokio::test]
async fn schedule_add_names_the_window_it_made() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "");
    let first = proxy.ctl(&add("+1h", "+2h", None)).await.unwrap();
    let first = first.window.expect("the window made is named");
    let r = proxy.ctl(&add("+3h", "+4h", Some("second"))).await.unwrap();
    let made = r.window.expect("the window made is named");
    assert_eq!(made.id, first.id + 1);
    assert_eq!(made.message.as_deref(), Some("second"));
    assert_eq!(
        r.state.expect("a state").schedules,
        vec![first, made.clone()]
    );
    let status = proxy.ctl(&Ctl::Status).await.unwrap();
    assert!(status.window.is_none(), "only schedule_add's answer has it");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_intermission"))
        .arg("ctl")
        .arg("-s")
        .arg(dir.path().join("intermission.sock"))
        .args(["schedule", "add", "--start", "+5h", "--end", "+5h 30m"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let list = proxy
        .ctl(&Ctl::ScheduleList)
        .await
        .unwrap()
        .schedules
        .unwrap();
    let third = list.last().expect("three windows");
    assert_eq!(third.id, made.id + 1);
    let said = String::from_utf8_lossy(&out.stdout);
    // The command to take it back is whole, with the `-s` this one was given: pasted as
    // `schedule remove 3` it was no command, and after `intermission ctl` alone it tried the
    // default socket of the folder it was pasted in.
    let want = format!(
        "scheduled window {}: {} to {} (`intermission ctl -s {} schedule remove {}` takes it back)",
        third.id,
        third.start.rfc3339(),
        third.end.rfc3339(),
        dir.path().join("intermission.sock").display(),
        third.id
    );
    assert_eq!(said.lines().next(), Some(want.as_str()), "{said}");
    let logged = format!(
        "maintenance window {} scheduled from {} to {}",
        third.id,
        third.start.rfc3339(),
        third.end.rfc3339()
    );
    let mut found = false;
    for _ in 0..100 {
        found = proxy.log_lines().iter().any(|l| l.contains(&logged));
        if found {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(found, "{logged}: {:#?}", proxy.log_lines());
}
