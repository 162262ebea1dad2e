//! A planned switchover: a replica becomes the primary while the primary still runs,
//! without losing a write the primary acknowledged. The primary stops taking writes
//! (`default_transaction_read_only`, and its client sessions end: their open transactions
//! roll back, never acknowledged), the replica replays everything up to the primary's
//! last WAL position, then it is promoted as in a failover. The old primary stays
//! read-only and fenced until it rejoins as a replica (pg_rewind or a new base backup).

use super::Database;
use super::failover::{FailoverError, run};
use super::health::{Control, parse_lsn};
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Database {
    /// Switches shard `shard` over to `to` (a replica's node index, or the most advanced
    /// replica) within `within`; returns the new primary's node index. This pgshard's
    /// clients should be paused around it (the admin console's SWITCHOVER does), so that
    /// none waits on the old primary. When the replica does not catch up in time, the old
    /// primary takes writes again and nothing changes.
    pub async fn switchover(
        self: &Arc<Self>,
        shard: usize,
        to: Option<usize>,
        within: Duration,
    ) -> Result<usize, FailoverError> {
        let started = Instant::now();
        let s = self
            .shards
            .get(shard)
            .ok_or(FailoverError::NoSuchShard(shard))?;
        let mut controls: Vec<Control> = s.nodes.iter().map(|n| Control::new(self, n)).collect();
        let view = s.view();
        let fail = |what: &str, e: String| FailoverError::Switchover(format!("{what}: {e}"));
        let old = view
            .primary
            .ok_or_else(|| fail("no primary", "use FAILOVER".into()))?;
        let target = match to {
            Some(t) if t >= s.nodes.len() => return Err(FailoverError::NoSuchNode(shard, t)),
            Some(t) => t,
            None => {
                let mut best = None;
                for (n, c) in controls.iter_mut().enumerate() {
                    if n == old || view.nodes[n].fenced || s.nodes[n].is_banned() {
                        continue;
                    }
                    if let Ok(p) = c.probe().await
                        && p.in_recovery
                        && best.is_none_or(|(_, lsn)| p.receive_lsn > lsn)
                    {
                        best = Some((n, p.receive_lsn));
                    }
                }
                best.ok_or(FailoverError::NoCandidate(shard))?.0
            }
        };
        let replica = controls[target]
            .probe()
            .await
            .map_err(|e| fail("the replica", e))?;
        if target == old || !replica.in_recovery {
            return Err(FailoverError::NotReplica(s.nodes[target].addr.clone()));
        }
        let primary = &mut controls[old];
        let p = primary.probe().await.map_err(|e| fail("the primary", e))?;
        if p.in_recovery {
            return Err(fail("the primary", "it is in recovery".into()));
        }
        tracing::warn!(shard, primary = %s.nodes[old].addr, replica = %s.nodes[target].addr, "switchover: the primary stops taking writes");
        let stopped = stop_writes(primary).await;
        let lsn = match stopped {
            Ok(lsn) => lsn,
            Err(e) => {
                take_writes(primary).await;
                return Err(fail("stopping writes on the primary", e));
            }
        };
        // Everything the primary acknowledged is at or before `lsn`.
        loop {
            let replayed = controls[target]
                .query("SELECT pg_catalog.pg_last_wal_replay_lsn()::text")
                .await
                .ok()
                .and_then(|r| r.first().and_then(|r| r[0].clone()))
                .and_then(|l| parse_lsn(&l));
            if replayed.is_some_and(|r| r >= lsn) {
                break;
            }
            if started.elapsed() > within {
                take_writes(&mut controls[old]).await;
                return Err(fail(
                    "the replica",
                    format!(
                        "it did not replay the primary's WAL within {within:?}; the primary takes writes again"
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        run(self, shard, Some(target), &mut controls).await
    }
}

/// Makes the primary read-only for every session and ends the sessions already there;
/// returns its WAL insert position after that.
async fn stop_writes(c: &mut Control) -> Result<u64, String> {
    c.query("ALTER SYSTEM SET default_transaction_read_only = on")
        .await?;
    c.query("SELECT pg_catalog.pg_reload_conf()").await?;
    // The postmaster reloads before it signals its children: once this session sees the
    // setting, every session started from now on has it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = c.query("SHOW default_transaction_read_only").await?;
        if rows.first().and_then(|r| r[0].as_deref()) == Some("on") {
            break;
        }
        if Instant::now() > deadline {
            return Err("the configuration was not reloaded within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.query(
        "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity \
         WHERE pid <> pg_catalog.pg_backend_pid() AND backend_type = 'client backend'",
    )
    .await?;
    let rows = c
        .query("SELECT pg_catalog.pg_current_wal_insert_lsn()::text")
        .await?;
    rows.first()
        .and_then(|r| r[0].as_deref())
        .and_then(parse_lsn)
        .ok_or_else(|| "no WAL position".to_string())
}

/// Undoes [`stop_writes`]'s setting (the ended sessions stay ended).
async fn take_writes(c: &mut Control) {
    for sql in [
        "ALTER SYSTEM RESET default_transaction_read_only",
        "SELECT pg_catalog.pg_reload_conf()",
    ] {
        if let Err(e) = c.query(sql).await {
            tracing::error!(error = %e, "switchover abandoned, and the primary is still read-only: ALTER SYSTEM RESET default_transaction_read_only there");
            return;
        }
    }
}
