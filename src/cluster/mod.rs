//! The topology pgshard routes over: per database, its shards, their nodes and pools, and
//! what the health monitor last learned about each node (role, lag, health).
//!
//! What the monitor learns is published as an immutable [`ShardView`] per shard, swapped
//! in whole (arc-swap): sessions read it when they pick a node, without a lock.

mod catalog;
pub mod deadlock;
mod failover;
mod health;
pub mod keys;
mod switchover;

use crate::backend::BackendTarget;
use crate::config::{
    Config, Consistency, DEFAULT_MAX_LAG_MS, DatabaseConfig, LoadBalance, ReadFrom,
};
use crate::pool::NodePool;
use crate::router::Router;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

pub use failover::FailoverError;
pub use health::{Control, parse_lsn};

/// One server of a shard.
pub struct Node {
    /// As written in the configuration.
    pub addr: String,
    pub pool: NodePool,
    /// Read weight (0: never takes reads).
    pub weight: u32,
    /// `BAN`: no reads, never a failover candidate, until `UNBAN`.
    pub banned: Arc<std::sync::atomic::AtomicBool>,
}

impl Node {
    pub fn is_banned(&self) -> bool {
        self.banned.load(Ordering::Relaxed)
    }
}

/// What the last health checks said about a node.
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    /// False once `failures_before_down` consecutive checks failed.
    pub up: bool,
    /// Consecutive failed checks.
    pub failures: u32,
    /// None until a check succeeded.
    pub in_recovery: Option<bool>,
    pub timeline: u32,
    /// The primary's current WAL position, or a replica's replay position.
    pub lsn: u64,
    /// A replica's received WAL position (its replay position when unknown).
    pub receive_lsn: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    /// Claims to be primary while another node holds the role: gets no traffic until it
    /// comes back as a replica.
    pub fenced: bool,
    /// When the last successful check finished.
    pub checked_at: Option<Instant>,
    /// When the last successful check began: what it read (`lsn`) was at least the
    /// node's position at that instant.
    pub check_started: Option<Instant>,
    pub last_error: Option<String>,
}

/// A shard as the monitor last saw it.
#[derive(Debug, Clone, Default)]
pub struct ShardView {
    /// The node index that takes writes; None while no node qualifies (failover pending).
    pub primary: Option<usize>,
    pub nodes: Vec<NodeState>,
    /// Node indexes that may take reads now (healthy, within lag bounds, weight > 0).
    pub readers: Vec<usize>,
}

/// One shard: its nodes (index 0 is the configured primary) and their current view.
pub struct Shard {
    pub nodes: Vec<Node>,
    view: ArcSwap<ShardView>,
    /// `view.primary` (`usize::MAX` for none), for the per-transaction path: one relaxed
    /// load instead of a snapshot's.
    primary: AtomicUsize,
    round_robin: AtomicUsize,
    pub stats: Arc<crate::metrics::ShardStats>,
    /// In `read_acknowledged_writes`: the highest commit position acknowledged to any
    /// client on this shard; every read must see it.
    acked_lsn: AtomicU64,
    /// In `read_acknowledged_writes`: when the latest commit whose position is not
    /// known (one over several shards) was acknowledged, as nanoseconds after
    /// [`epoch`] plus one (0: none). Reads go to the primary until a check of the
    /// primary made after it gives a position that covers it.
    acked_unknown: AtomicU64,
}

/// The instant `Shard::acked_unknown` counts from.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Shard {
    fn new(
        nodes: Vec<Node>,
        view: Arc<ShardView>,
        stats: Arc<crate::metrics::ShardStats>,
    ) -> Shard {
        Shard {
            nodes,
            primary: AtomicUsize::new(view.primary.unwrap_or(usize::MAX)),
            view: ArcSwap::new(view),
            round_robin: AtomicUsize::new(0),
            stats,
            acked_lsn: AtomicU64::new(0),
            acked_unknown: AtomicU64::new(0),
        }
    }

    /// The current view.
    pub fn view(&self) -> Arc<ShardView> {
        self.view.load_full()
    }

    fn publish(&self, v: ShardView) {
        self.primary.store(
            v.primary.unwrap_or(usize::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.view.store(Arc::new(v));
    }
}

/// What a client has seen of one shard, so that its reads never go back in time
/// (`consistency: read_your_writes`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadFloor {
    /// Reads must see at least this WAL position (its commits, what it read before).
    pub min_lsn: u64,
    /// The node of the last read and when it was made: until a check of that node taken
    /// after the read tells how far it was, the next read goes to the same node or the
    /// primary.
    pub pending: Option<(usize, Instant)>,
}

/// A logical database: its routing rules and its shards.
pub struct Database {
    pub config: DatabaseConfig,
    pub router: Router,
    pub shards: Vec<Shard>,
    /// Held while a shard's roles are decided (monitor rounds, failovers), so that a
    /// failover's decision is never overwritten by a round that started before it.
    roles: tokio::sync::Mutex<()>,
    /// Failovers done by this process, and how long the last one took (detection of the
    /// dead primary to the new one taking writes).
    pub failovers: std::sync::atomic::AtomicU64,
    pub last_failover_ms: std::sync::atomic::AtomicU64,
    /// Deadlocks across shards this process broke (`deadlock`).
    pub deadlocks: std::sync::atomic::AtomicU64,
    /// Shard answers cut off at `max_merge_bytes` (`exec::MergeLimit`).
    pub merge_limit_hits: std::sync::atomic::AtomicU64,
    /// Statements whose subqueries pgshard evaluated first (`router::preeval`).
    pub pre_evaluated: std::sync::atomic::AtomicU64,
    /// The names of user-defined aggregates (CREATE AGGREGATE) on the default shard, as
    /// the monitor last read them: pgshard cannot merge them over shards, and cannot tell
    /// them from plain functions by their text.
    pub user_aggregates: ArcSwap<Vec<String>>,
    /// Changes whenever `user_aggregates` does (sessions drop their cached analyses).
    pub user_aggregates_version: std::sync::atomic::AtomicU64,
    /// Monitor rounds that read the catalogs whatever their turn: DDL went through pgshard
    /// (a key column's type may have changed; read for a few rounds, as the DDL may not
    /// have committed by the first).
    pub catalog_rounds: std::sync::atomic::AtomicU8,
    /// Types and collations of the columns merges ordered (`exec::order`): read from a
    /// server once per column; None where the server knew none.
    pub order_facts: std::sync::Mutex<
        std::collections::HashMap<crate::exec::order::FactKey, Option<crate::exec::order::Fact>>,
    >,
    /// The 2PC decision table exists on the coordinator (created on first use).
    pub decisions_ready: std::sync::atomic::AtomicBool,
    /// Transactions committed with two-phase commit, and in-doubt ones recovery finished.
    pub two_phase_prepared: std::sync::atomic::AtomicU64,
    pub two_phase_commits: std::sync::atomic::AtomicU64,
    pub recovered_commits: std::sync::atomic::AtomicU64,
    pub recovered_rollbacks: std::sync::atomic::AtomicU64,
    splits_reads: bool,
    /// Turns for rows that may go to any shard (`next_shard`).
    turn: std::sync::atomic::AtomicUsize,
    /// Per (sharded table, shard): the shard was seen to generate the table's keys
    /// (`keys::verify`); rows without keys go only to such shards.
    keys_ready: Vec<std::sync::atomic::AtomicBool>,
}

/// Why no node can serve a request.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("shard {0} has no primary at the moment (its primary is down; failover pending)")]
    NoPrimary(usize),
}

impl Database {
    /// Whether reads may go to other nodes than the primary (decided at build: this is
    /// asked for every query).
    pub fn splits_reads(&self) -> bool {
        self.splits_reads
    }

    /// The shard for rows that may go to any shard (their keys made there): the next in
    /// turn whose primary the monitor has not seen down, so that such INSERTs spread over
    /// the shards and keep working while one shard's primary is down.
    pub fn next_shard(&self) -> usize {
        let n = self.shards.len();
        let first = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let up = |s: usize| {
            self.primary(s)
                .is_ok_and(|p| self.shards[s].view().nodes.get(p).is_none_or(|st| st.up))
        };
        (0..n)
            .map(|i| (first + i) % n)
            .find(|&s| up(s))
            .unwrap_or(first % n)
    }

    /// Whether `shard` was seen to generate the keys of sharded table `table`.
    pub fn keys_ready(&self, table: usize, shard: usize) -> bool {
        self.keys_ready
            .get(table * self.shards.len() + shard)
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub(crate) fn set_keys_ready(&self, table: usize, shard: usize) {
        if let Some(f) = self.keys_ready.get(table * self.shards.len() + shard) {
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The node that takes a shard's writes.
    pub fn primary(&self, shard: usize) -> Result<usize, NodeError> {
        let s = &self.shards[shard];
        match s.primary.load(std::sync::atomic::Ordering::Relaxed) {
            // A lone node is tried whatever its checks say: its pool reports why it fails.
            usize::MAX if s.nodes.len() == 1 => Ok(0),
            usize::MAX => Err(NodeError::NoPrimary(shard)),
            p => Ok(p),
        }
    }

    /// The node a read goes to, given what this client has seen of the shard.
    pub fn pick_read(&self, shard: usize, floor: &mut ReadFloor) -> Result<usize, NodeError> {
        let s = &self.shards[shard];
        let v = s.view.load();
        let primary = v.primary;
        let ryw = self.config.consistency != Consistency::Eventual;
        if self.config.consistency == Consistency::ReadAcknowledgedWrites {
            let unknown = s.acked_unknown.load(Ordering::Acquire);
            if unknown != 0 {
                let at = epoch() + std::time::Duration::from_nanos(unknown - 1);
                let checked = primary
                    .map(|p| &v.nodes[p])
                    .filter(|p| p.check_started.is_some_and(|c| c > at));
                match checked {
                    Some(p) => {
                        s.acked_lsn.fetch_max(p.lsn, Ordering::AcqRel);
                        let _ = s.acked_unknown.compare_exchange(
                            unknown,
                            0,
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        );
                    }
                    None => return primary.ok_or(NodeError::NoPrimary(shard)),
                }
            }
            floor.min_lsn = floor.min_lsn.max(s.acked_lsn.load(Ordering::Acquire));
        }
        let mut pinned = None;
        if ryw && let Some((n, at)) = floor.pending {
            let st = &v.nodes[n];
            if st.check_started.is_some_and(|c| c > at) {
                // The check after the read bounds what the read saw.
                floor.min_lsn = floor.min_lsn.max(st.lsn);
                floor.pending = None;
            } else {
                pinned = Some(n);
            }
        }
        let ok = |&&n: &&usize| -> bool {
            Some(n) == primary
                || !ryw
                || (v.nodes[n].lsn >= floor.min_lsn && pinned.is_none_or(|p| p == n))
        };
        let candidates: Vec<usize> = v
            .readers
            .iter()
            .filter(ok)
            .filter(|&&n| !s.nodes[n].is_banned())
            .copied()
            .collect();
        let chosen = match candidates.len() {
            0 => primary.ok_or(NodeError::NoPrimary(shard))?,
            1 => candidates[0],
            _ => self.balance(s, &candidates),
        };
        if ryw {
            floor.pending = Some((chosen, Instant::now()));
        }
        Ok(chosen)
    }

    /// Other nodes a read may go to when `failed` refused a connection: the primary,
    /// then the other readers (in read_your_writes, those not behind the client's floor
    /// are not known here, so only the primary).
    pub fn read_fallbacks(&self, shard: usize, failed: usize) -> Vec<usize> {
        let v = self.shards[shard].view.load();
        let mut out: Vec<usize> = v.primary.into_iter().collect();
        if self.config.consistency == Consistency::Eventual {
            out.extend(v.readers.iter().copied());
        }
        out.retain(|&n| n != failed);
        out.dedup();
        out
    }

    fn balance(&self, s: &Shard, candidates: &[usize]) -> usize {
        let weight = |n: usize| s.nodes[n].weight.max(1) as usize;
        match self.config.load_balance {
            LoadBalance::LeastOutstanding => *candidates
                .iter()
                .min_by_key(|&&n| {
                    // The pool reads its counters under a short lock; this runs once per
                    // transaction, not per message.
                    let st = s.nodes[n].pool.state();
                    let busy = st.connections.saturating_sub(st.idle_connections) as usize;
                    // Weighted: busy per unit of weight, compared without division.
                    busy * 1000 / weight(n)
                })
                .expect("not empty"),
            lb => {
                let total: usize = candidates.iter().map(|&n| weight(n)).sum();
                let mut x = if lb == LoadBalance::Random {
                    rand::random_range(0..total)
                } else {
                    s.round_robin.fetch_add(1, Ordering::Relaxed) % total
                };
                for &n in candidates {
                    if x < weight(n) {
                        return n;
                    }
                    x -= weight(n);
                }
                candidates[0]
            }
        }
    }

    /// After a client committed writes on `shard` at `lsn`: its later reads see them (in
    /// `read_acknowledged_writes`, everyone's do).
    pub fn wrote(&self, shard: usize, floor: &mut ReadFloor, lsn: u64) {
        floor.min_lsn = floor.min_lsn.max(lsn);
        floor.pending = None;
        if self.config.consistency == Consistency::ReadAcknowledgedWrites {
            self.shards[shard]
                .acked_lsn
                .fetch_max(lsn, Ordering::AcqRel);
        }
    }

    /// In `read_acknowledged_writes`, before a commit on `shard` whose position is not
    /// known is acknowledged: reads there go to the primary until it is bounded.
    pub fn wrote_unknown(&self, shard: usize) {
        if self.config.consistency != Consistency::ReadAcknowledgedWrites {
            return;
        }
        let now = Instant::now().saturating_duration_since(epoch()).as_nanos() as u64 + 1;
        // The latest such commit counts: a check begun after it bounds the earlier ones
        // too (a check begun after an earlier one alone might not cover this one).
        self.shards[shard]
            .acked_unknown
            .fetch_max(now, Ordering::AcqRel);
    }

    /// Sets read weights (tests build databases without them).
    #[cfg(test)]
    fn with_weights(mut self, w: &[u32]) -> Database {
        for (n, node) in self.shards[0].nodes.iter_mut().enumerate() {
            node.weight = w[n];
        }
        self
    }

    /// The lag bound for reads.
    fn max_lag_ms(&self) -> u64 {
        self.config.max_replica_lag_ms.unwrap_or(DEFAULT_MAX_LAG_MS)
    }
}

/// All databases, by client-facing name.
pub struct Topology {
    pub databases: HashMap<String, Arc<Database>>,
}

impl Topology {
    /// A topology of its own for unit tests (see [`Topology::build_from`]).
    #[cfg(test)]
    pub(crate) fn build(cfg: &Config) -> Topology {
        let tls = crate::net::TlsClient::new(&cfg.server_tls).expect("test TLS settings");
        Topology::build_from(cfg, None, Some(Arc::new(tls)))
    }

    /// Builds pools for every node; pools of the same (node, database, user) are shared
    /// between logical databases. Until the first health check, each shard's configured
    /// primary is taken at its word.
    ///
    /// For a (re)loaded configuration, keeps from `old`: the pools of
    /// nodes whose target and pool settings did not change, and the health view,
    /// statistics and bans of shards whose nodes did not change. `tls` is how to reach
    /// the servers over TCP (built from `cfg.server_tls`; None: plain).
    // A target's TLS client hashes by its immutable fingerprint, not by its rustls
    // session cache, which is the interior mutability clippy sees.
    #[allow(clippy::mutable_key_type)]
    pub fn build_from(
        cfg: &Config,
        old: Option<&Topology>,
        tls: Option<Arc<crate::net::TlsClient>>,
    ) -> Topology {
        let tls = tls.filter(|t| t.mode != crate::config::ServerTlsMode::Disable);
        let mut pools: HashMap<BackendTarget, NodePool> = HashMap::new();
        let mut kept: HashMap<Vec<String>, &Shard> = HashMap::new();
        let mut banned: HashMap<String, Arc<std::sync::atomic::AtomicBool>> = HashMap::new();
        for db in old.iter().flat_map(|t| t.databases.values()) {
            for shard in &db.shards {
                for n in &shard.nodes {
                    if n.pool.config() == &cfg.pool {
                        pools.insert(n.pool.target.clone(), n.pool.clone());
                    }
                    banned.insert(n.addr.clone(), n.banned.clone());
                }
                kept.insert(shard.nodes.iter().map(|n| n.addr.clone()).collect(), shard);
            }
        }
        let mut pool_for = |addr: &str, d: &DatabaseConfig| {
            let target = BackendTarget {
                addr: crate::net::ServerAddr::parse(addr).expect("validated at load"),
                database: d.server_database().to_string(),
                user: d.server_user.clone(),
                password: d.server_password.clone(),
                tls: tls.clone(),
            };
            pools
                .entry(target.clone())
                .or_insert_with(|| NodePool::new(target, &cfg.pool))
                .clone()
        };
        let databases = cfg
            .databases
            .iter()
            .map(|d| {
                let shards: Vec<Shard> = d
                    .shards
                    .iter()
                    .map(|s| {
                        let nodes: Vec<Node> = std::iter::once(&s.primary)
                            .chain(&s.replicas)
                            .enumerate()
                            .map(|(i, addr)| Node {
                                addr: addr.clone(),
                                pool: pool_for(addr, d),
                                weight: match &s.weights {
                                    Some(w) => w[i],
                                    None => 1,
                                },
                                banned: banned.get(addr).cloned().unwrap_or_default(),
                            })
                            .collect();
                        let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
                        if let Some(old) = kept.get(&addrs) {
                            return Shard::new(nodes, old.view(), old.stats.clone());
                        }
                        let view = ShardView {
                            primary: Some(0),
                            nodes: vec![
                                NodeState {
                                    up: true,
                                    ..NodeState::default()
                                };
                                nodes.len()
                            ],
                            readers: if d.read_from == ReadFrom::Any {
                                vec![0]
                            } else {
                                Vec::new()
                            },
                        };
                        Shard::new(nodes, Arc::new(view), Default::default())
                    })
                    .collect();
                let splits_reads = d.read_from != ReadFrom::Primary
                    && shards.iter().any(|s: &Shard| s.nodes.len() > 1);
                let db = Database {
                    splits_reads,
                    config: d.clone(),
                    router: Router::new(d),
                    shards,
                    roles: tokio::sync::Mutex::new(()),
                    failovers: Default::default(),
                    last_failover_ms: Default::default(),
                    deadlocks: Default::default(),
                    merge_limit_hits: Default::default(),
                    pre_evaluated: Default::default(),
                    user_aggregates: Default::default(),
                    user_aggregates_version: Default::default(),
                    catalog_rounds: Default::default(),
                    order_facts: Default::default(),
                    decisions_ready: Default::default(),
                    two_phase_prepared: Default::default(),
                    two_phase_commits: Default::default(),
                    recovered_commits: Default::default(),
                    recovered_rollbacks: Default::default(),
                    turn: Default::default(),
                    keys_ready: (0..d.sharded_tables.len() * d.shards.len())
                        .map(|_| Default::default())
                        .collect(),
                };
                (d.name.clone(), Arc::new(db))
            })
            .collect();
        Topology { databases }
    }

    /// Starts the health monitor of every database (on the current tokio runtime). Each
    /// stops when its database is dropped.
    pub fn start_monitors(&self) {
        for db in self.databases.values() {
            health::spawn(Arc::downgrade(db));
            crate::exec::twophase::spawn_recovery(Arc::downgrade(db));
            deadlock::spawn(Arc::downgrade(db));
        }
    }
}

/// A database of one shard with `nodes` nodes (no servers behind them), for unit tests;
/// `extra` adds database keys.
#[cfg(test)]
pub(crate) fn test_database(nodes: usize, extra: &str) -> Database {
    let replicas: Vec<String> = (1..nodes)
        .map(|i| format!("127.0.0.1:{}", 6000 + i))
        .collect();
    let yaml = format!(
        "users: [{{ name: a, password: a }}]\ndatabases:\n  - name: a\n    server_user: a\n    shards:\n      - {{ primary: 127.0.0.1:6000, replicas: [{}] }}\n{extra}",
        replicas.join(", ")
    );
    let cfg = crate::config::Config::from_yaml(&yaml).unwrap();
    let mut t = Topology::build(&cfg);
    Arc::try_unwrap(t.databases.remove("a").unwrap())
        .ok()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(db: &Database, lsns: &[u64], readers: &[usize]) {
        let nodes = lsns
            .iter()
            .enumerate()
            .map(|(n, &lsn)| NodeState {
                up: true,
                in_recovery: Some(n != 0),
                lsn,
                checked_at: Some(Instant::now()),
                check_started: Some(Instant::now()),
                ..NodeState::default()
            })
            .collect();
        db.shards[0].publish(ShardView {
            primary: Some(0),
            nodes,
            readers: readers.to_vec(),
        });
    }

    #[tokio::test]
    async fn weighted_round_robin_and_random() {
        let db = test_database(3, "    read_from: replicas\n    consistency: eventual\n");
        view(&db, &[10, 10, 10], &[1, 2]);
        let mut f = ReadFloor::default();
        let picks: Vec<usize> = (0..4).map(|_| db.pick_read(0, &mut f).unwrap()).collect();
        assert_eq!(picks, [1, 2, 1, 2]);
        // No reader: the primary.
        view(&db, &[10, 10, 10], &[]);
        assert_eq!(db.pick_read(0, &mut f).unwrap(), 0);

        let db = test_database(
            3,
            "    read_from: any\n    load_balance: random\n    consistency: eventual\n",
        )
        .with_weights(&[0, 1, 3]);
        view(&db, &[10, 10, 10], &[1, 2]);
        let mut count = [0; 3];
        for _ in 0..4000 {
            count[db.pick_read(0, &mut f).unwrap()] += 1;
        }
        assert_eq!(count[0], 0);
        assert!((800..1200).contains(&count[1]), "{count:?}");
    }

    #[tokio::test]
    async fn floors_keep_reads_from_going_back_in_time() {
        let db = test_database(3, "    read_from: replicas\n");
        view(&db, &[100, 90, 50], &[1, 2]);
        let mut f = ReadFloor::default();
        // After a commit at 95, no replica has it yet: the primary.
        db.wrote(0, &mut f, 95);
        assert_eq!(db.pick_read(0, &mut f).unwrap(), 0);
        // The primary's next check bounds what that read saw (100); node 1 reaches it.
        std::thread::sleep(std::time::Duration::from_millis(2));
        view(&db, &[100, 100, 60], &[1, 2]);
        assert_eq!(db.pick_read(0, &mut f).unwrap(), 1);
        // Until node 1 is checked again, reads stay on it (or go to the primary) even
        // though node 2 is a reader too.
        for _ in 0..5 {
            assert_eq!(db.pick_read(0, &mut f).unwrap(), 1);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        view(&db, &[130, 125, 125], &[1, 2]);
        // Both replicas have what the client saw; it sticks to the one it picks until
        // that one is checked again.
        let picks: std::collections::HashSet<usize> =
            (0..6).map(|_| db.pick_read(0, &mut f).unwrap()).collect();
        assert_eq!(picks.len(), 1);
        assert_ne!(picks.into_iter().next(), Some(0));
        assert_eq!(f.min_lsn, 125);
    }
}
