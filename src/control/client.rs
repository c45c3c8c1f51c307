//! A control-socket client: one request, one response line. Used by `ctl` and the tests.

use super::protocol::{Request, Response};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no proxy answered on {path}: {source}{}", hint(source, path))]
    NoProxy {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The socket is there, but this user may not use it: the proxy may well be running, and
    /// "no proxy answered" sent an operator to restart one that was serving.
    #[error(
        "permission denied on {path}: the proxy may well be running, but this user may not \
         use its socket; run ctl as the proxy's user or root (or let a group in: \
         control.socket_mode = \"0660\", the proxy run with that group)"
    )]
    Denied { path: String },
    /// The proxy's end of the connection went before it read the request whole: a Unix
    /// socket says so with a broken pipe at the write, or a reset at the read (Linux resets
    /// only an end closed with bytes still unread in it, or never taken from the listener's
    /// queue: one that read the line whole and went ends it plainly, `Unanswered`). The
    /// line's end never reached the proxy, so nothing was applied. Said as "no proxy
    /// answered", as a socket already gone is, where a broken pipe read "the control
    /// connection failed" and a reset "may or may not be in force": the same stopping proxy,
    /// worded by which of the two calls saw it first.
    #[error(
        "no proxy answered on {path}: the connection was closed before the request was read ({source}), so it was not applied"
    )]
    NotRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the control connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The request went out whole and the connection ended before an answer came: the proxy
    /// stopped (crashed, killed, out of memory) while it read or applied it, so whether the
    /// change took effect is not known. Told apart from an answer not understood, which
    /// read as "the proxy said something odd, nothing happened".
    #[error("the proxy closed the connection without answering{}", .0.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Unanswered(Option<std::io::Error>),
    #[error("the proxy sent an answer that is not understood: {0}")]
    Protocol(String),
}

/// What an operator can do about a socket that is not there: a proxy whose socket file was
/// removed binds it again at SIGHUP, which a restart (refusing clients while it drains)
/// would otherwise be the way to. A refused connection is told apart by what is at the
/// path: the system says "Connection refused" of a socket nobody listens on and of a file
/// that is no socket alike (`-s config.toml` typed for `-c`), and an operator read both as
/// "the proxy is down".
fn hint(e: &std::io::Error, path: &str) -> String {
    match e.kind() {
        // A mistyped folder (`-s /rnu/intermission.sock`) is no removed socket: sent to
        // `kill -HUP` first, an operator under stress lost minutes on a proxy that was fine.
        // A folder a cleaner of /run or /tmp removed under a running proxy is the other way
        // here, and a SIGHUP binds the socket again once the folder is back: without this a
        // restart, whose drain refuses clients, looked like the only way.
        std::io::ErrorKind::NotFound if !parent_exists(Path::new(path)) => {
            let folder = Path::new(path)
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!(
                " (its folder {folder} does not exist: check the path, or the -c config's \
                 control.socket; if it is right and the proxy is running, the folder was \
                 removed (by a cleaner of /run or /tmp): make it again, writable by the \
                 proxy's user (`install -d -m 0755 -o USER {folder}`, USER the one the proxy \
                 runs as), then `kill -HUP` the proxy's PID, which binds the socket there again)"
            )
        }
        // A control.socket changed in the config since the start is the other way to get
        // here: a reload keeps the socket the proxy started with (it warned so), and `ctl -c`
        // reads the new path. `kill -HUP` alone binds the old path again, not this one.
        std::io::ErrorKind::NotFound => " (a proxy that is stopping removes it at once, and the \
            next one binds it when it starts; if the proxy is running and not stopping, the \
            file was removed: `kill -HUP` it to bind the socket again; or control.socket was \
            changed in the config since the proxy started, which only a restart applies: until \
            then pass -s with the socket it started with, which its start's log names, \
            `control socket ready`)"
            .to_owned(),
        std::io::ErrorKind::ConnectionRefused => refused_hint(Path::new(path)),
        _ => String::new(),
    }
}

/// Whether the folder `path` would be in is there (a relative path's is the current one).
fn parent_exists(path: &Path) -> bool {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.is_dir(),
        _ => true,
    }
}

fn refused_hint(path: &Path) -> String {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return String::new();
    };
    let kind = meta.file_type();
    if kind.is_socket() {
        " (the socket file is there but nothing listens on it: the proxy that made it is not \
         running, as after `kill -9` or a crash; the next start replaces the file)"
            .to_owned()
    } else if kind.is_dir() {
        " (it is a folder, not a socket: -s names the socket itself, -c the config file)".to_owned()
    } else if kind.is_file() {
        " (it is a regular file, not a socket: a config file is named with -c, not -s)".to_owned()
    } else {
        " (it is not a socket)".to_owned()
    }
}

/// The longest answer taken: the largest status (500 windows and 50 updates of 2,000
/// characters each) is a few MiB.
const MAX_ANSWER: u64 = 64 << 20;

/// A connection that can carry many requests.
pub struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// The socket, as errors name it.
    path: String,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path).await.map_err(|source| {
            let path = shown.clone();
            match source.kind() {
                std::io::ErrorKind::PermissionDenied => ClientError::Denied { path },
                _ => ClientError::NoProxy { path, source },
            }
        })?;
        let (r, w) = stream.into_split();
        Ok(Client {
            reader: BufReader::new(r),
            writer: w,
            path: shown,
        })
    }

    /// Sends a raw line (a newline is added) and returns the raw answer line.
    pub async fn raw(&mut self, line: &[u8]) -> Result<String, ClientError> {
        let sent = match self.writer.write_all(line).await {
            Ok(()) => self.writer.write_all(b"\n").await,
            Err(e) => Err(e),
        };
        // The proxy may answer before it has read the whole line (a refused `line_too_long`)
        // and close, which fails the rest of the write; its answer is then already waiting
        // here, and it is the one that matters.
        let mut answer = String::new();
        // Bounded: whatever listens on the socket (not always the proxy) could send without
        // end, and `ctl` would grow with it.
        let mut capped = (&mut self.reader).take(MAX_ANSWER);
        let read = capped.read_line(&mut answer).await;
        match (read, sent) {
            (Ok(_), _) if answer.len() as u64 >= MAX_ANSWER && !answer.ends_with('\n') => Err(
                ClientError::Protocol(format!("an answer longer than {MAX_ANSWER} bytes")),
            ),
            (Ok(n), _) if n > 0 => Ok(answer),
            // Nothing came back: the failed write is what went wrong.
            (_, Err(e)) if not_read(&e) => Err(ClientError::NotRead {
                path: self.path.clone(),
                source: e,
            }),
            (_, Err(e)) => Err(e.into()),
            // Sent whole, and reset: the proxy's end went with the line's end unread.
            (Err(e), Ok(())) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                Err(ClientError::NotRead {
                    path: self.path.clone(),
                    source: e,
                })
            }
            // Sent, and the connection ended under the read: the proxy went.
            (Err(e), Ok(())) if e.kind() == std::io::ErrorKind::ConnectionAborted => {
                Err(ClientError::Unanswered(Some(e)))
            }
            (Err(e), Ok(())) => Err(e.into()),
            (Ok(_), Ok(())) => Err(ClientError::Unanswered(None)),
        }
    }

    pub async fn request(&mut self, req: &Request) -> Result<Response, ClientError> {
        let line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let answer = self.raw(&line).await?;
        serde_json::from_str(&answer)
            .map_err(|e| ClientError::Protocol(format!("{e}: {}", excerpt(&answer))))
    }
}

/// A failed write that says the proxy's end is gone: nothing after the last byte it read
/// reached it, and the line's end is last.
fn not_read(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

/// The start of an answer not understood: what listens on the socket may be no proxy of this
/// version (another program, an older proxy's whole status), and megabytes of it on stderr
/// would bury the error it illustrates.
fn excerpt(answer: &str) -> String {
    const SHOWN: usize = 200;
    let answer = answer.trim_end();
    match answer.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}… ({} bytes)", &answer[..cut], answer.len()),
        None => answer.to_owned(),
    }
}

/// Connects, sends one request, returns the response.
pub async fn request(path: &Path, req: &Request) -> Result<Response, ClientError> {
    Client::connect(path).await?.request(req).await
}
