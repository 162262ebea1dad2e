//! Deadlocks across shards.
//!
//! A transaction over several shards holds locks on one shard (its connection there parked,
//! idle in transaction) while it waits on another. Two such transactions can wait for each
//! other in a cycle that no server sees: each server sees only a session waiting for an
//! idle one. PostgreSQL's own detector never fires, and both clients wait forever (or until
//! a `lock_timeout`).
//!
//! pgshard knows which server backends belong to which transaction: sessions register the
//! backends of their multi-shard transactions in [`TRANSACTIONS`]. A detector per database
//! reads the lock waits on its shards' primaries (`pg_blocking_pids`), merges the backends of
//! each registered transaction into one node of a wait-for graph, and looks for cycles whose
//! waits are on more than one server (a cycle on one server is PostgreSQL's to break). When
//! the same cycle is seen in two consecutive rounds, the youngest transaction in it (the one
//! that spanned shards last) is the victim: its waiting statement is cancelled, and its
//! client gets `40P01 deadlock detected`, as from PostgreSQL, so that retry logic written
//! for deadlocks works unchanged.
//!
//! Only transactions running through this pgshard process are known: a cycle that goes
//! through another pgshard or a client connected to the servers directly is not seen.

use super::{Control, Database};
use crate::net::ServerAddr;
use crate::protocol::PgError;
use bytes::BytesMut;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

/// A server backend of a multi-shard transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    pub shard: usize,
    pub addr: ServerAddr,
    pub pid: i32,
    pub secret: i32,
}

/// The multi-shard transactions of this process (touched when a transaction joins a shard
/// and when it ends, never per message).
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Entry>>,
}

struct Entry {
    participants: Vec<Participant>,
    victim: Arc<Mutex<Option<String>>>,
}

/// Every multi-shard transaction of this process. One registry for the process rather
/// than one per database: a backend is named by its server address and pid, unique over
/// databases and configuration reloads alike.
pub static TRANSACTIONS: LazyLock<Registry> = LazyLock::new(Registry::default);

/// A transaction's place in the registry; removed when dropped (at COMMIT, ROLLBACK, or when
/// the session ends).
pub struct Registration {
    id: u64,
    /// Set by the detector when the transaction is the victim: the detail of the error its
    /// cancelled statement becomes.
    victim: Arc<Mutex<Option<String>>>,
}

impl Registry {
    /// Registers a transaction with the backends it holds so far.
    pub fn register(&'static self, participants: Vec<Participant>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let victim = Arc::new(Mutex::new(None));
        self.lock().insert(
            id,
            Entry {
                participants,
                victim: victim.clone(),
            },
        );
        Registration { id, victim }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn snapshot(&self) -> Vec<(u64, Vec<Participant>)> {
        self.lock()
            .iter()
            .map(|(id, e)| (*id, e.participants.clone()))
            .collect()
    }

    /// Marks a transaction as the victim; false when it ended meanwhile.
    fn choose(&self, id: u64, detail: String) -> bool {
        match self.lock().get(&id) {
            Some(e) => {
                *e.victim.lock().unwrap_or_else(|e| e.into_inner()) = Some(detail);
                true
            }
            None => false,
        }
    }
}

impl Registration {
    /// The transaction now holds these backends.
    pub fn update(&self, participants: Vec<Participant>) {
        if let Some(e) = TRANSACTIONS.lock().get_mut(&self.id) {
            e.participants = participants;
        }
    }

    /// The error the client gets instead of `frame` (an ErrorResponse), when this is the
    /// cancellation of the transaction chosen as a deadlock's victim.
    pub fn deadlock_error(&self, frame: &[u8]) -> Option<BytesMut> {
        if crate::metrics::sqlstate_of(frame) != Some("57014") {
            return None;
        }
        let detail = self
            .victim
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        let mut out = BytesMut::new();
        PgError::new("40P01", "deadlock detected")
            .with_detail(detail)
            .with_hint("The transaction was rolled back on the shard where it waited; roll it back and retry it.")
            .write(&mut out);
        Some(out)
    }
}

impl Registration {
    /// [`Registration::deadlock_error`] over a statement's frames, in place.
    pub fn rewrite(&self, frames: &mut [BytesMut]) {
        for f in frames.iter_mut().filter(|f| f[0] == b'E') {
            if let Some(e) = self.deadlock_error(f) {
                *f = e;
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        TRANSACTIONS.lock().remove(&self.id);
    }
}

/// A lock wait on one shard's primary: backend `waiter` waits for backend `holder`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wait {
    shard: usize,
    addr: ServerAddr,
    waiter: i32,
    holder: i32,
}

/// A cycle of waits over several shards, and the transaction to cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Deadlock {
    victim: u64,
    /// The victim's backend that waits in the cycle.
    cancel: Participant,
    /// Registered transactions in the cycle, and backends of other sessions.
    transactions: usize,
    shards: Vec<usize>,
}

/// Cycles of `waits` that cross servers and go through registered transactions.
fn find(waits: &[Wait], transactions: &[(u64, Vec<Participant>)]) -> Vec<Deadlock> {
    // Graph nodes: each registered transaction (all its backends as one), and each other
    // backend on its own.
    let mut node_of: HashMap<(&ServerAddr, i32), usize> = HashMap::new();
    let mut txn_of_node: Vec<Option<u64>> = Vec::new();
    for (id, parts) in transactions {
        let n = txn_of_node.len();
        txn_of_node.push(Some(*id));
        for p in parts {
            node_of.insert((&p.addr, p.pid), n);
        }
    }
    let mut edges: Vec<(usize, usize, &Wait)> = Vec::new();
    for w in waits {
        let from = node(&mut node_of, &mut txn_of_node, &w.addr, w.waiter);
        let to = node(&mut node_of, &mut txn_of_node, &w.addr, w.holder);
        if from != to {
            edges.push((from, to, w));
        }
    }
    let n = txn_of_node.len();
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut inc: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &(a, b, _) in &edges {
        out[a].push(b);
        inc[b].push(a);
    }
    let reach = |start: usize, adj: &[Vec<usize>]| {
        let mut seen = vec![false; n];
        let mut queue = VecDeque::from([start]);
        seen[start] = true;
        while let Some(x) = queue.pop_front() {
            for &y in &adj[x] {
                if !seen[y] {
                    seen[y] = true;
                    queue.push_back(y);
                }
            }
        }
        seen
    };
    let mut done = vec![false; n];
    let mut found = Vec::new();
    for start in 0..n {
        if done[start] || txn_of_node[start].is_none() {
            continue;
        }
        // The strongly connected component of `start`: every node in it waits, through
        // the others, for itself.
        let (fwd, back) = (reach(start, &out), reach(start, &inc));
        let member: Vec<bool> = (0..n).map(|x| fwd[x] && back[x]).collect();
        for (x, m) in member.iter().enumerate() {
            done[x] |= *m;
        }
        let inside: Vec<&(usize, usize, &Wait)> = edges
            .iter()
            .filter(|(a, b, _)| member[*a] && member[*b])
            .collect();
        let servers: HashSet<&ServerAddr> = inside.iter().map(|(_, _, w)| &w.addr).collect();
        if servers.len() < 2 {
            continue;
        }
        let Some(victim) = (0..n)
            .filter(|&x| member[x])
            .filter_map(|x| txn_of_node[x].map(|id| (id, x)))
            .max()
        else {
            continue;
        };
        let parts = &transactions
            .iter()
            .find(|(id, _)| *id == victim.0)
            .expect("a registered node")
            .1;
        let Some(cancel) = inside
            .iter()
            .filter(|(a, _, _)| *a == victim.1)
            .find_map(|(_, _, w)| parts.iter().find(|p| p.addr == w.addr && p.pid == w.waiter))
            .cloned()
        else {
            continue;
        };
        let mut shards: Vec<usize> = inside.iter().map(|(_, _, w)| w.shard).collect();
        shards.sort_unstable();
        shards.dedup();
        found.push(Deadlock {
            victim: victim.0,
            cancel,
            transactions: (0..n)
                .filter(|&x| member[x] && txn_of_node[x].is_some())
                .count(),
            shards,
        });
    }
    found
}

/// The graph node of a backend: its transaction's, or a new one of its own.
fn node<'a>(
    node_of: &mut HashMap<(&'a ServerAddr, i32), usize>,
    txn_of_node: &mut Vec<Option<u64>>,
    addr: &'a ServerAddr,
    pid: i32,
) -> usize {
    *node_of.entry((addr, pid)).or_insert_with(|| {
        txn_of_node.push(None);
        txn_of_node.len() - 1
    })
}

/// The lock waits on a server: (waiting pid, blocking pid) pairs.
const WAITS_SQL: &str = "SELECT pid, array_to_string(pg_blocking_pids(pid), ',') \
     FROM pg_stat_activity WHERE wait_event_type = 'Lock'";

/// Runs the detector of one database while it lives (`deadlock_detection_ms`; 0: none).
pub(super) fn spawn(db: Weak<Database>) {
    tokio::spawn(async move {
        let Some(d) = db.upgrade() else { return };
        let every = d.config.deadlock_detection_ms;
        if every == 0 || d.shards.len() < 2 {
            return;
        }
        let mut controls: Vec<Vec<Control>> = d
            .shards
            .iter()
            .map(|s| s.nodes.iter().map(|n| Control::new(&d, n)).collect())
            .collect();
        drop(d);
        let mut seen: HashSet<(u64, i32)> = HashSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(d) = db.upgrade() else { return };
            // Only while a transaction spans this database's servers: otherwise there is
            // nothing to find, and the primaries are not asked.
            let transactions = TRANSACTIONS.snapshot();
            let ours = transactions.iter().flat_map(|(_, p)| p).any(|p| {
                d.shards
                    .iter()
                    .any(|s| s.nodes.iter().any(|n| n.pool.target.addr == p.addr))
            });
            if !ours {
                seen.clear();
                continue;
            }
            let waits = read_waits(&d, &mut controls).await;
            let found = find(&waits, &transactions);
            let now: HashSet<(u64, i32)> = found.iter().map(|f| (f.victim, f.cancel.pid)).collect();
            for dl in found {
                // A cycle read from several servers at slightly different times could be
                // made of waits that never coexisted; one seen twice, a round apart, is
                // real (a deadlock does not go away by itself).
                if seen.contains(&(dl.victim, dl.cancel.pid)) {
                    break_deadlock(&d, dl).await;
                }
            }
            seen = now;
        }
    });
}

async fn read_waits(d: &Database, controls: &mut [Vec<Control>]) -> Vec<Wait> {
    let mut waits = Vec::new();
    for (s, shard) in d.shards.iter().enumerate() {
        let Ok(p) = d.primary(s) else { continue };
        let addr = shard.nodes[p].pool.target.addr.clone();
        match controls[s][p].query(WAITS_SQL).await {
            Ok(rows) => {
                for row in rows {
                    let waiter = row.first().cloned().flatten().and_then(|v| v.parse().ok());
                    let holders = row.get(1).cloned().flatten().unwrap_or_default();
                    let Some(waiter) = waiter else { continue };
                    for h in holders.split(',').filter_map(|h| h.trim().parse().ok()) {
                        waits.push(Wait {
                            shard: s,
                            addr: addr.clone(),
                            waiter,
                            holder: h,
                        });
                    }
                }
            }
            Err(e) => {
                tracing::debug!(database = %d.config.name, shard = s, error = %e, "cannot read lock waits");
            }
        }
    }
    waits
}

async fn break_deadlock(d: &Database, dl: Deadlock) {
    let detail = format!(
        "This transaction and {} other(s) waited for each other's locks in a cycle over shards {:?}, which no single server can see; pgshard cancelled this one, the youngest, on shard {}.",
        dl.transactions.saturating_sub(1),
        dl.shards,
        dl.cancel.shard,
    );
    if !TRANSACTIONS.choose(dl.victim, detail) {
        return;
    }
    tracing::warn!(
        database = %d.config.name,
        shards = ?dl.shards,
        victim_shard = dl.cancel.shard,
        victim_pid = dl.cancel.pid,
        "deadlock across shards: cancelling the youngest transaction's wait"
    );
    d.deadlocks.fetch_add(1, Ordering::Relaxed);
    if let Err(e) =
        crate::backend::BackendConn::cancel(&dl.cancel.addr, dl.cancel.pid, dl.cancel.secret).await
    {
        tracing::warn!(error = %e, "cannot send the cancel request that breaks a deadlock");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> ServerAddr {
        ServerAddr::parse(&format!("127.0.0.1:{port}")).unwrap()
    }

    fn part(shard: usize, pid: i32) -> Participant {
        Participant {
            shard,
            addr: addr(5000 + shard as u16),
            pid,
            secret: pid * 10,
        }
    }

    fn wait(shard: usize, waiter: i32, holder: i32) -> Wait {
        Wait {
            shard,
            addr: addr(5000 + shard as u16),
            waiter,
            holder,
        }
    }

    #[test]
    fn a_cycle_over_two_shards_cancels_the_youngest_where_it_waits() {
        // T1 holds on shard 0 (pid 10), waits on shard 1 (pid 11) for T2's pid 21;
        // T2 holds on shard 1 (pid 21), waits on shard 0 (pid 20) for T1's pid 10.
        let txns = vec![
            (1, vec![part(0, 10), part(1, 11)]),
            (2, vec![part(1, 21), part(0, 20)]),
        ];
        let waits = vec![wait(1, 11, 21), wait(0, 20, 10)];
        let found = find(&waits, &txns);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].victim, 2);
        assert_eq!(found[0].cancel, part(0, 20));
        assert_eq!(found[0].shards, [0, 1]);
        assert_eq!(found[0].transactions, 2);
    }

    #[test]
    fn waits_without_a_cycle_or_on_one_server_are_left_alone() {
        let txns = vec![
            (1, vec![part(0, 10), part(1, 11)]),
            (2, vec![part(1, 21), part(0, 20)]),
        ];
        // T1 waits for T2, T2 waits for nobody.
        assert!(find(&[wait(1, 11, 21)], &txns).is_empty());
        // A cycle on one server is PostgreSQL's to break.
        let local = [wait(0, 20, 10), wait(0, 10, 20)];
        assert!(find(&local, &txns).is_empty());
        // Unregistered backends only.
        assert!(find(&[wait(0, 1, 2), wait(1, 2, 1)], &[]).is_empty());
    }

    #[test]
    fn a_cycle_through_a_one_shard_session_is_found() {
        // T1 waits on shard 1 for a plain session (pid 30), which waits on shard 1 for T2;
        // T2 waits on shard 0 for T1.
        let txns = vec![
            (1, vec![part(0, 10), part(1, 11)]),
            (7, vec![part(1, 21), part(0, 20)]),
        ];
        let waits = [wait(1, 11, 30), wait(1, 30, 21), wait(0, 20, 10)];
        let found = find(&waits, &txns);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].victim, found[0].cancel.pid), (7, 20));
        // The same pid on another server is another backend: no cycle.
        let elsewhere = [wait(1, 11, 30), wait(0, 30, 21), wait(0, 20, 10)];
        assert!(find(&elsewhere, &txns).is_empty());
    }

    #[test]
    fn only_the_chosen_victims_cancellation_becomes_a_deadlock_error() {
        let r = TRANSACTIONS.register(vec![part(0, 1)]);
        let mut cancel = BytesMut::new();
        PgError::new("57014", "canceling statement due to user request").write(&mut cancel);
        let mut other = BytesMut::new();
        PgError::new("23505", "duplicate key").write(&mut other);
        assert!(r.deadlock_error(&cancel).is_none());
        assert!(TRANSACTIONS.choose(r.id, "cycle".into()));
        assert!(r.deadlock_error(&other).is_none());
        let e = r.deadlock_error(&cancel).expect("rewritten");
        assert_eq!(crate::metrics::sqlstate_of(&e), Some("40P01"));
        // Once.
        assert!(r.deadlock_error(&cancel).is_none());
        let id = r.id;
        drop(r);
        assert!(!TRANSACTIONS.choose(id, "gone".into()));
    }
}
