//! The health monitor: every `check_interval_ms` each node of a database is asked whether
//! it is in recovery, how far its WAL is and on which timeline, over a control connection
//! (tokio-postgres). From the answers it derives health, replica lag, the readers and the
//! primary of each shard, publishes them as a new [`ShardView`], and starts a failover when
//! a primary is down.

use super::failover;
use super::{Database, NodeState, ShardView};
use crate::config::ReadFrom;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// What one check of a node found.
#[derive(Debug, Clone, Copy)]
pub(super) struct Probe {
    pub in_recovery: bool,
    pub lsn: u64,
    pub receive_lsn: u64,
    pub timeline: u32,
}

/// The primary's WAL positions over the last checks: a replica's lag in time is how long
/// ago the primary was where the replica is now.
const HISTORY: usize = 256;

const PROBE_SQL: &str = "SELECT pg_catalog.pg_is_in_recovery()::text, \
     (CASE WHEN pg_catalog.pg_is_in_recovery() THEN COALESCE(pg_catalog.pg_last_wal_replay_lsn(), '0/0') \
      ELSE pg_catalog.pg_current_wal_lsn() END)::text, \
     COALESCE(pg_catalog.pg_last_wal_receive_lsn(), '0/0')::text, \
     (CASE WHEN pg_catalog.pg_is_in_recovery() \
      THEN COALESCE((SELECT received_tli FROM pg_catalog.pg_stat_wal_receiver), 0) \
      ELSE ('x' || substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::int END)::text";

/// Parses `X/Y` (hexadecimal halves) into a 64-bit WAL position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Connects, and drives the connection in a task of its own.
async fn open<T>(config: &tokio_postgres::Config, tls: T) -> Result<tokio_postgres::Client, String>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, conn) = config.connect(tls).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(client)
}

/// Connects; the connection runs in a task of its own that sends its notifications to `tx`.
async fn notifying<T>(
    config: &tokio_postgres::Config,
    tls: T,
    tx: tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>,
) -> Result<tokio_postgres::Client, String>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut conn) = config.connect(tls).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m
                && tx.send(n).is_err()
            {
                return;
            }
        }
    });
    Ok(client)
}

/// A control connection to one node.
pub struct Control {
    config: tokio_postgres::Config,
    /// TLS as the node's pool speaks it (None: plain).
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    client: Option<tokio_postgres::Client>,
    timeout: Duration,
}

impl Control {
    /// A connection as the failover user (the server user by default).
    pub(super) fn new(db: &Database, node: &super::Node) -> Control {
        let f = &db.config.failover;
        let (user, password) = match &f.user {
            Some(u) => (u.as_str(), f.password.as_deref()),
            None => (
                db.config.server_user.as_str(),
                db.config.server_password.as_deref(),
            ),
        };
        let timeout = Duration::from_millis(f.check_timeout_ms);
        Control::with_login(db, node, user, password, "pgshard monitor", timeout)
    }

    /// A connection as the server user, for setup commands (`pgshard keys`).
    pub fn as_server_user(db: &Database, node: &super::Node, timeout: Duration) -> Control {
        let (user, password) = (&db.config.server_user, &db.config.server_password);
        Control::with_login(db, node, user, password.as_deref(), "pgshard", timeout)
    }

    fn with_login(
        db: &Database,
        node: &super::Node,
        user: &str,
        password: Option<&str>,
        application: &str,
        timeout: Duration,
    ) -> Control {
        let sa = &node.pool.target.addr;
        let mut config = tokio_postgres::Config::new();
        // A host starting with '/' is a socket directory to tokio-postgres, as to libpq.
        config
            .host(sa.host())
            .port(sa.port())
            .dbname(db.config.server_database())
            .user(user)
            .application_name(application)
            .connect_timeout(timeout);
        if let Some(p) = password {
            config.password(p.as_bytes());
        }
        // The pool's target has TLS only for TCP nodes and a mode other than disable.
        let tls = match (&node.pool.target.tls, sa) {
            (Some(t), crate::net::ServerAddr::Tcp(_)) => {
                config.ssl_mode(match t.mode {
                    crate::config::ServerTlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                    _ => tokio_postgres::config::SslMode::Require,
                });
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(
                    (*t.config()).clone(),
                ))
            }
            _ => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                None
            }
        };
        Control {
            config,
            tls,
            client: None,
            timeout,
        }
    }

    /// A connection of its own whose notifications (LISTEN) arrive on the receiver, which
    /// ends when the connection does.
    pub async fn listen_connection(
        &self,
        application: &str,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
        ),
        String,
    > {
        let mut config = self.config.clone();
        config.application_name(application);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = match &self.tls {
            Some(tls) => notifying(&config, tls.clone(), tx).await?,
            None => notifying(&config, tokio_postgres::NoTls, tx).await?,
        };
        Ok((client, rx))
    }

    async fn client(&mut self) -> Result<&tokio_postgres::Client, String> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = match &self.tls {
                Some(tls) => open(&self.config, tls.clone()).await?,
                None => open(&self.config, tokio_postgres::NoTls).await?,
            };
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("just set"))
    }

    /// Runs a simple query; the rows' text values. The connection is dropped on failure.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let timeout = self.timeout;
        let run = async {
            let c = self.client().await?;
            let msgs = c.simple_query(sql).await.map_err(|e| {
                e.as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string())
            })?;
            Ok::<_, String>(
                msgs.into_iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => {
                            Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                        }
                        _ => None,
                    })
                    .collect(),
            )
        };
        let r = match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        };
        if r.is_err() {
            self.client = None;
        }
        r
    }

    /// Same, with a longer bound (promotion waits for the end of recovery).
    pub(super) async fn query_slow(
        &mut self,
        sql: &str,
        bound: Duration,
    ) -> Result<Vec<Vec<Option<String>>>, String> {
        let saved = self.timeout;
        self.timeout = bound;
        let r = self.query(sql).await;
        self.timeout = saved;
        r
    }

    pub(super) async fn probe(&mut self) -> Result<Probe, String> {
        let rows = self.query(PROBE_SQL).await?;
        let row = rows.first().ok_or("probe returned no row")?;
        let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let lsn = parse_lsn(&get(1)).ok_or("unreadable WAL position")?;
        Ok(Probe {
            in_recovery: get(0) == "true",
            lsn,
            receive_lsn: parse_lsn(&get(2)).unwrap_or(0).max(lsn),
            timeline: get(3).parse().unwrap_or(0),
        })
    }
}

/// Runs the monitor of one database until the database is dropped.
pub(super) fn spawn(db: Weak<Database>) {
    tokio::spawn(async move {
        let Some(d) = db.upgrade() else { return };
        let interval = Duration::from_millis(d.config.failover.check_interval_ms);
        let mut controls: Vec<Vec<Control>> = d
            .shards
            .iter()
            .map(|s| s.nodes.iter().map(|n| Control::new(&d, n)).collect())
            .collect();
        let mut history: Vec<VecDeque<(Instant, u64)>> = vec![VecDeque::new(); d.shards.len()];
        drop(d);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rounds: u64 = 0;
        loop {
            tick.tick().await;
            let Some(d) = db.upgrade() else { return };
            round(&d, &mut controls, &mut history).await;
            if rounds.is_multiple_of(CATALOG_EVERY) || super::catalog::due(&d) {
                super::catalog::read(&d, &mut controls).await;
            }
            rounds += 1;
        }
    });
}

/// Rounds between readings of the servers' catalogs (`catalog`).
const CATALOG_EVERY: u64 = 10;

/// One round of checks over every node of the database, then the new views.
async fn round(
    db: &Arc<Database>,
    controls: &mut [Vec<Control>],
    history: &mut [VecDeque<(Instant, u64)>],
) {
    // Probes taken before a failover or switchover are stale once it has published its
    // view: they would undo it (a just-promoted node still seen in recovery).
    let roles_changed = db.failovers.load(Ordering::Relaxed);
    let round_started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (s, shard) in controls.iter_mut().enumerate() {
        for (n, c) in std::mem::take(shard).into_iter().enumerate() {
            tasks.spawn(async move {
                let mut c = c;
                let r = c.probe().await;
                (s, n, c, r)
            });
        }
    }
    let mut probes: Vec<Vec<Option<Result<Probe, String>>>> = db
        .shards
        .iter()
        .map(|s| vec![None; s.nodes.len()])
        .collect();
    let mut back: Vec<Vec<Option<Control>>> = db
        .shards
        .iter()
        .map(|s| (0..s.nodes.len()).map(|_| None).collect())
        .collect();
    while let Some(j) = tasks.join_next().await {
        let Ok((s, n, c, r)) = j else { continue };
        probes[s][n] = Some(r);
        back[s][n] = Some(c);
    }
    for (s, shard) in back.into_iter().enumerate() {
        controls[s] = shard
            .into_iter()
            .enumerate()
            .map(|(n, c)| c.unwrap_or_else(|| Control::new(db, &db.shards[s].nodes[n])))
            .collect();
    }
    for (s, probes) in probes.into_iter().enumerate() {
        let now = Instant::now();
        let _guard = db.roles.lock().await;
        if db.failovers.load(Ordering::Relaxed) != roles_changed {
            continue;
        }
        let prev = db.shards[s].view();
        let mut nodes = prev.nodes.clone();
        for (n, p) in probes.into_iter().enumerate() {
            apply_probe(
                &mut nodes[n],
                p.unwrap_or(Err("check did not run".into())),
                db,
                &db.shards[s].nodes[n],
                (round_started, now),
            );
        }
        let primary = failover::resolve_roles(db, s, &prev, &mut nodes);
        if let Some(p) = primary
            && nodes[p].failures == 0
        {
            let h = &mut history[s];
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back((now, nodes[p].lsn));
        }
        lags(&mut nodes, primary, &history[s], now);
        let view = finish_view(db, s, primary, nodes);
        db.shards[s].publish(view);
        if failover::primary_down(db, &db.shards[s].view()) {
            drop(_guard);
            if db.config.failover.enabled {
                let started = Instant::now();
                match failover::run(db, s, None, &mut controls[s]).await {
                    Ok(to) => tracing::warn!(
                        shard = s,
                        new_primary = %db.shards[s].nodes[to].addr,
                        seconds = started.elapsed().as_secs_f64(),
                        "failover done"
                    ),
                    Err(e) => tracing::error!(shard = s, error = %e, "failover failed"),
                }
            }
        }
    }
}

fn apply_probe(
    st: &mut NodeState,
    r: Result<Probe, String>,
    db: &Database,
    node: &super::Node,
    (started, now): (Instant, Instant),
) {
    let addr = node.addr.as_str();
    let pool = &node.pool;
    match r {
        Ok(p) => {
            if !st.up {
                tracing::warn!(node = %addr, "node is up again");
            }
            st.up = true;
            st.failures = 0;
            st.in_recovery = Some(p.in_recovery);
            st.lsn = p.lsn;
            st.receive_lsn = if p.in_recovery { p.receive_lsn } else { p.lsn };
            if p.timeline != 0 || !p.in_recovery {
                st.timeline = p.timeline;
            }
            st.checked_at = Some(now);
            st.check_started = Some(started);
            st.last_error = None;
        }
        Err(e) => {
            st.failures += 1;
            if st.failures == 1 {
                pool.invalidate();
            }
            if st.up && st.failures >= db.config.failover.failures_before_down {
                tracing::error!(node = %addr, error = %e, failures = st.failures, "node is down");
                st.up = false;
            } else if st.up {
                tracing::warn!(node = %addr, error = %e, "health check failed");
            }
            st.last_error = Some(e);
        }
    }
}

/// Replica lag against the primary: bytes from this round's positions, time from the
/// history of the primary's positions.
fn lags(
    nodes: &mut [NodeState],
    primary: Option<usize>,
    h: &VecDeque<(Instant, u64)>,
    now: Instant,
) {
    let Some(p) = primary else { return };
    let plsn = nodes[p].lsn;
    for (n, st) in nodes.iter_mut().enumerate() {
        if n == p || st.failures > 0 {
            if n == p {
                st.lag_bytes = 0;
                st.lag_ms = 0;
            }
            continue;
        }
        st.lag_bytes = plsn.saturating_sub(st.lsn);
        st.lag_ms = if st.lsn >= plsn {
            0
        } else {
            now.duration_since(when_primary_was_at(h, st.lsn).unwrap_or(now))
                .as_millis() as u64
        };
    }
}

/// When the primary's WAL position was `lsn`: interpolated between the two checks around
/// it (WAL is written at a roughly steady rate between checks), or the oldest check when
/// `lsn` is older than the whole history.
fn when_primary_was_at(h: &VecDeque<(Instant, u64)>, lsn: u64) -> Option<Instant> {
    let after = h.iter().position(|(_, l)| *l > lsn);
    match after {
        None => h.back().map(|(t, _)| *t),
        Some(0) => h.front().map(|(t, _)| *t),
        Some(i) => {
            let (t0, l0) = h[i - 1];
            let (t1, l1) = h[i];
            let frac = (lsn - l0) as f64 / (l1 - l0) as f64;
            Some(t0 + t1.duration_since(t0).mul_f64(frac))
        }
    }
}

/// The readers of a shard, given the nodes' states.
fn finish_view(
    db: &Database,
    s: usize,
    primary: Option<usize>,
    nodes: Vec<NodeState>,
) -> ShardView {
    let max_ms = db.max_lag_ms();
    let max_bytes = db.config.max_replica_lag_bytes.unwrap_or(u64::MAX);
    let shard = &db.shards[s];
    let readers = match db.config.read_from {
        ReadFrom::Primary => Vec::new(),
        from => nodes
            .iter()
            .enumerate()
            .filter(|(n, st)| {
                let weight = shard.nodes[*n].weight > 0 && !shard.nodes[*n].is_banned();
                if Some(*n) == primary {
                    return from == ReadFrom::Any && weight;
                }
                weight
                    && st.up
                    && st.failures == 0
                    && !st.fenced
                    && st.in_recovery == Some(true)
                    && st.lag_ms <= max_ms
                    && st.lag_bytes <= max_bytes
            })
            .map(|(n, _)| n)
            .collect(),
    };
    ShardView {
        primary,
        nodes,
        readers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_parses() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("x"), None);
    }

    #[test]
    fn lag_in_time_comes_from_the_primary_history() {
        let t0 = Instant::now();
        let h: VecDeque<(Instant, u64)> = [
            (t0, 100),
            (t0 + Duration::from_millis(500), 200),
            (t0 + Duration::from_millis(1000), 300),
        ]
        .into_iter()
        .collect();
        let now = t0 + Duration::from_millis(1000);
        let mut nodes = vec![
            NodeState {
                lsn: 300,
                ..Default::default()
            },
            NodeState {
                lsn: 150,
                ..Default::default()
            },
            NodeState {
                lsn: 300,
                ..Default::default()
            },
            NodeState {
                lsn: 50,
                ..Default::default()
            },
        ];
        lags(&mut nodes, Some(0), &h, now);
        // Halfway between the first two checks.
        assert_eq!((nodes[1].lag_bytes, nodes[1].lag_ms), (150, 750));
        assert_eq!((nodes[2].lag_bytes, nodes[2].lag_ms), (0, 0));
        // Behind everything remembered: at least the whole history.
        assert_eq!(nodes[3].lag_ms, 1000);
    }
}
