//! A WebSocket tunnel's copy loop (RFC 6455): bytes go both ways as `copy_bidirectional`
//! copies them, but each direction knows where its frames begin, from their headers alone
//! (the payload is skipped, never read), so that a drain can close the WebSocket as its
//! endpoints expect rather than cut it.
//!
//! Cut at `shutdown_timeout`, a browser's `onclose` says 1006 (abnormal) and it backs off
//! before reconnecting; and every stop waited out the whole of `shutdown_timeout` for any
//! WebSocket open. When a drain begins, each direction waits for its next frame boundary and
//! puts a close frame there, code 1001 ("going away"): unmasked to the client, masked to the
//! server (a client's frames must be masked, §5.3). A control frame may come between the
//! fragments of a message (§5.4), and permessage-deflate never compresses one (RFC 7692
//! §6), so a boundary mid-message is a legal place for it. What the source sends after that
//! is read and thrown away (its peer has been told it closed, and must see nothing after
//! that, §5.5.1), but watched for the source's own close, its answer. Once both ends have
//! sent theirs (or ended their connection), the tunnel ends: a drain no longer waits out
//! `shutdown_timeout` for it. An end that never answers is cut at `shutdown_timeout`, as
//! before.
//!
//! A server that ends its side without a close (killed, crashed, restarted: a FIN, a reset, a
//! failed read or write) left the client a cut, a browser's `onclose` 1006 again. Where its
//! stream stands at a frame boundary, the client is told with a close frame first, code 1012
//! ("service restart", in IANA's registry of close codes) and a reason: the proxy cannot
//! tell a crash from a restart, and either way the client is to connect again, to whatever
//! serves by then; 1011 ("internal error") reads as a fault not worth retrying to some
//! clients (graphql-ws gives up on it; on 1001, 1012, 1013 and 1014 it reconnects), and 1001
//! is what the drain says, the proxy itself going away. 1014 ("bad gateway") fits a proxy,
//! but fewer libraries know it than 1012 (a few strict ones know only RFC 6455's codes, to
//! 1011, and fail on either: a cut, as before). Mid-frame nothing can be
//! added that the client would read as a frame: the connection is closed as it was. A
//! server's own close passes as it is, with nothing after it. The client's end is not told
//! to the server in a close frame: a frame the client never sent would make a network cut a
//! clean "going away", and a server keeping a vanished client's state for its reconnection
//! would drop it.
//!
//! Framing that makes no sense (a reserved opcode, RSV2 or RSV3, a control frame fragmented
//! or longer than 125 bytes, a client's frame unmasked or a server's masked, a continuation
//! with no message begun) means this is not WebSocket framing as the tracker reads it (an
//! extension it does not know, say): the tunnel is copied plainly from then on, and never
//! closed by the proxy. RSV1 is permessage-deflate's, and passes.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Each direction's buffer, as `copy_bidirectional`'s: a tunnel that idles (most WebSockets)
/// keeps two.
const BUF: usize = 8 * 1024;

/// A close frame, code 1001, unmasked (masked on its way to the server, `Half::inject`).
const GOING_AWAY: &[u8] = &[0x88, 0x02, 0x03, 0xE9];

/// What the client is told when its server ends the connection without a close: 1012
/// ("service restart", IANA's registry) and why, in a close frame (module's docs).
const RESTART: &[u8] = &{
    const WHY: &[u8] = b"the server closed the connection; connect again to be served";
    let mut f = [0u8; 4 + WHY.len()];
    f[0] = 0x88;
    // A control frame's payload is at most 125 bytes (§5.5): the length fits in 7 bits.
    f[1] = (2 + WHY.len()) as u8;
    f[2] = 0x03;
    f[3] = 0xF4;
    let mut i = 0;
    while i < WHY.len() {
        f[4 + i] = WHY[i];
        i += 1;
    }
    f
};

/// The longest close frame put in: a control frame's whole payload, masked.
const CLOSE_MAX: usize = 2 + 4 + 125;
const _: () = assert!(RESTART.len() <= 2 + 125);

const CLOSE: u8 = 0x8;

/// Framing that is not WebSocket's (`Frames::feed`).
#[derive(Debug)]
struct Unframed;

/// Where a direction's stream stands: at a frame's boundary, in its header, or in its
/// payload. Small and `Copy`: a trial copy tells how far the next boundary is.
#[derive(Clone, Copy)]
struct Frames {
    head: [u8; 14],
    /// Header bytes gathered; 0 at a boundary and in a payload.
    got: u8,
    /// How many the header has (known once its first two bytes are).
    need: u8,
    /// The payload's bytes still to pass.
    left: u64,
    in_payload: bool,
    /// A fragmented message is under way (a data frame without FIN passed).
    in_message: bool,
    /// The current frame is a close.
    closing: bool,
    /// Frames this way must be masked: the client's.
    masked: bool,
    /// A close frame has passed, whole.
    closed: bool,
}

impl Frames {
    fn new(masked: bool) -> Frames {
        Frames {
            head: [0; 14],
            got: 0,
            need: 2,
            left: 0,
            in_payload: false,
            in_message: false,
            closing: false,
            masked,
            closed: false,
        }
    }

    fn at_boundary(&self) -> bool {
        !self.in_payload && self.got == 0
    }

    /// Moves past `data`, or (`stop`) to the first frame's end in it; how many bytes that was.
    #[inline]
    fn feed(&mut self, data: &[u8], stop: bool) -> Result<usize, Unframed> {
        let mut at = 0;
        while at < data.len() {
            if self.in_payload {
                // The hot path: a payload's bytes are counted, never looked at.
                let take = self.left.min((data.len() - at) as u64);
                self.left -= take;
                at += take as usize;
                if self.left > 0 {
                    break;
                }
                self.in_payload = false;
                self.ended();
                if stop {
                    break;
                }
                continue;
            }
            self.head[usize::from(self.got)] = data[at];
            self.got += 1;
            at += 1;
            if self.got == 2 {
                self.need = self.first_two()?;
            }
            if self.got < 2 || self.got < self.need {
                continue;
            }
            let len = self.length()?;
            self.got = 0;
            if len == 0 {
                self.ended();
                if stop {
                    break;
                }
            } else {
                self.left = len;
                self.in_payload = true;
            }
        }
        Ok(at)
    }

    fn ended(&mut self) {
        self.closed |= self.closing;
    }

    /// Checks the first two bytes, and says how long the header is.
    fn first_two(&mut self) -> Result<u8, Unframed> {
        let (b0, b1) = (self.head[0], self.head[1]);
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        let len7 = b1 & 0x7F;
        if b0 & 0x30 != 0 || (b1 & 0x80 != 0) != self.masked {
            return Err(Unframed);
        }
        match opcode {
            0x0 if self.in_message => self.in_message = !fin,
            0x1 | 0x2 if !self.in_message => self.in_message = !fin,
            0x8..=0xA if fin && b0 & 0x40 == 0 && len7 <= 125 => {}
            _ => return Err(Unframed),
        }
        self.closing = opcode == CLOSE;
        let extended = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Ok(2 + extended + if self.masked { 4 } else { 0 })
    }

    /// The payload's length, from the whole header.
    fn length(&self) -> Result<u64, Unframed> {
        let h = &self.head;
        Ok(match h[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => {
                let n = u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]);
                // The most significant bit must be 0 (§5.2).
                if n >> 63 != 0 {
                    return Err(Unframed);
                }
                n
            }
            n => u64::from(n),
        })
    }
}

/// What both directions share.
struct Tunnel {
    /// The framing made no sense somewhere: copied as it comes from then on.
    plain: bool,
    draining: bool,
}

/// One direction's copy.
struct Half {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    /// The source has ended its side.
    eof: bool,
    /// And that end has been passed on: this direction is done.
    done: bool,
    need_flush: bool,
    frames: Frames,
    /// The close frame put in, and how much of it is written.
    close: [u8; CLOSE_MAX],
    close_len: usize,
    close_at: usize,
    /// The destination has been sent a close (the source's, or one put in).
    sent_close: bool,
    /// One was put in: what the source sends after it is thrown away.
    injected: bool,
    /// The close to put in when the source ends its side without one (the server's: the
    /// client is told; the client's end is left to the server to see as it is).
    on_end: Option<&'static [u8]>,
    /// The last failure was writing to the destination, not reading from the source.
    write_failed: bool,
    /// The source failed, found by the other direction writing to it: read no more from it.
    source_failed: Option<io::Error>,
}

impl Half {
    fn new(masked: bool, on_end: Option<&'static [u8]>) -> Half {
        Half {
            buf: vec![0; BUF].into_boxed_slice(),
            pos: 0,
            cap: 0,
            eof: false,
            done: false,
            need_flush: false,
            frames: Frames::new(masked),
            close: [0; CLOSE_MAX],
            close_len: 0,
            close_at: 0,
            sent_close: false,
            injected: false,
            on_end,
            write_failed: false,
            source_failed: None,
        }
    }

    /// The source's own close has passed (or been thrown away after one put in).
    fn source_closed(&self) -> bool {
        self.frames.closed
    }

    /// Puts `frame` (a close, unmasked, at most `CLOSE_MAX` bytes once masked) in: masked
    /// with a key of its own where frames must be masked.
    fn inject(&mut self, frame: &[u8]) {
        let (head, payload) = frame.split_at(2);
        if self.frames.masked {
            use std::hash::BuildHasher;
            // The key must be unpredictable to keep a client's script from choosing the
            // bytes on the wire (§10.3); this payload is the proxy's own, so any key does.
            let k = std::collections::hash_map::RandomState::new()
                .hash_one(0u8)
                .to_le_bytes();
            self.close[..6].copy_from_slice(&[head[0], head[1] | 0x80, k[0], k[1], k[2], k[3]]);
            for (i, (to, b)) in self.close[6..].iter_mut().zip(payload).enumerate() {
                *to = b ^ k[i % 4];
            }
            self.close_len = 6 + payload.len();
        } else {
            self.close[..frame.len()].copy_from_slice(frame);
            self.close_len = frame.len();
        }
        self.close_at = 0;
        self.sent_close = true;
        self.injected = true;
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut from: Pin<&mut R>,
        mut to: Pin<&mut W>,
        tunnel: &mut Tunnel,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        // Which end failed tells the relay whether the other direction is to end with a close.
        macro_rules! wrote {
            ($poll:expr) => {
                match ready!($poll) {
                    Ok(done) => done,
                    Err(e) => {
                        self.write_failed = true;
                        return Poll::Ready(Err(e));
                    }
                }
            };
        }
        loop {
            // A close put in goes whole before anything after it.
            while self.close_at < self.close_len {
                let n = wrote!(to
                    .as_mut()
                    .poll_write(cx, &self.close[self.close_at..self.close_len]));
                if n == 0 {
                    self.write_failed = true;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.close_at += n;
                self.need_flush = true;
            }
            let closing = tunnel.draining && !tunnel.plain && !self.sent_close;
            if closing && self.frames.at_boundary() {
                self.inject(GOING_AWAY);
                continue;
            }
            if self.pos < self.cap {
                let chunk = &self.buf[self.pos..self.cap];
                if self.injected {
                    // Read for the source's close alone; framing gone wrong now changes
                    // nothing: the destination has its close.
                    if self.frames.feed(chunk, false).is_err() {
                        tunnel.plain = true;
                    }
                    self.pos = self.cap;
                    continue;
                }
                let mut end = self.cap;
                if closing {
                    // No further than the frame's end, where the close goes.
                    let mut trial = self.frames;
                    match trial.feed(chunk, true) {
                        Ok(n) => end = self.pos + n,
                        Err(Unframed) => tunnel.plain = true,
                    }
                }
                let n = wrote!(to.as_mut().poll_write(cx, &self.buf[self.pos..end]));
                if n == 0 {
                    self.write_failed = true;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                if !tunnel.plain {
                    match self.frames.feed(&self.buf[self.pos..self.pos + n], false) {
                        Ok(_) => self.sent_close |= self.frames.closed,
                        Err(Unframed) => tunnel.plain = true,
                    }
                }
                self.pos += n;
                self.need_flush = true;
                continue;
            }
            if self.eof {
                // Shutting down flushes first.
                wrote!(to.as_mut().poll_shutdown(cx));
                self.need_flush = false;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let failed = match self.source_failed.take() {
                Some(e) => e,
                None => {
                    let mut read = ReadBuf::new(&mut self.buf);
                    match from.as_mut().poll_read(cx, &mut read) {
                        Poll::Ready(Ok(())) => {
                            let n = read.filled().len();
                            (self.pos, self.cap) = (0, n);
                            if n == 0 {
                                self.source_ended(tunnel);
                                self.eof = true;
                            }
                            continue;
                        }
                        Poll::Ready(Err(e)) => e,
                        Poll::Pending => {
                            if self.need_flush {
                                wrote!(to.as_mut().poll_flush(cx));
                                self.need_flush = false;
                            }
                            return Poll::Pending;
                        }
                    }
                }
            };
            if !self.source_ended(tunnel) {
                return Poll::Ready(Err(failed));
            }
            // Ended as a FIN would have: the failure told as a close, which is all an
            // endpoint could have made of it.
            tracing::debug!(error = %failed, "a WebSocket's server failed; its client told with 1012");
            self.eof = true;
        }
    }

    /// The source has ended its side (or failed) without its own close: puts in the close
    /// for that, where there is one and it is safe, at a frame boundary of framing followed;
    /// whether it did. Mid-frame, nothing can be added that the destination would read as a
    /// frame.
    fn source_ended(&mut self, tunnel: &Tunnel) -> bool {
        let Some(frame) = self.on_end else {
            return false;
        };
        if tunnel.plain || self.sent_close || !self.frames.at_boundary() {
            return false;
        }
        self.inject(frame);
        true
    }
}

/// Copies between `client` and `upstream`, the two ends of a WebSocket, until both have
/// ended their side; once `drain` resolves, closes the WebSocket both ways at the next frame
/// boundaries (the module's docs), and ends once both ends have sent their close.
pub async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    drain: impl Future<Output = ()>,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut tunnel = Tunnel {
        plain: false,
        draining: false,
    };
    let mut up = Half::new(true, None);
    let mut down = Half::new(false, Some(RESTART));
    tokio::pin!(drain);
    let mut handshaken = false;
    poll_fn(|cx| {
        if !tunnel.draining && drain.as_mut().poll(cx).is_ready() {
            tunnel.draining = true;
        }
        if !up.done {
            if let Poll::Ready(Err(e)) = up.poll_copy(
                cx,
                Pin::new(&mut *client),
                Pin::new(&mut *upstream),
                &mut tunnel,
            ) {
                // The server failed under a write (reset): the client is told as when its
                // read fails, unless that other direction is over.
                if !up.write_failed || down.done {
                    return Poll::Ready(Err(e));
                }
                up.done = true;
                down.source_failed = Some(e);
            }
        }
        if !down.done {
            if let Poll::Ready(Err(e)) = down.poll_copy(
                cx,
                Pin::new(&mut *upstream),
                Pin::new(&mut *client),
                &mut tunnel,
            ) {
                return Poll::Ready(Err(e));
            }
        }
        if up.done && down.done {
            return Poll::Ready(Ok(()));
        }
        // The close handshake is over: each end has sent its close, or ended its side.
        let over = |h: &Half| h.done || h.source_closed();
        if tunnel.draining && !tunnel.plain && over(&up) && over(&down) {
            handshaken = true;
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    })
    .await?;
    if handshaken {
        // Each end's close frame written, and flushed with the end of its side.
        let _ = upstream.shutdown().await;
        let _ = client.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's bytes: `b0` (FIN, RSV, opcode), its payload, masked or not.
    fn frame(b0: u8, payload: &[u8], mask: bool) -> Vec<u8> {
        let mut f = vec![b0];
        let m = if mask { 0x80 } else { 0 };
        match payload.len() {
            n @ 0..=125 => f.push(m | n as u8),
            n @ 126..=0xFFFF => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if mask {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend_from_slice(payload);
        f
    }

    /// Where `stream`'s frames end, fed in pieces of `step` bytes.
    fn boundaries(stream: &[u8], masked: bool, step: usize) -> Result<Vec<usize>, Unframed> {
        let mut frames = Frames::new(masked);
        let mut at = 0;
        let mut ends = Vec::new();
        while at < stream.len() {
            let piece = &stream[at..(at + step).min(stream.len())];
            let n = frames.feed(piece, true)?;
            at += n;
            if frames.at_boundary() {
                ends.push(at);
            }
        }
        Ok(ends)
    }

    #[test]
    fn frame_ends_are_found_whatever_the_pieces() {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for f in [
            frame(0x01, b"frag", true),
            frame(0x89, b"ping", true),
            frame(0x00, &[7; 300], true),
            frame(0x80 | 0x40, &[9; 70_000], true),
            frame(0x82, b"", true),
            frame(0x88, &[3, 0xE8], true),
        ] {
            stream.extend_from_slice(&f);
            want.push(stream.len());
        }
        for step in [1, 2, 3, 7, 100, 8192, stream.len()] {
            assert_eq!(boundaries(&stream, true, step).unwrap(), want, "{step}");
        }
        let mut frames = Frames::new(true);
        frames.feed(&stream, false).unwrap();
        assert!(frames.closed && frames.at_boundary());
    }

    /// The relay between two in-memory pipes, no drain: the test's ends of the client's and
    /// the server's connections, and the relay's outcome.
    fn relayed() -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let (client, mut client_side) = tokio::io::duplex(64 * 1024);
        let (server, mut server_side) = tokio::io::duplex(64 * 1024);
        let relay = tokio::spawn(async move {
            relay(&mut client_side, &mut server_side, std::future::pending()).await
        });
        (client, server, relay)
    }

    /// All `s` gives until it ends, within 10 s.
    async fn rest(s: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut got));
        assert!(read.await.is_ok(), "not ended: {got:?}");
        got
    }

    /// `RESTART` says 1012 and why, the whole payload counted in its length.
    #[test]
    fn the_close_for_a_server_gone_is_1012_with_its_reason() {
        assert_eq!(RESTART[..4], [0x88, RESTART.len() as u8 - 2, 0x03, 0xF4]);
        assert!(std::str::from_utf8(&RESTART[4..]).is_ok());
    }

    /// A server that ends its side between frames, a message half sent (a control frame may
    /// come between fragments): the client has what it sent, then a close 1012, then the end.
    /// It had the end alone: a browser's 1006.
    #[tokio::test]
    async fn a_server_s_end_between_frames_is_told_to_the_client_with_1012() {
        let (mut client, mut server, relay) = relayed();
        let sent = [frame(0x81, b"hello", false), frame(0x01, b"half a ", false)].concat();
        server.write_all(&sent).await.unwrap();
        drop(server);
        let got = rest(&mut client).await;
        assert_eq!(got, [&sent[..], RESTART].concat());
        // The relay ends once the client has ended its side too.
        drop(client);
        assert!(relay.await.unwrap().is_ok());
    }

    /// Mid-frame, or once the server has sent its own close, the client's connection ends as
    /// the server's did, nothing added.
    #[tokio::test]
    async fn a_server_s_end_mid_frame_or_after_its_close_adds_nothing() {
        let whole = frame(0x82, &[7; 300], false);
        let closed = [
            frame(0x81, b"bye", false),
            frame(0x88, &[0x03, 0xE8], false),
        ]
        .concat();
        for sent in [&whole[..1], &whole[..3], &whole[..100], &closed[..]] {
            let (mut client, mut server, relay) = relayed();
            server.write_all(sent).await.unwrap();
            drop(server);
            assert_eq!(rest(&mut client).await, sent);
            drop(client);
            assert!(relay.await.unwrap().is_ok());
        }
    }

    /// Framing the tracker gave up on: the end passes as it is.
    #[tokio::test]
    async fn a_server_s_end_after_framing_not_followed_adds_nothing() {
        let (mut client, mut server, _relay) = relayed();
        let sent = [&frame(0x81, b"ok", false)[..], b"not a frame"].concat();
        server.write_all(&sent).await.unwrap();
        drop(server);
        assert_eq!(rest(&mut client).await, sent);
    }

    /// A server connection that takes no writes (reset) and says nothing more when read.
    struct Reset;

    impl AsyncRead for Reset {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Reset {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A server found gone by writing the client's frame to it, before its own side is read
    /// ended: the client is told as well, and the relay ends. The client was cut.
    #[tokio::test]
    async fn a_server_found_reset_by_a_write_is_told_to_the_client_with_1012() {
        let (mut client, mut client_side) = tokio::io::duplex(64 * 1024);
        let relay = tokio::spawn(async move {
            relay(&mut client_side, &mut Reset, std::future::pending()).await
        });
        client
            .write_all(&frame(0x81, b"anyone?", true))
            .await
            .unwrap();
        assert_eq!(rest(&mut client).await, RESTART);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), relay);
        assert!(ended.await.is_ok(), "the relay did not end");
    }

    #[test]
    fn framing_that_is_not_websocket_s_is_told() {
        let bad: [(Vec<u8>, bool); 8] = [
            (b"first".to_vec(), true),
            (frame(0x83, b"x", true), true),
            (frame(0xA1, b"x", true), true),
            (frame(0x81, b"x", false), true),
            (frame(0x81, b"x", true), false),
            (frame(0x00, b"x", true), true),
            (frame(0x09, b"x", true), true),
            (frame(0x88, &[0; 126], true), true),
        ];
        for (stream, masked) in bad {
            assert!(boundaries(&stream, masked, 1).is_err(), "{stream:?}");
        }
        let mut huge = frame(0x82, b"", false);
        huge[1] = 127;
        huge.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0]);
        assert!(boundaries(&huge, false, 1).is_err());
        // A new message while one is under way.
        let mut two = frame(0x01, b"a", false);
        two.extend(frame(0x81, b"b", false));
        assert!(boundaries(&two, false, 1).is_err());
    }
}
