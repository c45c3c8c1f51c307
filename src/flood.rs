//! The HTTP/2 flood check of a client connection: what the client sends is weighed, beneath
//! hyper's HTTP/2 server, against the work it asks for, and a connection that sends mostly
//! frames that do none is closed, as nginx closes one ("http2 flood detected").
//!
//! h2 bounds the attacks that make it hold state (rapid resets, CONTINUATION floods, empty
//! DATA frames) but not frames that cost only CPU: PING and SETTINGS whose acknowledgements
//! the client reads, PRIORITY, WINDOW_UPDATE. Sent without end on a connection holding one
//! request open, about 100 MB/s of them kept a core busy for as long as the client cared.
//! The frames are walked as their bytes pass, nothing copied or held: each read's bytes are
//! looked at once, only for their 9-byte frame headers, and the payload of the frames that
//! carry requests, bodies and answers (HEADERS, CONTINUATION, DATA) is counted as useful,
//! both ways. Only the HTTP/2 connections pay for it.
//!
//! The same walk tells h2's own `431` to a request head over `max_header_bytes` among what
//! the proxy writes (`Budget::wrote`): h2 answers it before hyper sees a request, so that it
//! was counted and logged nowhere. So it tells the streams h2 resets for the client's errors
//! (a malformed request: bad pseudo-headers, `connection:`), which h2 tells hyper nothing of.

use crate::metrics::{Http2Goaway, Http2Reset};
use crate::state::StateHandle;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How many bytes a client may send for each useful one, as nginx: a request's headers and
/// body come in frames of a few to 16,384 bytes behind 9 bytes of header (ratios of 1 to 3 at
/// most), and a download's WINDOW_UPDATEs (13 bytes per 32 KiB or more) count against the
/// answer they make room for.
const RATIO: u64 = 8;
/// What a client may send beyond that before the ratio is held to, as nginx: a browser's
/// SETTINGS, PINGs and PRIORITY frames take a few KiB, and a gRPC client's keep-alive PINGs
/// (17 bytes each) on a connection that carries little else may go on for 490,000 of them,
/// 57 days at one every 10 s. A flood is stopped after 8 MiB, under 0.1 s of a core.
pub(crate) const ALLOWANCE: u64 = 8 * 1024 * 1024;
/// How many bytes of frames that do no work are handed to h2 between two turns the
/// connection gives its worker's other tasks. tokio's budget lets a task do 128 socket reads
/// of rustls' 4 KiB a turn, some 35,000 SETTINGS or PINGs that h2 answers one by one, tens of
/// milliseconds of a core: 30 connections flooding so held every other client of their
/// worker (a page, `/healthz` on the admin listener) for up to 0.6 to 1.6 s, until the
/// allowance closed them. About a thousand frames a turn; requests and bodies never count.
const TURN: u64 = 16 * 1024;

/// The client's connection preface (RFC 9113 §3.4), which precedes its first frame.
const PREFACE: u32 = 24;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The largest header block of h2's own `431` (`Budget::wrote`) as it writes one: `:status`
/// alone, 1 byte as an index of its table or 4 as a literal, after a table size update of up
/// to 6 bytes when the client changed the table's size.
const REFUSAL_BLOCK: usize = 16;

/// A frame's header, as it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head<'a> {
    kind: u8,
    flags: u8,
    len: u32,
    stream: u32,
    /// The header block of a HEADERS frame that ends its stream, when it is small enough to
    /// be h2's own `431` (and the frames are the proxy's): read with the header. Else empty.
    block: &'a [u8],
}

/// One direction's frames, walked as their bytes pass.
#[derive(Default)]
struct Frames {
    /// Bytes still to pass before the next frame header: the rest of a payload (or of the
    /// preface).
    skip: u32,
    /// A frame header split between two reads or writes, gathered, with the small header
    /// block after it that `blocks` asks for.
    head: [u8; 9 + REFUSAL_BLOCK],
    got: u8,
    /// Whether a small header block that ends its stream, and an `RST_STREAM`'s code, are
    /// read with their frame's header: the proxy's frames only.
    blocks: bool,
}

impl Frames {
    /// How many bytes of the frame that `head`, its 9-byte header, begins are read as its
    /// header: its payload too when it is a small header block that ends its stream, or an
    /// `RST_STREAM`'s code.
    fn head_len(&self, head: &[u8]) -> usize {
        // Flags that end the stream and the block, with no padding or priority (which h2
        // never writes).
        let (ending, len) = (END_STREAM | END_HEADERS, usize::from(head[2]));
        let small = self.blocks && head[..2] == [0, 0];
        match head[3] {
            HEADERS if small && head[4] == ending && len <= REFUSAL_BLOCK => 9 + len,
            RST_STREAM if small && len == 4 => 13,
            _ => 9,
        }
    }

    /// Walks `bytes`, the next ones of the stream, telling `each` of every frame whose header
    /// they complete.
    fn walk(&mut self, mut bytes: &[u8], mut each: impl FnMut(Head<'_>)) {
        loop {
            let skipped = bytes.len().min(self.skip as usize);
            bytes = &bytes[skipped..];
            // No more than `skip`, a u32.
            self.skip -= skipped as u32;
            if bytes.is_empty() {
                return;
            }
            let mut gathered = [0u8; 9 + REFUSAL_BLOCK];
            let (head, taken): (&[u8], usize) = match bytes.get(..9) {
                Some(nine) if self.got == 0 && self.head_len(nine) <= bytes.len() => {
                    let n = self.head_len(nine);
                    let head = &bytes[..n];
                    bytes = &bytes[n..];
                    (head, n)
                }
                _ => loop {
                    let got = usize::from(self.got);
                    let want = if got < 9 {
                        9
                    } else {
                        self.head_len(&self.head)
                    };
                    if got == want {
                        self.got = 0;
                        gathered[..want].copy_from_slice(&self.head[..want]);
                        break (&gathered[..want], want);
                    }
                    if bytes.is_empty() {
                        return;
                    }
                    let n = (want - got).min(bytes.len());
                    self.head[got..got + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    // At most 25.
                    self.got += n as u8;
                },
            };
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
            each(Head {
                kind: head[3],
                flags: head[4],
                len,
                stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                block: &head[9..],
            });
            // A block read with its header: at most `len`.
            self.skip = len - (taken - 9) as u32;
        }
    }

    /// Between two frames: something written now would not land inside one.
    fn between(&self) -> bool {
        self.skip == 0 && self.got == 0
    }
}

/// An HPACK integer with a `prefix`-bit prefix at the start of `b` (RFC 7541 §5.1), and what
/// follows it.
fn hpack_int(b: &[u8], prefix: u8) -> Option<(u64, &[u8])> {
    let max = (1u8 << prefix) - 1;
    let (&first, mut rest) = b.split_first()?;
    if first & max != max {
        return Some((u64::from(first & max), rest));
    }
    let (mut n, mut shift) = (u64::from(max), 0u32);
    loop {
        let (&c, r) = rest.split_first()?;
        rest = r;
        n = n.checked_add(u64::from(c & 0x7f).checked_shl(shift)?)?;
        if c & 0x80 == 0 {
            return Some((n, rest));
        }
        shift += 7;
    }
}

/// What follows an HPACK string literal at the start of `b` (§5.2).
fn hpack_str(b: &[u8]) -> Option<&[u8]> {
    let (len, rest) = hpack_int(b, 7)?;
    rest.get(usize::try_from(len).ok()?..)
}

/// Whether `block`, a header block the proxy wrote, holds one field, after any table size
/// updates (RFC 7541 §6.3). None of hyper's answers does: each has `:status` and `date`, and
/// trailers follow a stream's first frame. h2 writes such a block of its own for one thing,
/// its `431` to a request head over its limit (`max_header_bytes`).
fn one_field(block: &[u8]) -> bool {
    let mut b = block;
    while b.first().is_some_and(|&c| c & 0xe0 == 0x20) {
        match hpack_int(b, 5) {
            Some((_, rest)) => b = rest,
            None => return false,
        }
    }
    let Some(&first) = b.first() else {
        return false;
    };
    let rest = if first & 0x80 != 0 {
        // Indexed.
        hpack_int(b, 7).map(|(_, rest)| rest)
    } else {
        // A literal, with incremental indexing (01), without (0000) or never (0001): its
        // name by index, or given, then its value.
        let prefix = if first & 0x40 != 0 { 6 } else { 4 };
        hpack_int(b, prefix).and_then(|(name, rest)| match name {
            0 => hpack_str(rest).and_then(hpack_str),
            _ => hpack_str(rest),
        })
    };
    rest.is_some_and(<[u8]>::is_empty)
}

/// What one connection's client sent, against what of it, and of the answers, was useful.
struct Budget {
    read: Frames,
    written: Frames,
    /// Bytes read from the client, its preface included.
    total: u64,
    /// Payload of the HEADERS, CONTINUATION and DATA frames read and written.
    useful: u64,
    /// The highest stream the client opened: the GOAWAY's last stream, which may be higher
    /// than what h2 took up (RFC 9113 §6.8 allows it), never lower.
    last_stream: u32,
    /// Bytes read that carried no request, body or answer since the connection last let
    /// its worker's other tasks run (`TURN`).
    idle_streak: u64,
    /// Payload of requests and bodies counted in `useful` whose bytes are still to be read.
    ahead: u64,
    /// The highest stream the proxy has written a frame of.
    written_stream: u32,
    /// The streams of the last few `431`s h2 wrote of its own (`wrote`), by their number's
    /// place (`refusal_slot`), until their reset has passed: h2 resets each such stream
    /// `PROTOCOL_ERROR` after its answer, which is the same refusal, already counted, and no
    /// malformed request of the client's.
    refused_streams: [u32; 4],
}

/// Where a refused stream is kept among `Budget::refused_streams`: client streams are odd,
/// so that four in a row have four places.
fn refusal_slot(stream: u32) -> usize {
    (stream >> 1) as usize % 4
}

impl Budget {
    fn new() -> Budget {
        Budget {
            read: Frames {
                skip: PREFACE,
                ..Frames::default()
            },
            written: Frames {
                blocks: true,
                ..Frames::default()
            },
            total: 0,
            useful: 0,
            last_stream: 0,
            idle_streak: 0,
            ahead: 0,
            written_stream: 0,
            refused_streams: [0; 4],
        }
    }

    /// Counts bytes read from the client; whether it has now sent too much for too little.
    fn read(&mut self, bytes: &[u8]) -> bool {
        self.total += bytes.len() as u64;
        let useful_before = self.useful;
        let (useful, last) = (&mut self.useful, &mut self.last_stream);
        self.read.walk(bytes, |f| {
            if matches!(f.kind, DATA | HEADERS | CONTINUATION) {
                *useful += u64::from(f.len);
            }
            if f.kind == HEADERS {
                *last = (*last).max(f.stream);
            }
        });
        // A payload is counted useful when its frame's header passes, before its bytes do:
        // what is still to come of it (`ahead`) covers the first bytes of the next reads,
        // which would otherwise count as frames that do no work (an upload split across
        // reads gave up its turn as a flood does).
        let len = bytes.len() as u64;
        let ahead = self.ahead + (self.useful - useful_before);
        let covered = ahead.min(len);
        self.ahead = ahead - covered;
        self.idle_streak += len - covered;
        self.total > self.useful.saturating_mul(RATIO).saturating_add(ALLOWANCE)
    }

    /// Counts bytes written to the client; how many request heads they refused as h2 refuses
    /// one over `max_header_bytes`, its own `431` before hyper sees a request: a header block
    /// of one field (`one_field`), which ends the stream, written as the stream's first frame.
    /// h2 writes it as it reads the head, before any frame of a later stream (whose request
    /// comes after), so that stream is higher than any written before it; trailers are not.
    /// And the streams reset for the client's errors, by reason (`Http2Reset::ALL`'s order).
    fn wrote(&mut self, bytes: &[u8]) -> Wrote {
        let (useful, highest) = (&mut self.useful, &mut self.written_stream);
        let refused = &mut self.refused_streams;
        let mut wrote = Wrote::default();
        self.written.walk(bytes, |f| {
            if matches!(f.kind, DATA | HEADERS | CONTINUATION) {
                *useful += u64::from(f.len);
            }
            if let (RST_STREAM, &[a, b, c, d]) = (f.kind, f.block) {
                let slot = &mut refused[refusal_slot(f.stream)];
                if *slot == f.stream && f.stream != 0 {
                    // The reset that follows h2's own `431`: the refusal, told already.
                    *slot = 0;
                } else if let Some(reason) = Http2Reset::of(u32::from_be_bytes([a, b, c, d])) {
                    wrote.resets[reason as usize] += 1;
                }
            }
            if f.stream > *highest {
                if f.kind == HEADERS && !f.block.is_empty() && one_field(f.block) {
                    wrote.refused += 1;
                    refused[refusal_slot(f.stream)] = f.stream;
                }
                *highest = f.stream;
            }
        });
        wrote
    }

    /// GOAWAY with ENHANCE_YOUR_CALM, as h2 answers the abuse it bounds itself.
    fn goaway(&self) -> [u8; 17] {
        let mut frame = [0u8; 17];
        frame[..9].copy_from_slice(&[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0]);
        frame[9..13].copy_from_slice(&self.last_stream.to_be_bytes());
        frame[13..].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        frame
    }
}

/// What a write to the client told (`Budget::wrote`).
#[derive(Default, Debug, PartialEq, Eq)]
struct Wrote {
    /// Request heads h2 refused with its own `431`.
    refused: u32,
    /// Streams reset for the client's errors, by `Http2Reset`.
    resets: [u32; 4],
}

impl std::ops::AddAssign for Wrote {
    fn add_assign(&mut self, other: Wrote) {
        self.refused += other.refused;
        for (r, o) in self.resets.iter_mut().zip(other.resets) {
            *r += o;
        }
    }
}

/// At most one line a second for every flooding connection together: a client that
/// reconnects would otherwise write one for each MiB it sends.
static TOLD: Mutex<crate::listener::Lasting> = Mutex::new(crate::listener::Lasting::new());

/// An HTTP/2 client connection's socket, beneath hyper, with its flood check.
pub struct Flood<I> {
    io: I,
    budget: Budget,
    flooded: bool,
    state: StateHandle,
    peer: SocketAddr,
}

impl<I: AsyncWrite + Unpin> Flood<I> {
    pub fn new(io: I, state: StateHandle, peer: SocketAddr) -> Flood<I> {
        Flood {
            io,
            budget: Budget::new(),
            flooded: false,
            state,
            peer,
        }
    }

    /// Closes the connection for a flood: counts it, says so, and tells the client with a
    /// GOAWAY of its own when no frame of h2's is half written. Nothing is waited for: the
    /// frame goes if the socket takes it now, and every read and write from here fails, which
    /// ends hyper's connection.
    fn close(&mut self, cx: &mut Context<'_>) -> std::io::Error {
        self.flooded = true;
        self.state.load().metrics.http2_goaway(Http2Goaway::Flood);
        let told = TOLD
            .lock()
            .map(|mut t| t.tell(std::time::Instant::now()))
            .unwrap_or(None);
        if let Some(unsaid) = told {
            let more = crate::forward::More(unsaid);
            tracing::warn!(
                peer = %self.peer,
                "HTTP/2 client flood: {} bytes received for {} bytes of requests, bodies and \
                 answers, more than 8 to 1 past 8 MiB; closed with GOAWAY \
                 (ENHANCE_YOUR_CALM){more}",
                self.budget.total,
                self.budget.useful,
            );
        }
        if self.budget.written.between() {
            let goaway = self.budget.goaway();
            if let Poll::Ready(Ok(_)) = Pin::new(&mut self.io).poll_write(cx, &goaway) {
                let _ = Pin::new(&mut self.io).poll_shutdown(cx);
            }
        }
        flooded()
    }
}

impl<I> Flood<I> {
    /// Counts and logs the request heads h2 refused with its own `431` (`Budget::wrote`), as
    /// HTTP/1.1's are when hyper refuses one (`listener::count_unread`); counts the streams
    /// it reset for the client's errors. Nothing to do for almost every write.
    fn told(&self, wrote: Wrote) {
        for _ in 0..wrote.refused {
            crate::listener::refused_unread(&self.state, self.peer.ip(), 431);
        }
        if wrote.resets != [0; 4] {
            let snap = self.state.load();
            for (reason, &n) in Http2Reset::ALL.iter().zip(&wrote.resets) {
                for _ in 0..n {
                    snap.metrics.http2_reset(*reason);
                }
            }
        }
    }
}

fn flooded() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "HTTP/2 client flood: too many bytes for too little work",
    )
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for Flood<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.flooded {
            return Poll::Ready(Err(flooded()));
        }
        if this.budget.idle_streak >= TURN {
            // As tokio's own budget does: the task is woken at once and goes to the back of
            // its worker's queue, and h2 answers what it has buffered before it reads again.
            this.budget.idle_streak = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before && this.budget.read(&buf.filled()[before..]) {
            return Poll::Ready(Err(this.close(cx)));
        }
        if polled.is_pending() {
            this.budget.idle_streak = 0;
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Flood<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.flooded {
            return Poll::Ready(Err(flooded()));
        }
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            let wrote = this.budget.wrote(&buf[..n.min(buf.len())]);
            this.told(wrote);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.flooded {
            return Poll::Ready(Err(flooded()));
        }
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            let (mut left, mut wrote) = (n, Wrote::default());
            for buf in bufs {
                let taken = left.min(buf.len());
                wrote += this.budget.wrote(&buf[..taken]);
                left -= taken;
                if left == 0 {
                    break;
                }
            }
            this.told(wrote);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.flooded {
            return Poll::Ready(Err(flooded()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{Budget, Flood, Frames, Wrote, ALLOWANCE, PREFACE, TURN};
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// A client that always has more PINGs to send, after its preface.
    struct Pings {
        preface: bool,
    }

    impl AsyncRead for Pings {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if !self.preface {
                self.preface = true;
                buf.put_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            }
            let ping = frame(0x6, 0, b"12345678");
            while buf.remaining() >= ping.len() {
                buf.put_slice(&ping);
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Pings {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A socket that always has control frames to read still lets its worker's other tasks
    /// run every `TURN` bytes, waking itself, rather than hold the worker until tokio's budget
    /// of reads (half a MiB over TLS) or the allowance runs out.
    #[test]
    fn a_flood_gives_its_worker_a_turn() {
        let config = "[upstream]\nservers = [\"http://127.0.0.1:9\"]\n[log]\naccess_log = false\n";
        let state =
            crate::state::StateHandle::new(crate::state::snapshot::for_tests(config, false));
        let peer = "192.0.2.7:40000".parse().unwrap();
        let mut flood = Flood::new(Pings { preface: false }, state, peer);
        let waker = std::sync::Arc::new(Woken::default());
        let waker_ref = std::task::Waker::from(waker.clone());
        let mut cx = Context::from_waker(&waker_ref);
        let mut read = 0u64;
        let mut mem = [0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut mem);
            match Pin::new(&mut flood).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) => read += buf.filled().len() as u64,
                Poll::Ready(Err(e)) => panic!("no turn given before {read} bytes: {e}"),
                Poll::Pending => break,
            }
        }
        assert!(
            (TURN..TURN + 4096).contains(&read),
            "{read} bytes in a turn"
        );
        assert!(
            waker.0.load(std::sync::atomic::Ordering::SeqCst),
            "not woken"
        );
        // The next turn reads as much again.
        let mut buf = ReadBuf::new(&mut mem);
        assert!(Pin::new(&mut flood).poll_read(&mut cx, &mut buf).is_ready());
    }

    /// An upload's DATA frames are work, however they are split across reads: a payload is
    /// counted when its frame's header passes, and the rest of it, in the reads after, was
    /// counted again as frames that do no work, so that a client sending a body gave up its
    /// turn every 16 KiB or so, as a flood does.
    #[test]
    fn an_upload_split_across_reads_is_no_flood_s_turn() {
        let mut budget = Budget::new();
        let mut upload = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        upload.extend(frame(0x1, 1, b"head"));
        for _ in 0..64 {
            upload.extend(frame(0x0, 1, &[b'b'; 16 * 1024]));
        }
        for piece in upload.chunks(4096) {
            assert!(!budget.read(piece), "a flood");
        }
        // Only the frames' 9-byte headers and the preface do no work.
        assert!(
            budget.idle_streak < 1024,
            "{} idle bytes",
            budget.idle_streak
        );
        // A control frame after the last payload still counts, whole.
        let before = budget.idle_streak;
        assert!(!budget.read(&frame(0x6, 0, b"12345678")));
        assert_eq!(budget.idle_streak, before + 17);
    }

    #[derive(Default)]
    struct Woken(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn stream() -> Vec<u8> {
        let mut s = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        s.extend(frame(0x4, 0, &[0, 3, 0, 0, 0, 100]));
        s.extend(frame(0x1, 1, b"head"));
        s.extend(frame(0x8, 0, &[0, 0, 1, 0]));
        s.extend(frame(0x0, 1, &[7; 300]));
        s.extend(frame(0x9, 1, b"more"));
        s.extend(frame(0x6, 0, b"12345678"));
        s.extend(frame(0x1, 5, b""));
        s
    }

    const SEEN: [(u8, u32, u32); 7] = [
        (0x4, 6, 0),
        (0x1, 4, 1),
        (0x8, 4, 0),
        (0x0, 300, 1),
        (0x9, 4, 1),
        (0x6, 8, 0),
        (0x1, 0, 5),
    ];

    /// Every frame is seen once, whatever the reads' sizes, a header split over two, three
    /// or nine reads included.
    #[test]
    fn frames_are_walked_across_any_split() {
        let bytes = stream();
        for size in 1..=bytes.len() {
            let mut frames = Frames {
                skip: PREFACE,
                ..Frames::default()
            };
            let mut seen = Vec::new();
            for chunk in bytes.chunks(size) {
                frames.walk(chunk, |f| seen.push((f.kind, f.len, f.stream)));
            }
            assert_eq!(seen, SEEN, "reads of {size} bytes");
            assert!(frames.between());
        }
    }

    #[test]
    fn useful_bytes_are_those_of_headers_and_data() {
        let mut budget = Budget::new();
        assert!(!budget.read(&stream()));
        assert_eq!(budget.useful, 4 + 300 + 4);
        assert_eq!(budget.last_stream, 5);
        budget.wrote(&frame(0x0, 1, &[0; 1000]));
        budget.wrote(&frame(0x6, 0, b"12345678"));
        assert_eq!(budget.useful, 4 + 300 + 4 + 1000);
    }

    /// h2's own `431` (one field, ending its stream, the stream's first frame) is told,
    /// whether its `:status` is a literal or an index of h2's table, after table size updates
    /// or not, split anyhow across writes, with frames of earlier streams after it; hyper's
    /// answers (two fields at least, ending the stream or not) and trailers of one field are
    /// not, nor a header block read from the client; the reset h2 sends after its own `431`
    /// is not told as one for the client's error.
    #[test]
    fn h2_s_own_refusal_of_a_head_is_told() {
        let ended = |stream: u32, block: &[u8]| {
            let mut f = frame(0x1, stream, block);
            f[4] = 0x5;
            f
        };
        let mut written = Vec::new();
        // hyper's answer of an empty body: `:status`, `content-length` and `date` indexed.
        written.extend(ended(1, &[0x88, 0xbf, 0xbe]));
        // h2's, `:status` a literal (huffman "431"), then an index; a table size update.
        written.extend(ended(3, &[0x48, 0x83, 0x64, 0x30, 0xff]));
        written.extend(frame(0x0, 1, b"late"));
        written.extend(ended(5, &[0xbe]));
        written.extend(ended(7, &[0x3f, 0xe1, 0x1f, 0xbe]));
        // An answer with a body, then its trailers of one field.
        written.extend(frame(0x1, 9, &[0x88, 0xbe]));
        written.extend(frame(0x0, 9, b"1"));
        written.extend(ended(9, &[0xc0]));
        // A stream lower than one written already.
        written.extend(ended(7, &[0xbe]));
        // Too large for `:status` alone, and a literal with a value left over.
        written.extend(ended(11, &[0x88; 20]));
        written.extend(ended(13, &[0x08, 0x03, b'4', b'3', b'1', 0x00]));
        written.extend(ended(15, &[0x08, 0x03, b'4', b'3', b'1']));
        // The resets h2 sends after its refusals, one of them behind a later refusal, are
        // the same refusals; another stream's, and a second on a refused one, are not.
        let reset = |stream: u32| frame(0x3, stream, &1u32.to_be_bytes());
        written.extend(ended(17, &[0xbe]));
        written.extend(reset(15));
        written.extend(reset(13));
        written.extend(reset(17));
        written.extend(reset(17));
        for size in 1..=written.len() {
            let mut budget = Budget::new();
            let mut told = Wrote::default();
            for w in written.chunks(size) {
                told += budget.wrote(w);
            }
            let want = Wrote {
                refused: 5,
                resets: [2, 0, 0, 0],
            };
            assert_eq!(told, want, "writes of {size} bytes");
            assert!(budget.written.between());
        }
        // Read, the same frames are a client's.
        let mut budget = Budget::new();
        let mut read = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        read.extend(&written);
        assert!(!budget.read(&read));
        assert!(budget.read.between());
    }

    /// The streams h2 resets for the client's errors are told by their code, split anyhow
    /// across writes; hyper's own resets (NO_ERROR, INTERNAL_ERROR, CANCEL) are not, nor a
    /// reset read from the client, nor a 4-byte DATA frame of the same bytes.
    #[test]
    fn streams_reset_for_the_client_s_errors_are_told() {
        let mut written = Vec::new();
        for (stream, code) in [
            (1u32, 1u32),
            (3, 0),
            (5, 3),
            (7, 2),
            (9, 7),
            (11, 8),
            (13, 5),
        ] {
            written.extend(frame(0x3, stream, &code.to_be_bytes()));
            written.extend(frame(0x0, stream, &1u32.to_be_bytes()));
        }
        written.extend(frame(0x3, 15, &1u32.to_be_bytes()));
        for size in 1..=written.len() {
            let mut budget = Budget::new();
            let mut told = Wrote::default();
            for w in written.chunks(size) {
                told += budget.wrote(w);
            }
            let want = Wrote {
                refused: 0,
                resets: [2, 1, 1, 1],
            };
            assert_eq!(told, want, "writes of {size} bytes");
            assert!(budget.written.between());
        }
        let mut budget = Budget::new();
        let mut read = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        read.extend(&written);
        assert!(!budget.read(&read));
        assert!(budget.read.between());
    }

    /// Control frames alone are let through up to the allowance, and 8 times what is useful.
    #[test]
    fn a_flood_is_told_past_eight_to_one_and_the_allowance() {
        let update = frame(0x8, 0, &[0, 0, 0, 1]);
        let mut budget = Budget::new();
        assert!(!budget.read(&stream()));
        let mut sent = stream().len() as u64;
        while !budget.read(&update) {
            sent += update.len() as u64;
            assert!(sent < 2 * ALLOWANCE, "never told");
        }
        let useful = 4 + 300 + 4;
        assert!(sent <= 8 * useful + ALLOWANCE && sent + 13 > 8 * useful + ALLOWANCE);
        // An answer written makes room for 8 times its size.
        budget.wrote(&frame(0x0, 1, &[0; 16_384]));
        assert!(!budget.read(&update));
        let goaway = budget.goaway();
        assert_eq!(goaway[..9], [0, 0, 8, 7, 0, 0, 0, 0, 0]);
        assert_eq!(goaway[9..], [0, 0, 0, 5, 0, 0, 0, 0xb]);
    }
}
