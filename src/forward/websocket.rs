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

/// A close frame, code 1001, unmasked: to the client.
const GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

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
    close: [u8; 8],
    close_len: usize,
    close_at: usize,
    /// The destination has been sent a close (the source's, or one put in).
    sent_close: bool,
    /// One was put in: what the source sends after it is thrown away.
    injected: bool,
}

impl Half {
    fn new(masked: bool) -> Half {
        Half {
            buf: vec![0; BUF].into_boxed_slice(),
            pos: 0,
            cap: 0,
            eof: false,
            done: false,
            need_flush: false,
            frames: Frames::new(masked),
            close: [0; 8],
            close_len: 0,
            close_at: 0,
            sent_close: false,
            injected: false,
        }
    }

    /// The source's own close has passed (or been thrown away after one put in).
    fn source_closed(&self) -> bool {
        self.frames.closed
    }

    /// Puts the close frame in: masked with a key of its own where frames must be masked.
    fn inject(&mut self) {
        let [b0, b1, c0, c1] = GOING_AWAY;
        if self.frames.masked {
            use std::hash::BuildHasher;
            // The key must be unpredictable to keep a client's script from choosing the
            // bytes on the wire (§10.3); this payload is the proxy's own, so any key does.
            let k = std::collections::hash_map::RandomState::new()
                .hash_one(0u8)
                .to_le_bytes();
            self.close = [b0, b1 | 0x80, k[0], k[1], k[2], k[3], c0 ^ k[0], c1 ^ k[1]];
            self.close_len = 8;
        } else {
            self.close[..4].copy_from_slice(&GOING_AWAY);
            self.close_len = 4;
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
        loop {
            // A close put in goes whole before anything after it.
            while self.close_at < self.close_len {
                let n = ready!(to
                    .as_mut()
                    .poll_write(cx, &self.close[self.close_at..self.close_len]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.close_at += n;
                self.need_flush = true;
            }
            let closing = tunnel.draining && !tunnel.plain && !self.sent_close;
            if closing && self.frames.at_boundary() {
                self.inject();
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
                let n = ready!(to.as_mut().poll_write(cx, &self.buf[self.pos..end]))?;
                if n == 0 {
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
                ready!(to.as_mut().poll_shutdown(cx))?;
                self.need_flush = false;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut self.buf);
            match from.as_mut().poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    self.eof = n == 0;
                    (self.pos, self.cap) = (0, n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.need_flush {
                        ready!(to.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
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
    let mut up = Half::new(true);
    let mut down = Half::new(false);
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
                return Poll::Ready(Err(e));
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
