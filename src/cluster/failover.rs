//! Which node of a shard is its primary, fencing of stale primaries, and promotion of a
//! replica when the primary is down.
//!
//! Every pgshard process decides from what the nodes themselves report, with the same
//! rules, so that several processes over one configuration agree: among the nodes that
//! claim to be primary the one on the highest timeline wins; a node that claims to be
//! primary on an older timeline than the primary we know of is an old primary back from
//! the dead and is fenced. A failover promotes the replica that received the most WAL
//! (ties: configuration order), and a process that finds a replica already promoted by
//! another adopts it instead of promoting a second one.

use super::health::{Control, Probe};
use super::{Database, NodeState, ShardView};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Why a failover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("shard {0} does not exist")]
    NoSuchShard(usize),
    #[error("shard {0} has no node {1}")]
    NoSuchNode(usize, usize),
    #[error("shard {0} has no healthy replica to promote")]
    NoCandidate(usize),
    #[error("node {0} is not a replica")]
    NotReplica(String),
    #[error("promoting {0} failed: {1}")]
    Promote(String, String),
    #[error("switchover refused: {0}")]
    Switchover(String),
}

/// Decides the primary of a shard after a round of checks; fences and unfences nodes.
pub(super) fn resolve_roles(
    db: &Database,
    s: usize,
    prev: &ShardView,
    nodes: &mut [NodeState],
) -> Option<usize> {
    let addr = |n: usize| db.shards[s].nodes[n].addr.as_str();
    for (n, st) in nodes.iter_mut().enumerate() {
        if st.fenced && st.failures == 0 && st.in_recovery == Some(true) {
            tracing::warn!(shard = s, node = %addr(n), "fenced node rejoined as a replica; unfenced");
            st.fenced = false;
        }
    }
    let known = prev.primary;
    let known_tl = known.map(|p| prev.nodes[p].timeline).unwrap_or(0);
    let mut claimants = Vec::new();
    for (n, st) in nodes.iter_mut().enumerate() {
        if st.failures > 0 || st.in_recovery != Some(false) || st.fenced {
            continue;
        }
        if Some(n) != known && st.timeline < known_tl {
            tracing::error!(
                shard = s,
                node = %addr(n),
                timeline = st.timeline,
                primary_timeline = known_tl,
                "node claims to be primary on an older timeline: fenced (rejoin it as a replica with pg_rewind)"
            );
            st.fenced = true;
            continue;
        }
        claimants.push(n);
    }
    let Some(&winner) = claimants
        .iter()
        .max_by_key(|&&n| (nodes[n].timeline, Some(n) == known, std::cmp::Reverse(n)))
    else {
        // Nobody claims the role this round: keep the primary we know even when its checks
        // fail (writes to it fail fast, and a failover replaces it), but never one that
        // reported being in recovery.
        return known.filter(|&p| nodes[p].in_recovery != Some(true));
    };
    for &n in &claimants {
        if n != winner {
            tracing::error!(
                shard = s,
                node = %addr(n),
                primary = %addr(winner),
                "two nodes claim to be primary: this one lost (lower timeline) and is fenced"
            );
            nodes[n].fenced = true;
        }
    }
    if known != Some(winner) {
        tracing::warn!(shard = s, primary = %addr(winner), timeline = nodes[winner].timeline, "shard primary");
    }
    Some(winner)
}

/// Whether the shard has no working primary (and a failover should run).
pub(super) fn primary_down(db: &Database, v: &ShardView) -> bool {
    let _ = db;
    v.nodes.len() > 1 && v.primary.is_none_or(|p| !v.nodes[p].up)
}

/// Promotes a replica of shard `s` (`to`, or the most advanced one) and makes it the
/// shard's primary. Returns the new primary's node index.
pub(super) async fn run(
    db: &Arc<Database>,
    s: usize,
    to: Option<usize>,
    controls: &mut [Control],
) -> Result<usize, FailoverError> {
    let started = Instant::now();
    let shard = &db.shards[s];
    let _guard = db.roles.lock().await;
    let prev = shard.view();
    let old = prev.primary;
    // Fresh positions: the monitor's may predate the last WAL the replicas received.
    let mut probes: Vec<Option<Probe>> = Vec::with_capacity(controls.len());
    for (n, c) in controls.iter_mut().enumerate() {
        let p = if Some(n) == old || prev.nodes[n].fenced || shard.nodes[n].is_banned() {
            None
        } else {
            c.probe().await.ok()
        };
        probes.push(p);
    }
    // Another pgshard may have promoted one already: adopt it.
    let adopted = probes
        .iter()
        .enumerate()
        .filter_map(|(n, p)| p.filter(|p| !p.in_recovery).map(|p| (n, p)))
        .max_by_key(|(n, p)| (p.timeline, std::cmp::Reverse(*n)));
    let (chosen, probe) = if let Some((n, p)) = adopted.filter(|(n, _)| to.is_none_or(|t| t == *n))
    {
        tracing::warn!(shard = s, node = %shard.nodes[n].addr, "replica was already promoted; adopting it");
        (n, p)
    } else {
        let candidate = match to {
            Some(t) => {
                if t >= shard.nodes.len() {
                    return Err(FailoverError::NoSuchNode(s, t));
                }
                if probes[t].is_none_or(|p| !p.in_recovery) {
                    return Err(FailoverError::NotReplica(shard.nodes[t].addr.clone()));
                }
                t
            }
            None => probes
                .iter()
                .enumerate()
                .filter_map(|(n, p)| p.filter(|p| p.in_recovery).map(|p| (n, p)))
                .max_by_key(|(n, p)| (p.receive_lsn, std::cmp::Reverse(*n)))
                .map(|(n, _)| n)
                .ok_or(FailoverError::NoCandidate(s))?,
        };
        let addr = shard.nodes[candidate].addr.clone();
        tracing::warn!(shard = s, node = %addr, "promoting replica");
        match controls[candidate]
            .query_slow(
                "SELECT pg_catalog.pg_promote(true, 60)",
                Duration::from_secs(70),
            )
            .await
        {
            Ok(rows) if rows.first().and_then(|r| r[0].as_deref()) == Some("t") => {}
            Ok(_) => {
                return Err(FailoverError::Promote(
                    addr,
                    "pg_promote returned false".into(),
                ));
            }
            // Promoted by someone else between our probe and our call.
            Err(e) if e.contains("recovery is not in progress") => {}
            Err(e) => return Err(FailoverError::Promote(addr, e)),
        }
        let p = controls[candidate]
            .probe()
            .await
            .map_err(|e| FailoverError::Promote(addr.clone(), e))?;
        if p.in_recovery {
            return Err(FailoverError::Promote(
                addr,
                "still in recovery after pg_promote".into(),
            ));
        }
        (candidate, p)
    };
    let mut view = (*prev).clone();
    let now = Instant::now();
    let st = &mut view.nodes[chosen];
    st.in_recovery = Some(false);
    st.timeline = probe.timeline;
    st.lsn = probe.lsn;
    st.receive_lsn = probe.lsn;
    st.up = true;
    st.failures = 0;
    st.checked_at = Some(now);
    // Its position was read before the promotion: the next check bounds reads.
    st.check_started = None;
    st.lag_bytes = 0;
    st.lag_ms = 0;
    if let Some(o) = old.filter(|&o| o != chosen) {
        // Whatever state it is in, the old primary gets no more traffic until it
        // rejoins as a replica.
        view.nodes[o].fenced = true;
    }
    view.primary = Some(chosen);
    view.readers
        .retain(|&n| n != chosen || db.config.read_from == crate::config::ReadFrom::Any);
    shard.publish(view);
    db.failovers.fetch_add(1, Ordering::Relaxed);
    db.last_failover_ms
        .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    drop(_guard);
    // The other replicas follow the new primary (recovery_target_timeline 'latest' lets
    // them cross to its timeline).
    let new_addr = shard.nodes[chosen].addr.clone();
    for (n, c) in controls.iter_mut().enumerate() {
        if n == chosen || probes[n].is_none_or(|p| !p.in_recovery) {
            continue;
        }
        if let Err(e) = repoint(c, &new_addr).await {
            tracing::error!(shard = s, node = %shard.nodes[n].addr, error = %e, "could not point replica at the new primary");
        }
    }
    Ok(chosen)
}

async fn repoint(c: &mut Control, primary: &str) -> Result<(), String> {
    let rows = c
        .query("SELECT pg_catalog.current_setting('primary_conninfo')")
        .await?;
    let old = rows.first().and_then(|r| r[0].clone()).unwrap_or_default();
    let sa = crate::net::ServerAddr::parse(primary)?;
    let new = with_host(&old, &sa.host(), sa.port());
    c.query(&format!(
        "ALTER SYSTEM SET primary_conninfo = {}",
        crate::sql::quote_literal(&new)
    ))
    .await?;
    c.query("SELECT pg_catalog.pg_reload_conf()").await?;
    Ok(())
}

/// A libpq connection string with its host (an address or a socket directory) and port
/// replaced.
pub(super) fn with_host(conninfo: &str, host: &str, port: u16) -> String {
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut out: Vec<String> = parse_conninfo(conninfo)
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "host" | "hostaddr" | "port"))
        .map(|(k, v)| format!("{k}={}", quote(&v)))
        .collect();
    out.push(format!("host={}", quote(host)));
    out.push(format!("port={port}"));
    out.join(" ")
}

/// `key=value` pairs of a libpq connection string (values may be single-quoted, with
/// backslash escapes).
fn parse_conninfo(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == '=') {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

impl Database {
    /// Promotes a replica of `shard` by hand (`to`: its node index, or the most advanced
    /// replica), whatever the primary's health. Returns the new primary's node index.
    ///
    /// With a primary that is still running, writes other pgshard processes send it until
    /// their next check (they then fence it, as its timeline is older) are not on the new
    /// primary: stop the old primary first.
    pub async fn failover(
        self: &Arc<Self>,
        shard: usize,
        to: Option<usize>,
    ) -> Result<usize, FailoverError> {
        let s = self
            .shards
            .get(shard)
            .ok_or(FailoverError::NoSuchShard(shard))?;
        let mut controls: Vec<Control> = s.nodes.iter().map(|n| Control::new(self, n)).collect();
        run(self, shard, to, &mut controls).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_gets_the_new_host() {
        let old = "user=postgres passfile='/root/.pgpass' channel_binding=prefer host=127.0.0.1 port=5433 sslmode=prefer";
        let new = with_host(old, "127.0.0.1", 6000);
        let parsed = parse_conninfo(&new);
        assert!(parsed.contains(&("port".into(), "6000".into())), "{new}");
        assert!(parsed.contains(&("host".into(), "127.0.0.1".into())));
        assert!(parsed.contains(&("passfile".into(), "/root/.pgpass".into())));
        assert_eq!(parsed.iter().filter(|(k, _)| k == "port").count(), 1);
        let on_socket = parse_conninfo(&with_host(old, "/run/it's", 5432));
        assert!(on_socket.contains(&("host".into(), "/run/it's".into())));
        let q = parse_conninfo(r"password='a \'b\' c' dbname=x");
        assert_eq!(q[0], ("password".into(), "a 'b' c".into()));
        assert_eq!(q[1], ("dbname".into(), "x".into()));
    }

    fn st(recovery: bool, timeline: u32) -> NodeState {
        NodeState {
            up: true,
            in_recovery: Some(recovery),
            timeline,
            ..NodeState::default()
        }
    }

    fn db(nodes: usize) -> Database {
        super::super::test_database(nodes, "")
    }

    #[tokio::test]
    async fn highest_timeline_wins_and_stale_primaries_are_fenced() {
        let d = db(3);
        let prev = ShardView {
            primary: Some(0),
            nodes: vec![st(false, 1), st(true, 1), st(true, 1)],
            readers: vec![],
        };
        // Node 1 was promoted (by another pgshard): it wins, node 0 is fenced.
        let mut nodes = vec![st(false, 1), st(false, 2), st(true, 1)];
        assert_eq!(resolve_roles(&d, 0, &prev, &mut nodes), Some(1));
        assert!(nodes[0].fenced && !nodes[1].fenced);
        // Later the old primary comes back alone (node 1 down): it stays fenced.
        let prev = ShardView {
            primary: Some(1),
            nodes: nodes.clone(),
            readers: vec![],
        };
        nodes[1].failures = 5;
        nodes[1].up = false;
        assert_eq!(resolve_roles(&d, 0, &prev, &mut nodes), Some(1));
        assert!(nodes[0].fenced);
        // Rejoined as a replica: unfenced.
        nodes[0] = NodeState {
            fenced: true,
            ..st(true, 2)
        };
        resolve_roles(&d, 0, &prev, &mut nodes);
        assert!(!nodes[0].fenced);
    }

    #[tokio::test]
    async fn a_primary_in_recovery_takes_no_writes() {
        let d = db(2);
        let prev = ShardView {
            primary: Some(0),
            nodes: vec![st(false, 1), st(true, 1)],
            readers: vec![],
        };
        let mut nodes = vec![st(true, 1), st(true, 1)];
        assert_eq!(resolve_roles(&d, 0, &prev, &mut nodes), None);
        // Only failing checks: kept (writes fail fast until it is down).
        let mut nodes = vec![
            NodeState {
                failures: 1,
                ..st(false, 1)
            },
            st(true, 1),
        ];
        assert_eq!(resolve_roles(&d, 0, &prev, &mut nodes), Some(0));
    }
}
