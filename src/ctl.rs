//! `intermission ctl`: sends one control request and prints the answer for people or as JSON.

use crate::{CtlCommand, ScheduleCommand};
use intermission::config;
use intermission::control::client;
use intermission::control::protocol::{
    ErrorBody, Request, Response, ServerHealth, StatusView, MAX_LINE,
};
use intermission::state::controller::to_change;
use intermission::state::mode::Window;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

pub fn run(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    json: bool,
    command: CtlCommand,
) -> ExitCode {
    // Said the same way for every failure before the proxy answers: on stderr for people,
    // and with `--json` also as one object on stdout, so a script always has one to read.
    let fail = |exit: u8, code: &str, message: String| {
        // What the socket's other end said reaches `message` too: written as every field is.
        eprintln!("intermission ctl: {}", terminal_safe(&message));
        if json {
            print_failure(code, &message);
        }
        ExitCode::from(exit)
    };
    // The commands suggested below name the socket as this one did, so that they can be
    // pasted as they are (from another folder than the config's too).
    let again = match (&socket, &config) {
        (Some(s), _) => format!("intermission ctl -s {}", shell_word(s)),
        (None, Some(c)) => format!("intermission ctl -c {}", shell_word(c)),
        (None, None) => "intermission ctl".to_owned(),
    };
    // Whether the socket is only the built-in default's, no config file having been named or
    // found here: an operator who forgot `-c`, or is in another folder, is told that rather
    // than that the proxy's socket file was removed.
    let mut guessed = false;
    let socket_given = socket.is_some();
    let socket = match socket {
        Some(s) => s,
        None => match socket_from_config(config.as_deref()) {
            Ok((s, defaulted)) => {
                guessed = defaulted;
                s
            }
            Err(Unusable::Unreadable(e)) => return fail(2, "bad_usage", e),
            // No proxy can be listening there: "no proxy answered" (SPEC §1), said as what it is.
            Err(Unusable::NoSocket(e)) => return fail(3, "no_proxy", e),
        },
    };
    let req = request(command);
    if let Err(e) = check_texts(&req)
        .and_then(|()| check_times(&req))
        .and_then(|()| check_size(&req))
    {
        return fail(2, "bad_usage", e);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(3, "no_answer", format!("cannot start: {e}")),
    };
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    let answer = runtime.block_on(exchange(&socket, &req, deadline));
    let too_long = config::socket_path_too_long(&socket);
    let resp = match answer {
        Ok(Ok(r)) => r,
        // No proxy of this version binds there (`check` and `run` refuse the path), so what
        // the system says of it ("path must be shorter than SUN_LEN", or no such file for
        // one a few bytes shorter) is replaced by the limit, as `check` words it.
        Ok(Err(client::ClientError::NoProxy { .. })) if too_long.is_some() => {
            let long = too_long.unwrap_or_default();
            let from = if socket_given {
                "check -s SOCKET"
            } else {
                "check the config's control.socket, which `intermission check` refuses"
            };
            let message = format!(
                "no proxy answered: {long}, so no proxy can have made its socket there: {from}"
            );
            return fail(3, "no_proxy", message);
        }
        Ok(Err(client::ClientError::NoProxy { path, source })) if guessed => {
            let message = format!(
                "no proxy answered on {path}: {source}; no config file was named and there is \
                 no ./{} in this folder, so the default socket was tried: name the proxy's \
                 config with -c PATH (the one it runs with) or its socket with -s SOCKET",
                config::DEFAULT_PATH
            );
            return fail(3, "no_proxy", message);
        }
        Ok(Err(e @ client::ClientError::NoProxy { .. })) => {
            return fail(3, "no_proxy", e.to_string())
        }
        Ok(Err(e @ client::ClientError::Denied { .. })) => {
            return fail(3, "permission_denied", e.to_string())
        }
        // The proxy's end went before it read the request: a proxy stopping (its socket
        // closed as this one connected), or stopped.
        Ok(Err(e @ client::ClientError::NotRead { .. })) => {
            let message = format!(
                "{e}; the proxy was stopping, or has stopped: check that one runs \
                 (`{again} status`), then send the command again"
            );
            return fail(3, "no_proxy", message);
        }
        // Sent, and the proxy went before it answered: as when it does not answer in time,
        // the change may be in force, and "no answer" alone read as "nothing happened".
        Ok(Err(e @ client::ClientError::Unanswered(_))) => {
            let message = format!(
                "{e}: the request was sent, and the proxy stopped (crashed, or was killed) \
                 before it answered, so the change may or may not be in force: check with \
                 `{again} status` before sending it again"
            );
            return fail(3, "no_answer", message);
        }
        // The exchange broke off or made no sense: no answer from the proxy either.
        Ok(Err(e)) => return fail(3, "no_answer", e.to_string()),
        Err(sent) => {
            let socket = socket.display();
            let limit = ANSWER_TIMEOUT.as_secs();
            // A stopped or stalled proxy reads the request when it runs again, and applies
            // it then: "did not answer" alone read as "nothing happened".
            let message = if sent {
                format!(
                    "the proxy on {socket} did not answer within {limit} s; the request was sent \
                     and may still take effect when the proxy gets to it: check with \
                     `{again} status` before sending it again"
                )
            } else {
                format!(
                    "the proxy on {socket} did not take the connection within {limit} s; nothing \
                     was sent. A socket is there and something listens on it, but its queue of \
                     connections waiting to be taken stayed full: the proxy is stalled (stopped \
                     with SIGSTOP or by a debugger, or starved of CPU or memory) or flooded with \
                     connections; it is not down, and a restart would drop its clients: see what \
                     holds it (`ps -o stat,pid,cmd -p PID`: T is stopped, `kill -CONT PID` resumes \
                     it)"
                )
            };
            return fail(3, "no_answer", message);
        }
    };
    let written = if json {
        // SPEC §5: the socket's `state` is "the same object as `ctl status --json`", so
        // `status` prints that object itself; every other command prints the reply line.
        let text = match (&req, &resp.state) {
            (Request::Status, Some(state)) if resp.ok => serde_json::to_string(state),
            _ => serde_json::to_string(&resp),
        };
        crate::to_stdout(|out| writeln!(out, "{}", text.unwrap_or_default()))
    } else {
        crate::to_stdout(|out| print_human(&mut TerminalSafe(out), &resp, &again))
    };
    // On stderr whether or not `--json` is given, so that stdout stays the answer alone; the
    // exit code is the command's, as `check`'s is with its warnings.
    for warning in &resp.warnings {
        eprintln!("warning: {}", terminal_safe(warning));
    }
    match resp.error.as_ref().map(|e| e.code.as_str()) {
        Some("busy") => eprintln!("note: {}", busy_hint(&socket, ANSWER_TIMEOUT)),
        Some("shutting_down") => eprintln!(
            "note: no proxy took its place on {} within {} s; once one runs, send the command again",
            socket.display(),
            ANSWER_TIMEOUT.as_secs()
        ),
        _ => {}
    }
    if resp.error.as_ref().is_some_and(|e| e.code == "pending") {
        // Neither done nor refused: queued behind a save that has not returned, and applied
        // once it does (or refused, which the proxy logs), as when it does not answer at all.
        ExitCode::from(3)
    } else if !resp.ok {
        ExitCode::FAILURE
    } else if !written {
        // The proxy did what it was asked: not 1, which says it refused.
        eprintln!(
            "intermission ctl: the proxy answered (the command was done), but its answer could \
             not be written: see it with `{again} status` on another output"
        );
        ExitCode::from(4)
    } else {
        ExitCode::SUCCESS
    }
}

/// Times and durations are checked here, by the proxy's own reading of a change, so that a
/// mistyped one is bad usage (exit 2) as SPEC §1 says, not a refusal. They are still sent as
/// typed: a relative `+45m` is resolved by the proxy, against its clock.
fn check_times(req: &Request) -> Result<(), String> {
    if !matches!(req, Request::On { .. } | Request::ScheduleAdd { .. }) {
        return Ok(());
    }
    to_change(req.clone(), String::new(), SystemTime::now())
        .map(drop)
        .map_err(|e| e.message)
}

/// A text that is one word shaped like an option (`--until`, `-m`, `--json`) is an option
/// taken for the text its flag was left without: `--message` and `--reason` take what
/// follows them even when it begins with a hyphen, so that "- step 2 of 3" is a message,
/// and `update --message --json` would otherwise have put "--json" on every page.
fn check_texts(req: &Request) -> Result<(), String> {
    let (texts, command): (&[(&str, &Option<String>)], &str) = match req {
        Request::On {
            message, reason, ..
        } => (&[("--message", message), ("--reason", reason)], "on"),
        Request::ScheduleAdd { message, .. } => (&[("--message", message)], "schedule add"),
        Request::Update { message } => {
            return option_shaped("--message", message, "update");
        }
        _ => return Ok(()),
    };
    texts.iter().try_for_each(|(flag, text)| match text {
        Some(text) => option_shaped(flag, text, command),
        None => Ok(()),
    })
}

fn option_shaped(flag: &str, text: &str, command: &str) -> Result<(), String> {
    let word = text.trim();
    let name = word.trim_start_matches('-');
    let dashes = word.len() - name.len();
    let shaped = matches!(dashes, 1 | 2)
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && !word.contains(char::is_whitespace)
        && (dashes == 2 || name.len() == 1);
    if !shaped {
        return Ok(());
    }
    Err(format!(
        "{command}: {flag} was given {word:?}, an option, as its text: give the text after \
         {flag} (in quotes when it has spaces), then the other options"
    ))
}

/// A request the protocol would refuse for its size (SPEC §5) is bad usage, said here with the
/// limit and what to shorten, rather than sent to be refused with the connection closed.
fn check_size(req: &Request) -> Result<(), String> {
    let len = serde_json::to_vec(req).map_or(0, |l| l.len());
    if len <= MAX_LINE {
        return Ok(());
    }
    Err(format!(
        "the request would be {len} bytes and the control protocol takes at most {MAX_LINE} \
         a line; shorten the message or reason"
    ))
}

/// A failure before the proxy answered, as `--json` prints it: the shape of a refusal.
pub fn print_failure(code: &str, message: &str) {
    let error = ErrorBody::new(code, message);
    // Said on stderr already: the exit code is the failure's.
    crate::to_stdout(|out| {
        writeln!(
            out,
            "{}",
            serde_json::to_string(&Response::error(error)).unwrap_or_default()
        )
    });
}

/// A stuck proxy must not hang an operator's terminal mid-incident.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// The first pause before asking again after the proxy did not read a request; doubled at
/// each try up to `MAX_BACKOFF`, so that a burst of scripts clears within a few tries and
/// one that waits out other connections asks about once a second.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The answer, or the failure, as `run` reports it; `Err(sent)` when `deadline` passed,
/// `sent` saying whether the request had gone out.
type Answer = Result<Result<Response, client::ClientError>, bool>;

/// Sends `req`, on a new connection each time, until the proxy reads it or `deadline` is
/// too near to try again. `busy` (its control connections all in use) and `idle` (this one
/// closed to make room for a newer one) both say that the request was not read: asked again,
/// it cannot apply twice, and an operator in an incident gets through once a slot frees
/// rather than being sent away at the first refusal. The last refusal is what is returned.
///
/// `shutting_down` says the same of a proxy that is stopping, whose socket file is already
/// gone: a restart's next instance binds it within a second or two, and the request is sent
/// to that one, so that `ctl on` typed during a deploy's restart is not lost. Until it comes,
/// or until the deadline, the stopping proxy's refusal is what is returned.
async fn exchange(socket: &Path, req: &Request, deadline: tokio::time::Instant) -> Answer {
    let mut backoff = FIRST_BACKOFF;
    // The stopping proxy's refusal, which stands until the next instance answers.
    let mut stopping: Option<Response> = None;
    loop {
        let (unread, answer) = match once(socket, req, deadline).await {
            Ok(Ok(resp)) => {
                let code = resp.error.as_ref().map(|e| e.code.as_str());
                stopping = (code == Some("shutting_down")).then(|| resp.clone());
                (
                    matches!(code, Some("busy" | "idle" | "shutting_down")),
                    Ok(Ok(resp)),
                )
            }
            // Between the stopping proxy and the next: no socket, one not yet listening, or
            // the stopping one's, closed as this connected to it.
            Ok(Err(
                e @ (client::ClientError::NoProxy { .. } | client::ClientError::NotRead { .. }),
            )) => match &stopping {
                Some(refusal) => (true, Ok(Ok(refusal.clone()))),
                None => (false, Ok(Err(e))),
            },
            other => (false, other),
        };
        // Spread, so that clients refused together do not come back together.
        let pause = backoff / 2 + backoff.mul_f64(jitter() / 2.0);
        if !unread || tokio::time::Instant::now() + pause >= deadline {
            return answer;
        }
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection, one request, within `deadline`.
async fn once(socket: &Path, req: &Request, deadline: tokio::time::Instant) -> Answer {
    let mut proxy = match connect(socket, deadline).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Ok(Err(e)),
        Err(()) => return Err(false),
    };
    tokio::time::timeout_at(deadline, proxy.request(req))
        .await
        .map_err(|_| true)
}

/// The first pause before connecting again to a socket whose queue of connections is full;
/// doubled at each try up to `MAX_BACKOFF`.
const FIRST_CONNECT_PAUSE: Duration = Duration::from_millis(10);

/// Connects within `deadline`; `Err(())` when it passed. A Unix socket whose queue of
/// connections not yet accepted is full refuses a connect at once (`EAGAIN`) rather than
/// making it wait: the proxy is there, but stalled (stopped with `SIGSTOP` or by a debugger,
/// starved of CPU, swapping) or flooded with connections. That was reported at once as "no
/// proxy answered", which sent an operator to restart a proxy that was running; it is tried
/// again, as a connect that waited would have, until the deadline.
async fn connect(
    socket: &Path,
    deadline: tokio::time::Instant,
) -> Result<Result<client::Client, client::ClientError>, ()> {
    let mut pause = FIRST_CONNECT_PAUSE;
    loop {
        match tokio::time::timeout_at(deadline, client::Client::connect(socket)).await {
            Ok(Err(client::ClientError::NoProxy { source, .. }))
                if source.kind() == std::io::ErrorKind::WouldBlock =>
            {
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(());
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_BACKOFF);
            }
            Ok(connected) => return Ok(connected),
            Err(_) => return Err(()),
        }
    }
}

/// A number in [0, 1) that differs between processes and calls: std's hasher keys are
/// random, which is all the spread needs.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// What an operator can do when the proxy stayed busy until `ctl` gave up: find what holds
/// its control connections. They are found by the socket's file name: the proxy binds it
/// under a temporary folder beside it (`.PID/NAME`, `control::server::bind`) and the system
/// lists it by that, so its path would not match. `ss -xp` shows the proxy's ends with the
/// client's inode but not the client; `lsof +E` names the client beside each.
fn busy_hint(socket: &Path, waited: Duration) -> String {
    let name = socket
        .file_name()
        .unwrap_or(socket.as_os_str())
        .to_string_lossy();
    let name = shell_quote(&name);
    format!(
        "the proxy's control connections stayed in use for {} s: something holds many of them \
         open (a script that leaks connections, or keeps a pool of them). `lsof +E -U | grep -F \
         -e {name}` names the process at the other end of each; `ss -xp | grep -F -e {name}` \
         lists them with the inode of each client's end under Peer, which `ss -xp | grep -w \
         INODE` shows with its process",
        waited.as_secs()
    )
}

/// Why `socket_from_config` found no socket to try.
enum Unusable {
    /// The file cannot be read (bad usage).
    Unreadable(String),
    /// It names no socket: `control.socket = ""`, which `check` and `run` refuse. Joined to
    /// the file's folder it was that folder, and `ctl` dialled it and said it was a folder,
    /// "-s names the socket itself", of a socket nobody had named with `-s`.
    NoSocket(String),
}

/// The socket path from the config file, read without validating the rest: an operator who
/// broke the config must still be able to run `ctl status`, `off` or `reload` (which then
/// tells what is wrong). With it, whether no config file was named or found, the default
/// socket taken for want of one.
fn socket_from_config(path: Option<&Path>) -> Result<(PathBuf, bool), Unusable> {
    let default = Path::new(config::DEFAULT_PATH);
    let (file, named) = match path {
        Some(p) => (p, true),
        None => (default, false),
    };
    // As `check` and `run` read it: a FIFO or `/dev/zero` named by mistake is refused at once,
    // not waited on or read without end.
    let text = match intermission::files::read_text(file, intermission::files::MAX_CONFIG_BYTES) {
        Ok(t) => t,
        Err(e) if !named && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Path::new(".").join(DEFAULT_SOCKET), true))
        }
        // One character saved as Latin-1 (an editor's setting) left `ctl -c` unable to reach
        // the proxy at all, `off` and `status` included, in the middle of an incident. The
        // proxy refuses the file at reload; its control.socket is read as for a file that
        // does not parse.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            let bytes = intermission::files::read(file, intermission::files::MAX_CONFIG_BYTES)
                .map_err(|e| Unusable::Unreadable(unreadable(file, &e)))?;
            eprintln!(
                "warning: {}: {e} (the proxy refuses it at reload)",
                file.display()
            );
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Err(e) => return Err(Unusable::Unreadable(unreadable(file, &e))),
    };
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let socket = match toml::from_str::<toml::Table>(&text) {
        // Refused by `run` and a reload (caught mid-write, or emptied by mistake): the socket
        // it named is not known, and the default may not be it.
        Ok(_) if text.trim().is_empty() && file.exists() => {
            eprintln!(
                "warning: {} is empty; trying the default socket: {} (pass -s SOCKET to choose)",
                file.display(),
                base.join(DEFAULT_SOCKET).display()
            );
            DEFAULT_SOCKET.to_owned()
        }
        Ok(table) => table
            .get("control")
            .and_then(|c| c.get("socket"))
            .and_then(|s| s.as_str())
            .unwrap_or(DEFAULT_SOCKET)
            .to_owned(),
        Err(e) => {
            // Said, not fatal: the socket can often still be read from the broken file, and
            // otherwise the default may be the right one.
            let (socket, how) = match scan_socket(&text) {
                Scan::Found { socket, line } if socket.is_empty() => {
                    return Err(no_socket(file, &format!(" (its line {line})")))
                }
                Scan::Found { socket, line } => {
                    (socket, format!("using control.socket from its line {line}"))
                }
                Scan::Unset => (
                    DEFAULT_SOCKET.to_owned(),
                    "it sets no control.socket, so trying the default".to_owned(),
                ),
                Scan::Unclear(why) => (
                    DEFAULT_SOCKET.to_owned(),
                    format!("control.socket cannot be read from it ({why}), so trying the default"),
                ),
            };
            let why = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!(
                "warning: {} does not parse ({why}); {how}: {} (pass -s SOCKET to choose)",
                file.display(),
                base.join(&socket).display()
            );
            socket
        }
    };
    if socket.is_empty() {
        return Err(no_socket(file, ""));
    }
    Ok((base.join(socket), false))
}

/// `file` sets `control.socket = ""` (`at`: where, when it was found line by line).
fn no_socket(file: &Path, at: &str) -> Unusable {
    Unusable::NoSocket(format!(
        "{} has no control socket configured: its control.socket is empty{at}, which \
         `intermission check` refuses: there is no socket to try; set \
         control.socket in it, or name the proxy's socket with -s SOCKET (the proxy's start \
         log names it: `control socket ready`)",
        file.display()
    ))
}

/// Why the config `ctl -c` names cannot be read. One this user may not read is the usual way
/// here (a config kept to the proxy's user, `ctl` run as oneself), and "Permission denied"
/// alone did not say that the socket can be named without it.
fn unreadable(file: &Path, e: &io::Error) -> String {
    let hint = if e.kind() == io::ErrorKind::PermissionDenied {
        "; run ctl as the proxy's user or root, who can read it, or name the socket itself with \
         -s SOCKET (the proxy's start log names it: `control socket ready`), if this user may \
         use it"
    } else {
        ""
    };
    format!("cannot read config file {}: {e}{hint}", file.display())
}

/// `control.socket`'s default (SPEC §2).
const DEFAULT_SOCKET: &str = "intermission.sock";

/// What a line-by-line reading of a config file that does not parse says of `control.socket`.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    Found {
        socket: String,
        line: usize,
    },
    /// Nothing in the file sets it.
    Unset,
    /// Something may set it, but what cannot be told for sure.
    Unclear(String),
}

/// Finds `control.socket` in a file that does not parse as a whole, so that a syntax error
/// elsewhere does not send `ctl` to the wrong socket. Only an unambiguous answer counts: the
/// `socket` key under a `[control]` header (or `control.socket` / `control = {...}` before any
/// header), set once, on a line that parses by itself. Anything that might set it and cannot
/// be read that way makes the answer unclear rather than a guess.
fn scan_socket(text: &str) -> Scan {
    #[derive(PartialEq)]
    enum Scope {
        Root,
        Control,
        Other,
        /// Under a header that does not parse: it may be `[control]`.
        Unknown,
    }
    let mut scope = Scope::Root;
    let mut found: Option<(String, usize)> = None;
    // The delimiter of the multi-line string being skipped: its lines are text, not keys.
    let mut in_string: Option<&str> = None;
    // A byte order mark, which toml accepts and Windows editors write, is not part of a key.
    for (i, raw) in text.trim_start_matches('\u{feff}').lines().enumerate() {
        let n = i + 1;
        if let Some(delim) = in_string {
            if raw.matches(delim).count() % 2 == 1 {
                in_string = None;
            }
            continue;
        }
        let line = raw.trim();
        if line.starts_with('#') {
            continue;
        }
        // The string a line opens is the one whose delimiter comes first on it: a `'''` string
        // may hold `"""` and the other way round.
        let opens = ["\"\"\"", "'''"]
            .into_iter()
            .filter_map(|d| line.find(d).map(|at| (at, d)))
            .min()
            .map(|(_, d)| d)
            .filter(|d| line.matches(d).count() % 2 == 1);
        if line.starts_with('[') && opens.is_none() {
            scope = match toml::from_str::<toml::Table>(line) {
                // `[[control]]` would make it an array, which has no `socket`.
                _ if line.starts_with("[[") => Scope::Other,
                Ok(t) if t.len() == 1 && t.get("control") == Some(&empty_table()) => Scope::Control,
                Ok(_) => Scope::Other,
                Err(_) => Scope::Unknown,
            };
            continue;
        }
        in_string = opens;
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key: String = key
            .chars()
            .filter(|c| !c.is_whitespace() && !matches!(c, '"' | '\''))
            .collect();
        let value = match (&scope, key.as_str()) {
            (Scope::Control, "socket") => {
                toml::from_str::<toml::Table>(line).map(|t| t.get("socket").cloned())
            }
            (Scope::Root, "control.socket" | "control") => toml::from_str::<toml::Table>(line)
                .map(|t| t.get("control").and_then(|c| c.get("socket")).cloned()),
            (Scope::Unknown, "socket") => {
                return Scan::Unclear(format!(
                    "line {n} sets a socket under a table header that does not parse"
                ))
            }
            _ => continue,
        };
        let socket = match value {
            Ok(None) => continue,
            Ok(Some(toml::Value::String(s))) => s,
            Ok(Some(_)) => return Scan::Unclear(format!("line {n} sets it to a non-string")),
            Err(_) => return Scan::Unclear(format!("line {n}, which sets it, does not parse")),
        };
        if let Some((_, first)) = found {
            return Scan::Unclear(format!("lines {first} and {n} both set it"));
        }
        found = Some((socket, n));
    }
    match found {
        Some((socket, line)) => Scan::Found { socket, line },
        None => Scan::Unset,
    }
}

fn empty_table() -> toml::Value {
    toml::Value::Table(toml::Table::new())
}

fn request(command: CtlCommand) -> Request {
    match command {
        CtlCommand::Status => Request::Status,
        CtlCommand::On {
            message,
            until,
            retry_after,
            reason,
        } => Request::On {
            message,
            until,
            retry_after,
            reason,
        },
        CtlCommand::Update { message } => Request::Update { message },
        CtlCommand::Off => Request::Off,
        CtlCommand::ForceOpen { setting } => Request::ForceOpen {
            enabled: setting == "on",
        },
        CtlCommand::Health => Request::Health,
        CtlCommand::Reload => Request::Reload,
        CtlCommand::Schedule(ScheduleCommand::Add {
            start,
            end,
            message,
        }) => Request::ScheduleAdd {
            start,
            end,
            message,
        },
        CtlCommand::Schedule(ScheduleCommand::List) => Request::ScheduleList,
        CtlCommand::Schedule(ScheduleCommand::Remove { id }) => Request::ScheduleRemove { id },
    }
}

/// `again` is this command's own start (`intermission ctl -c PATH`), put before each command
/// suggested, so that it is pasted as it is (README: from another folder than the config's
/// too), where `schedule remove 3` alone tried the default socket there and exited 3.
fn print_human(out: &mut impl Write, resp: &Response, again: &str) -> io::Result<()> {
    if let Some(e) = &resp.error {
        let said = match e.code.as_str() {
            "pending" => "not answered",
            _ => "refused",
        };
        eprintln!("{said} ({}): {}", e.code, terminal_safe(&e.message));
    }
    // First: among many windows, the listing below does not say which one this is.
    if let Some(w) = &resp.window {
        writeln!(
            out,
            "scheduled window {}: {} to {} (`{again} schedule remove {}` takes it back)",
            w.id,
            w.start.rfc3339(),
            w.end.rfc3339(),
            w.id
        )?;
    }
    if let Some(s) = &resp.state {
        print_state(out, s, again)?;
    }
    if let Some(h) = &resp.health {
        print_health(out, h)?;
    }
    if let Some(list) = &resp.schedules {
        if list.is_empty() {
            writeln!(out, "no maintenance windows scheduled")?;
        }
        for w in list {
            print_window(out, w)?;
        }
    }
    Ok(())
}

/// Text as a terminal may show it: messages and reasons come from whoever can write to the
/// socket (a whole group, with `socket_mode = "0660"`), and a control character or a bidi
/// override in them would recolour, retitle or reorder another operator's screen. Each is
/// written as Rust escapes it (`\u{1b}`), as the logs do; line ends and tabs stay. So is a
/// line or paragraph separator (U+2028, U+2029), which a message may hold: `less` and other
/// viewers of a saved `status` end a line there, and a false `mode:` line could follow.
fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(
                c,
                '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
            )
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.contains(unsafe_char) {
        return text.into();
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            shown.extend(c.escape_unicode());
        } else {
            shown.push(c);
        }
    }
    shown.into()
}

/// A field on one line: a line end in a message would begin a line of its own, such as a
/// false `mode:` under the true one.
fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains(['\n', '\r']) {
        text.replace('\n', "\\n").replace('\r', "\\r").into()
    } else {
        text.into()
    }
}

/// Writes human output through `terminal_safe`: every field, whoever wrote it. `writeln!`
/// hands it whole `str` pieces, so no character is ever split between two writes.
struct TerminalSafe<W>(W);

impl<W: Write> Write for TerminalSafe<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => self.0.write_all(terminal_safe(text).as_bytes())?,
            Err(_) => self.0.write_all(String::from_utf8_lossy(buf).as_bytes())?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

fn print_state(out: &mut impl Write, s: &StatusView, again: &str) -> io::Result<()> {
    writeln!(out, "mode:        {}", s.mode.as_str())?;
    if let Some(m) = &s.message {
        writeln!(out, "message:     {}", one_line(m))?;
    }
    if let Some(t) = &s.since {
        writeln!(out, "since:       {}", t.rfc3339())?;
    }
    if let Some(t) = &s.until {
        let note = if s.overrun {
            "  (OVERRUN: the announced end has passed)"
        } else {
            ""
        };
        writeln!(out, "until:       {}{note}", t.rfc3339())?;
    }
    if let Some(r) = s.retry_after {
        writeln!(out, "retry-after: {r}s")?;
    }
    if let Some(by) = &s.by {
        match &s.reason {
            Some(r) => writeln!(out, "switched by: {by} ({})", one_line(r))?,
            None => writeln!(out, "switched by: {by}")?,
        }
    }
    if s.force_open {
        writeln!(
            out,
            "force-open:  on (forwarding whatever health checks say)"
        )?;
    }
    if let Some(p) = &s.status_page {
        writeln!(out, "status page: {p}")?;
    }
    if let Some(o) = &s.save_overdue {
        writeln!(
            out,
            "SAVE OVERDUE: the state file's save has been under way since {} (is its disk slow \
             or hung?); {} request(s) wait behind it: a change is in force, and shown here, \
             only once saved",
            o.since.rfc3339(),
            o.waiting
        )?;
    }
    for pending in &s.restart_pending {
        writeln!(out, "RESTART PENDING: {pending}")?;
    }
    if let Some(r) = &s.reload_refused {
        writeln!(
            out,
            "LAST RELOAD REFUSED at {} (the running config stays): {}",
            r.at.rfc3339(),
            one_line(&r.message)
        )?;
    }
    if !s.updates.is_empty() {
        writeln!(out, "updates:")?;
        for u in &s.updates {
            writeln!(out, "  {}  {}", u.at.rfc3339(), one_line(&u.message))?;
        }
    }
    print_schedules(out, &s.schedules, again)?;
    print_health(out, &s.upstream)
}

/// How many windows `status` lists: the state a worried operator reads in an incident is not
/// to scroll away under a year of planned work (up to 500 windows), and the server health
/// below it with it. `schedule list` and `--json` give every one.
const STATUS_WINDOWS: usize = 5;

/// The first windows, in order of start (as they are kept), and how many more there are.
fn print_schedules(out: &mut impl Write, windows: &[Window], again: &str) -> io::Result<()> {
    if windows.is_empty() {
        return Ok(());
    }
    writeln!(out, "schedules:")?;
    for w in windows.iter().take(STATUS_WINDOWS) {
        print_window(out, w)?;
    }
    let more = windows.len().saturating_sub(STATUS_WINDOWS);
    if more > 0 {
        let s = if more == 1 { "" } else { "s" };
        writeln!(
            out,
            "  … and {more} later window{s} (`{again} schedule list` shows them all)"
        )?;
    }
    Ok(())
}

fn print_window(out: &mut impl Write, w: &Window) -> io::Result<()> {
    write!(
        out,
        "  window {}  {} to {}  by {}",
        w.id,
        w.start.rfc3339(),
        w.end.rfc3339(),
        w.by
    )?;
    match &w.message {
        Some(m) => writeln!(out, "  \"{}\"", one_line(m)),
        None => writeln!(out),
    }
}

fn print_health(out: &mut impl Write, servers: &[ServerHealth]) -> io::Result<()> {
    writeln!(out, "upstream:")?;
    for h in servers {
        let state = match h.healthy {
            Some(true) => "healthy",
            Some(false) => "DOWN",
            None => "unknown (not checked yet)",
        };
        write!(out, "  {}  {state}", h.server)?;
        if let Some(t) = &h.since {
            write!(out, " since {}", t.rfc3339())?;
        }
        let notes = health_notes(h);
        if !notes.is_empty() {
            write!(out, " ({})", notes.join("; "))?;
        }
        if let Some(t) = &h.last_check {
            write!(out, "  last check {}", t.rfc3339())?;
        }
        if let Some(ms) = h.last_latency_ms {
            write!(out, "  {ms:.1} ms")?;
        }
        if let Some(e) = &h.last_error {
            match &h.last_error_at {
                Some(t) => write!(out, "  last error {}: {}", t.rfc3339(), one_line(e))?,
                None => write!(out, "  last error: {}", one_line(e))?,
            }
        }
        writeln!(out)?;
    }
    Ok(())
}

/// What `ctl health` says in brackets after a server's health: its latest results in a row,
/// and for a server down why, and what it needs to be back. A server added by a reload
/// during an outage starts down before any check, and showed a bare `DOWN`, or
/// `DOWN (1 result in a row)` once it had passed one check of the two it needed.
fn health_notes(h: &ServerHealth) -> Vec<String> {
    let plural = |n: u32| if n == 1 { "" } else { "s" };
    let down = h.healthy == Some(false);
    let mut notes = Vec::new();
    if down && h.added_in_outage {
        notes.push("added during an outage".to_owned());
    }
    // Down, and its latest checks pass: on its way back.
    let rising = down && h.last_ok == Some(true);
    match h.consecutive {
        0 => {}
        n if rising => notes.push(format!("{n} passing check{} in a row", plural(n))),
        n => notes.push(format!("{n} result{} in a row", plural(n))),
    }
    match h.passes_needed.filter(|_| down) {
        Some(n) if rising => notes.push(format!("needs {n} more")),
        Some(n) if h.added_in_outage => {
            notes.push(format!("needs {n} passing check{}", plural(n)));
        }
        _ => {}
    }
    notes
}

/// `path` as one word a shell reads back as it is: quoted unless it needs none.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    // A leading `-` would read as a flag, and a leading `=` is expanded by zsh.
    let text = match text.as_bytes().first() {
        Some(b'-' | b'=') => format!("./{text}"),
        _ => text,
    };
    shell_quote(&text)
}

/// `text` as one word a shell reads back as it is: quoted unless it needs none.
fn shell_quote(text: &str) -> String {
    // zsh expands a leading `=` even in a word of these characters alone.
    let plain = !text.is_empty()
        && !text.starts_with('=')
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@%,=".contains(&b));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `status` lists the first windows and counts the rest, where it printed all 500 a
    /// schedule may hold above the upstream's health.
    /// An overdue save is shown by `status`, with what waits behind it: the change an
    /// operator just sent is not in the state shown, and this says why.
    #[test]
    fn status_shows_an_overdue_save() {
        let state = serde_json::json!({
            "mode": "normal", "message": null, "since": null, "until": null,
            "retry_after": null, "overrun": false, "by": null, "reason": null,
            "force_open": false, "updates": [], "status_page": null, "upstream": [],
            "config": null,
            "save_overdue": {"since": "2026-12-08T01:00:00Z", "waiting": 3}
        });
        let state: StatusView = serde_json::from_value(state).unwrap();
        let mut out = Vec::new();
        print_state(&mut out, &state, "intermission ctl").unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains(
                "SAVE OVERDUE: the state file's save has been under way since 2026-12-08T01:00:00Z"
            ) && out.contains("3 request(s) wait behind it"),
            "{out}"
        );
    }

    #[test]
    fn status_lists_the_first_windows_and_counts_the_others() {
        let at = |secs: u64| {
            intermission::time::Timestamp(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            )
        };
        let window = |id: u64| Window {
            id,
            start: at(1_900_000_000 + id * 3600),
            end: at(1_900_000_000 + id * 3600 + 60),
            message: Some(format!("work {id}")),
            by: "ops".into(),
            started: false,
        };
        let shown = |n: u64| {
            let list: Vec<Window> = (1..=n).map(window).collect();
            let mut out = Vec::new();
            print_schedules(&mut out, &list, "intermission ctl -c /etc/i.toml").unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(shown(0), "");
        let five = shown(5);
        assert_eq!(five.lines().count(), 6, "{five}");
        assert!(
            five.contains("\"work 5\"") && !five.contains("later"),
            "{five}"
        );
        let six = shown(6);
        assert!(
            six.contains("\"work 5\"") && !six.contains("\"work 6\""),
            "{six}"
        );
        assert!(
            six.ends_with(
                "  … and 1 later window (`intermission ctl -c /etc/i.toml schedule list` shows \
                 them all)\n"
            ),
            "{six}"
        );
        let many = shown(500);
        assert_eq!(many.lines().count(), 7, "{many}");
        assert!(many.contains("… and 495 later windows"), "{many}");
    }

    /// A server healthy again keeps its last error shown, with when it happened: without
    /// the time, an operator in an incident read "connection refused" as happening now.
    #[test]
    fn a_last_error_is_shown_with_its_time() {
        let at =
            |t: &str| intermission::time::Timestamp(intermission::time::parse_rfc3339(t).unwrap());
        let h = ServerHealth {
            server: "http://10.0.0.6:3000".into(),
            healthy: Some(true),
            since: Some(at("2026-11-24T09:12:30Z")),
            last_check: Some(at("2026-11-24T09:40:00Z")),
            last_error: Some("tcp connect error: Connection refused".into()),
            last_error_at: Some(at("2026-11-24T09:11:52Z")),
            consecutive: 800,
            last_latency_ms: Some(1.25),
            last_ok: Some(true),
            added_in_outage: false,
            passes_needed: None,
        };
        let mut out = Vec::new();
        print_health(&mut out, std::slice::from_ref(&h)).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains(
                "  last error 2026-11-24T09:11:52Z: tcp connect error: Connection refused"
            ),
            "{out}"
        );
    }

    /// A server a reload added during an outage says why it is down, and what it needs to be
    /// back, where it showed a bare `DOWN`, then `DOWN (1 result in a row)` after a passing
    /// check.
    #[test]
    fn a_server_added_during_an_outage_says_why_it_is_down() {
        let shown = |consecutive, last_ok, passes_needed, added_in_outage| {
            let h = ServerHealth {
                server: "http://10.0.0.7:3000".into(),
                healthy: Some(false),
                since: None,
                last_check: None,
                last_error: None,
                last_error_at: None,
                consecutive,
                last_latency_ms: None,
                last_ok,
                added_in_outage,
                passes_needed,
            };
            let mut out = Vec::new();
            print_health(&mut out, std::slice::from_ref(&h)).unwrap();
            String::from_utf8(out).unwrap()
        };
        let line = |text: &str| format!("upstream:\n  http://10.0.0.7:3000  {text}\n");
        assert_eq!(
            shown(0, None, Some(2), true),
            line("DOWN (added during an outage; needs 2 passing checks)")
        );
        assert_eq!(
            shown(1, Some(true), Some(1), true),
            line("DOWN (added during an outage; 1 passing check in a row; needs 1 more)")
        );
        assert_eq!(
            shown(3, Some(false), Some(2), true),
            line("DOWN (added during an outage; 3 results in a row; needs 2 passing checks)")
        );
        // Any server down on its way back says so.
        assert_eq!(
            shown(1, Some(true), Some(1), false),
            line("DOWN (1 passing check in a row; needs 1 more)")
        );
        assert_eq!(
            shown(4, Some(false), Some(2), false),
            line("DOWN (4 results in a row)")
        );
        // What an older proxy answers (no `last_ok`, no new fields) reads as before.
        assert_eq!(
            shown(1, None, None, false),
            line("DOWN (1 result in a row)")
        );
    }

    #[test]
    fn a_path_is_one_shell_word() {
        assert_eq!(
            shell_word(Path::new("/etc/intermission/config.toml")),
            "/etc/intermission/config.toml"
        );
        assert_eq!(
            shell_word(Path::new("/srv/my site/c.toml")),
            "'/srv/my site/c.toml'"
        );
        assert_eq!(shell_word(Path::new("it's.toml")), "'it'\\''s.toml'");
        assert_eq!(shell_word(Path::new("-x.toml")), "./-x.toml");
    }

    /// One word shaped like an option is refused as a text; a text that only begins with a
    /// hyphen is not.
    #[test]
    fn an_option_is_no_text() {
        for word in [
            "--json",
            "--until",
            "-m",
            "-h",
            " --retry-after ",
            "--message=x",
        ] {
            let e = option_shaped("--message", word, "update").unwrap_err();
            assert!(e.contains("an option, as its text"), "{word:?}: {e}");
            // One sentence, as printed: no run of spaces from the source's line break.
            assert!(
                e.contains(" give the text after --message (in quotes") && !e.contains("  "),
                "{word:?}: {e}"
            );
        }
        for text in [
            "-",
            "--",
            "- step 2 of 3",
            "-- back soon",
            "-5 % capacity",
            "-x-",
            "--- done ---",
            "-m is short for --message",
            "a --json",
        ] {
            assert_eq!(
                option_shaped("--message", text, "update"),
                Ok(()),
                "{text:?}"
            );
        }
    }

    /// A message with an escape sequence, a bell, a NUL and a bidi override is shown with
    /// them escaped: it cannot recolour, retitle or reorder the operator's terminal.
    #[test]
    fn human_output_escapes_what_would_drive_the_terminal() {
        let text = "a\u{1b}[31mRED\u{1b}]0;title\u{7}\0b\u{202e}evil\u{9b}c";
        let mut out = TerminalSafe(Vec::new());
        writeln!(out, "message:     {text}\ttab").unwrap();
        let shown = String::from_utf8(out.0).unwrap();
        assert_eq!(
            shown,
            "message:     a\\u{1b}[31mRED\\u{1b}]0;title\\u{7}\\u{0}b\\u{202e}evil\\u{9b}c\ttab\n"
        );
        assert_eq!(terminal_safe("Back at 10:00 — été"), "Back at 10:00 — été");
        // The separators a viewer ends a line at, and the Arabic letter mark, as the logs.
        assert_eq!(
            terminal_safe("a\u{2028}mode:        normal\u{2029}b\u{61c}c\u{85}"),
            "a\\u{2028}mode:        normal\\u{2029}b\\u{61c}c\\u{85}"
        );
        assert_eq!(
            one_line("ok\nmode:        normal\r"),
            "ok\\nmode:        normal\\r"
        );
    }

    /// A stand-in proxy on `socket`: answers each connection's first line with the next of
    /// `answers` (the last again once they run out), and sends what it read on `seen`.
    fn fake_proxy(
        socket: &Path,
        answers: &'static [&'static str],
    ) -> tokio::sync::mpsc::UnboundedReceiver<String> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let (seen, read) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for n in 0.. {
                let (stream, _) = listener.accept().await.unwrap();
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                tokio::io::BufReader::new(r)
                    .read_line(&mut line)
                    .await
                    .unwrap();
                let _ = seen.send(line);
                let answer = answers[n.min(answers.len() - 1)];
                w.write_all(format!("{answer}\n").as_bytes()).await.unwrap();
            }
        });
        read
    }

    const BUSY: &str = r#"{"ok":false,"error":{"code":"busy","message":"64 open"}}"#;
    const IDLE: &str = r#"{"ok":false,"error":{"code":"idle","message":"closed for room"}}"#;
    const CONFLICT: &str = r#"{"ok":false,"error":{"code":"conflict","message":"nothing held"}}"#;
    const DONE: &str = r#"{"ok":true}"#;

    /// A `busy` or `idle` refusal says the request was not read: it is sent again, whole, on
    /// a new connection, and the answer that comes then is the one reported.
    #[tokio::test]
    async fn a_request_the_proxy_did_not_read_is_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("c.sock");
        let mut seen = fake_proxy(&socket, &[BUSY, IDLE, DONE]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let answer = exchange(&socket, &Request::Off, deadline).await;
        let resp = answer.unwrap().unwrap();
        assert!(resp.ok, "{resp:?}");
        for _ in 0..3 {
            assert_eq!(seen.recv().await.unwrap(), "{\"cmd\":\"off\"}\n");
        }
    }

    /// A proxy busy until the deadline is given up on before it, with its last refusal, and
    /// asked often enough meanwhile; other refusals are not sent again.
    #[tokio::test]
    async fn a_proxy_busy_throughout_is_given_up_on_by_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("c.sock");
        let mut seen = fake_proxy(&socket, &[BUSY]);
        let started = tokio::time::Instant::now();
        let deadline = started + Duration::from_secs(2);
        let resp = exchange(&socket, &Request::Off, deadline)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.error.unwrap().code, "busy");
        // The last try starts before the deadline and may end a scheduling hiccup after it
        // on a loaded machine: what is held is that the refusals are not retried past it.
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "still asking {took:?} after a 2 s deadline"
        );
        let mut tries = 0;
        while seen.try_recv().is_ok() {
            tries += 1;
        }
        assert!(tries >= 4, "asked {tries} times in 2 s");

        let socket = dir.path().join("d.sock");
        let mut seen = fake_proxy(&socket, &[CONFLICT]);
        let resp = exchange(&socket, &Request::Off, deadline)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.error.unwrap().code, "conflict");
        seen.recv().await.unwrap();
        assert!(
            seen.try_recv().is_err(),
            "a refusal that read the request was sent again"
        );
    }

    const SHUTTING: &str =
        r#"{"ok":false,"error":{"code":"shutting_down","message":"not applied"}}"#;

    /// A proxy stopping for a restart refuses what it has not applied; the command goes to
    /// the instance that takes the socket next. With none, the refusal is what is returned.
    #[tokio::test]
    async fn a_command_refused_by_a_stopping_proxy_goes_to_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("c.sock");
        let mut old = fake_proxy(&socket, &[SHUTTING]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let asking = tokio::spawn({
            let socket = socket.clone();
            async move { exchange(&socket, &Request::Off, deadline).await }
        });
        old.recv().await.unwrap();
        // The stopping proxy removes its socket file; the next binds it a moment later.
        std::fs::remove_file(&socket).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut next = fake_proxy(&socket, &[DONE]);
        let resp = asking.await.unwrap().unwrap().unwrap();
        assert!(resp.ok, "{resp:?}");
        assert_eq!(next.recv().await.unwrap(), "{\"cmd\":\"off\"}\n");

        let socket = dir.path().join("d.sock");
        let mut seen = fake_proxy(&socket, &[SHUTTING]);
        let asking = tokio::spawn({
            let socket = socket.clone();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            async move { exchange(&socket, &Request::Off, deadline).await }
        });
        seen.recv().await.unwrap();
        std::fs::remove_file(&socket).unwrap();
        let resp = asking.await.unwrap().unwrap().unwrap();
        assert_eq!(resp.error.unwrap().code, "shutting_down");
    }

    #[test]
    fn giving_up_on_a_busy_proxy_says_how_to_find_what_holds_it() {
        // The file name, which the temporary name the socket was bound under holds.
        let hint = busy_hint(Path::new("/run/my proxy/-i.sock"), ANSWER_TIMEOUT);
        assert!(hint.contains("15 s"), "{hint}");
        assert!(hint.contains("`ss -xp | grep -F -e -i.sock`"), "{hint}");
        assert!(hint.contains("`lsof +E -U | grep -F -e -i.sock`"), "{hint}");
        let hint = busy_hint(Path::new("i'.sock"), ANSWER_TIMEOUT);
        assert!(hint.contains("grep -F -e 'i'\\''.sock'`"), "{hint}");
    }

    fn found(socket: &str, line: usize) -> Scan {
        Scan::Found {
            socket: socket.into(),
            line,
        }
    }

    #[test]
    fn the_socket_is_found_in_a_file_that_does_not_parse() {
        let broken = "[maintenance\n";
        let cases: &[(&str, Scan)] = &[
            (
                "[control]\nsocket = \"ctl.sock\"\n[maintenance\n",
                found("ctl.sock", 2),
            ),
            (
                "# ops\n[ control ] # ours\n  \"socket\" = 'a b.sock' # here\n[x\n",
                found("a b.sock", 3),
            ),
            (
                "control.socket = \"/run/i.sock\"\n[maintenance\n",
                found("/run/i.sock", 1),
            ),
            (
                "control = { socket = \"in.sock\" }\n[x\n",
                found("in.sock", 1),
            ),
            (
                "[maintenance\n[control]\nstate_file = \"s.json\"\nsocket = \"late.sock\"\n",
                found("late.sock", 4),
            ),
            (broken, Scan::Unset),
            ("[control]\nstate_file = \"s.json\"\n[x\n", Scan::Unset),
            // Elsewhere, `socket` is not control.socket.
            ("[admin]\nsocket = \"no.sock\"\n[x\n", Scan::Unset),
            ("[control.sub]\nsocket = \"no.sock\"\n[x\n", Scan::Unset),
            ("[[notify]]\nsocket = \"no.sock\"\n[x\n", Scan::Unset),
            ("socket = \"no.sock\"\n[x\n", Scan::Unset),
            (
                "[maintenance]\nmessage = \"\"\"\n[control]\nsocket = \"no.sock\"\n\"\"\"\n[x\n",
                Scan::Unset,
            ),
            ("# [control]\n# socket = \"no.sock\"\n[x\n", Scan::Unset),
            // A byte order mark before the first line.
            (
                "\u{feff}[control]\nsocket = \"bom.sock\"\n[x\n",
                found("bom.sock", 2),
            ),
            (
                "\u{feff}control.socket = \"bom.sock\"\n[x\n",
                found("bom.sock", 1),
            ),
            // A `'''` string holding `\"\"\"` ends at its own delimiter.
            (
                "message = '''He said \"\"\"\nhi'''\n[control]\nsocket = \"real.sock\"\n[x\n",
                found("real.sock", 4),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(&scan_socket(text), want, "{text}");
        }
    }

    #[test]
    fn an_unclear_socket_is_not_guessed() {
        for text in [
            "[control]\nsocket = \"ctl.sock\n",
            "[control]\nsocket = 5\n[x\n",
            "[control\nsocket = \"ctl.sock\"\n",
            "[control]\nsocket = \"a.sock\"\n[control]\nsocket = \"b.sock\"\n",
            "control.socket = \"a.sock\"\n[control]\nsocket = \"b.sock\"\n[x\n",
            "[control]\nsocket = \"\"\"\nctl.sock\"\"\"\n[x\n",
        ] {
            assert!(
                matches!(scan_socket(text), Scan::Unclear(_)),
                "{text}: {:?}",
                scan_socket(text)
            );
        }
    }
}
