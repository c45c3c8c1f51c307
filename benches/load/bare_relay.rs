//! The barest HTTP/1.1 relay the load harness can measure: the ceiling of what any relay on
//! tokio and epoll reaches on the machine, next to nginx, in the same run.
//!
//! On a 2-core machine, wrk, the upstream and the proxy share the cores, so a proxy's req/s
//! depends on its peers' CPU as much as on its own, and a ratio to nginx has a ceiling below
//! what the proxy's own cost would suggest. This program shows where that ceiling is: it does
//! the system calls every relay must make (read the request, write it upstream, read the
//! answer, write it back) and nothing else. No timeouts, no health checks, no metrics, no
//! hop-by-hop rules beyond `Connection`, `GET` only, no chunked answers, no 1xx, no retries:
//! anything it does not handle closes the connection. It is a measuring stick, never a
//! proxy to put in front of anything.
//!
//! `bare_relay LISTEN UPSTREAM`, e.g. `bare_relay 127.0.0.1:8081 127.0.0.1:8080`.

#[path = "heads.rs"]
mod heads;

use heads::{request_head, response_head, Closed};
use std::cell::RefCell;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Room for one request or response head and, after it, a 100-byte body.
const BUF: usize = 16 * 1024;

thread_local! {
    /// Idle upstream connections: one thread runs everything, so no lock.
    static IDLE: RefCell<Vec<TcpStream>> = const { RefCell::new(Vec::new()) };
}

fn main() {
    let (listen, upstream) = heads::addresses("bare_relay");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bare_relay: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bare_relay: cannot listen on {listen}: {e}");
                std::process::exit(1);
            }
        };
        loop {
            match listener.accept().await {
                Ok((client, _)) => {
                    let _ = client.set_nodelay(true);
                    tokio::spawn(async move {
                        let _ = relay(client, upstream).await;
                    });
                }
                // Out of descriptors, say: the next accept may do better.
                Err(_) => tokio::task::yield_now().await,
            }
        }
    });
}

impl From<std::io::Error> for Closed {
    fn from(_: std::io::Error) -> Closed {
        Closed
    }
}

/// Serves one client connection, a request at a time. `GET` only: a `HEAD` answer's length
/// would have to be told apart from its (absent) body.
async fn relay(mut client: TcpStream, upstream: SocketAddr) -> Result<(), Closed> {
    let mut req = vec![0u8; BUF];
    let mut have = 0;
    let mut resp = vec![0u8; BUF];
    let mut out = Vec::with_capacity(1024);
    loop {
        let used = loop {
            if let Some(used) = request_head(&req[..have], &mut out)? {
                break used;
            }
            if have == req.len() {
                return Err(Closed);
            }
            match client.read(&mut req[have..]).await? {
                0 => return Err(Closed),
                n => have += n,
            }
        };
        req.copy_within(used..have, 0);
        have -= used;

        let mut up = match IDLE.with(|idle| idle.borrow_mut().pop()) {
            Some(up) => up,
            None => {
                let up = TcpStream::connect(upstream).await?;
                up.set_nodelay(true)?;
                up
            }
        };
        up.write_all(&out).await?;
        let mut got = 0;
        let (head, length) = loop {
            match up.read(&mut resp[got..]).await? {
                0 => return Err(Closed),
                n => got += n,
            }
            if let Some(found) = response_head(&resp[..got], &mut out)? {
                break found;
            }
            if got == resp.len() {
                return Err(Closed);
            }
        };
        // The body: what came with the head, then the rest as it arrives.
        let mut left = length;
        let first = (got - head).min(left);
        out.extend_from_slice(&resp[head..head + first]);
        left -= first;
        client.write_all(&out).await?;
        while left > 0 {
            let n = up.read(&mut resp[..left.min(BUF)]).await?;
            if n == 0 {
                return Err(Closed);
            }
            client.write_all(&resp[..n]).await?;
            left -= n;
        }
        IDLE.with(|idle| idle.borrow_mut().push(up));
    }
}
