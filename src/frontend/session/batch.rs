//! A pipelined batch (statements up to one Sync) whose Binds go to several shards, as
//! pgjdbc's executeBatch, asyncpg's executemany and psycopg's pipeline mode send them.
//!
//! When a Bind needs another shard, what the attached shard has of the batch is settled
//! there first (Flush). After an error the rest of the batch is skipped, as one server
//! would skip it. Otherwise the shard becomes a participant of a transaction over several
//! shards: the client's, or, for a batch begun outside a transaction, one begun for the
//! batch (a BEGIN makes the server's implicit transaction, with the batch's statements so
//! far, an explicit one), committed with two-phase commit at the batch's Sync. So the
//! batch is all or nothing, as on one server. A batch that has only read so far has
//! nothing to keep atomic: it just moves to the other shard's node.

use super::{Pending, Session, SessionError};
use crate::config::PoolMode;
use crate::protocol;

impl Session {
    /// Whether a Bind for another shard may move the batch there. From a replica's
    /// connection, only outside a transaction (the batch's reads so far need no
    /// transaction over the shards).
    pub(super) fn can_move_batch(&self) -> bool {
        self.mode == PoolMode::Transaction
            && self.in_batch
            && !self.in_copy
            && self.backend.is_some()
            && match self.status {
                b'I' => true,
                b'T' => !self.reads.on_replica,
                _ => false,
            }
    }

    /// Moves the batch to shard `to` for the Bind `frame`. False when the batch is to be
    /// skipped up to its Sync (an error, which the client has).
    pub(super) async fn move_batch(
        &mut self,
        to: usize,
        frame: &[u8],
    ) -> Result<bool, SessionError> {
        self.settle().await?;
        if self.backend.is_none() || self.relay.skipping {
            return Ok(false);
        }
        if self.reads.on_replica || (self.status == b'I' && !self.route.wrote_before_bind) {
            return self.move_reads(to, frame).await;
        }
        if self.status == b'I' {
            self.relay.push(Pending::Internal);
            protocol::write_query(&mut self.bout, "BEGIN");
            self.multi.begin = Some("BEGIN".to_string());
            self.multi.batch_commit = true;
        }
        // The shard's part of the batch ends here; its transaction stays open.
        self.relay.push(Pending::InternalSync);
        protocol::write_msg(&mut self.bout, b'S', &[]);
        self.settle().await?;
        if self.backend.is_none() || self.status != b'T' {
            return Ok(false);
        }
        let joined = self.join_shard(to).await?;
        self.in_batch = true;
        Ok(joined && self.parse_unnamed_again(frame)?)
    }

    /// A batch that has only read so far (on a replica, or outside a transaction on a
    /// primary) moving to another shard: nothing needs to stay atomic with what follows,
    /// so its part simply ends and the other shard's node is chosen as at the start of a
    /// batch (a replica for a read). No two-phase commit for a batch of reads.
    async fn move_reads(&mut self, to: usize, frame: &[u8]) -> Result<bool, SessionError> {
        self.relay.push(Pending::InternalSync);
        protocol::write_msg(&mut self.bout, b'S', &[]);
        self.settle().await?;
        if self.backend.is_none() || self.status != b'I' {
            return Ok(false);
        }
        self.detach().await;
        let b = protocol::parse_bind(frame)?;
        if let Some((query, _)) = self.route.texts.get(b.stmt).cloned() {
            let sql = std::str::from_utf8(&query).unwrap_or("");
            let a = self.analysis(sql).ok();
            self.set_read_ok(sql, a.as_deref());
        }
        let attached = self.attach(to).await;
        self.in_batch = true;
        Ok(attached && self.parse_unnamed_again(frame)?)
    }

    /// The unnamed statement a Bind names was parsed where the batch was before: parsed
    /// again here (its ParseComplete is not the client's). True (for chaining).
    fn parse_unnamed_again(&mut self, frame: &[u8]) -> Result<bool, SessionError> {
        let b = protocol::parse_bind(frame)?;
        if b.stmt.is_empty()
            && let Some((query, types)) = self.route.texts.get(&b""[..]).cloned()
        {
            self.relay.push(Pending::Parse {
                swallow: true,
                undo: None,
            });
            protocol::write_parse(&mut self.bout, b"", &query, &types);
        }
        Ok(true)
    }

    /// The Sync of a batch that became a transaction over several shards: the attached
    /// shard's part ends, then the transaction commits on every shard (two-phase), or
    /// rolls back after an error or a lost connection; ReadyForQuery `I`.
    pub(super) async fn end_moved_batch(&mut self) -> Result<(), SessionError> {
        self.multi.batch_commit = false;
        if self.backend.is_some() {
            self.relay.push(Pending::InternalSync);
            protocol::write_msg(&mut self.bout, b'S', &[]);
            self.settle().await?;
        } else {
            self.relay.sync_local();
        }
        let ok = self.backend.is_some() && self.status == b'T';
        if !ok {
            self.status = b'E';
        }
        let r = self
            .end_multi(if ok { "COMMIT" } else { "ROLLBACK" })
            .await?;
        self.relay.drain_local(&mut self.cout);
        if let Err(frame) = r {
            self.cout.extend_from_slice(&frame);
        }
        let params = self.ended_params();
        self.cout.extend_from_slice(&params);
        protocol::write_ready(&mut self.cout, b'I');
        Ok(())
    }
}
