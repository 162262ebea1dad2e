//! Counters and histograms an operator pages on, kept in atomics so that the per-query
//! path never locks (errors, which are rare, are counted per SQLSTATE class in a map).
//! Rendered in Prometheus text format by `admin::metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram (cumulative buckets are computed when rendered).
#[derive(Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        if ns > 0 {
            self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        }
    }

    /// Cumulative counts per bucket (the last is +Inf = the total), and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut acc = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                acc += c.load(Ordering::Relaxed);
                acc
            })
            .collect();
        (cumulative, self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9)
    }

    /// An estimate of the q-quantile (0..1) in seconds: the upper bound of its bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let (cum, _) = self.snapshot();
        let total = *cum.last()?;
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let i = cum.iter().position(|&c| c >= rank)?;
        Some(BUCKETS.get(i).copied().unwrap_or(f64::INFINITY))
    }
}

/// What happened on one shard through this pgshard.
#[derive(Default)]
pub struct ShardStats {
    /// Requests answered (a simple Query, or an extended batch up to Sync).
    pub queries: AtomicU64,
    pub transactions: AtomicU64,
    /// Requests that needed several shards, and writes/DDL sent to every shard.
    pub cross_shard: AtomicU64,
    pub broadcast: AtomicU64,
    /// Final queries of aggregates over shards run on this shard's servers, and the bytes
    /// of merged groups or gathered rows sent to them.
    pub finalized: AtomicU64,
    pub finalized_bytes: AtomicU64,
    /// pgshard's statements on server connections (named ones in transaction mode and
    /// `pool.statement_cache`'s): Parses sent, uses of a statement a connection already
    /// held (parsing PostgreSQL was spared), statements closed to keep `per_connection`,
    /// and requests sent again after the server refused a cached statement.
    pub statements: StatementStats,
    pub latency: Histogram,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl ShardStats {
    /// Counts an error by its SQLSTATE class (the first two characters).
    pub fn error(&self, sqlstate: &str) {
        let class: String = sqlstate.chars().take(2).collect();
        *self
            .errors
            .lock()
            .expect("not poisoned")
            .entry(class)
            .or_default() += 1;
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().expect("not poisoned").clone()
    }
}

/// See [`ShardStats::statements`].
#[derive(Default)]
pub struct StatementStats {
    pub prepared: AtomicU64,
    pub reused: AtomicU64,
    pub evicted: AtomicU64,
    pub retried: AtomicU64,
}

/// Checkouts of one pool: how many wait now, and how long they waited.
#[derive(Default)]
pub struct PoolStats {
    pub waiting: AtomicU64,
    pub checkout: Histogram,
    /// Checkouts that gave up after the checkout timeout (the client got 53300).
    pub timeouts: AtomicU64,
    /// Server connections opened, and attempts that failed (refused, auth, timeout).
    pub opened: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Server connections closed, by [`CloseReason`].
    pub closed: [AtomicU64; CloseReason::ALL.len()],
}

/// Why pgshard closed a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Idle beyond `min_idle` for `idle_timeout_ms`.
    Idle,
    /// Older than `max_lifetime_ms`.
    Lifetime,
    /// Opened before its node failed a health check.
    Invalidated,
    /// Left in an unknown state (lost, mid-COPY, a failed reset...).
    Broken,
    /// Closed by the server while idle in the pool (a restart, `pg_terminate_backend`).
    Closed,
}

impl CloseReason {
    pub const ALL: [CloseReason; 5] = [
        CloseReason::Idle,
        CloseReason::Lifetime,
        CloseReason::Invalidated,
        CloseReason::Broken,
        CloseReason::Closed,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Lifetime => "lifetime",
            CloseReason::Invalidated => "invalidated",
            CloseReason::Broken => "broken",
            CloseReason::Closed => "server_closed",
        }
    }
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The SQLSTATE of an ErrorResponse frame (tag, length, then fields), if present.
pub fn sqlstate_of(frame: &[u8]) -> Option<&str> {
    let mut rest = frame.get(5..)?;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if kind == b'C' {
            return std::str::from_utf8(&tail[..end]).ok();
        }
        rest = &tail[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = Histogram::default();
        for ms in [0.2, 0.7, 3.0, 3.0, 40.0, 20_000.0] {
            h.observe(Duration::from_secs_f64(ms / 1000.0));
        }
        let (cum, sum) = h.snapshot();
        assert_eq!(cum.len(), BUCKETS.len() + 1);
        assert_eq!(cum[0], 1);
        assert_eq!(cum[1], 2);
        assert_eq!(*cum.last().unwrap(), 6);
        assert!((sum - 20.0469).abs() < 1e-3, "{sum}");
        assert_eq!(h.quantile(0.5), Some(0.005));
        assert_eq!(h.quantile(0.99), Some(f64::INFINITY));
    }

    #[test]
    fn sqlstate_is_read_from_error_frames() {
        let mut out = bytes::BytesMut::new();
        crate::protocol::PgError::new("40001", "x").write(&mut out);
        assert_eq!(sqlstate_of(&out), Some("40001"));
        let s = ShardStats::default();
        s.error("40001");
        s.error("40P01");
        s.error("08006");
        assert_eq!(s.errors().get("40"), Some(&2));
    }
}
