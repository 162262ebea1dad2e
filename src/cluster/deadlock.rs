//! Deadlocks across shards.
//!
//! A transaction over several shards holds locks on one shard (its connection there parked,
//! idle in transaction) while it waits on another. Two such transactions can wait for each
//! other in a cycle that no server sees: each server sees only a session waiting for an
//! idle one. PostgreSQL's own detector never fires, and both clients wait forever (or until
//! a `lock_timeout`).
//!
//! Each multi-shard transaction gets an id, [`Txn`]: when it started, a random number for
//! the pgshard process, and a counter. Its backends carry it as their `application_name`
//! for the transaction (`set_config(..., true)`), and this process also registers them in
//! [`TRANSACTIONS`]. A detector per database reads the backends on its shards' primaries
//! (`pg_stat_activity`, and `pg_blocking_pids` for those waiting on a lock), makes the
//! backends of each transaction one node of a wait-for graph, and looks for cycles whose
//! waits are on more than one server (a cycle on one server is PostgreSQL's to break).
//! Since the ids are on the servers, every pgshard process sees the same graph, and picks
//! the same victim: the youngest transaction in the cycle. The process it belongs to, when
//! it has seen the cycle in two consecutive rounds, cancels its waiting statement, and its
//! client gets `40P01 deadlock detected`, as from PostgreSQL, so that retry logic written
//! for deadlocks works unchanged.
//!
//! A cycle through other sessions (holding locks on one shard only, or connected to the
//! servers directly) is found too, each of their backends a node of its own; the victim is
//! always a multi-shard transaction.

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

/// A multi-shard transaction's id, the same in every pgshard process and on the servers.
/// Ordered by age: the greatest is the youngest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Txn {
    /// When it began to span shards, in microseconds since the Unix epoch.
    start: u64,
    /// The pgshard process it runs in ([`NONCE`]).
    process: u64,
    id: u64,
}

/// This process's number in transaction ids.
static NONCE: LazyLock<u64> = LazyLock::new(rand::random);

impl Txn {
    /// Its form as an `application_name` (at most 63 bytes, as PostgreSQL keeps).
    fn tag(&self) -> String {
        format!("pgshard:{}:{:x}:{}", self.start, self.process, self.id)
    }

    fn parse(tag: &str) -> Option<Txn> {
        let mut p = tag.strip_prefix("pgshard:")?.split(':');
        let txn = Txn {
            start: p.next()?.parse().ok()?,
            process: u64::from_str_radix(p.next()?, 16).ok()?,
            id: p.next()?.parse().ok()?,
        };
        p.next().is_none().then_some(txn)
    }

    fn ours(&self) -> bool {
        self.process == *NONCE
    }
}

/// The multi-shard transactions of this process (touched when a transaction joins a shard
/// and when it ends, never per message).
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Entry>>,
}

struct Entry {
    txn: Txn,
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
    txn: Txn,
    /// Set by the detector when the transaction is the victim: the detail of the error its
    /// cancelled statement becomes.
    victim: Arc<Mutex<Option<String>>>,
}

impl Registry {
    /// Registers a transaction with the backends it holds so far.
    pub fn register(&'static self, participants: Vec<Participant>) -> Registration {
        let txn = Txn {
            start: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            process: *NONCE,
            id: self.next.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let victim = Arc::new(Mutex::new(None));
        self.lock().insert(
            txn.id,
            Entry {
                txn,
                participants,
                victim: victim.clone(),
            },
        );
        Registration { txn, victim }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn snapshot(&self) -> Vec<(Txn, Vec<Participant>)> {
        self.lock()
            .values()
            .map(|e| (e.txn, e.participants.clone()))
            .collect()
    }

    /// Marks a transaction of this process as the victim: its backend `(addr, pid)`, to
    /// cancel; None when it ended meanwhile.
    fn choose(&self, txn: Txn, addr: &ServerAddr, pid: i32, detail: String) -> Option<Participant> {
        let map = self.lock();
        let e = map.get(&txn.id).filter(|e| e.txn == txn)?;
        let p = e
            .participants
            .iter()
            .find(|p| &p.addr == addr && p.pid == pid)?
            .clone();
        *e.victim.lock().unwrap_or_else(|e| e.into_inner()) = Some(detail);
        Some(p)
    }
}

impl Registration {
    /// The transaction now holds these backends.
    pub fn update(&self, participants: Vec<Participant>) {
        if let Some(e) = TRANSACTIONS.lock().get_mut(&self.txn.id) {
            e.participants = participants;
        }
    }

    /// The query that marks a backend as this transaction's, for the rest of it (for the
    /// detectors of every pgshard process).
    pub fn tag_sql(&self) -> String {
        format!(
            "SELECT set_config('application_name', {}, true)",
            crate::sql::quote_literal(&self.txn.tag())
        )
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
        TRANSACTIONS.lock().remove(&self.txn.id);
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

/// What the detector read on the primaries: lock waits, and the backends marked as a
/// multi-shard transaction's (by any pgshard process).
#[derive(Debug, Default)]
struct Seen {
    waits: Vec<Wait>,
    tagged: HashMap<(ServerAddr, i32), Txn>,
}

/// A cycle of waits over several shards, and the transaction to cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Deadlock {
    /// The youngest transaction in the cycle.
    victim: Txn,
    /// Its backend that waits in the cycle: shard, server, pid.
    waiter: (usize, ServerAddr, i32),
    /// Transactions in the cycle (other sessions' backends not counted).
    transactions: usize,
    shards: Vec<usize>,
}

/// A graph node: a multi-shard transaction (all its backends), or another backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Node {
    Txn(Txn),
    Backend(ServerAddr, i32),
}

/// Cycles of waits that cross servers and go through multi-shard transactions.
fn find(seen: &Seen, local: &[(Txn, Vec<Participant>)]) -> Vec<Deadlock> {
    let mut txn_of: HashMap<(&ServerAddr, i32), Txn> = seen
        .tagged
        .iter()
        .map(|((a, p), t)| ((a, *p), *t))
        .collect();
    // This process's transactions, also when a tag did not reach a server.
    for (t, parts) in local {
        for p in parts {
            txn_of.insert((&p.addr, p.pid), *t);
        }
    }
    let mut index: HashMap<Node, usize> = HashMap::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut node = |addr: &ServerAddr, pid: i32| {
        let n = match txn_of.get(&(addr, pid)) {
            Some(t) => Node::Txn(*t),
            None => Node::Backend(addr.clone(), pid),
        };
        *index.entry(n.clone()).or_insert_with(|| {
            nodes.push(n);
            nodes.len() - 1
        })
    };
    let mut edges: Vec<(usize, usize, &Wait)> = Vec::new();
    for w in &seen.waits {
        let (from, to) = (node(&w.addr, w.waiter), node(&w.addr, w.holder));
        if from != to {
            edges.push((from, to, w));
        }
    }
    let n = nodes.len();
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
    let txn = |x: usize| match nodes[x] {
        Node::Txn(t) => Some(t),
        Node::Backend(..) => None,
    };
    let mut done = vec![false; n];
    let mut found = Vec::new();
    for start in 0..n {
        if done[start] || txn(start).is_none() {
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
        let Some((victim, v)) = (0..n)
            .filter(|&x| member[x])
            .filter_map(|x| txn(x).map(|t| (t, x)))
            .max()
        else {
            continue;
        };
        let Some((_, _, w)) = inside.iter().find(|(a, _, _)| *a == v) else {
            continue;
        };
        let mut shards: Vec<usize> = inside.iter().map(|(_, _, w)| w.shard).collect();
        shards.sort_unstable();
        shards.dedup();
        found.push(Deadlock {
            victim,
            waiter: (w.shard, w.addr.clone(), w.waiter),
            transactions: (0..n).filter(|&x| member[x] && txn(x).is_some()).count(),
            shards,
        });
    }
    found
}

/// The backends of a server that wait on a lock (with the pids they wait for) or belong
/// to a multi-shard transaction.
const BACKENDS_SQL: &str = "SELECT pid, application_name, \
     CASE WHEN wait_event_type = 'Lock' THEN array_to_string(pg_blocking_pids(pid), ',') END \
     FROM pg_stat_activity \
     WHERE wait_event_type = 'Lock' OR application_name LIKE 'pgshard:%'";

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
        let mut before: HashSet<(Txn, i32)> = HashSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(d) = db.upgrade() else { return };
            let local = TRANSACTIONS.snapshot();
            let seen = read_backends(&d, &mut controls).await;
            // Nothing spans shards here, in this process or another: nothing to find.
            if local.is_empty() && seen.tagged.is_empty() {
                before.clear();
                continue;
            }
            let found = find(&seen, &local);
            let now: HashSet<(Txn, i32)> = found.iter().map(|f| (f.victim, f.waiter.2)).collect();
            for dl in found {
                // A cycle read from several servers at slightly different times could be
                // made of waits that never coexisted; one seen twice, a round apart, is
                // real (a deadlock does not go away by itself). Every process finds the
                // same victim; the one it belongs to cancels it.
                if dl.victim.ours() && before.contains(&(dl.victim, dl.waiter.2)) {
                    break_deadlock(&d, dl).await;
                }
            }
            before = now;
        }
    });
}

async fn read_backends(d: &Database, controls: &mut [Vec<Control>]) -> Seen {
    let mut seen = Seen::default();
    for (s, shard) in d.shards.iter().enumerate() {
        let Ok(p) = d.primary(s) else { continue };
        let addr = shard.nodes[p].pool.target.addr.clone();
        let rows = match controls[s][p].query(BACKENDS_SQL).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(database = %d.config.name, shard = s, error = %e, "cannot read lock waits");
                continue;
            }
        };
        for row in rows {
            let col = |i: usize| row.get(i).cloned().flatten();
            let Some(pid) = col(0).and_then(|v| v.parse().ok()) else {
                continue;
            };
            if let Some(t) = col(1).as_deref().and_then(Txn::parse) {
                seen.tagged.insert((addr.clone(), pid), t);
            }
            for h in col(2).unwrap_or_default().split(',') {
                if let Ok(holder) = h.trim().parse() {
                    seen.waits.push(Wait {
                        shard: s,
                        addr: addr.clone(),
                        waiter: pid,
                        holder,
                    });
                }
            }
        }
    }
    seen
}

async fn break_deadlock(d: &Database, dl: Deadlock) {
    let (shard, addr, pid) = &dl.waiter;
    let detail = format!(
        "This transaction and {} other(s) waited for each other's locks in a cycle over shards {:?}, which no single server can see; pgshard cancelled this one, the youngest, on shard {shard}.",
        dl.transactions.saturating_sub(1),
        dl.shards,
    );
    let Some(p) = TRANSACTIONS.choose(dl.victim, addr, *pid, detail) else {
        return;
    };
    tracing::warn!(
        database = %d.config.name,
        shards = ?dl.shards,
        victim_shard = shard,
        victim_pid = pid,
        "deadlock across shards: cancelling the youngest transaction's wait"
    );
    d.deadlocks.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = crate::backend::BackendConn::cancel(&p.addr, p.pid, p.secret).await {
        tracing::warn!(error = %e, "cannot send the cancel request that breaks a deadlock");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(shard: usize) -> ServerAddr {
        ServerAddr::parse(&format!("127.0.0.1:{}", 5000 + shard)).unwrap()
    }

    fn part(shard: usize, pid: i32) -> Participant {
        Participant {
            shard,
            addr: addr(shard),
            pid,
            secret: pid * 10,
        }
    }

    fn wait(shard: usize, waiter: i32, holder: i32) -> Wait {
        Wait {
            shard,
            addr: addr(shard),
            waiter,
            holder,
        }
    }

    fn txn(start: u64, process: u64) -> Txn {
        Txn {
            start,
            process,
            id: 1,
        }
    }

    fn seen(waits: Vec<Wait>, tagged: &[(usize, i32, Txn)]) -> Seen {
        Seen {
            waits,
            tagged: tagged
                .iter()
                .map(|&(s, pid, t)| ((addr(s), pid), t))
                .collect(),
        }
    }

    #[test]
    fn ids_survive_application_name() {
        let t = Txn {
            start: 1_763_822_400_123_456,
            process: u64::MAX,
            id: u64::MAX,
        };
        assert!(t.tag().len() <= 63, "{}", t.tag());
        assert_eq!(Txn::parse(&t.tag()), Some(t));
        for bad in ["psql", "pgshard:1:2", "pgshard:x:1:1", "pgshard:1:1:1:1"] {
            assert_eq!(Txn::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_cycle_over_two_shards_cancels_the_youngest_where_it_waits() {
        // T1 holds on shard 0 (pid 10), waits on shard 1 (pid 11) for T2's pid 21;
        // T2 holds on shard 1 (pid 21), waits on shard 0 (pid 20) for T1's pid 10.
        // T1 is this process's (registered, not tagged), T2 another's (tagged only).
        let (t1, t2) = (txn(100, 7), txn(200, 8));
        let local = vec![(t1, vec![part(0, 10), part(1, 11)])];
        let s = seen(
            vec![wait(1, 11, 21), wait(0, 20, 10)],
            &[(1, 21, t2), (0, 20, t2)],
        );
        let found = find(&s, &local);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].victim, t2);
        assert_eq!(found[0].waiter, (0, addr(0), 20));
        assert_eq!(found[0].shards, [0, 1]);
        assert_eq!(found[0].transactions, 2);
        // Seen from the other process, the same victim.
        let s = seen(
            vec![wait(1, 11, 21), wait(0, 20, 10)],
            &[(0, 10, t1), (1, 11, t1)],
        );
        let local = vec![(t2, vec![part(1, 21), part(0, 20)])];
        assert_eq!(find(&s, &local), found);
    }

    #[test]
    fn waits_without_a_cycle_or_on_one_server_are_left_alone() {
        let (t1, t2) = (txn(1, 1), txn(2, 1));
        let tagged = [(0, 10, t1), (1, 11, t1), (1, 21, t2), (0, 20, t2)];
        // T1 waits for T2, T2 waits for nobody.
        assert!(find(&seen(vec![wait(1, 11, 21)], &tagged), &[]).is_empty());
        // A cycle on one server is PostgreSQL's to break.
        let local = [wait(0, 20, 10), wait(0, 10, 20)];
        assert!(find(&seen(local.to_vec(), &tagged), &[]).is_empty());
        // Untagged backends only.
        assert!(find(&seen(vec![wait(0, 1, 2), wait(1, 2, 1)], &[]), &[]).is_empty());
    }

    #[test]
    fn a_cycle_through_a_one_shard_session_is_found() {
        // T1 waits on shard 1 for a plain session (pid 30), which waits on shard 1 for T2;
        // T2 waits on shard 0 for T1.
        let (t1, t2) = (txn(1, 1), txn(9, 1));
        let tagged = [(0, 10, t1), (1, 11, t1), (1, 21, t2), (0, 20, t2)];
        let waits = vec![wait(1, 11, 30), wait(1, 30, 21), wait(0, 20, 10)];
        let found = find(&seen(waits, &tagged), &[]);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].victim, found[0].waiter.2), (t2, 20));
        // The same pid on another server is another backend: no cycle.
        let elsewhere = vec![wait(1, 11, 30), wait(0, 30, 21), wait(0, 20, 10)];
        assert!(find(&seen(elsewhere, &tagged), &[]).is_empty());
    }

    #[test]
    fn only_the_chosen_victims_cancellation_becomes_a_deadlock_error() {
        let r = TRANSACTIONS.register(vec![part(0, 1)]);
        assert!(r.tag_sql().contains(&format!("'{}'", r.txn.tag())));
        let mut cancel = BytesMut::new();
        PgError::new("57014", "canceling statement due to user request").write(&mut cancel);
        let mut other = BytesMut::new();
        PgError::new("23505", "duplicate key").write(&mut other);
        assert!(r.deadlock_error(&cancel).is_none());
        // Not its backend: nothing chosen.
        assert_eq!(TRANSACTIONS.choose(r.txn, &addr(0), 2, "x".into()), None);
        assert_eq!(
            TRANSACTIONS.choose(r.txn, &addr(0), 1, "cycle".into()),
            Some(part(0, 1))
        );
        assert!(r.deadlock_error(&other).is_none());
        let e = r.deadlock_error(&cancel).expect("rewritten");
        assert_eq!(crate::metrics::sqlstate_of(&e), Some("40P01"));
        // Once.
        assert!(r.deadlock_error(&cancel).is_none());
        let t = r.txn;
        drop(r);
        assert_eq!(TRANSACTIONS.choose(t, &addr(0), 1, "gone".into()), None);
    }
}
