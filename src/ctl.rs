//! `intermission ctl`: sends one control request and prints the answer for people or as JSON.

use crate::{CtlCommand, ScheduleCommand};
use intermission::config;
use intermission::control::client;
use intermission::control::protocol::{ErrorBody, Request, Response, ServerHealth, StatusView};
use intermission::state::controller::to_change;
use intermission::state::mode::Window;
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
        eprintln!("intermission ctl: {message}");
        if json {
            print_failure(code, &message);
        }
        ExitCode::from(exit)
    };
    let socket = match socket {
        Some(s) => s,
        None => match socket_from_config(config.as_deref()) {
            Ok(s) => s,
            Err(e) => return fail(2, "bad_usage", e),
        },
    };
    let req = request(command);
    if let Err(e) = check_times(&req) {
        return fail(2, "bad_usage", e);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(3, "no_answer", format!("cannot start: {e}")),
    };
    let answer = runtime.block_on(async {
        tokio::time::timeout(ANSWER_TIMEOUT, client::request(&socket, &req)).await
    });
    let resp = match answer {
        Ok(Ok(r)) => r,
        Ok(Err(e @ client::ClientError::NoProxy { .. })) => {
            return fail(3, "no_proxy", e.to_string())
        }
        // The exchange broke off or made no sense: no answer from the proxy either.
        Ok(Err(e)) => return fail(3, "no_answer", e.to_string()),
        Err(_) => {
            return fail(
                3,
                "no_answer",
                format!(
                    "the proxy on {} did not answer within {ANSWER_TIMEOUT:?}",
                    socket.display()
                ),
            )
        }
    };
    if json {
        // SPEC §5: the socket's `state` is "the same object as `ctl status --json`", so
        // `status` prints that object itself; every other command prints the reply line.
        let text = match (&req, &resp.state) {
            (Request::Status, Some(state)) if resp.ok => serde_json::to_string(state),
            _ => serde_json::to_string(&resp),
        };
        println!("{}", text.unwrap_or_default());
    } else {
        print_human(&resp);
    }
    if resp.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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

/// A failure before the proxy answered, as `--json` prints it: the shape of a refusal.
pub fn print_failure(code: &str, message: &str) {
    let error = ErrorBody::new(code, message);
    println!(
        "{}",
        serde_json::to_string(&Response::error(error)).unwrap_or_default()
    );
}

/// A stuck proxy must not hang an operator's terminal mid-incident.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// The socket path from the config file, read without validating the rest: an operator who
/// broke the config must still be able to run `ctl status`, `off` or `reload` (which then
/// tells what is wrong).
fn socket_from_config(path: Option<&Path>) -> Result<PathBuf, String> {
    let default = Path::new(config::DEFAULT_PATH);
    let (file, named) = match path {
        Some(p) => (p, true),
        None => (default, false),
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if !named && e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read config file {}: {e}", file.display())),
    };
    let table: toml::Table = toml::from_str(&text).unwrap_or_else(|e| {
        // Said, not fatal: the default socket may still be the right one.
        eprintln!(
            "warning: {} does not parse ({}); trying the default control socket (pass -s SOCKET to choose)",
            file.display(),
            e.message().trim()
        );
        toml::Table::new()
    });
    let socket = table
        .get("control")
        .and_then(|c| c.get("socket"))
        .and_then(|s| s.as_str())
        .unwrap_or("intermission.sock");
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(base.join(socket))
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

fn print_human(resp: &Response) {
    if let Some(e) = &resp.error {
        eprintln!("refused ({}): {}", e.code, e.message);
    }
    if let Some(s) = &resp.state {
        print_state(s);
    }
    if let Some(h) = &resp.health {
        print_health(h);
    }
    if let Some(list) = &resp.schedules {
        if list.is_empty() {
            println!("no maintenance windows scheduled");
        }
        for w in list {
            print_window(w);
        }
    }
}

fn print_state(s: &StatusView) {
    println!("mode:        {}", s.mode.as_str());
    if let Some(m) = &s.message {
        println!("message:     {m}");
    }
    if let Some(t) = &s.since {
        println!("since:       {}", t.rfc3339());
    }
    if let Some(t) = &s.until {
        let note = if s.overrun {
            "  (OVERRUN: the announced end has passed)"
        } else {
            ""
        };
        println!("until:       {}{note}", t.rfc3339());
    }
    if let Some(r) = s.retry_after {
        println!("retry-after: {r}s");
    }
    if let Some(by) = &s.by {
        match &s.reason {
            Some(r) => println!("switched by: {by} ({r})"),
            None => println!("switched by: {by}"),
        }
    }
    if s.force_open {
        println!("force-open:  on (forwarding whatever health checks say)");
    }
    if let Some(p) = &s.status_page {
        println!("status page: {p}");
    }
    if !s.updates.is_empty() {
        println!("updates:");
        for u in &s.updates {
            println!("  {}  {}", u.at.rfc3339(), u.message);
        }
    }
    if !s.schedules.is_empty() {
        println!("schedules:");
        for w in &s.schedules {
            print_window(w);
        }
    }
    print_health(&s.upstream);
}

fn print_window(w: &Window) {
    print!(
        "  window {}  {} to {}  by {}",
        w.id,
        w.start.rfc3339(),
        w.end.rfc3339(),
        w.by
    );
    match &w.message {
        Some(m) => println!("  \"{m}\""),
        None => println!(),
    }
}

fn print_health(servers: &[ServerHealth]) {
    println!("upstream:");
    for h in servers {
        let state = match h.healthy {
            Some(true) => "healthy",
            Some(false) => "DOWN",
            None => "unknown (not checked yet)",
        };
        print!("  {}  {state}", h.server);
        if let Some(t) = &h.since {
            print!(" since {}", t.rfc3339());
        }
        if h.consecutive > 0 {
            let noun = if h.consecutive == 1 {
                "result"
            } else {
                "results"
            };
            print!(" ({} {noun} in a row)", h.consecutive);
        }
        if let Some(t) = &h.last_check {
            print!("  last check {}", t.rfc3339());
        }
        if let Some(ms) = h.last_latency_ms {
            print!("  {ms:.1} ms");
        }
        if let Some(e) = &h.last_error {
            print!("  last error: {e}");
        }
        println!();
    }
}
