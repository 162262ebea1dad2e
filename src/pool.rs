//! Pools of server connections, one per (node, server database, server user), on bb8 with our
//! own connection manager.

use crate::backend::{BackendConn, BackendError, BackendTarget};
use crate::config::PoolConfig;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

/// A pooled server connection; dropping it returns it to its pool (or closes it when broken).
pub type Pooled = bb8::PooledConnection<'static, Manager>;

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {0} ms waiting for a server connection to {1}")]
    Timeout(u64, std::net::SocketAddr),
    #[error("{0}")]
    Down(String),
}

/// Creates and checks server connections for bb8.
pub struct Manager {
    target: BackendTarget,
    connect_timeout: Duration,
    failures: Arc<FailureLog>,
    server_params: Arc<OnceLock<Vec<(String, String)>>>,
    epoch: Arc<AtomicU64>,
}

/// The latest connection failure of a pool, so that clients waiting for a connection to a
/// node that is down get an error at once instead of waiting for the checkout timeout.
#[derive(Default)]
struct FailureLog {
    count: watch::Sender<u64>,
    last: Mutex<String>,
}

impl bb8::ManageConnection for Manager {
    type Connection = BackendConn;
    type Error = BackendError;

    async fn connect(&self) -> Result<BackendConn, BackendError> {
        match BackendConn::connect(&self.target, self.connect_timeout).await {
            Ok(mut c) => {
                c.epoch = self.epoch.load(Ordering::Relaxed);
                let _ = self.server_params.set(c.initial_params.clone());
                tracing::debug!(server = %self.target.addr, pid = c.pid, "server connection opened");
                Ok(c)
            }
            Err(e) => {
                tracing::warn!(server = %self.target.addr, error = %e, "server connection failed");
                *self.failures.last.lock().expect("not poisoned") = e.to_string();
                self.failures.count.send_modify(|c| *c += 1);
                Err(e)
            }
        }
    }

    async fn is_valid(&self, _conn: &mut BackendConn) -> Result<(), BackendError> {
        // test_on_check_out is off: a dead connection shows itself on first use.
        Ok(())
    }

    fn has_broken(&self, conn: &mut BackendConn) -> bool {
        conn.broken
    }
}

/// The pool of one (node, database, user).
#[derive(Clone)]
pub struct NodePool {
    pub target: BackendTarget,
    pool: bb8::Pool<Manager>,
    failures: Arc<FailureLog>,
    checkout_timeout_ms: u64,
    server_params: Arc<OnceLock<Vec<(String, String)>>>,
    epoch: Arc<AtomicU64>,
    pub stats: Arc<crate::metrics::PoolStats>,
    config: PoolConfig,
}

impl NodePool {
    /// Creates the pool; connections are opened on demand (and `min_idle` in the background).
    pub fn new(target: BackendTarget, cfg: &PoolConfig) -> NodePool {
        let failures = Arc::new(FailureLog::default());
        let server_params = Arc::new(OnceLock::new());
        let epoch = Arc::new(AtomicU64::new(0));
        let manager = Manager {
            target: target.clone(),
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            failures: failures.clone(),
            server_params: server_params.clone(),
            epoch: epoch.clone(),
        };
        let pool = bb8::Pool::builder()
            .max_size(cfg.size)
            .min_idle(Some(cfg.min_idle).filter(|&n| n > 0))
            .test_on_check_out(false)
            .connection_timeout(Duration::from_millis(cfg.checkout_timeout_ms))
            .idle_timeout(Some(Duration::from_millis(cfg.idle_timeout_ms)))
            .max_lifetime(Some(Duration::from_millis(cfg.max_lifetime_ms)))
            .build_unchecked(manager);
        NodePool {
            target,
            pool,
            failures,
            checkout_timeout_ms: cfg.checkout_timeout_ms,
            server_params,
            epoch,
            stats: Default::default(),
            config: cfg.clone(),
        }
    }

    /// The settings the pool was built with.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Connections open now are not handed out again (the node failed a health check:
    /// they are likely dead, and a client would be the one to find out).
    pub fn invalidate(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Checks out a connection, failing fast when the node refuses connections and with
    /// [`PoolError::Timeout`] when all connections stay busy for the checkout timeout.
    pub async fn get(&self) -> Result<Pooled, PoolError> {
        let started = std::time::Instant::now();
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let r = self.get_current().await;
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        self.stats.checkout.observe(started.elapsed());
        r
    }

    async fn get_current(&self) -> Result<Pooled, PoolError> {
        loop {
            let mut c = self.get_any().await?;
            if c.epoch >= self.epoch.load(Ordering::Relaxed) {
                return Ok(c);
            }
            c.broken = true;
        }
    }

    async fn get_any(&self) -> Result<Pooled, PoolError> {
        let map = |e: bb8::RunError<BackendError>| match e {
            bb8::RunError::User(e) => PoolError::Down(e.to_string()),
            bb8::RunError::TimedOut => {
                let last = self.failures.last.lock().expect("not poisoned").clone();
                if self.pool.state().connections == 0 && !last.is_empty() {
                    PoolError::Down(last)
                } else {
                    PoolError::Timeout(self.checkout_timeout_ms, self.target.addr)
                }
            }
        };
        let get = self.pool.get_owned();
        tokio::pin!(get);
        // Usually an idle connection is there: take it without watching for failures.
        if let Some(r) = poll_once(get.as_mut()).await {
            return r.map_err(map);
        }
        let mut failures = self.failures.count.subscribe();
        failures.borrow_and_update();
        tokio::select! {
            r = get => r.map_err(map),
            _ = failures.changed() => {
                Err(PoolError::Down(self.failures.last.lock().expect("not poisoned").clone()))
            }
        }
    }

    /// The ParameterStatus values servers of this pool report, once one connection was made.
    pub fn server_params(&self) -> Option<&Vec<(String, String)>> {
        self.server_params.get()
    }

    /// Connections open and idle.
    pub fn state(&self) -> bb8::State {
        self.pool.state()
    }
}

/// Polls a future once: its output if it is ready now.
async fn poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}
