//! Composition root: binds the listeners, builds the first snapshot, spawns the long-lived
//! tasks, and drains on shutdown. Only this module spawns tasks that outlive a request.

use crate::config::Config;
use crate::control::{self, protocol::Request, server::ControlError};
use crate::hold::pages::{Pages, PagesError};
use crate::listener;
use crate::shutdown::{self, Trigger};
use crate::state::controller::{Controller, ControllerHandle};
use crate::state::snapshot::Parts;
use crate::state::store::{self, StoreError};
use crate::state::StateHandle;
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
    #[error("cannot load the pages: {0}")]
    Pages(#[from] PagesError),
    #[error(transparent)]
    State(#[from] StoreError),
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// A started proxy: its bound addresses, and the handles to reload or stop it.
pub struct Running {
    local_addrs: Vec<SocketAddr>,
    state: StateHandle,
    controller: ControllerHandle,
    trigger: Trigger,
    accept_loops: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    graceful: Arc<GracefulShutdown>,
}

/// Loads pages and state, binds every listener and the control socket, and starts serving.
/// Anything that would make the proxy answer wrongly stops the start with an error.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let pages = Pages::load(&config.maintenance.pages)?;
    let persisted = store::load(&config.control.state_file)?;
    if let Some(p) = &persisted.planned {
        tracing::warn!(since = %p.since.rfc3339(), by = %p.by, "maintenance is on (restored from the state file)");
    }
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
    let control = control::server::bind(&config.control.socket, config.control.socket_mode)?;
    let socket_path = config.control.socket.clone();
    let builder = listener::conn_builder(&config.proxy);
    let parts = Parts::new(Arc::new(config), Arc::new(pages), None);
    let (controller, handle, state) = Controller::new(parts, persisted);
    let (trigger, shutdown) = shutdown::channel();
    let graceful = Arc::new(GracefulShutdown::new());
    let background = vec![
        tokio::spawn(controller.run()),
        tokio::spawn(control::server::serve(
            control,
            socket_path.clone(),
            handle.clone(),
            shutdown.clone(),
        )),
    ];
    tracing::info!(socket = %socket_path.display(), "control socket ready");
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
        controller: handle,
        trigger,
        accept_loops,
        background,
        graceful,
    })
}

impl Running {
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    pub fn state(&self) -> &StateHandle {
        &self.state
    }

    pub fn controller(&self) -> &ControllerHandle {
        &self.controller
    }

    /// Re-reads the config file and pages (as `ctl reload` does); on error the running
    /// config stays and the error is logged.
    pub async fn reload(&self) {
        let resp = self
            .controller
            .request(Request::Reload, "SIGHUP".into())
            .await;
        if let Some(e) = resp.error {
            tracing::error!("reload refused, the running config stays: {}", e.message);
        }
    }

    /// Stops accepting, lets in-flight requests finish for up to `shutdown_timeout`, and
    /// returns whether every connection finished in time.
    pub async fn shutdown(self) -> bool {
        let grace = self.state.load().config.proxy.shutdown_timeout;
        self.trigger.fire();
        for task in self.accept_loops {
            let _ = task.await;
        }
        let drained = drain(self.graceful, grace).await;
        for task in self.background {
            task.abort();
        }
        drained
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
            _ = hup.recv() => running.reload().await,
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
