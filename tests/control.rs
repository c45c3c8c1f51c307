//! The control socket and `intermission ctl`: protocol, errors, permissions, persistence,
//! reload, exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use intermission::control::client::Client;
use intermission::control::protocol::{Request as Ctl, Response as CtlResponse};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;
use support::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_intermission"))
}

/// `intermission ctl -c CONFIG ARGS…`, run to its end.
fn ctl_with(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    bin()
        .arg("ctl")
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn parse(line: &str) -> CtlResponse {
    serde_json::from_str(line).unwrap()
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `intermission` to be run as `nobody`, whom modes keep out where they let root in; `None`
/// (said) without `setpriv`.
fn as_nobody() -> Option<Command> {
    if !tool_present("setpriv", "--version", "util-linux") {
        return None;
    }
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_intermission"));
    Some(c)
}

/// A user the socket's mode keeps out is told so, not that no proxy answered: an on-call
/// engineer who is not the proxy's user read "no proxy answered" as "the proxy is down", and
/// restarted one that was serving. Root passes every mode, so `ctl` runs as `nobody`.
#[tokio::test]
async fn a_user_the_socket_keeps_out_is_told_so() {
    if !running_as_root() {
        eprintln!("SKIPPED: needs root, to run ctl as another user");
        return;
    }
    let Some(mut as_nobody) = as_nobody() else {
        return;
    };
    let proxy = spawn_proxy("").await;
    let socket = proxy.dir.path().join("intermission.sock");
    let out = as_nobody
        .args(["ctl", "--json", "-s"])
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(out.status.code(), Some(3), "{v}");
    assert_eq!(v["error"]["code"], "permission_denied", "{v}");
    let said = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        said.contains("may well be running") && said.contains("proxy's user or root"),
        "{said}"
    );
}

/// A config this user may not read (kept to the proxy's user, `ctl` run as oneself) is said
/// with what to do instead: before, "Permission denied" alone. Root reads every file, so
/// `ctl` runs as `nobody` then.
#[test]
fn a_config_this_user_cannot_read_is_said_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[control]\nsocket = \"im.sock\"\n").unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut ctl = if running_as_root() {
        let Some(c) = as_nobody() else {
            return;
        };
        c
    } else {
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o000)).unwrap();
        bin()
    };
    let out = ctl
        .args(["ctl", "--json", "-c"])
        .arg(&config)
        .arg("status")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(v["error"]["code"], "bad_usage", "{v}");
    let said = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        said.contains("cannot read config file")
            && said.contains("Permission denied")
            && said.contains("run ctl as the proxy's user or root")
            && said.contains("-s SOCKET"),
        "{said}"
    );
}

#[tokio::test]
async fn the_socket_is_private_by_default_and_configurable() {
    let proxy = spawn_proxy("").await;
    let mode = std::fs::metadata(proxy.dir.path().join("intermission.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let proxy = spawn_proxy("[control]\nsocket = \"ops.sock\"\nsocket_mode = \"0660\"\n").await;
    let mode = std::fs::metadata(proxy.dir.path().join("ops.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
}

#[tokio::test]
async fn bad_requests_get_errors_and_the_connection_stays_usable() {
    // A live upstream, so that nothing is held until an operator says so.
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"{}\"]\n", up.url())).await;
    let mut c = Client::connect(&proxy.dir.path().join("intermission.sock"))
        .await
        .unwrap();
    let cases: &[(&[u8], &str)] = &[
        (b"this is not json", "bad_request"),
        (br#"{"cmd":"frobnicate"}"#, "unknown_command"),
        (br#"{"cmd":"update"}"#, "bad_request"),
        (br#"{"cmd":"force_open","enabled":"yes"}"#, "bad_request"),
        (br#"{"cmd":"on","until":"yesterday"}"#, "bad_request"),
        (
            br#"{"cmd":"on","until":"2001-01-01T00:00:00Z"}"#,
            "bad_request",
        ),
        (
            br#"{"cmd":"update","message":"nothing is held"}"#,
            "conflict",
        ),
    ];
    for (line, code) in cases {
        let r = parse(&c.raw(line).await.unwrap());
        assert!(!r.ok);
        assert_eq!(
            r.error.unwrap().code,
            *code,
            "{}",
            String::from_utf8_lossy(line)
        );
    }
    // The whole reply, as SPEC §5 shows it.
    let reply: serde_json::Value =
        serde_json::from_str(&c.raw(br#"{"cmd":"frobnicate"}"#).await.unwrap()).unwrap();
    assert_eq!(
        reply,
        serde_json::json!({"ok": false, "error": {"code": "unknown_command", "message": "unknown command 'frobnicate'"}})
    );
    // Same connection, still fine; several requests in a row.
    let r = c
        .request(&Ctl::On {
            message: Some("m".into()),
            until: Some("+45m".into()),
            retry_after: None,
            reason: Some("ticket 1234".into()),
        })
        .await
        .unwrap();
    assert!(r.ok);
    let state = r.state.unwrap();
    assert_eq!(state.mode.as_str(), "maintenance");
    assert_eq!(state.reason.as_deref(), Some("ticket 1234"));
    assert!(state.by.is_some());
    // A reason that shows nothing is none, as a blank one is: it was kept, and `ctl status`
    // said "switched by: root (\u{202e})".
    let reply: serde_json::Value = serde_json::from_str(
        &c.raw(br#"{"cmd":"on","reason":"\u202e\u200b"}"#)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["state"]["reason"], serde_json::Value::Null, "{reply}");
    assert!(c.request(&Ctl::Status).await.unwrap().ok);
    let h = c.request(&Ctl::Health).await.unwrap();
    assert_eq!(h.health.unwrap().len(), 1);
    let r = c.request(&Ctl::ForceOpen { enabled: true }).await.unwrap();
    assert!(r.state.unwrap().force_open);
}

/// A field given twice is refused as a `bad_request`, whichever value would have won:
/// `{"cmd":"status","cmd":"off"}` switched maintenance off. Nothing changes, and the
/// connection stays usable.
#[tokio::test]
async fn a_request_giving_a_field_twice_is_refused_and_changes_nothing() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"{}\"]\n", up.url())).await;
    let mut c = Client::connect(&proxy.dir.path().join("intermission.sock"))
        .await
        .unwrap();
    assert!(c.request(&on(Some("Kept"))).await.unwrap().ok);
    for line in [
        &br#"{"cmd":"status","cmd":"off"}"#[..],
        br#"{"cmd":"update","message":"one","message":"two"}"#,
        br#"{"cmd":"force_open","enabled":true,"enabled":false}"#,
    ] {
        let r = parse(&c.raw(line).await.unwrap());
        assert!(!r.ok, "{}", String::from_utf8_lossy(line));
        let e = r.error.unwrap();
        assert_eq!(e.code, "bad_request", "{}", String::from_utf8_lossy(line));
        assert!(e.message.contains("is given twice"), "{}", e.message);
    }
    let state = c.request(&Ctl::Status).await.unwrap().state.unwrap();
    assert_eq!(state.mode.as_str(), "maintenance");
    assert_eq!(state.message.as_deref(), Some("Kept"));
    assert!(!state.force_open);
    assert_eq!(state.updates.len(), 1);
}

/// A line that begins with a UTF-8 byte order mark (PowerShell and other Windows tools
/// write one before what they pipe) is read past it, as the state file is: it was refused
/// as "not a JSON object". Each line may carry one, and the connection stays usable.
#[tokio::test]
async fn a_request_line_after_a_byte_order_mark_is_taken() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"{}\"]\n", up.url())).await;
    let mut c = Client::connect(&proxy.dir.path().join("intermission.sock"))
        .await
        .unwrap();
    let r = parse(&c.raw(b"\xef\xbb\xbf{\"cmd\":\"status\"}").await.unwrap());
    assert!(r.ok, "{r:?}");
    assert_eq!(r.state.unwrap().mode.as_str(), "normal");
    let r = parse(
        &c.raw(b"\xef\xbb\xbf{\"cmd\":\"on\",\"message\":\"Windows\"}\r")
            .await
            .unwrap(),
    );
    assert!(r.ok, "{r:?}");
    let state = c.request(&Ctl::Status).await.unwrap().state.unwrap();
    assert_eq!(state.mode.as_str(), "maintenance");
    assert_eq!(state.message.as_deref(), Some("Windows"));
    // Only at the start: one inside the JSON is still not JSON.
    let r = parse(&c.raw(b"{\"cmd\":\xef\xbb\xbf\"status\"}").await.unwrap());
    assert_eq!(r.error.unwrap().code, "bad_request");
}

#[tokio::test]
async fn an_oversized_line_is_refused_and_the_connection_closed() {
    let proxy = spawn_proxy("").await;
    let mut c = Client::connect(&proxy.dir.path().join("intermission.sock"))
        .await
        .unwrap();
    let huge = format!(
        "{{\"cmd\":\"update\",\"message\":\"{}\"}}",
        "x".repeat(70 * 1024)
    );
    let r = parse(&c.raw(huge.as_bytes()).await.unwrap());
    assert_eq!(r.error.unwrap().code, "line_too_long");
    assert!(
        c.raw(br#"{"cmd":"status"}"#).await.is_err(),
        "the connection should be closed"
    );
    // Others are not affected.
    assert!(ctl(&proxy, Ctl::Status).await.ok);
}

/// A refusal that closes the connection is written within a moment, and the connection
/// closed then whether or not its client read it: 64 clients that piped requests in without
/// reading the answers, then a line over the limit, held every slot for a minute (the
/// `line_too_long` waited that long for room in a buffer full of unread answers, its
/// connection neither reading nor able to be closed for room), and `ctl` gave up `busy`.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_nobody_reads_do_not_keep_the_operator_out() {
    use std::io::Write;
    use tokio::io::AsyncWriteExt;
    let proxy = spawn_proxy("").await;
    let socket = proxy.dir.path().join("intermission.sock");
    let mut probe = Client::connect(&socket).await.unwrap();
    let answer = probe.raw(b"{}").await.unwrap();
    assert!(answer.contains("bad_request"), "{answer}");
    drop(probe);
    // How many such answers the proxy writes before the next one waits for its client to
    // read: as many as a socket pair takes without a read, the system's default buffer.
    let fit = {
        let (w, _unread) = std::os::unix::net::UnixStream::pair().unwrap();
        w.set_nonblocking(true).unwrap();
        let mut n = 0;
        while (&w).write(answer.as_bytes()).ok() == Some(answer.len()) {
            n += 1;
        }
        n
    };
    let mut sent = b"{}\n".repeat(fit);
    sent.extend(vec![b'x'; 70 * 1024]);
    sent.push(b'\n');
    let mut unread = Vec::new();
    for _ in 0..64 {
        let mut c = tokio::net::UnixStream::connect(&socket).await.unwrap();
        c.write_all(&sent).await.unwrap();
        unread.push(c);
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_intermission"))
        .arg("ctl")
        .arg("-s")
        .arg(&socket)
        .args(["on", "--message", "Database upgrade"])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    // Asked as `ctl` asks, again while told `busy`: the unread connections still queued in
    // the socket's backlog when `ctl` got in may fill the room it left (a loaded CI machine).
    let request = intermission::control::protocol::Request::Status;
    let since = std::time::Instant::now();
    let mode = loop {
        let answer = intermission::control::client::request(&socket, &request).await;
        if let Some(state) = answer.ok().and_then(|a| a.state) {
            break state.mode.as_str().to_owned();
        }
        assert!(since.elapsed() < Duration::from_secs(15), "never let in");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(mode, "maintenance");
}

/// 64 connections each in the middle of a request leave the 65th told why it is closed
/// (`busy`: none is waiting for its next request, so none is closed to make room), and the
/// operator's way in opens again as soon as one of them goes.
#[tokio::test]
async fn control_connections_are_capped_and_one_over_is_told_busy() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let proxy = spawn_proxy("").await;
    let socket = proxy.dir.path().join("intermission.sock");
    let mut begun = Vec::new();
    for _ in 0..64 {
        let mut c = tokio::net::UnixStream::connect(&socket).await.unwrap();
        c.write_all(br#"{"cmd":"sta"#).await.unwrap();
        begun.push(c);
    }
    let over = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut lines = tokio::io::BufReader::new(over).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the connection over the cap was not answered")
        .unwrap()
        .unwrap();
    let refused: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(refused["error"]["code"], "busy", "{line}");
    assert_eq!(lines.next_line().await.unwrap(), None, "closed");
    // Up to 64 are served: the one that goes frees its slot for the next.
    drop(begun.pop());
    let answered = wait_until_async(|| async {
        intermission::control::client::request(&socket, &Ctl::Status)
            .await
            .is_ok_and(|r| r.ok)
    })
    .await;
    assert!(answered, "no way in once a connection closed");
}

/// 64 connections stuck mid-request (a script that never ends its line) no longer lock the
/// operator out for a minute, again each time they reconnect: `ctl` gets through once they
/// have been stuck a few seconds, within its deadline, and one of them is told its request
/// was not applied.
#[tokio::test(flavor = "multi_thread")]
async fn connections_stuck_mid_request_make_room_for_the_operator() {
    use tokio::io::AsyncWriteExt;
    let proxy = spawn_proxy("").await;
    let socket = proxy.dir.path().join("intermission.sock");
    let mut stuck = Vec::new();
    for _ in 0..64 {
        let mut c = tokio::net::UnixStream::connect(&socket).await.unwrap();
        c.write_all(br#"{"cmd":"sta"#).await.unwrap();
        stuck.push(c);
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_intermission"))
        .arg("ctl")
        .arg("-s")
        .arg(&socket)
        .args(["on", "--message", "Database upgrade"])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(proxy_mode(&proxy).await, "maintenance");
    // Told as it is closed, which may come a moment after `ctl`'s answer.
    let mut told = String::new();
    let heard = wait_until(Duration::from_secs(5), || {
        stuck.iter().any(|c| {
            let mut buf = vec![0u8; 4096];
            match c.try_read(&mut buf) {
                Ok(n) if n > 0 => {
                    told = String::from_utf8_lossy(&buf[..n]).into_owned();
                    true
                }
                _ => false,
            }
        })
    })
    .await;
    assert!(heard, "none of the stuck connections was told");
    assert!(told.contains(r#""code":"idle""#), "{told}");
    assert!(told.contains("not applied"), "{told}");
}

/// A flood of connections beyond the 64 (a script looping on connect) holds no descriptors
/// of the proxy's: each refusal was a task of its own, holding its connection's descriptor
/// until it ran, and a flood held some 130 at once, which the data plane needs (with a limit
/// of 150, one request in eight got the outage response from a healthy server). Each is
/// still told `busy`.
#[test]
fn connections_refused_as_busy_hold_no_descriptors() {
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "");
    let socket = dir.path().join("intermission.sock");
    let pid = proxy.child.id();
    let open = move || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let busy = |socket: &std::path::Path| {
        let c = UnixStream::connect(socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = String::new();
        let _ = std::io::BufReader::new(c).read_line(&mut line);
        line
    };
    // Stuck mid-request, so that none is closed for room for `STUCK` (5 s): longer than the
    // flood below.
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut c = UnixStream::connect(&socket).unwrap();
        c.write_all(br#"{"cmd":"sta"#).unwrap();
        held.push(c);
    }
    let told = busy(&socket);
    assert!(told.contains(r#""code":"busy""#), "{told}");
    let before = open();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            let (socket, stop) = (socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if UnixStream::connect(&socket).is_ok() {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let mut most = 0;
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < until {
        most = most.max(open());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let connects: u32 = flooders.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(connects > 100, "only {connects} connections were made");
    assert!(
        most <= before + 16,
        "{before} descriptors open before a flood of {connects} connections, {most} during it"
    );
    let told = busy(&socket);
    assert!(told.contains(r#""code":"busy""#), "{told}");
    drop(held);
}

/// 64 connections left idle (a script that leaks them, or keeps a pool) no longer lock the
/// operator out: `ctl` gets through, by the place of the one that has waited longest for its
/// next request, which is told why it is closed (`idle`); the others stay open.
#[tokio::test]
async fn idle_control_connections_make_room_for_the_operator() {
    use tokio::io::AsyncBufReadExt;
    let proxy = spawn_proxy("").await;
    let socket = proxy.dir.path().join("intermission.sock");
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::UnixStream::connect(&socket).await.unwrap());
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_intermission"))
        .arg("ctl")
        .arg("-s")
        .arg(&socket)
        .args(["on", "--message", "Database upgrade"])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(proxy_mode(&proxy).await, "maintenance");
    let mut oldest = tokio::io::BufReader::new(idle.remove(0)).lines();
    let line = tokio::time::timeout(Duration::from_secs(5), oldest.next_line())
        .await
        .expect("the connection idle longest was not told")
        .unwrap()
        .unwrap();
    let told: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(told["error"]["code"], "idle", "{line}");
    assert!(
        matches!(oldest.next_line().await, Ok(None) | Err(_)),
        "then closed"
    );
    for c in &idle {
        let mut buf = [0u8; 1];
        let e = c
            .try_read(&mut buf)
            .expect_err("another connection was closed");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    }
}

/// `ctl` asks again after a `busy` refusal, within its deadline, and reports the answer that
/// comes then: a burst of scripts, or a moment when every connection is in use, no longer
/// turns an operator's command away.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_asks_again_when_the_proxy_is_busy() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let fake = tokio::spawn(async move {
        let mut requests = Vec::new();
        for answer in [
            r#"{"ok":false,"error":{"code":"busy","message":"64 open"}}"#,
            r#"{"ok":true}"#,
        ] {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            tokio::io::BufReader::new(r)
                .read_line(&mut line)
                .await
                .unwrap();
            requests.push(line);
            w.write_all(format!("{answer}\n").as_bytes()).await.unwrap();
        }
        requests
    });
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_intermission"))
        .arg("ctl")
        .arg("-s")
        .arg(&socket)
        .arg("off")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("busy"), "{err}");
    let requests = fake.await.unwrap();
    assert_eq!(requests, ["{\"cmd\":\"off\"}\n"; 2]);
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("intermission.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let first = ProxyProcess::start(dir.path(), "");
    let out = tokio::net::UnixStream::connect(&path).await;
    assert!(out.is_ok(), "the stale socket was not replaced");
    // A second proxy on the same socket refuses to start.
    let cfg = dir.path().join("second.toml");
    std::fs::write(&cfg, "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[control]\nsocket = \"intermission.sock\"\nstate_file = \"other.json\"\n").unwrap();
    let out = bin().args(["run", "-c"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already listening"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(first);
}

/// A second proxy on another socket but the same state file refuses to start: each would
/// overwrite the other's changes, and a restart would bring back the other's state.
#[tokio::test]
async fn a_second_proxy_on_the_same_state_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let first = ProxyProcess::start(dir.path(), "");
    let cfg = dir.path().join("second.toml");
    std::fs::write(&cfg, "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[control]\nsocket = \"second.sock\"\nstate_file = \"intermission-state.json\"\n").unwrap();
    let out = bin().args(["run", "-c"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("in use by another intermission"), "{said}");
    drop(first);
}

/// The state file is read only once this proxy holds it: one started while its predecessor
/// drains (whose controller may still save a change) must not run on the state it read
/// before the predecessor's last save. Held elsewhere, the file is not read at all: the
/// start says it is in use, not that it is corrupt.
#[tokio::test]
async fn the_state_file_is_read_only_once_held() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("intermission-state.json");
    let held = intermission::state::store::lock(&state).unwrap();
    std::fs::write(&state, "{\"planned\": ").unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, with_listen("")).unwrap();
    let config = intermission::config::Config::load_file(&path).unwrap();
    let said = match intermission::app::start(config).await {
        Ok(_) => panic!("started on a state file held by another"),
        Err(e) => e.to_string(),
    };
    assert!(said.contains("in use by another intermission"), "{said}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn maintenance_survives_kill_9() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[upstream]\nservers = [\"{}\"]\n", up.url());
    let mut proxy = ProxyProcess::start(dir.path(), &config);
    let r = proxy
        .ctl(&Ctl::On {
            message: Some("Survives crashes".into()),
            until: None,
            retry_after: None,
            reason: None,
        })
        .await
        .unwrap();
    assert!(r.ok);
    proxy.signal("KILL");
    proxy.wait_exit(Duration::from_secs(10)).unwrap();
    let proxy = ProxyProcess::start(dir.path(), &config);
    let resp = get(&proxy.url("/")).await;
    assert_eq!(resp.status(), 503);
    let v: serde_json::Value = json(&resp);
    assert_eq!(v["detail"], "Survives crashes");
    let state = std::fs::read_to_string(dir.path().join("intermission-state.json")).unwrap();
    assert!(state.contains("Survives crashes"));
}

#[test]
fn a_corrupt_state_file_stops_the_start_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("intermission-state.json"),
        "{\"planned\": tru",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n",
    )
    .unwrap();
    let out = bin()
        .args(["run", "-c"])
        .arg(dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("intermission-state.json") && err.contains("corrupt"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("intermission-state.json")).unwrap(),
        "{\"planned\": tru"
    );
}

#[tokio::test]
async fn reload_applies_a_good_config_and_refuses_a_bad_one() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[maintenance]\nmessage = \"First words\"\n",
        up.url()
    ))
    .await;
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
    let v: serde_json::Value = json(&get(&proxy.url("/")).await);
    assert_eq!(v["detail"], "First words");
    let path = proxy.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("First words", "Second words")).unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    let v: serde_json::Value = json(&get(&proxy.url("/")).await);
    assert_eq!(v["detail"], "Second words");
    std::fs::write(
        &path,
        text.replace("First words", "Third")
            .replace("[maintenance]", "[maintenance]\nretry_after = \"never\""),
    )
    .unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    assert_eq!(r.error.as_ref().unwrap().code, "reload_failed");
    assert!(r.error.unwrap().message.contains("maintenance.retry_after"));
    let v: serde_json::Value = json(&get(&proxy.url("/")).await);
    assert_eq!(v["detail"], "Second words", "the old config keeps serving");
}

/// Whether the last reload took is in `/metrics` under Prometheus's own names, and a refused
/// one in `status` with its reason: a reload refused by SIGHUP, `systemctl reload` or a
/// certbot hook was otherwise only in the log.
#[tokio::test]
async fn metrics_say_whether_the_last_reload_took() {
    let pages = tempfile::tempdir().unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/pages");
    for f in ["maintenance.html", "outage.html"] {
        std::fs::copy(format!("{src}/{f}"), pages.path().join(f)).unwrap();
    }
    let proxy = spawn_proxy(&format!(
        "[maintenance]\npages = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        pages.path().display()
    ))
    .await;
    let took = "intermission_config_last_reload_successful";
    let at = "intermission_config_last_reload_success_timestamp_seconds";
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as f64
    };
    assert_eq!(series(&proxy, took).await, Some(1.0), "the start's config");
    let started = series(&proxy, at).await.unwrap();
    assert!((now() - started).abs() < 60.0, "{started}");

    let refused = || async { ctl(&proxy, Ctl::Status).await.state.unwrap().reload_refused };
    assert_eq!(refused().await, None);

    std::fs::write(pages.path().join("outage.html"), "<p>{{mesage}}</p>").unwrap();
    assert!(!ctl(&proxy, Ctl::Reload).await.ok);
    assert_eq!(series(&proxy, took).await, Some(0.0), "a refused reload");
    assert_eq!(
        series(&proxy, at).await,
        Some(started),
        "kept from the start"
    );
    // `status` says so too, with why.
    let said = refused().await.expect("status names the refused reload");
    assert!(said.message.contains("mesage"), "{said:?}");

    std::fs::write(pages.path().join("outage.html"), "<p>{{message}}</p>").unwrap();
    let mended = ctl(&proxy, Ctl::Reload).await;
    assert!(mended.ok, "{mended:?}");
    // `ctl reload` prints the status it answers with: the reload that mends the file must
    // not say "LAST RELOAD REFUSED", as if the fix had been refused too.
    assert_eq!(
        mended
            .state
            .expect("a reload answers with the status")
            .reload_refused,
        None,
        "the mending reload's own answer"
    );
    assert_eq!(series(&proxy, took).await, Some(1.0), "mended");
    assert!(series(&proxy, at).await.unwrap() >= started);
    assert_eq!(refused().await, None, "forgotten once a reload takes");
}

/// The `pages` folder beside the config, read at start (no `pages` key), gone at a reload (a
/// deploy that moves it in a moment later): the built-in pages are served, and the reload
/// says so, where nothing did.
#[tokio::test]
async fn a_reload_that_falls_back_to_the_built_in_pages_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("pages");
    std::fs::create_dir(&pages).unwrap();
    std::fs::write(pages.join("maintenance.html"), "<p>Ours: {{message}}</p>").unwrap();
    std::fs::write(pages.join("outage.html"), "<p>Ours too: {{message}}</p>").unwrap();
    let proxy = spawn_proxy_in(dir, &with_listen("")).await;
    let quiet = ctl(&proxy, Ctl::Reload).await;
    assert!(quiet.ok && quiet.warnings.is_empty(), "{quiet:?}");
    std::fs::rename(&pages, proxy.dir.path().join("pages.old")).unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("pages") && w.contains("built-in pages are served")),
        "{r:?}"
    );
}

/// The servers `ctl health` lists.
async fn servers(proxy: &Proxy) -> Vec<String> {
    let health = ctl(proxy, Ctl::Health).await.health.unwrap();
    health.into_iter().map(|s| s.server).collect()
}

/// A config file rewritten in place (`cat > config.toml`, an editor's save) and caught by a
/// reload half-written, where it was still valid TOML (cut after its `[proxy]` section), was
/// put in force: the application replaced by the default 127.0.0.1:3000, the site in outage,
/// and `ctl reload` said done. A file changed within the last second is read until it has
/// been left alone for a second; one that never stops changing is taken as last read, and
/// said to be.
#[tokio::test(flavor = "multi_thread")]
async fn a_config_caught_half_written_is_read_until_it_is_whole() {
    use std::io::Write;
    let up = echo_upstream().await;
    let whole = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[upstream]\nservers = [\"{}\"]\n\
         [health]\ninterval = \"3m\"\n[maintenance]\nmessage = \"Back soon\"\n",
        up.url()
    );
    let proxy = spawn_proxy_in(tempfile::tempdir().unwrap(), &whole).await;
    assert_eq!(servers(&proxy).await, [up.url()]);
    let path = proxy.dir.path().join("config.toml");
    let cut = whole.find("[upstream]").unwrap();
    // Truncated, its `[proxy]` written, and the rest a piece every 50 ms, as a slow writer
    // (or one in a loaded machine) writes it.
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&whole.as_bytes()[..cut]).unwrap();
    let rest = whole[cut..].to_owned();
    let writer = std::thread::spawn(move || {
        for piece in rest.as_bytes().chunks(16) {
            std::thread::sleep(Duration::from_millis(50));
            file.write_all(piece).unwrap();
        }
    });
    let r = ctl(&proxy, Ctl::Reload).await;
    writer.join().unwrap();
    assert!(r.ok && r.warnings.is_empty(), "{r:?}");
    assert_eq!(
        servers(&proxy).await,
        [up.url()],
        "the whole file is in force"
    );

    // A file that is still changing after 3 s: its last read, with a warning. Only a trailing
    // comment changes, in place and at the same length, so that every read is whole and valid:
    // a writer that empties the file first (`fs::write`) leaves the reload's last read, on a
    // loaded machine, the empty file, which is refused (rightly) instead of taken.
    std::fs::write(&path, format!("{whole}# save {:08}\n", 0)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, stop, at) = (path.clone(), stop.clone(), whole.len() as u64);
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                file.write_all_at(format!("# save {n:08}\n").as_bytes(), at)
                    .unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let r = ctl(&proxy, Ctl::Reload).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(r.ok, "{r:?}");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("was still changing after 3 s") && w.contains("reload again")),
        "{r:?}"
    );
}

/// A state file edited by hand while the proxy runs is not read (the state is read at start
/// only): a reload says so, where the operator who edited it and reloaded believed the edit
/// in force, and the next change replaces the file.
#[tokio::test]
async fn a_reload_says_a_state_file_edited_by_hand_is_not_in_force() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"{}\"]\n", up.url())).await;
    // Once the first checks are in, nothing but a command saves the state.
    assert!(all_servers_healthy(&proxy).await);
    assert!(ctl(&proxy, on(Some("Database upgrade"))).await.ok);
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok && r.warnings.is_empty(), "what the proxy wrote: {r:?}");
    let file = proxy.dir.path().join("intermission-state.json");
    // Maintenance off, by hand, in place.
    std::fs::write(&file, r#"{"version": 1}"#).unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.state.as_ref().unwrap().mode.as_str(), "maintenance");
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(
        r.warnings[0].contains("intermission-state.json")
            && r.warnings[0].contains("reads it at start only"),
        "{r:?}"
    );
    // The next change replaces the file, which is then the proxy's own again.
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("next_window_id"), "{text}");
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok && r.warnings.is_empty(), "{r:?}");
}

/// The state file's folder removed while the proxy runs (by hand, a cleanup, a lost mount): a
/// reload of a valid config takes, where it was refused over a folder the running proxy keeps
/// whatever the file says, keeping a renewed certificate or a new message out; it says loudly
/// that changes are refused as not saved. A state put in force meanwhile by itself (here an
/// outage's start) is saved by the reload once the folder is back.
#[tokio::test]
async fn a_reload_takes_when_the_state_files_folder_is_gone_and_says_so() {
    let up = echo_upstream().await;
    let proxy = proxy_with_state_in_a_folder(&format!(
        "[upstream]\nservers = [\"{}\"]\n[health]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 1\n\
         [maintenance]\noutage_message = \"First words\"\n",
        up.url()
    ))
    .await;
    assert!(all_servers_healthy(&proxy).await);
    let folder = proxy.dir.path().join("state");
    std::fs::remove_dir_all(&folder).unwrap();
    edit_config(&proxy, |text| text.replace("First words", "Second words"));
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(
        r.warnings[0].contains("control.state_file: the folder")
            && r.warnings[0].contains("does not exist")
            && r.warnings[0].contains("this reload is in force")
            && r.warnings[0].contains("state_not_saved"),
        "{r:?}"
    );
    let r = ctl(&proxy, on(None)).await;
    assert_eq!(r.error.map(|e| e.code), Some("state_not_saved".into()));
    // The outage's start, which the proxy saves by itself (and fails to, now), shown with
    // the reloaded words.
    up.stopped().await;
    wait_mode(&proxy, "outage", Duration::from_secs(10)).await;
    let v: serde_json::Value = json(&get(&proxy.url("/")).await);
    assert_eq!(v["detail"], "Second words", "the reload is in force");
    std::fs::create_dir(&folder).unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok && r.warnings.is_empty(), "{r:?}");
    let saved = std::fs::read_to_string(folder.join("s.json")).expect("saved by the reload");
    assert!(saved.contains("\"outage_since\": \""), "{saved}");
    // A new path in a folder that does not exist is still refused: a typo the next restart
    // would stop on.
    edit_config(&proxy, |text| {
        text.replace("state/s.json", "nowhere/s.json")
    });
    let r = ctl(&proxy, Ctl::Reload).await;
    let e = r.error.expect("a new state file in no folder is refused");
    assert!(
        e.code == "reload_failed" && e.message.contains("control.state_file: the folder"),
        "{e:?}"
    );
}

/// A proxy with `sections` whose state file is `state/s.json`, in a folder of its own that a
/// test may remove.
async fn proxy_with_state_in_a_folder(sections: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let config = format!("{sections}[control]\nstate_file = \"state/s.json\"\n");
    spawn_proxy_in(dir, &with_listen(&config)).await
}

/// A state file saved, then removed with its folder, and the folder made again: the reload
/// the log asks for writes the state in force again, and calls it no edit by hand. It only
/// took the lock again, and a restart read no state: a `ctl on` was forgotten.
#[tokio::test]
async fn a_reload_writes_again_a_state_file_removed_with_its_folder() {
    let up = echo_upstream().await;
    let proxy = proxy_with_state_in_a_folder(&format!(
        "[upstream]\nservers = [\"{}\"]\n[health]\ninterval = \"3m\"\n",
        up.url()
    ))
    .await;
    let r = ctl(&proxy, on(Some("Moving house"))).await;
    assert!(r.ok, "{r:?}");
    let folder = proxy.dir.path().join("state");
    assert!(folder.join("s.json").exists(), "saved by ctl on");
    std::fs::remove_dir_all(&folder).unwrap();
    std::fs::create_dir(&folder).unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok && r.warnings.is_empty(), "{r:?}");
    let saved =
        std::fs::read_to_string(folder.join("s.json")).expect("written again by the reload");
    assert!(saved.contains("Moving house"), "{saved}");
}

/// A section the file in force had and a new one does not (cut short, or deleted with more
/// than meant) is said by the reload that applies it: its keys are back to their defaults.
#[tokio::test]
async fn a_reload_that_drops_a_section_says_so() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[maintenance]\nmessage = \"Back soon\"\n",
        up.url()
    ))
    .await;
    edit_config(&proxy, |text| {
        text.replace("[maintenance]\nmessage = \"Back soon\"\n", "")
    });
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(
        r.warnings[0].ends_with(
            "config.toml has no [maintenance] any more, which the file in force had: its keys \
             are back to their defaults (a file cut short while it was written? if so, reload \
             again once it is whole)"
        ),
        "{r:?}"
    );
    // Said once: the file now in force has none.
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok && r.warnings.is_empty(), "{r:?}");
}

#[tokio::test]
async fn a_broken_page_is_refused_at_start_and_at_reload() {
    let pages = tempfile::tempdir().unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/pages");
    for f in ["maintenance.html", "outage.html"] {
        std::fs::copy(format!("{src}/{f}"), pages.path().join(f)).unwrap();
    }
    let proxy = spawn_proxy(&format!(
        "[maintenance]\npages = \"{}\"\n",
        pages.path().display()
    ))
    .await;
    let on = Ctl::On {
        message: Some("Swapping disks".into()),
        until: None,
        retry_after: None,
        reason: None,
    };
    assert!(ctl(&proxy, on).await.ok);
    let page = || async {
        let req = http::Request::get(proxy.url("/"))
            .header("accept", "text/html")
            .body(empty())
            .unwrap();
        let resp = send(req).await;
        String::from_utf8_lossy(resp.body()).into_owned()
    };
    // A page changed on disk is served after the reload, and not before.
    std::fs::write(
        pages.path().join("maintenance.html"),
        "<p>Edited page: {{message}}</p>",
    )
    .unwrap();
    assert!(!page().await.contains("Edited page"));
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    assert_eq!(page().await, "<p>Edited page: Swapping disks</p>");
    std::fs::write(pages.path().join("outage.html"), "<p>{{mesage}}</p>").unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    let e = r.error.unwrap();
    assert_eq!(e.code, "reload_failed");
    assert!(
        e.message.contains("outage.html") && e.message.contains("mesage"),
        "{}",
        e.message
    );
    assert_eq!(
        page().await,
        "<p>Edited page: Swapping disks</p>",
        "a refused reload keeps the pages in force"
    );
    // A page that would not show the operator's words is refused the same way.
    std::fs::write(pages.path().join("outage.html"), "<p>{{message}}</p>").unwrap();
    std::fs::write(
        pages.path().join("maintenance.html"),
        "<p>Static page, since {{since}}</p>",
    )
    .unwrap();
    let e = ctl(&proxy, Ctl::Reload).await.error.unwrap();
    assert_eq!(e.code, "reload_failed");
    assert!(
        e.message
            .contains("maintenance.html never shows {{message}}"),
        "{}",
        e.message
    );
    assert_eq!(page().await, "<p>Edited page: Swapping disks</p>");
    let cfg = intermission::config::Config::parse(
        &format!(
            "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[maintenance]\npages = \"{}\"\n",
            pages.path().display()
        ),
        pages.path(),
        None,
    )
    .unwrap();
    assert!(intermission::app::start(cfg).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn ctl_prints_for_people_or_json_and_exits_with_the_documented_codes() {
    let dir = tempfile::tempdir().unwrap();
    let up = echo_upstream().await;
    let proxy = ProxyProcess::start(
        dir.path(),
        &format!("[upstream]\nservers = [\"{}\"]\n", up.url()),
    );
    let cfg = dir.path().join("config.toml");
    let run = |args: &[&str]| ctl_with(&cfg, args);

    let out = run(&[
        "on",
        "--message",
        "Planned DB work",
        "--until",
        "+45m",
        "--reason",
        "ticket 1234",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("maintenance")
            && human.contains("Planned DB work")
            && human.contains("ticket 1234"),
        "{human}"
    );

    // SPEC §5: the socket's `state` is "the same object as `ctl status --json`", however
    // the flag is placed (as people type it: after the command, too).
    let out = run(&["--json", "status"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mode"], "maintenance");
    assert_eq!(v["reason"], "ticket 1234");
    let after = run(&["status", "--json"]);
    assert_eq!(after.status.code(), Some(0));
    assert_eq!(after.stdout, out.stdout);
    let socket = dir.path().join("intermission.sock");
    let mut c = intermission::control::client::Client::connect(&socket)
        .await
        .unwrap();
    let line: serde_json::Value =
        serde_json::from_str(&c.raw(br#"{"cmd":"status"}"#).await.unwrap()).unwrap();
    assert_eq!(line["ok"], true);
    let mut theirs = line["state"].clone();
    let mut ours = v.clone();
    // Health checks run on their own: their last check moves between the two asks.
    for o in [&mut theirs, &mut ours] {
        o["upstream"] = serde_json::Value::Null;
        o["retry_after"] = serde_json::Value::Null;
    }
    assert_eq!(ours, theirs);
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let by = v["by"].as_str().unwrap();
    assert!(by == user || by.starts_with("uid "), "by = {by}");

    assert_eq!(
        run(&["update", "--message", "Almost done"]).status.code(),
        Some(0)
    );
    assert_eq!(run(&["off"]).status.code(), Some(0));
    let out = run(&["update", "--message", "nothing held"]);
    assert_eq!(out.status.code(), Some(1), "refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("conflict"));
    assert_eq!(
        run(&["force-open", "sideways"]).status.code(),
        Some(2),
        "bad usage"
    );
    // The check at start runs at once; wait (bounded) until it has said something.
    let mut health = serde_json::Value::Null;
    for _ in 0..250 {
        let out = run(&["--json", "health"]);
        assert_eq!(out.status.code(), Some(0));
        health = serde_json::from_slice(&out.stdout).unwrap();
        if health["health"][0]["healthy"] == true {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let server = &health["health"][0];
    assert_eq!(server["server"], up.url(), "{health}");
    assert_eq!(server["healthy"], true, "{health}");
    assert!(server["since"].is_string(), "{health}");
    assert!(server["last_check"].is_string(), "{health}");
    assert!(server["consecutive"].as_u64().unwrap() >= 1, "{health}");
    assert!(server["last_latency_ms"].as_f64().is_some(), "{health}");
    let out = run(&["health"]);
    assert_eq!(out.status.code(), Some(0));
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains(&format!("{}  healthy since ", up.url()))
            && human.contains("in a row")
            && human.contains("last check")
            && human.contains(" ms"),
        "{human}"
    );
    assert_eq!(run(&["reload"]).status.code(), Some(0));
    // A broken config file does not lock the operator out: ctl only needs the socket.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{good}\n[maintenance]\nretry_after = \"whenever\"\n"),
    )
    .unwrap();
    assert_eq!(run(&["status"]).status.code(), Some(0));
    let out = run(&["reload"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the proxy refuses the broken file"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("maintenance.retry_after"));
    // A file that does not even parse: ctl says so, and tries the default socket (here the
    // proxy's own, since the test's config leaves it at the default).
    std::fs::write(&cfg, format!("{good}\n[maintenance\n")).unwrap();
    let out = run(&["status"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not parse"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `-s` names the socket itself, without a config file.
    let out = bin()
        .args(["ctl", "--json", "-s"])
        .arg(dir.path().join("intermission.sock"))
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["mode"], "normal", "{status}");
    drop(proxy);
    let out = bin()
        .args(["ctl", "-s"])
        .arg(dir.path().join("nobody.sock"))
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "no proxy");
}

/// Every `ctl` command through the binary, as an operator types it: each reaches the proxy as
/// the command it names, and a mistyped time or duration is bad usage (exit 2) before
/// anything is sent.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_commands_do_what_they_name_and_bad_times_are_bad_usage() {
    let dir = tempfile::tempdir().unwrap();
    let up = echo_upstream().await;
    let proxy = ProxyProcess::start(
        dir.path(),
        &format!(
            "[upstream]\nservers = [\"{}\"]\n[maintenance]\nretry_after = \"45s\"\n",
            up.url()
        ),
    );
    let cfg = dir.path().join("config.toml");
    let run = |args: &[&str]| {
        let out = ctl_with(&cfg, args);
        let json = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok();
        (
            out.status.code(),
            json,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let status = || {
        let (code, v, err) = run(&["--json", "status"]);
        assert_eq!(code, Some(0), "{err}");
        v.unwrap()
    };

    for (args, flag) in [
        (vec!["on", "--until", "tomorrow"], "until"),
        (vec!["on", "--until", "2026-12-01T02:00:00"], "no time zone"),
        (vec!["on", "--retry-after", "soonish"], "retry_after"),
        (
            vec!["schedule", "add", "--start", "+1h", "--end", "later"],
            "end",
        ),
        (vec!["force-open", "maybe"], "maybe"),
        (vec!["schedule", "remove", "first"], "first"),
    ] {
        let (code, v, err) = run(&[&["--json"], &args[..]].concat());
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
        let v = v.expect("--json prints an object for bad usage too");
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["code"], "bad_usage");
    }
    // A missing argument is named in the JSON too, not only on stderr.
    let (code, v, _) = run(&["--json", "schedule", "add"]);
    assert_eq!(code, Some(2));
    let said = v.unwrap()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(said.contains("--start") && said.contains("--end"), "{said}");
    assert_eq!(status()["mode"], "normal", "nothing was sent");

    // An offset is honoured: two hours from now written at +01:00 is one hour later on the
    // clock face than in UTC.
    let at = std::time::SystemTime::now() + Duration::from_secs(7200);
    let utc = humantime::format_rfc3339_seconds(at).to_string();
    let local = humantime::format_rfc3339_seconds(at + Duration::from_secs(3600))
        .to_string()
        .replace('Z', "+01:00");
    let (code, _, err) = run(&["on", "--until", &local]);
    assert_eq!(code, Some(0), "{err}");
    let v = status();
    assert_eq!(v["mode"], "maintenance");
    assert_eq!(v["until"], utc.as_str(), "{local}");
    let (code, _, err) = run(&["on", "--retry-after", "10m"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(status()["until"], utc.as_str(), "on again keeps until");
    assert_eq!(run(&["off"]).0, Some(0));
    let (code, _, err) = run(&["on", "--retry-after", "10m"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(status()["retry_after"], 600);
    assert_eq!(run(&["off"]).0, Some(0));
    assert_eq!(status()["mode"], "normal");

    assert_eq!(status()["force_open"], false);
    assert_eq!(run(&["force-open", "on"]).0, Some(0));
    assert_eq!(status()["force_open"], true);
    assert_eq!(run(&["force-open", "off"]).0, Some(0));
    assert_eq!(status()["force_open"], false);

    let (code, v, err) = run(&[
        "--json",
        "schedule",
        "add",
        "--start",
        "+1h",
        "--end",
        "+2h",
        "--message",
        "Window",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(v.unwrap()["ok"], true);
    let (code, v, _) = run(&["--json", "schedule", "list"]);
    assert_eq!(code, Some(0));
    let list = v.unwrap()["schedules"].clone();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["message"], "Window");
    assert_eq!(status()["schedules"], list, "status lists the schedules");
    let id = list[0]["id"].to_string();
    let (code, human, _) = {
        let out = bin()
            .arg("ctl")
            .arg("-c")
            .arg(&cfg)
            .args(["schedule", "list"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            (),
        )
    };
    assert_eq!(code, Some(0));
    assert!(
        human.contains(&format!("window {id} ")) && human.contains("\"Window\""),
        "{human}"
    );
    assert_eq!(run(&["schedule", "remove", &id]).0, Some(0));
    let (code, v, _) = run(&["--json", "schedule", "remove", &id]);
    assert_eq!(code, Some(1), "a second remove is refused");
    assert_eq!(v.unwrap()["error"]["code"], "not_found");
    assert_eq!(status()["schedules"], serde_json::json!([]));

    drop(proxy);
    let (code, v, _) = run(&["--json", "status"]);
    assert_eq!(code, Some(3), "no proxy");
    let v = v.expect("--json prints an object when no proxy answers");
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["code"], "no_proxy");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_config() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[upstream]\nservers = [\"{}\"]\n[maintenance]\nmessage = \"Before HUP\"\n",
        up.url()
    );
    let proxy = ProxyProcess::start(dir.path(), &config);
    proxy
        .ctl(&Ctl::On {
            message: None,
            until: None,
            retry_after: None,
            reason: None,
        })
        .await
        .unwrap();
    let path = dir.path().join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("Before HUP", "After HUP")).unwrap();
    proxy.signal("HUP");
    let mut detail = String::new();
    for _ in 0..200 {
        let v: serde_json::Value = json(&get(&proxy.url("/")).await);
        detail = v["detail"].as_str().unwrap_or_default().to_owned();
        if detail == "After HUP" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(detail, "After HUP");
}

/// A change that cannot be saved is not made (SPEC §5): the operator hears
/// `state_not_saved`, clients see no change, and once the state file can be written again
/// the same request works.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_that_cannot_be_saved_is_refused_and_nothing_changes() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("sub");
    std::fs::create_dir(&folder).unwrap();
    let proxy = spawn_proxy_in(
        dir,
        &format!(
            "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[upstream]\nservers = [\"{}\"]\n[control]\nstate_file = \"sub/state.json\"\n",
            up.url()
        ),
    )
    .await;
    // The state file's folder becomes a file: no write can succeed, whoever runs the test.
    std::fs::remove_dir_all(&folder).unwrap();
    std::fs::write(&folder, "not a folder").unwrap();
    let socket = proxy.dir.path().join("intermission.sock");
    let refused = intermission::control::client::request(&socket, &on(Some("Lost")))
        .await
        .unwrap();
    assert!(!refused.ok);
    let error = refused.error.unwrap();
    assert_eq!(error.code, "state_not_saved");
    // What to do, said where the operator reads it.
    assert!(
        error.message.contains("state.json") && error.message.contains("send it again"),
        "{}",
        error.message
    );
    // By its cause: a folder that is no folder any more is no full disk.
    assert!(
        error.message.contains("no folder any more") && !error.message.contains("Make room"),
        "{}",
        error.message
    );
    assert_eq!(proxy_mode(&proxy).await, "normal");
    assert_eq!(get(&proxy.url("/")).await.status(), 200, "still forwarded");

    std::fs::remove_file(&folder).unwrap();
    std::fs::create_dir(&folder).unwrap();
    let done = intermission::control::client::request(&socket, &on(Some("Saved")))
        .await
        .unwrap();
    assert!(done.ok, "{:?}", done.error);
    assert_eq!(get(&proxy.url("/")).await.status(), 503);
    assert!(folder.join("state.json").exists());
}

/// The proxy refuses an oversized line before reading all of it and closes, which fails the
/// rest of the client's write: its answer must still be read and reported, not lost behind
/// a broken pipe.
#[tokio::test]
async fn the_answer_to_an_oversized_line_is_not_lost_to_the_failed_write() {
    let proxy = spawn_proxy("").await;
    let socket = proxy.dir.path().join("intermission.sock");
    // Far more than the socket buffers hold, so the write cannot finish before the close.
    let huge = format!(
        "{{\"cmd\":\"update\",\"message\":\"{}\"}}",
        "x".repeat(4 << 20)
    );
    let mut c = Client::connect(&socket).await.unwrap();
    let r = parse(&c.raw(huge.as_bytes()).await.unwrap());
    assert_eq!(r.error.unwrap().code, "line_too_long");
    let r = intermission::control::client::request(
        &socket,
        &Ctl::Update {
            message: "x".repeat(4 << 20),
        },
    )
    .await
    .unwrap();
    assert!(!r.ok);
    assert_eq!(r.error.unwrap().code, "line_too_long");
    assert!(ctl(&proxy, Ctl::Status).await.ok);
}

/// An answer that cannot be written (a full disk) is no success: said on stderr with exit 4
/// (the proxy did the command; 1 says it refused), where `ctl status > /dev/full` exited 0
/// and a script took the output it never got for done. A refusal keeps its 1.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_whose_answer_cannot_be_written_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "");
    let cfg = dir.path().join("config.toml");
    let full = || {
        std::fs::File::options()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let run = |args: &[&str]| {
        bin()
            .arg("ctl")
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .stdout(full())
            .output()
            .unwrap()
    };
    for args in [
        &["status"][..],
        &["--json", "status"],
        &["on", "--message", "Full"],
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {err}");
        assert!(
            err.contains("cannot write the output") && err.contains("No space left"),
            "{args:?}: {err}"
        );
        assert!(err.contains("the command was done"), "{args:?}: {err}");
    }
    // Done all the same.
    let state = proxy.ctl(&Ctl::Status).await.unwrap().state.unwrap();
    assert_eq!(state.mode.as_str(), "maintenance");
    let out = run(&["update", "--message", ""]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    drop(proxy);
}

/// `ctl` does not send what the protocol would refuse for its size: bad usage, saying the
/// limit, and nothing reaches the proxy.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_refuses_a_request_too_long_for_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "");
    let cfg = dir.path().join("config.toml");
    let run = |args: &[&str]| ctl_with(&cfg, args);
    let long = "x".repeat(70_000);
    let out = run(&["--json", "on", "--message", &long]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "bad_usage", "{v}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("65536"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["--json", "status"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(v["mode"], "maintenance", "nothing was sent: {v}");
    // A long message that fits in a line still goes through.
    let fits = "x".repeat(1_500);
    assert_eq!(run(&["on", "--message", &fits]).status.code(), Some(0));
    drop(proxy);
}

/// `-c` and `-s` may come after the command, as `--json` may: `ctl status -c
/// /etc/intermission/config.toml`, the config named last as many tools take it, was refused
/// as "unexpected argument '-c'" (exit 2), with no hint of where it goes, mid-incident.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_takes_the_config_or_socket_after_the_command_too() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "");
    let cfg = dir.path().join("config.toml");
    let sock = dir.path().join("intermission.sock");
    let (cfg, sock) = (cfg.to_str().unwrap(), sock.to_str().unwrap());
    let run = |args: &[&str]| bin().arg("ctl").args(args).output().unwrap();
    let out = run(&["on", "-m", "after the command", "-c", cfg]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = run(&[
        "schedule", "add", "--start", "+1h", "--end", "+2h", "--socket", sock,
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = run(&["status", "--json", "-s", sock]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["message"], "after the command", "{v}");
    assert_eq!(v["schedules"].as_array().unwrap().len(), 1, "{v}");
    // Both, wherever they are, are still one too many.
    let out = run(&["-c", cfg, "status", "-s", sock]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{out:?}"
    );
    drop(proxy);
}

/// A text that begins with a hyphen ("- step 2 of 3", "-5 % capacity") is a text: clap took
/// it for an option and refused the command line ("unexpected argument '- ' found", exit 2),
/// leaving an operator mid-incident to guess why. A flag left without its text, which then
/// takes the next option for it, is bad usage, and nothing is sent.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_texts_may_begin_with_a_hyphen_and_an_option_is_no_text() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "");
    let cfg = dir.path().join("config.toml");
    let run = |args: &[&str]| ctl_with(&cfg, args);
    let status = || {
        let out = run(&["--json", "status"]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let out = run(&["on", "-m", "- step 1 of 3: backups", "--reason", "-"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for (args, shown) in [
        (
            &["update", "--message", "-- step 2 of 3"][..],
            "-- step 2 of 3",
        ),
        (&["update", "-m", "-5 % capacity"], "-5 % capacity"),
        (&["on", "--message", "-x-"], "-x-"),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert_eq!(status()["message"], shown, "{args:?}");
    }
    let out = run(&[
        "schedule", "add", "--start", "+1h", "--end", "+2h", "-m", "- later",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(status()["schedules"][0]["message"], "- later");
    // Whether `ctl` says it, or clap, at the argument left over.
    for (args, said) in [
        (&["update", "--message", "--json"][..], true),
        (&["update", "-m", "-h"], true),
        (&["on", "--message", "--reason"], true),
        (
            &[
                "schedule", "add", "--start", "+3h", "--end", "+4h", "-m", "--json",
            ],
            true,
        ),
        (&["on", "--message", "--until", "+1h"], false),
        (&["on", "--reason", "--message", "x"], false),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.contains("an option, as its text"),
            said,
            "{args:?}: {err}"
        );
    }
    let v = status();
    assert_eq!(v["message"], "-x-", "nothing was sent: {v}");
    assert_eq!(v["until"], serde_json::Value::Null, "{v}");
    assert_eq!(v["schedules"].as_array().unwrap().len(), 1, "{v}");
    drop(proxy);
}

/// A config whose `control.socket` is empty (refused by `check`) names no socket: `ctl -c`
/// dialled the config's folder and said "it is a folder, not a socket: -s names the socket
/// itself", of a socket nobody had named with `-s`. It says the file has none, still as no
/// proxy answering (exit 3), whether the file parses or is read line by line.
#[test]
fn ctl_says_a_config_without_a_control_socket_has_none() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    for (text, at) in [
        ("[control]\nsocket = \"\"\n", ""),
        ("[control]\nsocket = \"\"\n[maintenance\n", " (its line 2)"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = ctl_with(&cfg, &["status"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains(&format!(
                "{} has no control socket configured: its control.socket is empty{at}",
                cfg.display()
            )) && !err.contains("-s names the socket itself"),
            "{err}"
        );
        let out = ctl_with(&cfg, &["--json", "status"]);
        assert_eq!(out.status.code(), Some(3));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["error"]["code"], "no_proxy", "{v}");
    }
}

/// A syntax error elsewhere in the config does not send `ctl` to the default socket when the
/// file names another: the operator reaches the proxy and sees the reload refused.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_finds_a_custom_socket_in_a_config_that_does_not_parse() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "[control]\nsocket = \"ctl.sock\"\n");
    let cfg = dir.path().join("config.toml");
    let run = |args: &[&str]| ctl_with(&cfg, args);
    assert_eq!(run(&["status"]).status.code(), Some(0));
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{good}\n[maintenance\nmessage = \"x\"\n")).unwrap();
    let out = run(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("does not parse") && err.contains("ctl.sock"),
        "the warning says which socket is used: {err}"
    );
    let out = run(&["--json", "reload"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the proxy refuses the reload: {err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert_ne!(v["error"]["code"], "no_proxy", "{v}");
    drop(proxy);
}

/// A config saved with one character in Latin-1 (an editor's setting) is refused by the
/// proxy, but `ctl -c` still finds the socket it names: it exited 2 ("not UTF-8 text")
/// before trying, and `off`, `status` and `systemctl reload` could not reach the proxy.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_reaches_the_proxy_through_a_config_that_is_not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "[control]\nsocket = \"ctl.sock\"\n");
    let cfg = dir.path().join("config.toml");
    let run = |args: &[&str]| ctl_with(&cfg, args);
    assert_eq!(run(&["status"]).status.code(), Some(0));
    let mut bad = std::fs::read(&cfg).unwrap();
    bad.extend_from_slice(b"\n[maintenance]\nmessage = \"Back at 18:00 \x96 sorry\"\n");
    std::fs::write(&cfg, &bad).unwrap();
    let out = run(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("not UTF-8"), "the warning says why: {err}");
    let out = run(&["--json", "reload"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the proxy refuses the reload: {err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let message = v["error"]["message"].as_str().unwrap_or_default();
    // The line the proxy names is the one to mend: the appended message's line.
    let line = bad.iter().filter(|&&b| b == b'\n').count();
    assert!(
        message.contains("not UTF-8") && message.contains(&format!("line {line},")),
        "{v}"
    );
    drop(proxy);
}

/// A reload keeps the control socket the proxy started with, and says so; `ctl -c` then reads
/// the new path from the file and finds nothing there. What it says names that case, where it
/// sent the operator to `kill -HUP`, which binds the old path again and not the new one.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_says_a_changed_control_socket_waits_for_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "");
    let cfg = dir.path().join("config.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{good}\n[control]\nsocket = \"other.sock\"\n"),
    )
    .unwrap();
    let r = proxy.ctl(&Ctl::Reload).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert!(
        r.warnings.iter().any(|w| w.contains("control.socket")),
        "the reload says the socket waits for a restart: {r:?}"
    );
    let out = ctl_with(&cfg, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("other.sock")
            && err.contains("control.socket was changed in the config")
            && err.contains("-s"),
        "{err}"
    );
    drop(proxy);
}

/// When no proxy answers, `ctl` says what is at the path it tried, for what an operator got
/// wrong at 3 a.m.: run outside the config's folder without `-c` (the built-in default socket
/// was tried), `-s` given the config file or a folder, a socket a killed proxy left. Each was
/// "Connection refused" or "No such file", with advice to `kill -HUP` a proxy that was fine.
#[test]
fn ctl_says_why_no_proxy_answered_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let said = |dir: &std::path::Path, args: &[&str]| {
        let out = bin()
            .current_dir(dir)
            .arg("ctl")
            .arg("--json")
            .args(args)
            .arg("status")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["error"]["code"], "no_proxy", "{v}");
        v["error"]["message"].as_str().unwrap().to_owned()
    };
    let told = said(dir.path(), &[]);
    assert!(
        told.contains("no config file was named") && told.contains("-c PATH"),
        "{told}"
    );
    assert!(!told.contains("kill -HUP"), "{told}");

    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "[control]\nsocket = \"gone.sock\"\n").unwrap();
    let told = said(dir.path(), &[]);
    assert!(
        told.contains("kill -HUP") && !told.contains("no config file"),
        "a config that names the socket is no guess: {told}"
    );

    let told = said(dir.path(), &["-s", "config.toml"]);
    assert!(told.contains("regular file, not a socket"), "{told}");
    assert!(told.contains("-c"), "{told}");
    let told = said(dir.path(), &["-s", "."]);
    assert!(told.contains("folder, not a socket"), "{told}");
    // A mistyped folder is no removed socket: the path is to be checked first, and only then
    // (the folder removed under a running proxy) is it made again and the proxy sent SIGHUP.
    let told = said(dir.path(), &["-s", "rnu/intermission.sock"]);
    let check = told.find("its folder rnu does not exist: check the path");
    let remake = told.find("install -d -m 0755 -o USER rnu");
    let hup = told.find("`kill -HUP` the proxy's PID");
    assert!(
        check.is_some() && check < remake && remake < hup,
        "check the path, then make the folder and SIGHUP: {told}"
    );

    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let told = said(dir.path(), &["-s", "stale.sock"]);
    assert!(told.contains("nothing listens on it"), "{told}");
}

/// A socket path too long for a Unix socket is said as `check` says it, with the limit and
/// the path's length, whether `-s` or the config named it: before, `ctl` printed the
/// system's "path must be shorter than SUN_LEN".
#[test]
fn ctl_says_a_socket_path_too_long_as_check_does() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join(format!("{}.sock", "a".repeat(120)));
    let len = long.as_os_str().len();
    let limit = format!("is {len} bytes long; a control socket's path takes at most 98");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[control]\nsocket = \"{}\"\n", long.display()),
    )
    .unwrap();
    let checked = bin().arg("check").arg("-c").arg(&config).output().unwrap();
    let checked = String::from_utf8_lossy(&checked.stdout).into_owned()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(checked.contains(&limit), "{checked}");
    for (args, names) in [
        (
            vec!["-s".into(), long.clone().into_os_string()],
            "check -s SOCKET",
        ),
        (
            vec!["-c".into(), config.clone().into_os_string()],
            "check the config's control.socket",
        ),
    ] {
        let out = bin()
            .arg("ctl")
            .arg("--json")
            .args(&args)
            .arg("status")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["error"]["code"], "no_proxy", "{v}");
        let said = v["error"]["message"].as_str().unwrap();
        assert!(
            said.contains(&limit) && said.contains(names) && !said.contains("SUN_LEN"),
            "{said}"
        );
    }
}

/// The 64 KiB limit is on a line's content: CR LF and LF endings count the same.
#[tokio::test]
async fn the_line_limit_does_not_count_the_line_ending() {
    let proxy = spawn_proxy("").await;
    let socket = proxy.dir.path().join("intermission.sock");
    // `{"cmd":"status"` padded with spaces to `len` bytes, then `}`.
    let line = |len: usize| {
        let head = br#"{"cmd":"status""#;
        let mut l = head.to_vec();
        l.resize(len - 1, b' ');
        l.push(b'}');
        l
    };
    let max = intermission::control::protocol::MAX_LINE;
    for ending in [&b""[..], b"\r"] {
        // `raw` adds the LF.
        let mut c = Client::connect(&socket).await.unwrap();
        let r = parse(&c.raw(&[line(max), ending.to_vec()].concat()).await.unwrap());
        assert!(r.ok, "{max} bytes + {ending:?}LF: {:?}", r.error);
        assert!(c.request(&Ctl::Status).await.unwrap().ok, "still open");
        let r = parse(
            &c.raw(&[line(max + 1), ending.to_vec()].concat())
                .await
                .unwrap(),
        );
        assert_eq!(
            r.error.map(|e| e.code).as_deref(),
            Some("line_too_long"),
            "{} bytes + {ending:?}LF",
            max + 1
        );
    }
}

/// A `retry_after` under a second (zero too) is refused as the config refuses
/// `maintenance.retry_after = "0"` or `"500ms"`, rather than reaching clients as
/// `Retry-After: 1`.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_under_a_second_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "");
    let mut c = Client::connect(&dir.path().join("intermission.sock"))
        .await
        .unwrap();
    for zero in ["0", "0s", "0ms", "500ms", "0.0001s"] {
        let r = c
            .request(&Ctl::On {
                message: None,
                until: None,
                retry_after: Some(zero.into()),
                reason: None,
            })
            .await
            .unwrap();
        let e = r.error.expect(zero);
        assert_eq!(e.code, "bad_request", "{zero}");
        assert!(e.message.contains("retry_after"), "{}", e.message);
    }
    let cfg = dir.path().join("config.toml");
    let run = |args: &[&str]| ctl_with(&cfg, args);
    let out = run(&["--json", "on", "--retry-after", "0"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "refused, as any refused request"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    let out = run(&["on", "--retry-after", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad_request"));
    let r = c.request(&Ctl::Status).await.unwrap();
    assert_ne!(
        r.state.unwrap().mode.as_str(),
        "maintenance",
        "nothing was switched on"
    );
    assert_eq!(run(&["on", "--retry-after", "1"]).status.code(), Some(0));
    drop(proxy);
}

/// A start that fails after the control socket was made (here: the admin listener's address
/// is taken) removes it, so that nothing is left for an operator or the next start to find.
#[tokio::test]
async fn a_failed_start_leaves_no_control_socket() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"{}\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let config = intermission::config::Config::load_file(&path).unwrap();
    assert!(intermission::app::start(config).await.is_err());
    assert!(
        !dir.path().join("intermission.sock").exists(),
        "the control socket was left behind"
    );
}

/// `off` is "planned maintenance off" (SPEC §1), and a window is planned maintenance (§3):
/// during a window, `ctl off` ends it and says so, naming it, and traffic flows again.
#[tokio::test(flavor = "multi_thread")]
async fn off_during_a_window_ends_it_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "");
    let cfg = dir.path().join("config.toml");
    let added = ctl_with(&cfg, &["schedule", "add", "--start", "+1s", "--end", "+1h"]);
    assert_eq!(added.status.code(), Some(0), "{added:?}");
    let in_force = wait_until(Duration::from_secs(10), || {
        let out = ctl_with(&cfg, &["--json", "status"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|v| v["mode"] == "maintenance")
    })
    .await;
    assert!(in_force, "the window did not start");
    let off = ctl_with(&cfg, &["off"]);
    assert_eq!(off.status.code(), Some(0), "{off:?}");
    let err = String::from_utf8_lossy(&off.stderr);
    assert!(
        err.contains("maintenance window 1") && err.contains("`off` ended it"),
        "{err}"
    );
    let out = String::from_utf8_lossy(&off.stdout);
    // No upstream runs here: what `off` leaves is `outage`, and no longer maintenance.
    assert!(out.contains("mode:        outage"), "{out}");
    drop(proxy);
}

/// The proxy that `strace` (the process `wrapper`) started and traces.
fn traced_child(wrapper: u32) -> u32 {
    let children = format!("/proc/{wrapper}/task/{wrapper}/children");
    let text = std::fs::read_to_string(&children).unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

/// SPEC §6 with a `ctl` command in flight: a SIGTERM while the state write of `on` is under
/// way (each fsync slowed to 0.7 s by `strace`, as a busy disk would) lets the change finish
/// and be answered as done, and it is in force after the restart; a command sent after the
/// stop began is either applied and said so (by the next proxy, when the stopping one refused it
/// as not applied), or refused, and never both.
/// Before, `ctl` said "refused (internal)" about a change that was saved and in force.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_state_write_answers_the_command_truthfully() {
    if !tool_present("strace", "-V", "strace") {
        return;
    }
    let up = echo_upstream().await;
    let config = format!("[upstream]\nservers = [\"{}\"]\n", up.url());
    let dir = tempfile::tempdir().unwrap();
    let strace = [
        "strace",
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        "trace=fsync",
        "-e",
        "inject=fsync:delay_enter=700000",
    ];
    let mut proxy = ProxyProcess::start_via(&strace, dir.path(), &config);
    let pid = traced_child(proxy.child.id());
    let socket = dir.path().join("intermission.sock");
    let ctl = |args: &[&str]| {
        bin()
            .arg("ctl")
            .arg("-s")
            .arg(&socket)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = ctl(&["on", "--message", "first"]);
    // The temporary file exists from the write's start until its rename, after the fsync.
    let tmp = dir.path().join(".intermission-state.json.tmp");
    assert!(
        wait_until(Duration::from_secs(10), || tmp.exists()).await,
        "the state write never began"
    );
    let second = ctl(&["update", "--message", "second"]);
    let term = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let first = first.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&first.stderr);
    assert_eq!(
        first.status.code(),
        Some(0),
        "`on` was not answered as done: {said}"
    );
    let exit = proxy.wait_exit(Duration::from_secs(20));
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(0),
        "the proxy did not stop cleanly"
    );

    // A `second` the stopping proxy refused as not applied is sent to the next one.
    let proxy = ProxyProcess::start(dir.path(), &config);
    let second = second.wait_with_output().unwrap();
    let second_said = String::from_utf8_lossy(&second.stderr).into_owned();
    let state = proxy.ctl(&Ctl::Status).await.unwrap().state.unwrap();
    assert_eq!(
        state.mode.as_str(),
        "maintenance",
        "the saved `on` was lost"
    );
    let message = state.message.unwrap_or_default();
    match second.status.code() {
        Some(0) => assert_eq!(message, "second", "`update` said done, yet is not in force"),
        // Sent once the socket was gone, or connected into the listener's queue as it
        // closed, which the kernel resets (seen at the read, or as a broken pipe at the
        // write): never read, never applied. (One the stopping proxy refused as not applied
        // went to the next, and is in force.)
        Some(3) => {
            assert!(
                second_said.contains("no proxy answered")
                    || second_said.contains("reset by peer")
                    || second_said.contains("Broken pipe"),
                "{second_said}"
            );
            assert_eq!(message, "first", "`update` was refused, yet is in force");
        }
        other => panic!("`update` ended with {other:?}: {second_said}"),
    }
}

/// A proxy that is stopped (`SIGSTOP`; a hung disk does the same) leaves `ctl` waiting 15 s
/// and exiting 3; the request was sent, and the proxy applies it once it runs again. The
/// message says so and points to `ctl status`, where "did not answer" alone read as
/// "nothing happened", and an operator sent the change again or gave up on it.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_proxy_s_ctl_timeout_says_the_request_may_still_take_effect() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[upstream]\nservers = [\"{}\"]\n", up.url());
    let proxy = ProxyProcess::start(dir.path(), &config);
    proxy.signal("STOP");
    let out = bin()
        .arg("ctl")
        .arg("-s")
        .arg(dir.path().join("intermission.sock"))
        .args(["on", "--message", "late"])
        .output()
        .unwrap();
    proxy.signal("CONT");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("within 15 s"), "{err}");
    assert!(err.contains("may still take effect"), "{err}");
    // The command to check with names the socket as this one did, to be pasted as it is.
    let again = format!(
        "`intermission ctl -s {} status`",
        dir.path().join("intermission.sock").display()
    );
    assert!(err.contains(&again), "{err}");
    // As the message says: applied once the proxy runs again.
    let applied = wait_until_async(|| async {
        let state = proxy.ctl(&Ctl::Status).await.unwrap().state.unwrap();
        state.message.as_deref() == Some("late")
    })
    .await;
    assert!(
        applied,
        "the request sent to the stopped proxy was not applied"
    );
}

/// A stalled proxy whose queue of connections not yet taken is full (stopped, starved, or
/// flooded by a burst of scripts) refuses a connect at once (`EAGAIN`) rather than letting it
/// wait. `ctl` said "no proxy answered" at once, exit 3, and an operator restarted a proxy
/// that was running; it connects again until its deadline, and the proxy, running again,
/// takes the request and answers it.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_waits_for_a_proxy_whose_connection_queue_is_full() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[upstream]\nservers = [\"{}\"]\n", up.url());
    let proxy = ProxyProcess::start(dir.path(), &config);
    let socket = dir.path().join("intermission.sock");
    // The queue holds `net.core.somaxconn` connections (4096 by default): one descriptor each.
    let _ = rlimit::increase_nofile_limit(70_000);
    proxy.signal("STOP");
    let mut queued = Vec::new();
    let full = loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(s) => queued.push(s),
            Err(e) => break e.kind() == std::io::ErrorKind::WouldBlock,
        }
        if queued.len() > 66_000 {
            break false;
        }
    };
    if !full {
        proxy.signal("CONT");
        // CI runs as root, where the descriptors for a full queue are always to be had.
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "the control socket's queue could not be filled ({} connections)",
            queued.len()
        );
        eprintln!("SKIPPED: the control socket's queue could not be filled");
        return;
    }
    let ctl = tokio::spawn(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_intermission"))
            .arg("ctl")
            .arg("-s")
            .arg(&socket)
            .args(["on", "--message", "queued"])
            .output(),
    );
    // The proxy stays stalled a moment, as it would for whatever stopped it: `ctl`, started,
    // meets the full queue meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(queued);
    proxy.signal("CONT");
    let out = ctl.await.unwrap().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let state = proxy.ctl(&Ctl::Status).await.unwrap().state.unwrap();
    assert_eq!(state.message.as_deref(), Some("queued"));
}

/// A proxy that reads the request and goes before it answers (killed, crashed, out of memory
/// in the middle of `on`) may have applied it: `ctl` says so, and how to check, where it said
/// "the proxy sent an answer that is not understood", which it had not, and which read as
/// "nothing happened".
#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_gone_before_it_answered_may_have_applied_the_request() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let fake = tokio::spawn(async move {
        let mut requests = Vec::new();
        for _ in 0..2 {
            let (stream, _) = listener.accept().await.unwrap();
            let mut line = String::new();
            tokio::io::BufReader::new(stream)
                .read_line(&mut line)
                .await
                .unwrap();
            requests.push(line);
        }
        requests
    });
    let run = |json: bool| ctl_on_upgrade(&socket, json);
    let out = run(false).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("without answering"), "{err}");
    assert!(err.contains("may or may not be in force"), "{err}");
    assert!(!err.contains("not understood"), "{err}");
    let again = format!("`intermission ctl -s {} status`", socket.display());
    assert!(err.contains(&again), "{err}");
    let out = run(true).await.unwrap();
    assert_eq!(out.status.code(), Some(3));
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["error"]["code"], "no_answer", "{said}");
    // Each run sent the request once, and was not refused it before sending.
    let requests = fake.await.unwrap();
    assert_eq!(requests.len(), 2);
    assert!(
        requests.iter().all(|r| r.contains(r#""cmd":"on""#)),
        "{requests:?}"
    );
}

/// A proxy whose end of the connection goes before it has read the request whole (a
/// stopping proxy closing its socket as `ctl` connects) has not applied it, whether `ctl`
/// sees that as a broken pipe at its write or as a reset at its read: both are said as "no
/// proxy answered", not applied, exit 3. The write's was "the control connection failed:
/// Broken pipe", and the read's "may or may not be in force".
#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_gone_before_it_read_the_request_did_not_apply_it() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");

    // Connected into the listener's queue, which closes before it takes the connection: the
    // write is what fails, mostly; the kernel may also let the write through and reset the
    // read (seen 1 run in 7), which is the same case and must be said the same way.
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let mut c = Client::connect(&socket).await.unwrap();
    drop(listener);
    let e = c.raw(br#"{"cmd":"off"}"#).await.unwrap_err();
    let said = e.to_string();
    assert!(
        said.starts_with(&format!("no proxy answered on {}", socket.display()))
            && (said.contains("was read (Broken pipe")
                || said.contains("was read (Connection reset"))
            && said.contains("so it was not applied"),
        "{said}"
    );
    std::fs::remove_file(&socket).unwrap();

    // Taken, the first bytes read, and closed with the rest unread (the line's end among
    // them), as `ctl` sees it: whichever call sees it first, the same words.
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let fake = tokio::spawn(async move {
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut first = [0u8; 5];
            stream.read_exact(&mut first).await.unwrap();
        }
    });
    let run = |json: bool| ctl_on_upgrade(&socket, json);
    let out = run(false).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("no proxy answered on"), "{err}");
    assert!(err.contains("so it was not applied"), "{err}");
    assert!(!err.contains("may or may not"), "{err}");
    let again = format!("`intermission ctl -s {} status`", socket.display());
    assert!(err.contains(&again), "{err}");
    let out = run(true).await.unwrap();
    assert_eq!(out.status.code(), Some(3));
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["error"]["code"], "no_proxy", "{said}");
    fake.await.unwrap();
}

/// Whatever else answers on the socket (another program, a proxy of another version) is
/// quoted by `ctl` as far as an operator needs it: its start, with control characters
/// escaped. It was written whole and raw: a 3 MiB answer filled the screen, and an escape
/// sequence in it reached the terminal.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_not_understood_is_quoted_short_and_escaped() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let fake = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        let mut answer = b"\x1b[31mnot json ".to_vec();
        answer.extend(std::iter::repeat_n(b'x', 3 << 20));
        answer.push(b'\n');
        stream.get_mut().write_all(&answer).await.unwrap();
    });
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_intermission"))
        .arg("ctl")
        .arg("-s")
        .arg(&socket)
        .arg("status")
        .output()
        .await
        .unwrap();
    fake.await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.len() < 1_000, "{} bytes on stderr", err.len());
    assert!(err.contains("not understood"), "{err}");
    assert!(!err.contains('\x1b'), "{err}");
    assert!(err.contains(r"\u{1b}[31mnot json xxx"), "{err}");
    assert!(
        err.contains(&format!("({} bytes)", 14 + (3 << 20))),
        "{err}"
    );
}

/// A change whose connection was closed for room while it waited for a hung save is told
/// `pending`: `ctl` says it was not answered, not "refused", sends nothing again (a second
/// `update` would apply twice) and exits 3, as for a proxy that did not answer in time: the
/// change takes effect once saved.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_left_pending_is_not_said_refused_nor_sent_again() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    // Each `ctl` run below connects once; a second connection from one would be a retry.
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = asked.clone();
    let fake = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut stream = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            let answer = r#"{"ok":false,"error":{"code":"pending","message":"closed to make room; it takes effect once saved"}}"#;
            stream
                .get_mut()
                .write_all(format!("{answer}\n").as_bytes())
                .await
                .unwrap();
        }
    });
    let ctl = |json: bool| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_intermission"));
        c.arg("ctl").arg("-s").arg(&socket);
        if json {
            c.arg("--json");
        }
        c.args(["update", "--message", "Still on it"]);
        c
    };
    let out = ctl(false).output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("not answered (pending)"), "{err}");
    assert!(!err.contains("refused"), "{err}");
    let out = ctl(true).output().await.unwrap();
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "pending", "{v}");
    fake.abort();
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "sent again"
    );
}

/// An operator's reason or message with a line end in it is logged on one line: in the text
/// log, a line end would begin a line of its own (`X) by="root"`), one that could pass for
/// the proxy's own.
#[tokio::test(flavor = "multi_thread")]
async fn a_line_end_in_a_reason_does_not_forge_a_log_line() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[upstream]\nservers = [\"{}\"]\n", up.url());
    let proxy = ProxyProcess::start(dir.path(), &config);
    let on = Ctl::On {
        message: None,
        until: None,
        retry_after: None,
        reason: Some("ticket 7\nINFO intermission: maintenance off".into()),
    };
    assert!(proxy.ctl(&on).await.unwrap().ok);
    let logged = |l: &String| l.contains("maintenance on (ticket 7");
    assert!(
        wait_until(Duration::from_secs(10), || proxy
            .log_lines()
            .iter()
            .any(logged))
        .await,
        "{:#?}",
        proxy.log_lines()
    );
    let lines = proxy.log_lines();
    let line = lines.iter().find(|l| logged(l)).unwrap();
    assert!(
        line.contains(r"ticket 7\nINFO intermission: maintenance off"),
        "{line}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("INFO intermission")),
        "{lines:#?}"
    );
}

/// A start without a state file says so, so that maintenance lost over a restart (a state file
/// moved, a mount that failed) can be traced in the log; a start with one says nothing of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_without_a_state_file_says_so() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[upstream]\nservers = [\"{}\"]\n", up.url());
    let said = |p: &ProxyProcess| p.log_lines().iter().any(|l| l.contains("no state file at"));
    let mut first = ProxyProcess::start(dir.path(), &config);
    assert!(said(&first), "{:#?}", first.log_lines());
    assert!(first.ctl(&on(None)).await.unwrap().ok);
    first.signal("TERM");
    assert!(first.wait_exit(Duration::from_secs(20)).is_some());
    let second = ProxyProcess::start(dir.path(), &config);
    assert!(!said(&second), "{:#?}", second.log_lines());
}

/// `ctl` reads no more than it can use: a config named by mistake that is a device or a FIFO
/// is refused at once (as `check` and `run` refuse it), and whatever listens on the socket
/// cannot make it grow without end by sending a line that never ends.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_reads_within_bounds() {
    let out = bin()
        .args(["ctl", "-c", "/dev/zero", "status"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("/dev/zero"), "{said}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("endless.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let endless = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let (mut s, _) = listener.accept().await.unwrap();
        let chunk = vec![b'x'; 1 << 20];
        while s.write_all(&chunk).await.is_ok() {}
    });
    let out = tokio::task::spawn_blocking(move || {
        bin()
            .args(["ctl", "-s"])
            .arg(&path)
            .arg("status")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    endless.abort();
    assert_ne!(out.status.code(), Some(0));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("longer than"), "{said}");
}

/// A reload's warnings reach `ctl reload`, each as `warning: …` on stderr, and in the JSON
/// answer under `warnings`, with exit 0: a reload that loaded an expired certificate, or
/// changed `admin.listen` (in force at the next restart), printed the ordinary status, and
/// only the log said why clients would refuse it. They are `check`'s, and the reload's own.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_reload_prints_the_reloads_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(dir.path(), "");
    let cfg = dir.path().join("config.toml");
    let run = |args: &[&str]| ctl_with(&cfg, args);
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    // None to say: no field, no line.
    let out = run(&["--json", "reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert!(v.get("warnings").is_none(), "{v}");
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));

    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["shop.test".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("site.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("site.key"), key.serialize_pem()).unwrap();
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{good}\n[tls]\nlisten = [\"127.0.0.1:0\"]\n[[tls.certificates]]\n\
             cert = \"site.pem\"\nkey = \"site.key\"\n[admin]\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();
    let checked = bin().arg("check").arg("-c").arg(&cfg).output().unwrap();
    assert_eq!(checked.status.code(), Some(0), "{checked:?}");
    let checked = String::from_utf8_lossy(&checked.stdout).into_owned();
    let of_check: Vec<&str> = checked
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("warning:"))
        .map(str::trim_start)
        .collect();
    assert!(
        of_check.iter().any(|w| w.contains("expired on 2021-01-01")),
        "{checked}"
    );
    let restart = "admin.listen changed; it takes effect at the next restart";

    let out = run(&["reload"]);
    let said = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("mode:"),
        "the status is printed as ever"
    );
    let lines: Vec<&str> = said
        .lines()
        .filter_map(|l| l.strip_prefix("warning: "))
        .collect();
    for warning in of_check.iter().chain([&restart]) {
        assert!(lines.contains(warning), "{warning:?} not in {said}");
    }

    let out = run(&["--json", "reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings: Vec<&str> = v["warnings"]
        .as_array()
        .unwrap_or_else(|| panic!("no warnings in {v}"))
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings, lines, "the same in JSON");
    let said = stderr(&out);
    let on_stderr: Vec<&str> = said
        .lines()
        .filter_map(|l| l.strip_prefix("warning: "))
        .collect();
    assert_eq!(on_stderr, lines, "and on stderr with --json");
    // `status` says what waits for a restart until one, where only the reload said it.
    let out = run(&["status"]);
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        shown.contains(&format!("RESTART PENDING: {restart}")),
        "{shown}"
    );
    let out = run(&["--json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["restart_pending"][0], restart, "{v}");
    // A file that no longer changes it: nothing waits.
    std::fs::write(&cfg, &good).unwrap();
    assert_eq!(run(&["reload"]).status.code(), Some(0));
    let out = run(&["status"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("RESTART PENDING"));
    drop(proxy);
}

/// `ctl on --message "Database upgrade"` to `socket`, in JSON when `json`.
fn ctl_on_upgrade(
    socket: &std::path::Path,
    json: bool,
) -> impl std::future::Future<Output = std::io::Result<std::process::Output>> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_intermission"));
    cmd.arg("ctl").arg("-s").arg(socket);
    if json {
        cmd.arg("--json");
    }
    cmd.args(["on", "--message", "Database upgrade"]).output()
}
