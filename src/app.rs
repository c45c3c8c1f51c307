//! Composition root: binds the listeners, builds the first snapshot, spawns the long-lived
//! tasks, and drains on shutdown. Only this module spawns tasks that outlive a request.

use crate::config::Config;
use crate::listener;
use crate::shutdown::{self, Trigger};
use crate::state::{Snapshot, StateHandle};
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A started proxy: its bound addresses, and the handles to reload or stop it.
pub struct Running {
    local_addrs: Vec<SocketAddr>,
    state: StateHandle,
    trigger: Trigger,
    accept_loops: Vec<JoinHandle<()>>,
    graceful: Arc<GracefulShutdown>,
}

/// Binds every listener and starts serving. Errors only when an address cannot be bound.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let mut listeners = Vec::new();
    for &addr in &config.proxy.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let local = l
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        listeners.push((l, local));
    }
    let builder = listener::conn_builder(&config.proxy);
    let state = StateHandle::new(Snapshot::build(Arc::new(config), None));
    let (trigger, shutdown) = shutdown::channel();
    let graceful = Arc::new(GracefulShutdown::new());
    let mut local_addrs = Vec::new();
    let mut accept_loops = Vec::new();
    for (l, local) in listeners {
        tracing::info!(addr = %local, "listening on {local}");
        local_addrs.push(local);
        accept_loops.push(tokio::spawn(listener::accept_loop(
            l,
            state.clone(),
            builder.clone(),
            graceful.clone(),
            shutdown.clone(),
        )));
    }
    Ok(Running {
        local_addrs,
        state,
        trigger,
        accept_loops,
        graceful,
    })
}

impl Running {
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Re-reads the config file and swaps in a new snapshot; on error the running one stays.
    pub fn reload(&self) -> Result<(), crate::config::ConfigError> {
        let current = self.state.load();
        let Some(path) = current.config.source.clone() else {
            return Ok(());
        };
        let new = Config::load_file(&path)?;
        if new.proxy.listen != current.config.proxy.listen {
            tracing::warn!(
                "proxy.listen changed; the new addresses take effect at the next restart"
            );
        }
        self.state
            .store(Snapshot::build(Arc::new(new), Some(&current)));
        tracing::info!(file = %path.display(), "config reloaded");
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish for up to `shutdown_timeout`, and
    /// returns whether every connection finished in time.
    pub async fn shutdown(self) -> bool {
        let grace = self.state.load().config.proxy.shutdown_timeout;
        self.trigger.fire();
        for task in self.accept_loops {
            let _ = task.await;
        }
        drain(self.graceful, grace).await
    }
}

async fn drain(graceful: Arc<GracefulShutdown>, grace: Duration) -> bool {
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        return false;
    };
    let open = graceful.count();
    if open > 0 {
        tracing::info!(connections = open, "draining for up to {grace:?}");
    }
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => true,
        Err(_) => {
            tracing::warn!("shutdown_timeout reached; closing the connections still open");
            false
        }
    }
}

/// Runs the proxy until SIGTERM or SIGINT, reloading on SIGHUP. For the binary.
pub async fn run_until_signal(config: Config) -> anyhow_free::Result {
    let running = start(config).await?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let terminate = shutdown::terminate_signal();
    tokio::pin!(terminate);
    let name = loop {
        tokio::select! {
            sig = &mut terminate => break sig?,
            _ = hup.recv() => {
                if let Err(e) = running.reload() {
                    tracing::error!("reload refused, the running config stays: {e}");
                }
            }
        }
    };
    tracing::info!("{name} received; shutting down");
    running.shutdown().await;
    Ok(())
}

/// The app's own fatal errors, without pulling `anyhow` into the library.
pub mod anyhow_free {
    pub type Result = std::result::Result<(), RunError>;

    #[derive(Debug, thiserror::Error)]
    pub enum RunError {
        #[error(transparent)]
        Start(#[from] super::StartError),
        #[error("cannot install signal handlers: {0}")]
        Signals(#[from] std::io::Error),
    }
}
