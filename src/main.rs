//! The `intermission` binary: parses the command line and hands over to the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use intermission::config::Config;
use intermission::hold::pages::Pages;
use intermission::state::store;
use intermission::tls::TlsError;

mod ctl;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc rather than the system's malloc: per request on hyper's paths about 5 % less CPU
/// (HTTP/2 over TLS), the same on the relay and the holding page, which hardly allocate, and
/// the same memory idle and with 10,000 idle connections (README, "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "intermission",
    version,
    about = "A maintenance-mode reverse proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Config file [default: ./config.toml, built-in defaults if it does not exist]
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file, print a summary, exit 0 (valid) or 1 (every problem listed).
    Check {
        /// Config file [default: ./config.toml, built-in defaults if it does not exist]
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Talk to a running proxy over its control socket.
    ///
    /// Exit codes: 0 done; 1 the proxy refused (its error printed); 2 bad usage; 3 no proxy
    /// answered on the socket (or this user may not use it); 4 done, but its answer could
    /// not be written (a full disk).
    Ctl {
        // Global, as `--json` is: `ctl status -c /etc/intermission/config.toml`, the config
        // named last as many tools take it, was "unexpected argument '-c'" (exit 2) with no
        // hint, to an operator in an incident. No command has a `-c` or `-s` of its own.
        /// Config file naming the socket [default: ./config.toml; ./intermission.sock if it
        /// does not exist] (before or after the command)
        #[arg(short, long, conflicts_with = "socket", global = true)]
        config: Option<PathBuf>,
        /// The control socket, instead of the one the config names (before or after the command)
        #[arg(short, long, global = true)]
        socket: Option<PathBuf>,
        /// Print the proxy's answer as one JSON object (before or after the command)
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

/// Texts (`--message`, `--reason`) may begin with a hyphen, as "- step 2 of 3" or "-5 %
/// capacity" do: clap read such a text as an option and refused the command line with
/// "unexpected argument '- ' found", leaving an operator mid-incident to guess why. A flag
/// taken for the text when the text was left out (`--message --until +1h`) is refused by
/// `ctl` itself (`ctl::check_texts`).
#[derive(Subcommand)]
enum CtlCommand {
    /// Mode, message, since/until, upstream health, scheduled windows
    Status,
    /// Switch planned maintenance on (again: update the given fields)
    On {
        /// What people are told
        #[arg(short, long, allow_hyphen_values = true)]
        message: Option<String>,
        /// Announced end: RFC 3339 (2026-12-01T02:00:00Z) or +DURATION (+45m); "" takes it back
        #[arg(short, long)]
        until: Option<String>,
        /// Retry-After when no --until is set (or once it has passed): 90s, 5m, 1h30m or
        /// seconds, from 1s to 1d
        #[arg(short, long)]
        retry_after: Option<String>,
        /// Why (recorded in the state, with who switched it); "" clears it
        #[arg(long, allow_hyphen_values = true)]
        reason: Option<String>,
    },
    /// New message, also added to the public timeline of updates
    Update {
        /// What people are told from now on
        #[arg(short, long, allow_hyphen_values = true)]
        message: String,
    },
    /// Switch planned maintenance off (a schedule window in force is ended too)
    Off,
    /// Forward even when health checks say the upstream is down
    ForceOpen {
        #[arg(value_parser = ["on", "off"])]
        setting: String,
    },
    /// Each upstream server: healthy or not, last check, last error
    Health,
    /// Re-read the config file and pages; an invalid file is refused and the running config stays
    Reload,
    /// Maintenance windows that switch on and off by themselves
    #[command(subcommand)]
    Schedule(ScheduleCommand),
}

#[derive(Subcommand)]
enum ScheduleCommand {
    /// Add a window: maintenance on at --start, off at --end
    Add {
        /// RFC 3339 (2026-12-01T02:00:00Z) or +DURATION (+2h)
        #[arg(long)]
        start: String,
        /// RFC 3339 or +DURATION
        #[arg(long)]
        end: String,
        /// What people are told during the window
        #[arg(short, long, allow_hyphen_values = true)]
        message: Option<String>,
    },
    /// The windows to come (and the one in force)
    List,
    /// Remove a window by its id
    Remove { id: u64 },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse().map_err(did_you_mean).and_then(one_socket) {
        Ok(cli) => cli,
        Err(e) => {
            // `ctl --json` promises one object on stdout, a mistyped command line included.
            let args: Vec<String> = std::env::args().collect();
            if e.use_stderr()
                && args.iter().any(|a| a == "ctl")
                && args.iter().any(|a| a == "--json")
            {
                // The error's first paragraph, on one line: its first line alone can end in
                // "were not provided:", the arguments it means on the lines after it.
                let text = e.to_string();
                let said: Vec<&str> = text
                    .lines()
                    .map(str::trim)
                    .take_while(|line| !line.is_empty())
                    .collect();
                let mut said = said.join(" ");
                // A suggestion (`did_you_mean`'s, clap's own) is what to type instead: kept.
                for tip in text.lines().filter_map(|l| l.trim().strip_prefix("tip: ")) {
                    said.push_str(&format!(" ({tip})"));
                }
                ctl::print_failure("bad_usage", said.trim_start_matches("error: "));
            }
            e.exit()
        }
    };
    match cli.command {
        Command::Run { config } => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                intermission::logging::last_words(&describe(&e));
                ExitCode::FAILURE
            }
        },
        Command::Check { config } => check(config),
        Command::Ctl {
            config,
            socket,
            json,
            command,
        } => ctl::run(config, socket, json, command),
    }
}

/// A mistyped subcommand, with the whole command line it was likely meant to be: clap offers
/// a name only past its likeness cutoff, so `clt status` (for `ctl status`), `ctl of` or
/// `ctl sttaus` got "unrecognized subcommand" alone, and `ctrl` only the word `ctl`. Here a
/// name one edit away (a letter missing, added, changed, or two swapped), or begun by what was
/// typed, is offered whole, the rest of the line as it was (`intermission ctl status --json`);
/// a ctl command given without `ctl` (`intermission status`) gets it put in. Never run in its
/// place: `of` might have been `on`.
fn did_you_mean(e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::InvalidSubcommand {
        return e;
    }
    let Some(ContextValue::String(typed)) = e.get(ContextKind::InvalidSubcommand) else {
        return e;
    };
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let Some((at, level)) = typo_at(&mut cmd, &args, typed) else {
        return e;
    };
    let meant = meant(level, typed);
    if meant.is_empty() {
        return e;
    }
    let lines: Vec<String> = meant
        .iter()
        .map(|name| {
            let words = std::iter::once("intermission")
                .chain(args[1..at].iter().map(String::as_str))
                .chain(name.split(' '))
                .chain(args[at + 1..].iter().map(String::as_str));
            let line: Vec<String> = words.map(quoted).collect();
            format!("'{}'", line.join(" "))
        })
        .collect();
    let mut said = clap::Error::new(ErrorKind::InvalidSubcommand).with_cmd(level);
    said.insert(
        ContextKind::InvalidSubcommand,
        ContextValue::String(typed.clone()),
    );
    said.insert(
        ContextKind::Suggested,
        ContextValue::StyledStrs(vec![format!("did you mean {}?", lines.join(" or ")).into()]),
    );
    if let Some(usage) = e.get(ContextKind::Usage) {
        said.insert(ContextKind::Usage, usage.clone());
    }
    said
}

/// Where in `args` the subcommand `typed` stands, and the command it was meant for: the one
/// the words before it lead to, as clap read them.
fn typo_at<'a>(
    cmd: &'a mut clap::Command,
    args: &[String],
    typed: &str,
) -> Option<(usize, &'a clap::Command)> {
    let mut level: &clap::Command = cmd;
    let mut value_next = false;
    for (i, arg) in args.iter().enumerate().skip(1) {
        if value_next {
            value_next = false;
            continue;
        }
        if arg == typed {
            return Some((i, level));
        }
        if matches!(arg.as_str(), "-c" | "--config" | "-s" | "--socket") {
            value_next = true;
        } else if !arg.starts_with('-') {
            level = level.find_subcommand(arg)?;
        }
    }
    None
}

/// The subcommands of `level` that `typed` was likely meant to be, best first (those begun
/// by it, then the nearest); at the top, `ctl`'s own too, with `ctl` before them.
fn meant(level: &clap::Command, typed: &str) -> Vec<String> {
    let typed = typed.to_ascii_lowercase();
    let mut names: Vec<String> = level
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let ctl = level
        .get_subcommands()
        .find(|c| c.get_name() == "ctl")
        .into_iter()
        .flat_map(|c| c.get_subcommands())
        .map(|c| format!("ctl {}", c.get_name()));
    names.extend(ctl);
    let word = |name: &str| name.rsplit(' ').next().unwrap_or(name).to_owned();
    let begun: Vec<String> = names
        .iter()
        .filter(|n| typed.len() >= 2 && word(n).starts_with(&typed))
        .cloned()
        .collect();
    if !begun.is_empty() {
        return begun;
    }
    let near: Vec<String> = names
        .into_iter()
        .filter(|n| edits(&typed, &word(n)) <= 1)
        .collect();
    near
}

/// The edits that make `a` into `b`: letters inserted, removed, changed, or two side by
/// side swapped (the optimal string alignment distance).
fn edits(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let change = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + change);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// `word` as a shell reads it back: quoted when it holds anything but plain characters, in
/// double quotes where they do, since the line is shown in single ones.
fn quoted(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=+@%,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else if !word.contains(['"', '$', '`', '\\', '!']) {
        format!("\"{word}\"")
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// `ctl` takes `-c` or `-s`, not both: clap checks that between two arguments of one level
/// only, and a global one given at another (`ctl -c C status -s S`) got past it, the config
/// then silently ignored.
fn one_socket(cli: Cli) -> Result<Cli, clap::Error> {
    if let Command::Ctl {
        config: Some(_),
        socket: Some(_),
        ..
    } = &cli.command
    {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        // Built, so that the usage it prints names `intermission ctl`, not `ctl`.
        cmd.build();
        let ctl = cmd.find_subcommand_mut("ctl").map(|c| c.clone());
        return Err(ctl.unwrap_or(cmd).error(
            clap::error::ErrorKind::ArgumentConflict,
            "the argument '--config <CONFIG>' cannot be used with '--socket <SOCKET>': \
             name the config (-c) or the socket (-s)",
        ));
    }
    Ok(cli)
}

/// The error and its causes on one line, as `{e:#}` prints them, but each cause once: the
/// library's messages say their cause already (they are shown alone to `ctl` and in logs),
/// and also return it as their `source()`, which a printer of the chain would say again.
fn describe(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

fn run(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(path.as_deref())?;
    // Held to the end, so that the lines of the stop are written before the process exits.
    let _flush = intermission::logging::init(&config.log);
    // Before any thread starts: the sockets the service manager passed (socket activation).
    let passed = intermission::passed::take_from_env().map_err(anyhow::Error::msg)?;
    if !passed.is_empty() {
        let list: Vec<String> = passed.iter().map(ToString::to_string).collect();
        tracing::info!("sockets passed by the service manager: {}", list.join(", "));
    }
    if let Some(limit) = intermission::limits::raise_open_files() {
        intermission::limits::warn_if_short(limit, config.proxy.max_connections);
    }
    // The proxy's own runtime is single-threaded: it is the first worker, and starts the
    // others (`workers`) for `proxy.threads` above 1.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let run = runtime.block_on(intermission::app::run_until_signal(config));
    // A file read that never ends (a reload's, from a mount that does not answer) holds a
    // blocking thread, which dropping the runtime would wait for without end: the
    // shutdown has already drained what matters, and the state file is written by rename.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // Its last line, after those of the connections the runtime's end closed.
    run?.say();
    Ok(())
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let c = match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let origin = c.source.as_ref().map_or_else(
        || "built-in defaults".to_owned(),
        |p| p.display().to_string(),
    );
    // The pages and certificates are part of a valid config: what would be refused at start
    // and at reload is said now, all of them at once. They are read only once the keys are
    // valid, since the keys name them.
    let pages = Pages::load(&c.maintenance).map_err(|e| format!("maintenance.pages: {e}"));
    // Each certificate entry's problem is listed on its own line, under its own key.
    let server =
        intermission::tls::server_config_checked(&c.tls, std::time::SystemTime::now(), None)
            .map_err(|e| match e {
                TlsError::Certificates(entries) => {
                    entries.iter().map(ToString::to_string).collect()
                }
                e => vec![format!("tls: {e}")],
            });
    let client = intermission::tls::client_config(&c.upstream).map_err(|e| match e {
        // Names its key already, as the start says it.
        e @ TlsError::CaFile(_) => e.to_string(),
        e => format!("upstream: {e}"),
    });
    // As the user who runs `check`: the proxy's own may differ (said in the README).
    // Loaded as the start loads it: a corrupt file passed here and then stopped `run`.
    let state = store::inspect(&c.control.state_file)
        .and_then(|said| store::probe(&c.control.state_file).map(|()| said))
        .map_err(|e| match e {
            // Names its key already, as the start says it.
            e @ store::StoreError::Unwritable { .. } => e.to_string(),
            e => format!("control.state_file: {e}"),
        });
    // As the state file's: a folder this user cannot write in passed, and the start failed.
    let socket = intermission::control::server::probe(&c.control.socket).map_err(|e| e.to_string());
    let addresses = foreign_addresses(&c);
    let (pages, warnings) = match (pages, server, client, state, socket) {
        (Ok(pages), Ok((_, mut warnings)), Ok(_), Ok(state), Ok(())) if addresses.is_empty() => {
            warnings.extend(state);
            (pages, warnings)
        }
        (pages, server, client, state, socket) => {
            let problems: Vec<String> = addresses
                .into_iter()
                .chain(pages.err())
                .chain(server.err().into_iter().flatten())
                .chain(client.err())
                .chain(state.err())
                .chain(socket.err())
                .collect();
            let n = problems.len();
            let s = if n == 1 { "" } else { "s" };
            eprintln!("{origin} is not valid ({n} problem{s}):");
            for p in problems {
                // As `ConfigError` lists them: one item each, however many lines.
                eprintln!("  - {}", p.replace('\n', "\n    "));
            }
            return ExitCode::FAILURE;
        }
    };
    let warnings = c.load_warnings(&pages, warnings);
    if !to_stdout(|out| summary(out, &c, &origin, &pages, &warnings)) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The listen addresses this machine cannot listen on at all (a mistyped private address, a
/// floating one not here yet): `check` said OK and the start failed "Cannot assign requested
/// address". Each is tried on port 0, since its own port may be the running proxy's, as nginx
/// -t and haproxy -c leave ports untried.
fn foreign_addresses(c: &Config) -> Vec<String> {
    let keyed = |key: &'static str, list: &[std::net::SocketAddr]| {
        list.iter()
            .enumerate()
            .map(move |(i, addr)| (format!("{key}[{i}]"), *addr))
            .collect::<Vec<_>>()
    };
    keyed("proxy.listen", &c.proxy.listen)
        .into_iter()
        .chain(keyed("tls.listen", &c.tls.listen))
        .chain(c.admin.listen.map(|a| ("admin.listen".to_owned(), a)))
        .filter_map(|(key, addr)| {
            // The address as written, on any port: `SocketAddr::new` would drop an IPv6
            // scope (`[fe80::1%2]`), and a link-local address binds only with its scope.
            let mut any_port = addr;
            any_port.set_port(0);
            let e = std::net::TcpListener::bind(any_port).err()?;
            let why = match e.kind() {
                std::io::ErrorKind::AddrNotAvailable => "is not an address of this machine",
                _ => "cannot be listened on",
            };
            Some(format!(
                "{key}: {} {why} ({e}): the start would fail to listen on {addr}",
                addr.ip()
            ))
        })
        .collect()
}

/// `check`'s summary of a valid config.
fn summary(
    out: &mut impl Write,
    c: &Config,
    origin: &str,
    pages: &Pages,
    warnings: &[String],
) -> std::io::Result<()> {
    writeln!(out, "{origin}: OK")?;
    let list = |v: Vec<String>| v.join(", ");
    writeln!(
        out,
        "  listen:   {}",
        list(c.proxy.listen.iter().map(ToString::to_string).collect())
    )?;
    if !c.tls.listen.is_empty() {
        writeln!(
            out,
            "  https:    {} ({} certificate(s))",
            list(c.tls.listen.iter().map(ToString::to_string).collect()),
            c.tls.certificates.len()
        )?;
    }
    writeln!(
        out,
        "  upstream: {}",
        list(c.upstream.servers.iter().map(ToString::to_string).collect())
    )?;
    let threads = match c.proxy.threads {
        0 => "one per core".to_owned(),
        n => n.to_string(),
    };
    writeln!(out, "  threads:  {threads}")?;
    writeln!(
        out,
        "  pages:    {} ({})",
        pages.origin,
        pages.describe_langs()
    )?;
    writeln!(out, "  control:  {}", c.control.socket.display())?;
    writeln!(out, "  state:    {}", c.control.state_file.display())?;
    // Valid, but clients would refuse what it serves (an expired certificate...), or files
    // that look like pages are served to nobody: said after the summary, with exit 0, as
    // the start logs them and a reload logs and returns them.
    for warning in warnings {
        writeln!(out, "  warning:  {warning}")?;
    }
    Ok(())
}

/// Writes to stdout with `write`, flushed, and says how it went. A reader that has gone
/// (`check | head -1`) is not an error: the output stops quietly, and the exit code still
/// says what was checked or what the proxy answered. Any other write error (a full disk:
/// `> /dev/full`) is said on stderr, once, and is `false`, for a non-zero exit as coreutils
/// give: said on stderr alone, with exit 0, a script took the output it never got for done.
pub(crate) fn to_stdout(
    write: impl FnOnce(&mut std::io::StdoutLock<'static>) -> std::io::Result<()>,
) -> bool {
    let mut out = std::io::stdout().lock();
    // Flushed here: what stays buffered is written at exit, where its error goes unseen.
    match write(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
        Err(e) => {
            eprintln!("intermission: cannot write the output: {e}");
            false
        }
        Ok(()) => true,
    }
}
