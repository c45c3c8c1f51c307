//! Holding responses without hyper: while the proxy holds requests, the plain GET or HEAD
//! requests that arrive on a parked (idle) HTTP/1.1 connection, or as the first bytes of a new
//! one, are answered here, and the connection stays parked. `held` answers them for the relay
//! too, on the connections it serves (TLS ones included).
//!
//! During an incident the holding page is what every client gets, retries included, so it is
//! the path that must cost least. Building hyper's connection state, its header map and its
//! per-request timers costs more than the answer itself, which is pre-rendered. Here a request
//! is parsed with httparse (as hyper does) in place, its lines read where they lie
//! (`hold::fields`, no header map), judged by the gateway's own rules (`rule`: bypass cookies,
//! allowed paths and addresses, reserved paths: the same code as every other request), and its
//! answer, encoded when the state changed (`hold::Held::write_encoded`: all but its `Date`,
//! and while it counts down, its `Retry-After` and what follows from that), written with one
//! system call (a `writev` of its head and its pre-rendered body, which is not copied:
//! `h1::Answers`).
//!
//! Anything else goes to hyper, untouched, with the bytes read so far: another method, a body,
//! a `Connection` other than `keep-alive`, `Upgrade` or `Expect`, HTTP/1.0, a target with a
//! fragment or with bytes `Uri` refuses, an incomplete or malformed head, a request
//! that is forwarded (bypass) or answered by a reserved path, and every request once a drain
//! has begun. So hyper still answers every error (400, 431, timeouts) and every exchange with
//! state of its own.

use crate::gateway::{self, Conn};
use crate::h1::{Answers, PIECES};
use crate::shutdown::Drain;
use crate::state::{Snapshot, StateHandle};
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Method, Request};
use std::cell::RefCell;
use std::io::{ErrorKind, IoSlice};
use std::mem::MaybeUninit;
use std::sync::Arc;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// What is read at once. `proxy.max_header_bytes` is at least this, so a head that is whole
/// here is never one hyper would refuse as too large.
const READ_BUF: usize = 8192;

/// Headers a plain request may have; more, and hyper reads it.
const MAX_HEADERS: usize = 48;

/// Answers are written for the requests of one read until they pass this size; hyper reads
/// the rest, and stops reading while its answers wait. Without it, a client that pipelines
/// small requests and reads nothing would have a read's worth of pages held for it.
const OUT_BUDGET: usize = 64 * 1024;

/// What a connection needs to answer held requests itself.
pub struct Fast {
    state: StateHandle,
    conn: Arc<Conn>,
}

/// What became of the bytes that had arrived.
pub enum Step {
    /// Requests are not held now, or a drain has begun (a draining connection's answer says
    /// `Connection: close`, which hyper writes), or this thread's buffers are in use (never
    /// so today: `serve` does not call itself): nothing was read.
    Declined,
    /// The peer closed the connection, or it failed.
    Closed,
    /// `answered`: when the last request answered was counted, if one was; `unwritten` is
    /// what the socket did not take at once; `rest` is what hyper must read, from its first
    /// byte (empty when every request was answered).
    Served {
        answered: Option<std::time::Instant>,
        unwritten: Bytes,
        rest: Bytes,
    },
}

thread_local! {
    /// The bytes read and the answers written by one `serve`, kept for the next one: a
    /// parked connection owns no buffer, and a request allocates none of this size.
    static BUFFERS: RefCell<(Box<[u8; READ_BUF]>, Vec<u8>)> =
        RefCell::new((Box::new([0; READ_BUF]), Vec::new()));
}

impl Fast {
    /// Two pointers in every parked connection's state; in `Conn` instead, the state handle
    /// would move every connection's `Conn` allocation to the next size class.
    pub fn new(state: StateHandle, conn: Arc<Conn>) -> Fast {
        Fast { state, conn }
    }

    /// The state and the connection's facts, for `relay`.
    pub fn parts(&self) -> (&StateHandle, &Conn) {
        (&self.state, &self.conn)
    }

    /// The gateway's answer to a request hyper read on this connection.
    pub fn handle(&self, req: Request<hyper::body::Incoming>) -> gateway::Reply {
        gateway::handle(&self.state, &self.conn, req)
    }

    /// Reads what has arrived after `first`, and answers the plain held requests at its start.
    pub fn serve(&self, io: &TcpStream, first: Bytes, drain: &Drain) -> Step {
        let snap = self.state.load();
        if snap.held.is_none() || drain.started() {
            return Step::Declined;
        }
        BUFFERS.with(|cell| {
            let Ok(mut buffers) = cell.try_borrow_mut() else {
                return Step::Declined;
            };
            let (read, out) = &mut *buffers;
            let have = first.len().min(READ_BUF);
            read[..have].copy_from_slice(&first[..have]);
            let mut len = have;
            if first.len() < READ_BUF {
                let room = READ_BUF - have;
                let mut got = None;
                // A read that does not fill the buffer empties the socket's (epoll is
                // edge-triggered: more data makes a new event), so its readiness is forgotten,
                // sparing the next wait a read that would find nothing, as tokio's own
                // `poll_read` does. Read inside `try_io`, whose `WouldBlock` clears only the
                // readiness it saw before the read (a newer event moves its tick and is kept),
                // so nothing that arrives after the read is forgotten. tokio's docs ask the
                // closure for a plain `recv`; `try_read` is that, behind a readiness check
                // that the outer `try_io` has just passed, and its own clearing on a real
                // `WouldBlock` is the same clearing.
                let read_once = io.try_io(Interest::READABLE, || {
                    let n = io.try_read(&mut read[have..])?;
                    got = Some(n);
                    match n {
                        n if n > 0 && n < room => Err(ErrorKind::WouldBlock.into()),
                        _ => Ok(()),
                    }
                });
                match (got, read_once) {
                    (Some(0), _) if have == 0 => return Step::Closed,
                    // The end of the stream after some bytes: hyper sees it on its next read.
                    (Some(n), _) => len += n,
                    (None, Err(e)) if e.kind() != ErrorKind::WouldBlock => return Step::Closed,
                    (None, _) => {}
                }
            }
            // Parsed where they lie: the rules read httparse's lines (`hold::fields`), so
            // nothing of a request is copied unless hyper must read it.
            let mut at = 0;
            let mut answers = Answers::new(out);
            while at < len && answers.len() < OUT_BUDGET {
                let Some(used) = held(&snap, &self.conn, &read[at..len], &mut answers) else {
                    break;
                };
                at += used;
            }
            let answered = answers.last_counted();
            let Some(unwritten) = write(io, &answers) else {
                return Step::Closed;
            };
            if out.capacity() > 4 * READ_BUF {
                // One large answer does not pin its size in every thread for good.
                *out = Vec::new();
            }
            // When the read added nothing, or was skipped because `first` fills the buffer,
            // `first` holds all there is (more than `read` when it is longer than the buffer),
            // and a slice of it saves a copy; an empty slice holds none of it.
            let rest = if len == have {
                first.slice(at..)
            } else if at == len {
                Bytes::new()
            } else {
                Bytes::copy_from_slice(&read[at..len])
            };
            Step::Served {
                answered,
                unwritten,
                rest,
            }
        })
    }
}

/// Writes `answers` with one `writev` (more only when the socket takes a part, and will take
/// more at once); gives back what it did not take, or `None` when the connection failed.
fn write(io: &TcpStream, answers: &Answers<'_, '_>) -> Option<Bytes> {
    let mut pieces = [IoSlice::new(&[]); PIECES];
    let n = answers.pieces(&mut pieces);
    let mut left = &mut pieces[..n];
    while !left.is_empty() {
        match io.try_write_vectored(left) {
            Ok(0) => return None,
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => return None,
        }
    }
    // Rare: a client that reads slowly, or a socket buffer smaller than the answers.
    let mut rest = Vec::with_capacity(left.iter().map(|piece| piece.len()).sum());
    for piece in left.iter() {
        rest.extend_from_slice(piece);
    }
    Some(Bytes::from(rest))
}

/// Answers the request at the start of `input` into `out` when it is a plain held one;
/// returns the length of its head. For parked connections here, and for connections the relay
/// serves (TLS ones, which do not park, included).
pub fn held<'s>(
    snap: &'s Snapshot,
    conn: &Conn,
    input: &[u8],
    out: &mut Answers<'s, '_>,
) -> Option<usize> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let httparse::Status::Complete(used) =
        parsed.parse_with_uninit_headers(input, &mut slots).ok()?
    else {
        return None;
    };
    if parsed.version != Some(1) {
        return None;
    }
    let method = match parsed.method? {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        _ => return None,
    };
    let target = parsed.path?;
    let lines: &[httparse::Header<'_>] = parsed.headers;
    if !lines.iter().all(|line| plain_header(line.name, line.value)) {
        return None;
    }
    if !gateway::write_held(snap, conn, &method, target, lines, out) {
        return None;
    }
    conn.arrived();
    Some(used)
}

/// Whether a request header leaves the exchange plain: no body (`Content-Length: 0` aside),
/// nothing asked of the connection beyond keep-alive, no upgrade, no `100 Continue`.
fn plain_header(name: &str, value: &[u8]) -> bool {
    let is = |known: &HeaderName| name.eq_ignore_ascii_case(known.as_str());
    if is(&header::CONTENT_LENGTH) {
        return value == b"0";
    }
    if is(&header::CONNECTION) {
        return value.eq_ignore_ascii_case(b"keep-alive");
    }
    !(is(&header::TRANSFER_ENCODING) || is(&header::UPGRADE) || is(&header::EXPECT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_exchanges_are_answered_here() {
        assert!(plain_header("content-length", b"0"));
        assert!(!plain_header("Content-Length", b"5"));
        assert!(!plain_header("content-length", b"00"));
        assert!(plain_header("Connection", b"Keep-Alive"));
        assert!(!plain_header("connection", b"close"));
        assert!(!plain_header("CONNECTION", b"upgrade"));
        assert!(!plain_header("Transfer-Encoding", b"chunked"));
        assert!(!plain_header("upgrade", b"websocket"));
        assert!(!plain_header("Expect", b"100-continue"));
        assert!(plain_header("Accept", b"text/html"));
        assert!(plain_header("Content-Lengths", b"5"));
    }
}
