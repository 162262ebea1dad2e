//! Read/write split inside a session: whether the statement being routed may run on a
//! replica, which node of the shard it goes to, and what the client has seen of each
//! shard (so that it reads its own writes and never goes back in time).
//!
//! Applies in transaction pooling mode only: in session mode the server connection is the
//! session, and stays on the primary.

use super::Session;
use crate::cluster::{NodeError, ReadFloor};
use crate::config::{Consistency, PoolMode};
use crate::router::Analysis;

/// The read-routing state of a session.
#[derive(Default)]
pub(super) struct ReadState {
    /// The statement being routed may run on a replica (consumed by the next attach).
    pub(super) read_ok: bool,
    /// `SET pgshard.target`: Some(true) for replica, Some(false) for primary.
    pub(super) target: Option<bool>,
    /// The attached server connection is on a node that is not the shard's primary.
    pub(super) on_replica: bool,
    /// The attached connection is the primary's, in `read_your_writes`: its WAL position
    /// is read when it is given back.
    pub(super) capture_lsn: bool,
    /// Something ran on the attached connection (not only Parse/Describe).
    pub(super) executed: bool,
    /// Per shard, what this client has seen.
    floors: Vec<ReadFloor>,
}

impl ReadState {
    /// After the session moved to a new configuration (node indexes may differ).
    pub(super) fn reset(&mut self) {
        let target = self.target;
        *self = ReadState {
            target,
            ..ReadState::default()
        };
    }

    fn floor(&mut self, shards: usize, shard: usize) -> &mut ReadFloor {
        if self.floors.len() < shards {
            self.floors = vec![ReadFloor::default(); shards];
        }
        &mut self.floors[shard]
    }
}

/// `SET pgshard.target = primary|replica` / `RESET pgshard.target`: Some(Ok(..)) or None
/// when the statement is something else.
pub(super) fn target_set(sql: &str) -> Option<Result<Option<bool>, String>> {
    super::route::pgshard_setting(sql, "target").map(|v| match v.as_deref() {
        None => Ok(None),
        Some("primary") => Ok(Some(false)),
        Some("replica") => Ok(Some(true)),
        Some(other) => Err(other.to_string()),
    })
}

impl Session {
    /// Whether this session splits reads at all.
    pub(super) fn splits_reads(&self) -> bool {
        self.mode == PoolMode::Transaction && self.db.splits_reads()
    }

    /// Decides whether the statement being routed may go to a replica: a replica-safe
    /// read (or a `target=replica` hint) outside a transaction, or the first statement of
    /// a `READ ONLY` transaction.
    pub(super) fn set_read_ok(&mut self, sql: &str, a: Option<&Analysis>) {
        self.reads.read_ok = self.read_free()
            && crate::router::target_hint(sql)
                .or(self.reads.target)
                .unwrap_or_else(|| a.is_some_and(|a| a.replica_safe));
    }

    /// Whether the session is where a statement may start on a replica: outside a
    /// transaction, or at the first statement of a `READ ONLY` one.
    pub(super) fn read_free(&self) -> bool {
        self.splits_reads()
            && if self.backend.is_some() {
                self.status == b'I'
            } else {
                match &self.route.deferred_begin {
                    Some(begin) => is_read_only_begin(begin),
                    None => self.status == b'I',
                }
            }
    }

    /// The node of `shard` the next attach uses (consumes the read decision).
    pub(super) fn pick_node(&mut self, shard: usize) -> Result<(usize, bool), NodeError> {
        let read = std::mem::take(&mut self.reads.read_ok) && self.splits_reads();
        if !read {
            return self.db.primary(shard).map(|n| (n, false));
        }
        let n = self
            .db
            .pick_read(shard, self.reads.floor(self.db.shards.len(), shard))?;
        Ok((n, true))
    }

    /// Records what attaching `node` for `read` means for the session.
    pub(super) fn attached_node(&mut self, shard: usize, node: usize, read: bool) {
        self.reads.on_replica = read && self.db.primary(shard).ok() != Some(node);
        self.reads.executed = false;
        self.reads.capture_lsn =
            !read && self.splits_reads() && self.db.config.consistency != Consistency::Eventual;
    }

    /// The (shard, node) pairs a cross-shard read runs on.
    pub(super) fn read_nodes(&mut self, shards: &[usize]) -> Vec<(usize, Option<usize>)> {
        let read = std::mem::take(&mut self.reads.read_ok) && self.splits_reads();
        shards
            .iter()
            .map(|&s| {
                let node = if read {
                    self.db
                        .pick_read(s, self.reads.floor(self.db.shards.len(), s))
                        .ok()
                } else {
                    None
                };
                (s, node)
            })
            .collect()
    }

    /// After a commit on `shard` whose WAL position was not read (a multi-shard commit):
    /// the next reads there go to the primary until its next check, which bounds it.
    pub(super) fn wrote_unknown(&mut self, shard: usize) {
        if !self.splits_reads() {
            return;
        }
        self.db.wrote_unknown(shard);
        if let Ok(p) = self.db.primary(shard) {
            let n = self.db.shards.len();
            self.reads.floor(n, shard).pending = Some((p, std::time::Instant::now()));
        }
    }

    /// Before a primary connection goes back to the pool in `read_your_writes`: its WAL
    /// position becomes the floor of this client's later reads on the shard. False when
    /// the connection failed.
    pub(super) async fn note_commit_lsn(&mut self, b: &mut crate::backend::BackendConn) -> bool {
        let executed = std::mem::take(&mut self.reads.executed);
        if !std::mem::take(&mut self.reads.capture_lsn) || !executed {
            return true;
        }
        match b
            .query_rows("SELECT pg_catalog.pg_current_wal_lsn()::text")
            .await
        {
            Ok(rows) => {
                let lsn = rows
                    .first()
                    .and_then(|r| r.first().cloned().flatten())
                    .and_then(|t| crate::cluster::parse_lsn(&t));
                if let Some(lsn) = lsn {
                    let n = self.db.shards.len();
                    let shard = self.shard;
                    self.db.wrote(shard, self.reads.floor(n, shard), lsn);
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the commit WAL position");
                self.db.wrote_unknown(self.shard);
                false
            }
        }
    }
}

/// Whether a BEGIN / START TRANSACTION starts a read-only transaction.
fn is_read_only_begin(begin: &str) -> bool {
    let l = begin.to_ascii_lowercase();
    let words: Vec<&str> = l
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .collect();
    words.windows(2).any(|w| w == ["read", "only"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_settings_and_read_only_begins() {
        assert_eq!(
            target_set("SET pgshard.target = primary"),
            Some(Ok(Some(false)))
        );
        assert_eq!(
            target_set("set pgshard.target to 'replica';"),
            Some(Ok(Some(true)))
        );
        assert_eq!(target_set("RESET pgshard.target"), Some(Ok(None)));
        assert!(matches!(target_set("SET pgshard.target = x"), Some(Err(_))));
        assert_eq!(target_set("SET pgshard.shard = 1"), None);
        assert!(is_read_only_begin("BEGIN READ ONLY"));
        assert!(is_read_only_begin(
            "start transaction isolation level repeatable read, read only"
        ));
        assert!(!is_read_only_begin("BEGIN"));
        assert!(!is_read_only_begin("BEGIN READ WRITE"));
    }
}
