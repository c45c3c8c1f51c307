//! `uring_relay LISTEN UPSTREAM`: the same bare HTTP/1.1 relay as
//! `benches/load/bare_relay.rs` (GET only, Content-Length answers only, one request
//! at a time per client connection, idle upstream connections reused from a free list,
//! anything unhandled closes the connection), driven by io_uring on one thread.
//!
//! Design:
//! - one ring, one thread; one `submit_and_wait(1)` per loop turn, then every completion is
//!   drained, and the SQEs that the handlers queued go into the next submit;
//! - multishot accept on the listener;
//! - plain `Recv` per connection, armed only when the state machine wants bytes (like the
//!   tokio relay's `read`), into the connection's own buffers;
//! - `Send` for writes, short writes re-submitted from where they stopped (`MSG_NOSIGNAL`);
//! - the upstream request's `Send` and the `Recv` for its answer go in the same submit (the
//!   recv with `IORING_RECVSEND_POLL_FIRST`: no data can be there yet), and so do the last
//!   `Send` of an answer and the client's next `Recv`;
//! - upstream connections: `socket()` + `TCP_NODELAY` as system calls, then an io_uring
//!   `Connect`; kept on a free list once their answer has been read whole;
//! - connection state in a Vec indexed by `user_data >> 3`; slots and their buffers are
//!   reused, so steady state allocates nothing.
//!
//! Environment knobs for experiments: `URING_SETUP` = `defer` (default: SINGLE_ISSUER +
//! DEFER_TASKRUN), `coop` (SINGLE_ISSUER + COOP_TASKRUN), `none`; `URING_POLL_FIRST=0`
//! turns off the poll-first hint; `URING_PREARM=0` turns off arming the next recv together
//! with the last send.

#[path = "../../heads.rs"]
mod heads;

use heads::{Closed, request_head, response_head};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};

/// Room for one request or response head and, after it, a 100-byte body.
const BUF: usize = 16 * 1024;
const RING_ENTRIES: u32 = 4096;
/// `IORING_RECVSEND_POLL_FIRST` (not exported by the crate).
const POLL_FIRST: u16 = 1;

// Operation kinds, in the low 3 bits of user_data; the slot index above them.
const K_ACCEPT: u64 = 0;
const K_CRECV: u64 = 1;
const K_CSEND: u64 = 2;
const K_URECV: u64 = 3;
const K_USEND: u64 = 4;
const K_UCONN: u64 = 5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Waiting for a whole request head in `req` (and for the previous answer's last send).
    Request,
    /// The upstream connection is being made.
    Connect,
    /// The request is being sent upstream, and its answer's head read.
    Exchange,
    /// Body bytes beyond the first read: read from upstream, then sent on, in turn.
    Body,
}

/// A client connection's slot. The ring reads and writes the slot's buffers through raw
/// pointers, which is sound because `req` and `resp` are boxed (their bytes never move, even
/// when `Relay::conns` grows), `out` is refilled only when no send from it is in flight, and
/// a slot is reused only once `ops` shows none of its operations in flight (`maybe_free`).
struct Conn {
    live: bool,
    closing: bool,
    /// The client has shut its side: answer what it sent whole, then close.
    eof: bool,
    /// Bit `1 << kind` set while an operation of that kind is in flight.
    ops: u8,
    fd: RawFd,
    /// The upstream connection this client holds while a request is in flight, or -1.
    up: RawFd,
    phase: Phase,
    req: Box<[u8]>,
    have: usize,
    resp: Box<[u8]>,
    got: usize,
    /// The request for upstream, then the answer's head for the client.
    out: Vec<u8>,
    up_sent: usize,
    /// What the client send in flight sends: `out` or `resp`, from `c_off` to `c_len`.
    c_from_resp: bool,
    c_off: usize,
    c_len: usize,
    /// Body bytes still to read from upstream.
    left: usize,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            live: false,
            closing: false,
            eof: false,
            ops: 0,
            fd: -1,
            up: -1,
            phase: Phase::Request,
            req: vec![0u8; BUF].into_boxed_slice(),
            have: 0,
            resp: vec![0u8; BUF].into_boxed_slice(),
            got: 0,
            out: Vec::with_capacity(1024),
            up_sent: 0,
            c_from_resp: false,
            c_off: 0,
            c_len: 0,
            left: 0,
        }
    }
}

struct Relay {
    conns: Vec<Conn>,
    free: Vec<usize>,
    idle: Vec<RawFd>,
    pending: Vec<squeue::Entry>,
    listener: RawFd,
    up_addr: Box<libc::sockaddr_storage>,
    up_addr_len: libc::socklen_t,
    up_family: libc::c_int,
    poll_first: u16,
    prearm: bool,
}

fn ud(idx: usize, kind: u64) -> u64 {
    ((idx as u64) << 3) | kind
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Relay {
    fn arm_accept(&mut self) {
        let e = opcode::AcceptMulti::new(types::Fd(self.listener))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(K_ACCEPT);
        self.pending.push(e);
    }

    fn handle(&mut self, user_data: u64, res: i32, flags: u32) {
        let kind = user_data & 7;
        if kind == K_ACCEPT {
            if res >= 0 {
                self.on_accept(res);
            }
            if !cqueue::more(flags) {
                self.arm_accept();
            }
            return;
        }
        let idx = (user_data >> 3) as usize;
        self.conns[idx].ops &= !(1u8 << kind);
        if self.conns[idx].closing {
            self.maybe_free(idx);
            return;
        }
        match kind {
            K_CRECV => self.on_c_recv(idx, res),
            K_CSEND => self.on_c_send(idx, res),
            K_URECV => self.on_u_recv(idx, res),
            K_USEND => self.on_u_send(idx, res),
            K_UCONN => self.on_u_conn(idx, res),
            _ => unreachable!(),
        }
    }

    fn on_accept(&mut self, fd: RawFd) {
        set_nodelay(fd);
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.conns.push(Conn::new());
                self.conns.len() - 1
            }
        };
        let c = &mut self.conns[idx];
        c.live = true;
        c.closing = false;
        c.eof = false;
        c.ops = 0;
        c.fd = fd;
        c.up = -1;
        c.phase = Phase::Request;
        c.have = 0;
        c.got = 0;
        c.left = 0;
        self.arm_c_recv(idx, 0);
    }

    fn arm_c_recv(&mut self, idx: usize, ioprio: u16) {
        let c = &mut self.conns[idx];
        debug_assert!(c.ops & (1 << K_CRECV) == 0 && c.have < BUF);
        let buf = unsafe { c.req.as_mut_ptr().add(c.have) };
        let e = opcode::Recv::new(types::Fd(c.fd), buf, (BUF - c.have) as u32)
            .ioprio(ioprio)
            .build()
            .user_data(ud(idx, K_CRECV));
        c.ops |= 1 << K_CRECV;
        self.pending.push(e);
    }

    fn arm_u_recv(&mut self, idx: usize, from: usize, len: usize, ioprio: u16) {
        let c = &mut self.conns[idx];
        debug_assert!(c.ops & (1 << K_URECV) == 0);
        let buf = unsafe { c.resp.as_mut_ptr().add(from) };
        let e = opcode::Recv::new(types::Fd(c.up), buf, len as u32)
            .ioprio(ioprio)
            .build()
            .user_data(ud(idx, K_URECV));
        c.ops |= 1 << K_URECV;
        self.pending.push(e);
    }

    fn send_u(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        let buf = unsafe { c.out.as_ptr().add(c.up_sent) };
        let e = opcode::Send::new(types::Fd(c.up), buf, (c.out.len() - c.up_sent) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(idx, K_USEND));
        c.ops |= 1 << K_USEND;
        self.pending.push(e);
    }

    fn send_c(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        let base = if c.c_from_resp {
            c.resp.as_ptr()
        } else {
            c.out.as_ptr()
        };
        let buf = unsafe { base.add(c.c_off) };
        let e = opcode::Send::new(types::Fd(c.fd), buf, (c.c_len - c.c_off) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(idx, K_CSEND));
        c.ops |= 1 << K_CSEND;
        self.pending.push(e);
    }

    fn on_c_recv(&mut self, idx: usize, res: i32) {
        if res < 0 {
            return self.close(idx);
        }
        let c = &mut self.conns[idx];
        if res == 0 {
            c.eof = true;
        }
        c.have += res as usize;
        if c.phase == Phase::Request && c.ops & (1 << K_CSEND) == 0 {
            self.try_request(idx);
        }
        // Otherwise the bytes wait in `req` until the answer in hand has been sent.
    }

    /// In `Request`, with no client send in flight: parse what has come, or read more.
    fn try_request(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        match request_head(&c.req[..c.have], &mut c.out) {
            Err(Closed) => self.close(idx),
            Ok(Some(used)) => {
                c.req.copy_within(used..c.have, 0);
                c.have -= used;
                self.start_upstream(idx);
            }
            Ok(None) => {
                if c.have == BUF || c.eof {
                    self.close(idx);
                } else if c.ops & (1 << K_CRECV) == 0 {
                    self.arm_c_recv(idx, 0);
                }
            }
        }
    }

    fn start_upstream(&mut self, idx: usize) {
        if let Some(up) = self.idle.pop() {
            self.conns[idx].up = up;
            return self.send_request(idx);
        }
        let fd = unsafe { libc::socket(self.up_family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return self.close(idx);
        }
        set_nodelay(fd);
        let c = &mut self.conns[idx];
        c.up = fd;
        c.phase = Phase::Connect;
        let e = opcode::Connect::new(
            types::Fd(fd),
            &*self.up_addr as *const libc::sockaddr_storage as *const libc::sockaddr,
            self.up_addr_len,
        )
        .build()
        .user_data(ud(idx, K_UCONN));
        c.ops |= 1 << K_UCONN;
        self.pending.push(e);
    }

    fn on_u_conn(&mut self, idx: usize, res: i32) {
        if res < 0 {
            return self.close(idx);
        }
        self.send_request(idx);
    }

    /// The request (in `out`) goes upstream; the read of its answer is armed with it.
    fn send_request(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        c.phase = Phase::Exchange;
        c.up_sent = 0;
        c.got = 0;
        self.send_u(idx);
        let pf = self.poll_first;
        self.arm_u_recv(idx, 0, BUF, pf);
    }

    fn on_u_send(&mut self, idx: usize, res: i32) {
        if res <= 0 {
            return self.close(idx);
        }
        let c = &mut self.conns[idx];
        c.up_sent += res as usize;
        if c.up_sent < c.out.len() {
            return self.send_u(idx);
        }
        if c.ops & (1 << K_URECV) == 0 {
            // The answer's read finished first (it cannot in practice): go on with it.
            self.try_response(idx);
        }
    }

    fn on_u_recv(&mut self, idx: usize, res: i32) {
        if res <= 0 {
            return self.close(idx);
        }
        let n = res as usize;
        let c = &mut self.conns[idx];
        match c.phase {
            Phase::Exchange => {
                c.got += n;
                if c.ops & (1 << K_USEND) == 0 {
                    self.try_response(idx);
                }
            }
            Phase::Body => {
                c.left -= n;
                c.c_from_resp = true;
                c.c_off = 0;
                c.c_len = n;
                let last = c.left == 0;
                self.send_c(idx);
                if last {
                    self.answer_read(idx);
                }
            }
            _ => unreachable!("upstream recv in {:?}", c.phase),
        }
    }

    /// In `Exchange`, the request sent whole: parse the answer's head, or read more.
    fn try_response(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        match response_head(&c.resp[..c.got], &mut c.out) {
            Err(Closed) => self.close(idx),
            Ok(None) => {
                if c.got == BUF {
                    self.close(idx);
                } else {
                    let got = c.got;
                    self.arm_u_recv(idx, got, BUF - got, 0);
                }
            }
            Ok(Some((head, length))) => {
                let first = (c.got - head).min(length);
                c.out.extend_from_slice(&c.resp[head..head + first]);
                c.left = length - first;
                c.c_from_resp = false;
                c.c_off = 0;
                c.c_len = c.out.len();
                c.phase = Phase::Body;
                let last = c.left == 0;
                self.send_c(idx);
                if last {
                    self.answer_read(idx);
                }
            }
        }
    }

    /// The whole answer has been read from upstream (its last bytes are being sent): the
    /// upstream connection goes back to the free list, and the client's next request is
    /// awaited.
    fn answer_read(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        self.idle.push(c.up);
        c.up = -1;
        c.phase = Phase::Request;
        if self.prearm && !c.eof && c.ops & (1 << K_CRECV) == 0 && c.have < BUF {
            let pf = self.poll_first;
            self.arm_c_recv(idx, pf);
        }
    }

    fn on_c_send(&mut self, idx: usize, res: i32) {
        if res <= 0 {
            return self.close(idx);
        }
        let c = &mut self.conns[idx];
        c.c_off += res as usize;
        if c.c_off < c.c_len {
            return self.send_c(idx);
        }
        match c.phase {
            Phase::Request => self.try_request(idx),
            Phase::Body => {
                let len = c.left.min(BUF);
                self.arm_u_recv(idx, 0, len, 0);
            }
            p => unreachable!("client send done in {p:?}"),
        }
    }

    /// Ends a client connection, and the upstream one it holds (a request in flight).
    fn close(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.closing {
            return;
        }
        c.closing = true;
        if c.ops != 0 {
            // Wake the operations in flight: they end, and the slot is freed after the last.
            unsafe {
                libc::shutdown(c.fd, libc::SHUT_RDWR);
                if c.up >= 0 {
                    libc::shutdown(c.up, libc::SHUT_RDWR);
                }
            }
        }
        self.maybe_free(idx);
    }

    fn maybe_free(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.ops != 0 {
            return;
        }
        unsafe {
            libc::close(c.fd);
            if c.up >= 0 {
                libc::close(c.up);
            }
        }
        c.fd = -1;
        c.up = -1;
        c.live = false;
        self.free.push(idx);
    }
}

fn main() {
    let (listen, upstream) = heads::addresses("uring_relay");
    let listener = match std::net::TcpListener::bind(listen) {
        Ok(l) => l.into_raw_fd(),
        Err(e) => {
            eprintln!("uring_relay: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    // tokio's backlog.
    unsafe { libc::listen(listener, 1024) };

    let setup = std::env::var("URING_SETUP").unwrap_or_else(|_| "defer".into());
    let mut builder = IoUring::builder();
    match setup.as_str() {
        "defer" => {
            builder.setup_single_issuer().setup_defer_taskrun();
        }
        "coop" => {
            builder.setup_single_issuer().setup_coop_taskrun();
        }
        "none" => {}
        other => {
            eprintln!("uring_relay: URING_SETUP={other}? (defer, coop, none)");
            std::process::exit(2);
        }
    }
    let mut ring: IoUring = match builder.build(RING_ENTRIES) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("uring_relay: cannot set up io_uring ({setup}): {e}");
            std::process::exit(1);
        }
    };
    let off = |name: &str| std::env::var(name).map(|v| v == "0").unwrap_or(false);

    let (up_addr, up_addr_len, up_family) = sockaddr(upstream);
    let mut relay = Relay {
        conns: Vec::with_capacity(1024),
        free: Vec::with_capacity(1024),
        idle: Vec::with_capacity(1024),
        pending: Vec::with_capacity(RING_ENTRIES as usize),
        listener,
        up_addr,
        up_addr_len,
        up_family,
        poll_first: if off("URING_POLL_FIRST") {
            0
        } else {
            POLL_FIRST
        },
        prearm: !off("URING_PREARM"),
    };
    eprintln!(
        "uring_relay: {listen} -> {upstream}, setup={setup}, poll_first={}, prearm={}",
        relay.poll_first, relay.prearm
    );
    relay.arm_accept();

    loop {
        // Everything the handlers queued, into the ring; if it fills, submit and go on.
        let mut i = 0;
        while i < relay.pending.len() {
            let mut sq = ring.submission();
            while i < relay.pending.len() {
                if unsafe { sq.push(&relay.pending[i]) }.is_err() {
                    break;
                }
                i += 1;
            }
            drop(sq);
            if i < relay.pending.len() {
                submit(&ring, 0);
            }
        }
        relay.pending.clear();
        submit(&ring, 1);
        for cqe in ring.completion() {
            relay.handle(cqe.user_data(), cqe.result(), cqe.flags());
        }
    }
}

fn submit(ring: &IoUring, want: usize) {
    match ring.submit_and_wait(want) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
            ) => {}
        Err(e) => {
            eprintln!("uring_relay: io_uring_enter: {e}");
            std::process::exit(1);
        }
    }
}

fn sockaddr(a: SocketAddr) -> (Box<libc::sockaddr_storage>, libc::socklen_t, libc::c_int) {
    let mut ss: Box<libc::sockaddr_storage> = Box::new(unsafe { std::mem::zeroed() });
    match a {
        SocketAddr::V4(v4) => {
            let sin = unsafe { &mut *(&mut *ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                libc::AF_INET,
            )
        }
        SocketAddr::V6(v6) => {
            let sin6 = unsafe { &mut *(&mut *ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_scope_id = v6.scope_id();
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                libc::AF_INET6,
            )
        }
    }
}
