//! Listening sockets passed at start by the service manager (systemd's socket activation,
//! `LISTEN_FDS`): which address each listens on, and a copy of it for whichever listener the
//! config puts there.
//!
//! A socket systemd holds stays open while the proxy restarts: the connections that arrive
//! between the old process's last accept and the new one's first wait in its backlog and are
//! served, where a socket of the proxy's own is closed at the drain and they are refused.
//! A copy is handed out, never the socket itself, so that a reload that stops listening on an
//! address and listens there again finds it still passed.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

/// The sockets taken at start, by the address each listens on.
static PASSED: Mutex<Vec<(SocketAddr, TcpListener)>> = Mutex::new(Vec::new());

/// Takes the sockets the service manager passed to this process, once, before any thread
/// starts. Only for this process: `LISTEN_PID` must name it, as `sd_listen_fds` wants, so that
/// variables a socket-activated parent left in its children's environment are not taken for
/// this one's. Returns the addresses taken; a passed descriptor that is not a TCP socket
/// stops the start, since whoever configured it meant something that would not happen.
pub fn take_from_env() -> Result<Vec<SocketAddr>, String> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if !ours {
        return Ok(Vec::new());
    }
    let mut fds = listenfd::ListenFd::from_env();
    let mut taken = Vec::new();
    for index in 0..fds.len() {
        let listener = match fds.take_tcp_listener(index) {
            Ok(Some(listener)) => listener,
            Ok(None) => continue,
            Err(e) => {
                return Err(format!(
                    "socket {} passed by the service manager (LISTEN_FDS): {e}; only TCP \
                     listening sockets are served (ListenStream=)",
                    index + 3
                ))
            }
        };
        let addr = listener
            .local_addr()
            .map_err(|e| format!("socket {} passed by the service manager: {e}", index + 3))?;
        taken.push((addr, listener));
    }
    let addrs = taken.iter().map(|(addr, _)| *addr).collect();
    *PASSED.lock().unwrap_or_else(|e| e.into_inner()) = taken;
    Ok(addrs)
}

/// A copy of the passed socket listening on `addr`, ready for tokio; `None` when none was
/// passed for it, and the caller binds one of its own.
pub fn listener(addr: SocketAddr) -> Option<io::Result<tokio::net::TcpListener>> {
    let passed = PASSED.lock().unwrap_or_else(|e| e.into_inner());
    let (_, socket) = passed.iter().find(|(at, _)| *at == addr)?;
    Some(socket.try_clone().and_then(|copy| {
        copy.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(copy)
    }))
}

/// Whether a socket was passed for `addr`.
pub fn holds(addr: SocketAddr) -> bool {
    let passed = PASSED.lock().unwrap_or_else(|e| e.into_inner());
    passed.iter().any(|(at, _)| *at == addr)
}

/// The passed sockets that none of `served` names: connections to them would wait unanswered.
pub fn unserved(served: &[SocketAddr]) -> Vec<SocketAddr> {
    let passed = PASSED.lock().unwrap_or_else(|e| e.into_inner());
    passed
        .iter()
        .map(|(addr, _)| *addr)
        .filter(|addr| !served.contains(addr))
        .collect()
}
