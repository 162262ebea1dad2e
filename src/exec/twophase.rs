//! Two-phase commit of a transaction that wrote on several shards, the decision log kept in
//! PostgreSQL, and recovery of transactions left in doubt by a crash.
//!
//! Commit: `PREPARE TRANSACTION 'pgshard_<id>_<shard>'` on every participant; then the
//! decision row `(pgshard_<id>, 'commit')` is inserted on the coordinator (the primary of
//! the default shard); then `COMMIT PREPARED` everywhere. The decision row is the commit
//! point: recovery commits what it names and rolls back, after `two_phase_timeout_ms`,
//! what no row names. Recovery first inserts an `'abort'` row, so a slow coordinator's
//! later `'commit'` insert conflicts and it rolls back instead: exactly one outcome is
//! ever recorded, whichever pgshard process gets there first.

use crate::backend::BackendConn;
use crate::cluster::Database;
use crate::pool::Pooled;
use crate::sql::quote_literal;
use bytes::BytesMut;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// The decision table, on the coordinator.
pub const DECISIONS: &str = "public.pgshard_decisions";

const CREATE: &str = "CREATE TABLE IF NOT EXISTS public.pgshard_decisions (\
     gid text PRIMARY KEY, \
     outcome text NOT NULL CHECK (outcome IN ('commit', 'abort')), \
     decided_at timestamptz NOT NULL DEFAULT now())";

/// Why a commit did not commit.
#[derive(Debug)]
pub enum CommitError {
    /// Nothing was committed; the ErrorResponse (with the failing shard's SQLSTATE) to send.
    Aborted(BytesMut),
    /// The outcome is not known yet (the decision could not be confirmed); recovery will
    /// settle it on every shard.
    Unknown(String),
}

/// Testing hooks, from `PGSHARD_FAILPOINT`: `crash_after_prepare` and
/// `crash_after_decision` abort the process there; `sleep_before_prepare` waits 2 s (a test
/// kills a shard's primary meanwhile). Unset in production: one cached lookup.
async fn failpoint(name: &str) {
    static FP: OnceLock<Option<String>> = OnceLock::new();
    let Some(fp) = FP.get_or_init(|| std::env::var("PGSHARD_FAILPOINT").ok()) else {
        return;
    };
    if fp == name {
        if name.starts_with("crash") {
            tracing::error!(failpoint = name, "failpoint: aborting the process");
            std::process::abort();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A fresh global transaction id.
pub fn new_gid() -> String {
    format!("pgshard_{:016x}", rand::random::<u64>())
}

fn error_frame(code: &'static str, msg: impl Into<String>) -> BytesMut {
    let mut out = BytesMut::new();
    crate::protocol::PgError::new(code, msg).write(&mut out);
    out
}

/// Sends `sql` to every connection, then reads each answer: the ErrorResponse frame of
/// those that failed, `Err` for those whose connection failed.
async fn on_all(
    conns: &mut [(usize, Pooled)],
    sql: impl Fn(usize) -> String,
) -> Vec<Result<Option<BytesMut>, String>> {
    let mut sent = Vec::with_capacity(conns.len());
    for (s, c) in conns.iter_mut() {
        let mut out = BytesMut::new();
        crate::protocol::write_query(&mut out, &sql(*s));
        sent.push(c.send(&out).await.map_err(|e| e.to_string()));
    }
    let mut results = Vec::with_capacity(conns.len());
    for ((_, c), sent) in conns.iter_mut().zip(sent) {
        results.push(match sent {
            Err(e) => Err(e),
            Ok(()) => read_result(c).await,
        });
    }
    results
}

async fn read_result(c: &mut BackendConn) -> Result<Option<BytesMut>, String> {
    let mut err = None;
    loop {
        let f = c.read_frame().await.map_err(|e| {
            c.broken = true;
            e.to_string()
        })?;
        match f[0] {
            b'E' => err = Some(f),
            b'Z' => return Ok(err),
            b'S' => c.note_reported(f),
            _ => {}
        }
    }
}

/// Commits the participants' open transactions atomically. On return every connection is
/// idle (or marked broken).
pub async fn commit(
    db: &Database,
    participants: &mut [(usize, Pooled)],
) -> Result<(), CommitError> {
    let gid = new_gid();
    let part = |s: usize| format!("{gid}_{s}");
    failpoint("sleep_before_prepare").await;
    let prepared = on_all(participants, |s| {
        format!("PREPARE TRANSACTION {}", quote_literal(&part(s)))
    })
    .await;
    let failed = prepared.iter().position(|r| !matches!(r, Ok(None)));
    if let Some(i) = failed {
        // Undo the ones that prepared; a connection lost during PREPARE may have prepared:
        // without a decision row, recovery rolls it back after the timeout.
        let ok: Vec<bool> = prepared.iter().map(|r| matches!(r, Ok(None))).collect();
        for (k, (s, c)) in participants.iter_mut().enumerate() {
            if ok[k] && !c.broken {
                let _ = c
                    .run_quiet(&format!("ROLLBACK PREPARED {}", quote_literal(&part(*s))))
                    .await;
            }
        }
        let shard = participants[i].0;
        return Err(CommitError::Aborted(match &prepared[i] {
            Ok(Some(frame)) => frame.clone(),
            Err(e) => error_frame(
                "08006",
                format!(
                    "shard {shard} lost during PREPARE TRANSACTION: {e}; the transaction was rolled back"
                ),
            ),
            Ok(None) => unreachable!("position found a failure"),
        }));
    }
    crate::metrics::inc(&db.two_phase_prepared);
    failpoint("crash_after_prepare").await;
    match decide(db, participants, &gid, "commit").await {
        Ok(true) => {}
        Ok(false) => {
            // Recovery decided 'abort' first (we were slower than the in-doubt timeout).
            for (s, c) in participants.iter_mut() {
                let _ = c
                    .run_quiet(&format!("ROLLBACK PREPARED {}", quote_literal(&part(*s))))
                    .await;
            }
            return Err(CommitError::Aborted(error_frame(
                "40001",
                "the transaction was rolled back by in-doubt recovery before it could commit",
            )));
        }
        // The prepared transactions stay for recovery; the connections are idle.
        Err(e) => return Err(CommitError::Unknown(e)),
    }
    crate::metrics::inc(&db.two_phase_commits);
    failpoint("crash_after_decision").await;
    let done = on_all(participants, |s| {
        format!("COMMIT PREPARED {}", quote_literal(&part(s)))
    })
    .await;
    // "does not exist": a recovery pass finished it first, as the decision said.
    let finished = |r: &Result<Option<BytesMut>, String>| match r {
        Ok(None) => true,
        Ok(Some(f)) => crate::metrics::sqlstate_of(f) == Some("42704"),
        Err(_) => false,
    };
    if done.iter().all(finished) {
        // Best effort: recovery also removes old decision rows nobody needs.
        let _ = forget(db, participants, &gid).await;
    } else {
        tracing::warn!(gid = %gid, "COMMIT PREPARED failed on a shard; recovery will finish it");
    }
    Ok(())
}

/// Commits shard by shard (`two_phase_commit: off`). A failure after the first commit
/// leaves the earlier shards committed: the client gets XX000 saying which.
pub async fn commit_one_phase(participants: &mut [(usize, Pooled)]) -> Result<(), CommitError> {
    let mut committed = Vec::new();
    for (s, c) in participants.iter_mut() {
        match c.run_quiet("COMMIT").await {
            Ok(None) => committed.push(*s),
            other => {
                let why = match other {
                    Ok(Some((code, msg))) => format!("{code}: {msg}"),
                    Err(e) => e.to_string(),
                    Ok(None) => unreachable!(),
                };
                if committed.is_empty() {
                    return Err(CommitError::Aborted(error_frame(
                        "40001",
                        format!("COMMIT failed on shard {s} ({why}); nothing was committed"),
                    )));
                }
                tracing::error!(shard = s, committed = ?committed, "one-phase COMMIT failed after other shards committed");
                return Err(CommitError::Aborted(error_frame(
                    "XX000",
                    format!(
                        "COMMIT failed on shard {s} ({why}) after shards {committed:?} committed: the transaction is half committed (two_phase_commit is off)"
                    ),
                )));
            }
        }
    }
    Ok(())
}

/// A connection to the coordinator (the default shard's primary), with the decision table.
async fn coordinator(db: &Database) -> Result<Pooled, String> {
    let mut c = crate::exec::checkout_primary(db, db.config.default_shard)
        .await
        .map_err(|e| e.to_string())?;
    decisions_table(db, &mut c).await?;
    Ok(c)
}

/// Creates the decision table on the coordinator the first time this process needs it.
async fn decisions_table(db: &Database, c: &mut Pooled) -> Result<(), String> {
    if !db
        .decisions_ready
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        match c.run_quiet(CREATE).await {
            Ok(None) => db
                .decisions_ready
                .store(true, std::sync::atomic::Ordering::Relaxed),
            // Two creators at once: one fails on the catalog's unique index; the table is there.
            Ok(Some((code, _))) if ["23505", "42P07", "42710"].contains(&code.as_str()) => {}
            Ok(Some((code, msg))) => return Err(format!("creating {DECISIONS}: {code}: {msg}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// The connection a committing transaction records its decision on: its own participant
/// on the coordinator shard when it has one (idle once prepared or committed), else one
/// from the pool. Never a second connection there while it holds one: under load every
/// committing transaction would wait for another's, until their checkouts time out.
enum Coordinator<'a> {
    Participant(&'a mut Pooled),
    Pooled(Box<Pooled>),
}

impl Coordinator<'_> {
    async fn of<'a>(
        db: &Database,
        participants: &'a mut [(usize, Pooled)],
    ) -> Result<Coordinator<'a>, String> {
        match participants
            .iter_mut()
            .find(|(s, c)| *s == db.config.default_shard && !c.broken)
        {
            Some((_, c)) => {
                decisions_table(db, c).await?;
                Ok(Coordinator::Participant(c))
            }
            None => Ok(Coordinator::Pooled(Box::new(coordinator(db).await?))),
        }
    }

    fn conn(&mut self) -> &mut Pooled {
        match self {
            Coordinator::Participant(c) => c,
            Coordinator::Pooled(c) => c,
        }
    }
}

/// Records `outcome` for `gid` unless one is recorded; true when `outcome` is the one that
/// stands.
async fn decide(
    db: &Database,
    participants: &mut [(usize, Pooled)],
    gid: &str,
    outcome: &str,
) -> Result<bool, String> {
    let mut coordinator = Coordinator::of(db, participants).await?;
    let c = coordinator.conn();
    let rows = c
        .query_rows(&format!(
            "WITH i AS (INSERT INTO {DECISIONS} (gid, outcome) VALUES ({}, {}) ON CONFLICT (gid) DO NOTHING RETURNING outcome) \
             SELECT outcome FROM i UNION ALL SELECT outcome FROM {DECISIONS} WHERE gid = {} LIMIT 1",
            quote_literal(gid),
            quote_literal(outcome),
            quote_literal(gid)
        ))
        .await
        .map_err(|e| {
            c.broken = true;
            e.to_string()
        })?;
    let stands = rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .ok_or("the decision row could not be read")?;
    Ok(stands == outcome)
}

async fn forget(
    db: &Database,
    participants: &mut [(usize, Pooled)],
    gid: &str,
) -> Result<(), String> {
    let mut coordinator = Coordinator::of(db, participants).await?;
    coordinator
        .conn()
        .run_quiet(&format!(
            "DELETE FROM {DECISIONS} WHERE gid = {}",
            quote_literal(gid)
        ))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// What one recovery pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub committed: usize,
    pub rolled_back: usize,
}

/// Finishes the in-doubt transactions pgshard left on every shard: COMMIT PREPARED where
/// the decision is commit, ROLLBACK PREPARED where it is abort, or where none was recorded
/// and the transaction is older than `two_phase_timeout_ms` (then 'abort' is recorded
/// first). Safe to run in several pgshard processes at once.
pub async fn recover(db: &Database) -> Result<Recovered, String> {
    let timeout_s = db.config.two_phase_timeout_ms as f64 / 1000.0;
    // Young ones belong to a coordinator still at work: left alone (a decided one after a
    // short grace, an undecided one until the in-doubt timeout).
    let grace_s = timeout_s.min(2.0);
    let mut found: Vec<(usize, String, bool)> = Vec::new();
    for s in 0..db.shards.len() {
        let mut c = crate::exec::checkout_primary(db, s)
            .await
            .map_err(|e| format!("shard {s}: {e}"))?;
        let rows = c
            .query_rows(&format!(
                "SELECT gid, (now() - prepared > make_interval(secs => {timeout_s}))::text \
                 FROM pg_catalog.pg_prepared_xacts \
                 WHERE gid LIKE 'pgshard\\_%' AND database = current_database() \
                 AND now() - prepared > make_interval(secs => {grace_s})"
            ))
            .await
            .map_err(|e| format!("shard {s}: {e}"))?;
        for r in rows {
            if let [Some(gid), Some(old)] = &r[..] {
                found.push((s, gid.clone(), old == "true"));
            }
        }
    }
    let mut outcome: HashMap<String, Option<String>> = HashMap::new();
    let mut done = Recovered::default();
    for (s, gid, old) in &found {
        let Some((base, _)) = gid.rsplit_once('_') else {
            continue;
        };
        if !outcome.contains_key(base) {
            let decided = lookup(db, base).await?;
            let decided = match decided {
                Some(o) => Some(o),
                None if *old => {
                    // The coordinator never decided: abort (unless it just did).
                    decide(db, &mut [], base, "abort").await?;
                    lookup(db, base).await?
                }
                None => None,
            };
            outcome.insert(base.to_string(), decided);
        }
        let verb = match outcome[base].as_deref() {
            Some("commit") => "COMMIT",
            Some("abort") => "ROLLBACK",
            _ => continue,
        };
        let mut c = crate::exec::checkout_primary(db, *s)
            .await
            .map_err(|e| format!("shard {s}: {e}"))?;
        match c
            .run_quiet(&format!("{verb} PREPARED {}", quote_literal(gid)))
            .await
            .map_err(|e| e.to_string())?
        {
            None => {
                tracing::warn!(shard = s, gid = %gid, action = verb, "in-doubt transaction finished by recovery");
                if verb == "COMMIT" {
                    done.committed += 1;
                } else {
                    done.rolled_back += 1;
                }
            }
            // Finished meanwhile by another pgshard.
            Some((code, _)) if code == "42704" => {}
            Some((code, msg)) => return Err(format!("shard {s}: {verb} PREPARED: {code}: {msg}")),
        }
    }
    // Decision rows no prepared transaction needs any more.
    let live: HashSet<&str> = found
        .iter()
        .filter_map(|(_, g, _)| g.rsplit_once('_').map(|x| x.0))
        .collect();
    if let Ok(mut c) = coordinator(db).await
        && let Ok(rows) = c
            .query_rows(&format!(
                "SELECT gid FROM {DECISIONS} WHERE decided_at < now() - interval '1 minute'"
            ))
            .await
    {
        for r in rows {
            if let Some(Some(g)) = r.first()
                && !live.contains(g.as_str())
            {
                let _ = c
                    .run_quiet(&format!(
                        "DELETE FROM {DECISIONS} WHERE gid = {}",
                        quote_literal(g)
                    ))
                    .await;
            }
        }
    }
    db.recovered_commits
        .fetch_add(done.committed as u64, std::sync::atomic::Ordering::Relaxed);
    db.recovered_rollbacks.fetch_add(
        done.rolled_back as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(done)
}

async fn lookup(db: &Database, gid: &str) -> Result<Option<String>, String> {
    let mut c = coordinator(db).await?;
    let rows = c
        .query_rows(&format!(
            "SELECT outcome FROM {DECISIONS} WHERE gid = {}",
            quote_literal(gid)
        ))
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows.first().and_then(|r| r.first().cloned().flatten()))
}

/// Runs recovery at start and then periodically, while the database lives; warns once
/// when a primary has `max_prepared_transactions = 0`.
pub fn spawn_recovery(db: Weak<Database>) {
    tokio::spawn(async move {
        let Some(d) = db.upgrade() else { return };
        if d.config.two_phase_commit == crate::config::TwoPhaseCommit::Off || d.shards.len() < 2 {
            return;
        }
        let every = Duration::from_millis((d.config.two_phase_timeout_ms / 2).clamp(200, 10_000));
        check_prepared_setting(&d).await;
        drop(d);
        loop {
            let Some(d) = db.upgrade() else { return };
            if let Err(e) = recover(&d).await {
                tracing::warn!(database = %d.config.name, error = %e, "two-phase recovery pass failed; will retry");
            }
            drop(d);
            tokio::time::sleep(every).await;
        }
    });
}

/// Says clearly when 2PC cannot work on a shard.
async fn check_prepared_setting(db: &Arc<Database>) {
    for s in 0..db.shards.len() {
        let Ok(mut c) = crate::exec::checkout_primary(db, s).await else {
            continue;
        };
        if let Ok(rows) = c
            .query_rows("SELECT current_setting('max_prepared_transactions')")
            .await
            && rows.first().and_then(|r| r[0].as_deref()) == Some("0")
        {
            tracing::error!(
                database = %db.config.name,
                shard = s,
                "max_prepared_transactions is 0 on this shard's primary: transactions over several shards will fail to commit; set it above 0 (and restart the server) or set two_phase_commit: off"
            );
        }
    }
}
