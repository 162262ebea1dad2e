//! Moving a session between shards between transactions: giving back the attached
//! server connection, attaching another shard's, moving a transaction that has executed
//! nothing yet, and answering BEGIN/COMMIT/ROLLBACK of one that touched no shard.

use super::{Pending, Session, SessionError};
use crate::config::PoolMode;
use crate::protocol::{self, PgError};
use crate::router;

impl Session {
    /// Gives back the attached server connection between transactions.
    pub(super) async fn detach(&mut self) {
        let Some(mut b) = self.backend.take() else {
            return;
        };
        self.cancel.set(None);
        if !self.note_commit_lsn(&mut b).await {
            b.broken = true;
            return;
        }
        if self.mode == PoolMode::Session {
            // Session state does not follow the client to another shard.
            if b.run_quiet("DISCARD ALL").await.is_err() {
                b.broken = true;
            }
            b.prepared.clear();
            b.settings = 0;
        } else if self.settings_dirty {
            Box::pin(self.release_dirty(b)).await;
        }
    }

    /// Makes `shard`'s server the attached one. False when the client already got an
    /// error (a transaction open elsewhere, or no server connection).
    pub(super) async fn use_shard(&mut self, shard: usize) -> Result<bool, SessionError> {
        let role_change = self.reads.on_replica != self.reads.read_ok;
        if self.backend.is_some() && (self.shard != shard || role_change) {
            if self.status != b'I' || self.in_batch {
                // Inside a transaction the node stays; a write on a replica (in a READ
                // ONLY transaction) gets the server's own error.
                return Ok(self.shard == shard);
            }
            self.settle().await?;
            self.detach().await;
        }
        Ok(self.attach(shard).await)
    }

    /// BEGIN, COMMIT and ROLLBACK of a transaction that has not touched a shard yet are
    /// answered here. True when the statement was answered.
    pub(super) fn deferred_transaction(&mut self, sql: &str, kind: &router::StatementKind) -> bool {
        // Only on these rare statements is the text looked at again.
        let one = || router::split_statements(sql).first().copied().unwrap_or("");
        let answer = |s: &mut Session, tag: &str, status: u8| {
            s.relay.drain_local(&mut s.cout);
            protocol::write_complete(&mut s.cout, tag);
            s.status = status;
            protocol::write_ready(&mut s.cout, status);
        };
        match (kind, self.route.deferred_begin.is_some()) {
            (router::StatementKind::Begin, false) if self.status == b'I' => {
                self.route.deferred_begin = Some(one().to_string());
                answer(self, "BEGIN", b'T');
                true
            }
            (router::StatementKind::EndTransaction, true) => {
                let rollback = self.status == b'E' || super::multi::rolls_back(one());
                // `AND CHAIN` begins the next transaction alike: the BEGIN stays deferred.
                let status = if super::multi::chains(one()) {
                    b'T'
                } else {
                    self.route.deferred_begin = None;
                    b'I'
                };
                answer(self, if rollback { "ROLLBACK" } else { "COMMIT" }, status);
                self.listen_ext.ended(Some(!rollback));
                true
            }
            (_, true) if self.status == b'E' => {
                self.relay.drain_local(&mut self.cout);
                PgError::new(
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block",
                )
                .write(&mut self.cout);
                protocol::write_ready(&mut self.cout, b'E');
                true
            }
            _ => false,
        }
    }

    /// Moves a transaction that has executed nothing yet to another shard: rolls it back
    /// where it is (invisibly) and begins it again on `to`. False when it cannot move, or
    /// when attaching failed (the client then got the error).
    pub(super) async fn move_transaction(&mut self, to: usize) -> Result<bool, SessionError> {
        let Some(begin) = self.route.movable_begin.take() else {
            return Ok(false);
        };
        self.settle().await?;
        if self.backend.is_some() {
            self.relay.push(Pending::Internal);
            protocol::write_query(&mut self.bout, "ROLLBACK");
            self.settle().await?;
        }
        self.detach().await;
        self.route.deferred_begin = Some(begin);
        if !self.attach(to).await {
            return Ok(false);
        }
        // Still movable (the BEGIN was deferred again); the settings made so far follow.
        self.write_replay();
        Ok(true)
    }
}
