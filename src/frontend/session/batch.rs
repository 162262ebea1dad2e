//! A pipelined batch (statements up to one Sync) whose Binds go to several shards, as
//! pgjdbc's executeBatch, asyncpg's executemany and psycopg's pipeline mode send them.
//!
//! When a Bind needs another shard, what the attached shard has of the batch is settled
//! there first (Flush). After an error the rest of the batch is skipped, as one server
//! would skip it. Otherwise the shard becomes a participant of a transaction over several
//! shards: the client's, or, for a batch begun outside a transaction, one begun for the
//! batch (a BEGIN makes the server's implicit transaction, with the batch's statements so
//! far, an explicit one), committed with two-phase commit at the batch's Sync. So the
//! batch is all or nothing, as on one server.

use super::{Pending, Session, SessionError};
use crate::config::PoolMode;
use crate::protocol;

const FLUSH: [u8; 5] = [b'H', 0, 0, 0, 4];
const SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];

impl Session {
    /// Whether a Bind for another shard may move the batch there. Not from a replica's
    /// connection: a transaction needs the primaries.
    pub(super) fn can_move_batch(&self) -> bool {
        self.mode == PoolMode::Transaction
            && self.in_batch
            && !self.in_copy
            && matches!(self.status, b'I' | b'T')
            && self.backend.is_some()
            && !self.reads.on_replica
    }

    /// Moves the batch to shard `to` for the Bind `frame`. False when the batch is to be
    /// skipped up to its Sync (an error, which the client has).
    pub(super) async fn move_batch(
        &mut self,
        to: usize,
        frame: &[u8],
    ) -> Result<bool, SessionError> {
        self.bout.extend_from_slice(&FLUSH);
        self.settle().await?;
        if self.backend.is_none() || self.relay.skipping {
            return Ok(false);
        }
        if self.status == b'I' {
            self.relay.push(Pending::Internal);
            protocol::write_query(&mut self.bout, "BEGIN");
            self.multi.begin = Some("BEGIN".to_string());
            self.multi.batch_commit = true;
        }
        // The shard's part of the batch ends here; its transaction stays open.
        self.relay.push(Pending::InternalSync);
        self.bout.extend_from_slice(&SYNC);
        self.settle().await?;
        if self.backend.is_none() || self.status != b'T' {
            return Ok(false);
        }
        let joined = self.join_shard(to).await?;
        self.in_batch = true;
        if !joined {
            return Ok(false);
        }
        // The unnamed statement the Bind names was parsed where the batch was before.
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
            self.bout.extend_from_slice(&SYNC);
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
        protocol::write_ready(&mut self.cout, b'I');
        Ok(())
    }
}
