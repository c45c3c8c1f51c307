//! The data plane's threads: one single-threaded tokio runtime per worker, as nginx runs one
//! worker process per core. The accept loops, on the runtime that started the proxy (itself
//! worker 0), hand each new connection to the next worker in turn. A connection then lives
//! on its worker's thread, and so do the upstream connections it takes (`forward::pool` keeps
//! one idle list per worker): a request wakes no other thread and moves no task between
//! threads, where tokio's work-stealing runtime spent a fifth of its time waking threads.

use std::cell::Cell;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// This thread's worker: 0 on the thread that started the proxy, and on any thread not a
/// worker (a test's, say).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// How many workers `proxy.threads` asks for: 0 is one per core.
pub fn count(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        n => n,
    }
}

/// One `T` per worker, each used from its worker's thread only (whose index picks it): what
/// holds upstream connections, whose tasks run on the thread that opened them.
pub struct PerWorker<T>(Vec<T>);

impl<T> PerWorker<T> {
    /// `make` for each of `workers` (at least one).
    pub fn new(workers: usize, make: impl FnMut(usize) -> T) -> PerWorker<T> {
        PerWorker((0..workers.max(1)).map(make).collect())
    }

    /// This thread's: a thread that is no worker (a test's, say) takes the first.
    pub fn local(&self) -> &T {
        &self.0[index() % self.0.len()]
    }

    pub fn all(&self) -> &[T] {
        &self.0
    }
}

/// The workers other than the caller's runtime, and the turn of the next connection.
pub struct Workers {
    others: Vec<Handle>,
    next: AtomicUsize,
    /// Dropped with `Workers`: each worker's runtime then ends, and the connections still on
    /// it close. `app` keeps its `Workers` until a drain has waited for the busy ones.
    stop: Vec<oneshot::Sender<()>>,
    /// Disconnected once every worker thread has dropped its runtime (each holds a sender).
    /// In a mutex to be `Sync`, as `Workers` is shared; only `drop` reads it.
    ended: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

/// How long dropping `Workers` waits for the workers' runtimes to end, as `main` gives its
/// own (`Runtime::shutdown_timeout`): a runtime's end waits for its blocking tasks, which a
/// file read that never returns could hold for ever.
const END_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Drop for Workers {
    /// Ends the workers and waits, briefly, for their runtimes to drop what they still run:
    /// the connections a drain's `shutdown_timeout` cut write their access log lines as they
    /// drop (a request's 499, a WebSocket's tunnel), and the process exits right after this.
    /// Not waited for, a worker still dropping its connections lost some of those lines (a
    /// third of the requests cut, with four workers).
    fn drop(&mut self) {
        self.stop.clear();
        // Nothing is sent: this returns when the last thread's sender is gone, or at the end.
        let ended = self
            .ended
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = ended.recv_timeout(END_WAIT);
    }
}

impl Workers {
    /// Starts `total - 1` worker threads; the caller's runtime is the first worker. Each
    /// builds its runtime on its own thread: a runtime dropped on the caller's (after a failed
    /// spawn) would panic there, inside the caller's runtime.
    pub fn start(total: usize) -> std::io::Result<Workers> {
        let mut others = Vec::new();
        let mut stop = Vec::new();
        let (ends, ended) = std::sync::mpsc::channel();
        for i in 1..total {
            let (built_tx, built) = std::sync::mpsc::channel();
            let (tx, rx) = oneshot::channel::<()>();
            let end = ends.clone();
            std::thread::Builder::new()
                .name(format!("intermission-{i}"))
                .spawn(move || {
                    // Declared before the runtime, dropped after it: the thread's end.
                    let _end: std::sync::mpsc::Sender<()> = end;
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = built_tx.send(Err(e));
                            return;
                        }
                    };
                    INDEX.with(|c| c.set(i));
                    let _ = built_tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(async {
                        tokio::select! {
                            _ = rx => {}
                            () = crate::relay::trim_spares_regularly() => {}
                        }
                    });
                })?;
            // Waits the moment a runtime takes to build, once, at start.
            let handle = built
                .recv()
                .map_err(|_| std::io::Error::other("a worker thread ended at start"))??;
            others.push(handle);
            stop.push(tx);
        }
        // The caller's runtime is worker 0: its spare buffers are let go of as the others'.
        if let Ok(runtime) = Handle::try_current() {
            runtime.spawn(crate::relay::trim_spares_regularly());
        }
        Ok(Workers {
            others,
            next: AtomicUsize::new(0),
            stop,
            ended: std::sync::Mutex::new(ended),
        })
    }

    /// Serves a new connection on the next worker: `serve` makes its future there, with the
    /// socket registered with that worker's reactor.
    pub fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let turn = self.next.fetch_add(1, Relaxed) % (self.others.len() + 1);
        let Some(worker) = turn.checked_sub(1).and_then(|i| self.others.get(i)) else {
            tokio::spawn(serve(stream));
            return;
        };
        // Moved by its descriptor: a tokio socket belongs to the reactor that registered it.
        let socket = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to a worker; closed");
                return;
            }
        };
        worker.spawn(async move {
            match TcpStream::from_std(socket) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::warn!(error = %e, "a worker cannot take a connection"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{index, Workers};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Connections go to every worker in turn, each served on its own thread.
    #[tokio::test]
    async fn connections_take_turns_on_the_workers() {
        let workers = Workers::start(3).expect("workers");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut seen = Vec::new();
        for _ in 0..6 {
            let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (stream, _) = listener.accept().await.expect("accept");
            workers.spawn(stream, |mut stream| async move {
                // The worker's index and thread, through the socket the worker now drives.
                let line = format!("{} {:?}", index(), std::thread::current().id());
                let _ = stream.write_all(line.as_bytes()).await;
            });
            let mut answer = String::new();
            client.read_to_string(&mut answer).await.expect("read");
            seen.push(answer);
        }
        let here = format!("{:?}", std::thread::current().id());
        assert!(
            seen[0].starts_with("0 ") && seen[0].ends_with(&here),
            "{seen:?}"
        );
        assert!(
            seen[1].starts_with("1 ") && !seen[1].ends_with(&here),
            "{seen:?}"
        );
        assert!(seen[2].starts_with("2 "), "{seen:?}");
        assert_ne!(seen[1], seen[2], "two workers, two threads");
        assert_eq!(seen[..3], seen[3..], "the same turns again");
    }
}
