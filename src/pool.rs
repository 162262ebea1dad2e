//! Pools of server connections, one per (node, server database, server user).
//!
//! Our own pool rather than bb8 (the design card's first choice), because the checkout is on
//! the per-transaction path: in transaction mode every autocommit statement checks a
//! connection out and back in. Measured with `perf` under `pgbench -S` at 32 clients, bb8's
//! checkout and return were a quarter of pgshard's user-space instructions (its `get`
//! future, wrapped in a timeout, is built and moved for every checkout; the return goes
//! through a notifier). Here the common case is synchronous: one compare-and-swap on a
//! semaphore for the permit and one uncontended lock to pop an idle connection.
//!
//! Invariant: a connection is opened only by a holder of a permit that found no idle
//! connection, so open connections never exceed `size` (the number of permits).

use crate::backend::{BackendConn, BackendError, BackendTarget};
use crate::config::PoolConfig;
use crate::metrics::{CloseReason, PoolStats};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {0} ms waiting for a server connection to {1}")]
    Timeout(u64, crate::net::ServerAddr),
    #[error("{0}")]
    Down(String),
}

/// Connections open and idle, for `SHOW POOLS`, metrics and load balancing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolState {
    /// Open connections, idle or checked out.
    pub connections: u32,
    pub idle_connections: u32,
}

/// A checked-out server connection; dropping it returns it to its pool (or closes it when
/// it is broken, from before an invalidation, or past its lifetime).
pub struct Pooled {
    conn: Option<BackendConn>,
    pool: Arc<Inner>,
}

impl std::ops::Deref for Pooled {
    type Target = BackendConn;
    fn deref(&self) -> &BackendConn {
        self.conn.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut BackendConn {
        self.conn.as_mut().expect("present until dropped")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.reported.clear();
            let p = &self.pool;
            let now = Instant::now();
            if let Some(why) = p.retire(&conn, now) {
                p.close(conn, why);
            } else {
                p.idle
                    .lock()
                    .expect("not poisoned")
                    .push(Idle { conn, since: now });
            }
            // After the push: the waiter this permit goes to finds the connection.
            p.permits.add_permits(1);
        }
    }
}

struct Idle {
    conn: BackendConn,
    since: Instant,
}

struct Inner {
    target: BackendTarget,
    cfg: PoolConfig,
    /// One per connection clients may hold at once (`size`); waiters queue here in order.
    permits: Semaphore,
    /// Most recently returned last: checkouts take the warmest connection, and the
    /// coldest ones reach the idle timeout when load drops.
    idle: Mutex<Vec<Idle>>,
    open: AtomicUsize,
    /// The latest connection failure, reported when a checkout times out with nothing open.
    last_failure: Mutex<String>,
    server_params: OnceLock<Vec<(String, String)>>,
    epoch: AtomicU64,
    maintained: AtomicBool,
    stats: Arc<PoolStats>,
}

impl Inner {
    /// Not from before an invalidation.
    fn current(&self, c: &BackendConn) -> bool {
        c.epoch >= self.epoch.load(Ordering::Relaxed)
    }

    /// Why a connection must not be reused at `now`, if it must not.
    fn retire(&self, c: &BackendConn, now: Instant) -> Option<CloseReason> {
        let lifetime = self.cfg.max_lifetime_ms;
        if c.broken {
            Some(CloseReason::Broken)
        } else if !self.current(c) {
            Some(CloseReason::Invalidated)
        } else if lifetime > 0 && now.duration_since(c.created) >= Duration::from_millis(lifetime) {
            Some(CloseReason::Lifetime)
        } else {
            None
        }
    }

    fn close(&self, conn: BackendConn, why: CloseReason) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.stats.closed[why as usize].fetch_add(1, Ordering::Relaxed);
        if conn.broken {
            return;
        }
        // Terminate, so the server does not log an unexpected EOF; best effort.
        const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
        match conn.writer {
            // Through TLS the bytes must go through the session, and its close_notify
            // after them: a short task of its own, not waited for.
            crate::net::ServerWrite::Tls(mut w) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            w.write_all(&TERMINATE).await?;
                            w.shutdown().await
                        })
                        .await;
                    });
                }
            }
            w => {
                let _ = w.try_write(&TERMINATE);
            }
        }
    }

    /// An idle connection that can be reused, closing invalidated ones, and ones the
    /// server closed, on the way. (Its lifetime was checked when it was returned, and
    /// maintenance checks idle ones: no clock is read here.)
    fn pop_idle(&self) -> Option<BackendConn> {
        loop {
            let mut c = self.idle.lock().expect("not poisoned").pop()?.conn;
            if !self.current(&c) {
                self.close(c, CloseReason::Invalidated);
            } else if c.closed_while_idle() {
                // A server restarted between two health checks leaves every idle
                // connection dead: handed out, each would fail its client's next query.
                c.broken = true;
                self.close(c, CloseReason::Closed);
            } else {
                return Some(c);
            }
        }
    }

    /// Opens a connection (the caller holds a permit).
    async fn open(&self) -> Result<BackendConn, BackendError> {
        let timeout = Duration::from_millis(self.cfg.connect_timeout_ms);
        match BackendConn::connect(&self.target, timeout).await {
            Ok(mut c) => {
                c.epoch = self.epoch.load(Ordering::Relaxed);
                self.open.fetch_add(1, Ordering::Relaxed);
                self.stats.opened.fetch_add(1, Ordering::Relaxed);
                let _ = self.server_params.set(c.initial_params.clone());
                tracing::debug!(server = %self.target.addr, pid = c.pid, "server connection opened");
                Ok(c)
            }
            Err(e) => {
                tracing::warn!(server = %self.target.addr, error = %e, "server connection failed");
                *self.last_failure.lock().expect("not poisoned") = e.to_string();
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Closes connections idle past the idle timeout (keeping `min_idle`), past their
    /// lifetime or from before an invalidation; then opens connections up to `min_idle`.
    async fn maintain(&self) {
        // 0: idle connections stay open.
        let idle_timeout = match self.cfg.idle_timeout_ms {
            0 => Duration::MAX,
            ms => Duration::from_millis(ms),
        };
        let keep = self.cfg.min_idle as usize;
        let now = Instant::now();
        let expired: Vec<(BackendConn, CloseReason)> = {
            let mut idle = self.idle.lock().expect("not poisoned");
            let mut out = Vec::new();
            let mut kept = 0;
            // Newest first: those are the ones min_idle keeps.
            let mut i = idle.len();
            while i > 0 {
                i -= 1;
                let why = self.retire(&idle[i].conn, now).or_else(|| {
                    (kept >= keep && now.duration_since(idle[i].since) >= idle_timeout)
                        .then_some(CloseReason::Idle)
                });
                if let Some(why) = why {
                    out.push((idle.remove(i).conn, why));
                } else {
                    kept += 1;
                }
            }
            out
        };
        for (c, why) in expired {
            tracing::debug!(server = %self.target.addr, pid = c.pid, reason = why.label(), "idle server connection closed");
            self.close(c, why);
        }
        while self.open.load(Ordering::Relaxed) < keep {
            let Ok(permit) = self.permits.try_acquire() else {
                break;
            };
            permit.forget();
            let opened = self.open().await;
            let failed = match opened {
                Ok(conn) => {
                    self.idle.lock().expect("not poisoned").push(Idle {
                        conn,
                        since: Instant::now(),
                    });
                    false
                }
                Err(e) => {
                    tracing::debug!(error = %e, "min_idle: retrying at the next maintenance");
                    true
                }
            };
            self.permits.add_permits(1);
            if failed {
                break;
            }
        }
    }
}

/// The pool of one (node, database, user).
#[derive(Clone)]
pub struct NodePool {
    pub target: BackendTarget,
    inner: Arc<Inner>,
}

impl NodePool {
    /// Creates the pool; connections are opened on demand (and `min_idle` in the background).
    pub fn new(target: BackendTarget, cfg: &PoolConfig) -> NodePool {
        let inner = Arc::new(Inner {
            target: target.clone(),
            cfg: cfg.clone(),
            permits: Semaphore::new(cfg.size as usize),
            idle: Mutex::new(Vec::with_capacity(cfg.size as usize)),
            open: AtomicUsize::new(0),
            last_failure: Mutex::new(String::new()),
            server_params: OnceLock::new(),
            epoch: AtomicU64::new(0),
            maintained: AtomicBool::new(false),
            stats: Default::default(),
        });
        let pool = NodePool { target, inner };
        pool.start_maintenance();
        pool
    }

    /// Starts the maintenance task once a runtime is there (pools can be built outside one,
    /// by `pgshard check`).
    fn start_maintenance(&self) {
        if self.inner.maintained.load(Ordering::Relaxed)
            || tokio::runtime::Handle::try_current().is_err()
            || self.inner.maintained.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let cfg = &self.inner.cfg;
        // Often enough that a connection outlives its limit by a quarter of it at most.
        let shortest = [cfg.idle_timeout_ms, cfg.max_lifetime_ms]
            .into_iter()
            .filter(|&ms| ms > 0)
            .min()
            .unwrap_or(40_000);
        let tick = Duration::from_millis((shortest / 4).clamp(50, 10_000));
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                // Only while the pool exists (a reload can drop it).
                let Some(inner) = weak.upgrade() else { return };
                inner.maintain().await;
                drop(inner);
                tokio::time::sleep(tick).await;
            }
        });
    }

    /// Its checkout and connection counters.
    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    /// The settings the pool was built with.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    /// Connections open now are not handed out again (the node failed a health check:
    /// they are likely dead, and a client would be the one to find out).
    pub fn invalidate(&self) {
        self.inner.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// An idle connection, if one can be had without waiting.
    pub fn try_get(&self) -> Option<Pooled> {
        let permit = self.inner.permits.try_acquire().ok()?;
        match self.inner.pop_idle() {
            Some(conn) => {
                permit.forget();
                self.inner.stats.checkout.observe(Duration::ZERO);
                Some(Pooled {
                    conn: Some(conn),
                    pool: self.inner.clone(),
                })
            }
            None => None,
        }
    }

    /// Checks out a connection: an idle one, or a new one while the pool is not full, or
    /// the first one returned. Fails with [`PoolError::Timeout`] when none comes within the
    /// checkout timeout, and at once when the node refuses connections.
    pub async fn get(&self) -> Result<Pooled, PoolError> {
        if let Some(p) = self.try_get() {
            return Ok(p);
        }
        // Boxed: the slow path's future (a connect) is large; the fast path stays small.
        Box::pin(self.get_slow()).await
    }

    async fn get_slow(&self) -> Result<Pooled, PoolError> {
        self.start_maintenance();
        let started = Instant::now();
        self.inner.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let r = self.wait_and_open().await;
        self.inner.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        // Waiting for a permit and opening a connection: the client waited for both.
        self.inner.stats.checkout.observe(started.elapsed());
        r
    }

    async fn wait_and_open(&self) -> Result<Pooled, PoolError> {
        let inner = &self.inner;
        let wait = Duration::from_millis(inner.cfg.checkout_timeout_ms);
        let permit = match tokio::time::timeout(wait, inner.permits.acquire()).await {
            Ok(Ok(p)) => p,
            // The semaphore is never closed; an error rather than a panic all the same.
            Ok(Err(e)) => return Err(PoolError::Down(e.to_string())),
            Err(_) => {
                self.inner.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                let last = inner.last_failure.lock().expect("not poisoned").clone();
                return Err(
                    if inner.open.load(Ordering::Relaxed) == 0 && !last.is_empty() {
                        PoolError::Down(last)
                    } else {
                        PoolError::Timeout(inner.cfg.checkout_timeout_ms, self.target.addr.clone())
                    },
                );
            }
        };
        let conn = match inner.pop_idle() {
            Some(c) => c,
            // The permit goes back with the error (dropped).
            None => inner
                .open()
                .await
                .map_err(|e| PoolError::Down(e.to_string()))?,
        };
        permit.forget();
        Ok(Pooled {
            conn: Some(conn),
            pool: inner.clone(),
        })
    }

    /// The ParameterStatus values servers of this pool report, once one connection was made.
    pub fn server_params(&self) -> Option<&Vec<(String, String)>> {
        self.inner.server_params.get()
    }

    /// Connections open and idle.
    pub fn state(&self) -> PoolState {
        let idle = self.inner.idle.lock().expect("not poisoned").len();
        PoolState {
            connections: self.inner.open.load(Ordering::Relaxed) as u32,
            idle_connections: idle as u32,
        }
    }
}
