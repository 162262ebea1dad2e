//! Reads over several shards whose rows only concatenate (no ORDER BY, LIMIT, DISTINCT or
//! aggregate over them), in the simple protocol: each shard's rows go to the client as
//! they come, shard after shard, as bytes, instead of being held until every shard has
//! answered. Memory stays bounded whatever the table's size (`max_merge_bytes` does not
//! apply), and the first rows reach the client sooner. A shard's error after another
//! shard's rows ends the answer as an error in the middle of a scan does on one server.
//! Outside a transaction the shards run in parallel on pooled connections; inside one,
//! each in turn on the transaction's own connection to it (`stream_in_transaction`).

use super::{Session, SessionError};
use crate::exec::scatter::{Request, Sent};
use crate::protocol::{self, PgError};
use bytes::Bytes;

/// How a stream inside a transaction ended.
#[derive(Debug, PartialEq, Eq)]
enum Streamed {
    /// Every row and the tag went out; the shards' RowDescription.
    Rows(Bytes),
    /// The client got an error in its place (the transaction is aborted).
    Failed,
    /// A server connection was lost (`backend_lost` told the client).
    Gone,
}

/// Rows written to the client are flushed once this many bytes wait.
const FLUSH_AT: usize = 64 * 1024;

/// The shards' rows as they go to the client, one answer: the first RowDescription
/// (written when `describe`), then every DataRow, counted for the tag.
struct Concatenated {
    describe: bool,
    description: Option<Bytes>,
    rows: u64,
}

impl Concatenated {
    fn new(describe: bool) -> Self {
        Concatenated {
            describe,
            description: None,
            rows: 0,
        }
    }

    /// Takes a shard's RowDescription or DataRow, writing to `out` what the client gets
    /// of it; false for any other frame.
    fn take(&mut self, f: &[u8], out: &mut bytes::BytesMut) -> bool {
        match f[0] {
            b'T' => {
                if self.description.is_none() {
                    if self.describe {
                        out.extend_from_slice(f);
                    }
                    self.description = Some(Bytes::copy_from_slice(f));
                }
                true
            }
            b'D' => {
                self.rows += 1;
                out.extend_from_slice(f);
                true
            }
            _ => false,
        }
    }

    /// The answer's tag, written to `out`, and the description; None when no shard
    /// described the rows.
    fn finish(self, out: &mut bytes::BytesMut) -> Option<Bytes> {
        let description = self.description?;
        protocol::write_complete(out, &format!("SELECT {}", self.rows));
        Some(description)
    }
}

impl Session {
    /// Streams the rows `req` reads on `nodes` to the client, then its tag (not
    /// ReadyForQuery); the RowDescription goes first when `describe`. The description
    /// (None when the client got an error instead of the tag).
    pub(super) async fn stream_rows(
        &mut self,
        nodes: &[(usize, Option<usize>)],
        req: Request<'_>,
        prelude: &str,
        describe: bool,
    ) -> Result<Option<Bytes>, SessionError> {
        let streamed = self.stream_rows_from(nodes, req, prelude, describe).await;
        self.restore_cancel();
        streamed
    }

    /// Cancel requests go to the attached server connection again (if any), after a
    /// stream that pointed them at the shard being read.
    pub(super) fn restore_cancel(&self) {
        self.cancel
            .set(self.backend.as_ref().map(|b| (&b.addr, b.pid, b.secret)));
    }

    async fn stream_rows_from(
        &mut self,
        nodes: &[(usize, Option<usize>)],
        req: Request<'_>,
        prelude: &str,
        describe: bool,
    ) -> Result<Option<Bytes>, SessionError> {
        self.relay.drain_local(&mut self.cout);
        let sent = Sent::start(&self.db, nodes, req, Some(prelude), self.settings_fp).await;
        let mut sent = match sent {
            Ok(s) => s,
            Err(e) => {
                self.stream_error(e);
                return Ok(None);
            }
        };
        let mut answer = Concatenated::new(describe);
        for i in 0..sent.len() {
            // The client's cancel request stops the shard being read: its error ends the
            // answer, and the others are cancelled with it.
            self.cancel.set(sent.cancel_target(i));
            loop {
                let f = match sent.next(i).await {
                    Ok(f) => f,
                    Err(e) => {
                        sent.abandon(i, false).await;
                        self.stream_error(e);
                        return Ok(None);
                    }
                };
                let taken = answer.take(&f, &mut self.cout);
                match f[0] {
                    _ if taken => {}
                    b'Z' => break,
                    // Each shard's tag: one for the whole answer below.
                    b'C' => {}
                    b'E' => {
                        // This shard's statement failed: the others' are not read.
                        self.cout.extend_from_slice(&f);
                        sent.abandon(i + 1, true).await;
                        // Up to this shard's ReadyForQuery, so that its connection goes
                        // back in step.
                        while let Ok(f) = sent.next(i).await {
                            if f[0] == b'Z' {
                                break;
                            }
                        }
                        return Ok(None);
                    }
                    // Notices and the like, as they come.
                    _ => self.cout.extend_from_slice(&f),
                }
                if self.cout.len() >= FLUSH_AT {
                    // (Should the client be gone, dropping `sent` closes the connections
                    // still answering.)
                    self.flush_client().await?;
                }
            }
        }
        let description = answer.finish(&mut self.cout);
        if description.is_none() {
            self.stream_error(PgError::new("XX000", "no row description from any shard"));
        }
        Ok(description)
    }

    /// A Bind over several shards whose rows stream (`cross::streams`), outside a
    /// transaction: when the client's Execute of the portal, without a row limit (and a
    /// Describe of it before), already waits in the read buffer, pgshard answers the
    /// three at once, streaming the rows as they come; the portal is then held
    /// exhausted. False when they are not there (the rows are then held for the
    /// Execute, bounded by `max_merge_bytes`).
    pub(super) async fn stream_bound(
        &mut self,
        nodes: &[(usize, Option<usize>)],
        req: Request<'_>,
        prelude: &str,
    ) -> Result<bool, SessionError> {
        let Some(describe) = self.take_describe_execute() else {
            return Ok(false);
        };
        let portal = self.bind_complete();
        match self.stream_rows(nodes, req, prelude, describe).await? {
            Some(description) => self.hold_exhausted_portal(&portal, description),
            // As after any error in the extended protocol: the rest of the batch is
            // skipped, up to its Sync.
            None => self.batch_failed(),
        }
        Ok(true)
    }

    /// Takes the client's Describe (optional) and Execute (without a row limit) of the
    /// portal being bound out of the read buffer, when both are there: Some(whether it
    /// described the portal).
    pub(super) fn take_describe_execute(&mut self) -> Option<bool> {
        let portal = &self.route.bind_portal;
        let max = self.max_message;
        let next = |at: usize| -> Option<&[u8]> {
            let rest = self.crbuf.get(at..)?;
            let n = protocol::frame_len(rest, max).ok()??;
            Some(&rest[..n])
        };
        let mut at = 0;
        let mut describe = false;
        let mut f = next(at)?;
        if f[0] == b'D' {
            match protocol::parse_target(f, "Describe") {
                Ok((b'P', name)) if name == &portal[..] => {}
                _ => return None,
            }
            describe = true;
            at += f.len();
            f = next(at)?;
        }
        if f[0] != b'E' {
            return None;
        }
        match super::portal::parse_execute(f) {
            Ok((name, 0)) if name == &portal[..] => {}
            _ => return None,
        }
        at += f.len();
        let taken = self.crbuf.split_to(at);
        if self.unnamed.watching() {
            for f in protocol::frames(&taken) {
                self.unnamed.observe(f);
            }
        }
        Some(describe)
    }

    /// Streams `sql`'s rows from `shards`, each in turn, inside the client's transaction
    /// (each shard joins it), then its tag and ReadyForQuery. A shard's error ends the
    /// answer and aborts the transaction, as an error does on one server.
    pub(super) async fn stream_in_transaction(
        &mut self,
        sql: &str,
        shards: &[usize],
    ) -> Result<(), SessionError> {
        let mut query = bytes::BytesMut::new();
        protocol::write_query(&mut query, sql);
        if self.stream_each(&query, shards, true).await? != Streamed::Gone {
            protocol::write_ready(&mut self.cout, self.status);
        }
        Ok(())
    }

    /// A Bind over several shards whose rows stream (`cross::streams`), inside the
    /// client's transaction: as [`Session::stream_bound`], each shard in turn joining the
    /// transaction and running `req` (Parse, Bind, Describe, Execute, Sync).
    pub(super) async fn stream_bound_in_transaction(
        &mut self,
        req: &[u8],
        shards: &[usize],
    ) -> Result<bool, SessionError> {
        let Some(describe) = self.take_describe_execute() else {
            return Ok(false);
        };
        let portal = self.bind_complete();
        match self.stream_each(req, shards, describe).await? {
            Streamed::Rows(description) => self.hold_exhausted_portal(&portal, description),
            Streamed::Failed => self.batch_failed(),
            // (`backend_lost` ended the batch.)
            Streamed::Gone => {}
        }
        Ok(true)
    }

    /// Runs `request` (a Query, or an extended request ending in Sync) on each of
    /// `shards` in turn inside the transaction, streaming the rows to the client and
    /// then their tag (not ReadyForQuery); the first RowDescription when `describe`.
    async fn stream_each(
        &mut self,
        request: &[u8],
        shards: &[usize],
        describe: bool,
    ) -> Result<Streamed, SessionError> {
        self.relay.drain_local(&mut self.cout);
        let mut answer = Concatenated::new(describe);
        let mut failed = false;
        for &s in shards {
            crate::metrics::inc(&self.db.shards[s].stats.cross_shard);
            if !self.enter_shard(s).await? {
                // The client got the error (the shard is unavailable).
                self.fail_attached();
                return Ok(Streamed::Failed);
            }
            self.reads.executed = true;
            let sent = match self.backend.as_mut() {
                Some(b) => b.send(request).await.map_err(|e| e.to_string()),
                None => Err("no server connection".to_string()),
            };
            if let Err(why) = sent {
                self.backend_lost(why);
                return Ok(Streamed::Gone);
            }
            loop {
                let read = match self.backend.as_mut() {
                    Some(b) => b.read_frame().await.map_err(|e| e.to_string()),
                    None => Err("no server connection".to_string()),
                };
                let mut f = match read {
                    Ok(f) => f,
                    Err(why) => {
                        self.backend_lost(why);
                        return Ok(Streamed::Gone);
                    }
                };
                let taken = answer.take(&f, &mut self.cout);
                match f[0] {
                    _ if taken => {}
                    b'Z' => {
                        self.status = f.get(5).copied().unwrap_or(b'E');
                        break;
                    }
                    // Each shard's tag, and the extended request's acknowledgements.
                    b'C' | b'1' | b'2' => {}
                    b'E' => {
                        // The transaction is aborted on this shard (for the client,
                        // everywhere): the shards after it are not asked.
                        if let Some(r) = &self.multi.txn
                            && let Some(e) = r.deadlock_error(&f)
                        {
                            f = e;
                        }
                        self.cout.extend_from_slice(&f);
                        failed = true;
                    }
                    // A SELECT answers no COPY; one would desynchronize the connection.
                    b'G' | b'H' | b'W' => {
                        if let Some(b) = self.backend.as_mut() {
                            b.broken = true;
                        }
                        self.backend_lost("unexpected COPY in a multi-shard read".into());
                        return Ok(Streamed::Gone);
                    }
                    b'S' => self.parameter_to_client(&f),
                    // Notices and the like, as they come.
                    _ => self.cout.extend_from_slice(&f),
                }
                if self.cout.len() >= FLUSH_AT {
                    self.flush_client().await?;
                }
            }
            if failed {
                self.status = b'E';
                return Ok(Streamed::Failed);
            }
        }
        match answer.finish(&mut self.cout) {
            Some(description) => Ok(Streamed::Rows(description)),
            None => {
                self.fail_attached();
                self.stream_error(PgError::new("XX000", "no row description from any shard"));
                Ok(Streamed::Failed)
            }
        }
    }

    /// BindComplete for the Bind being handled, whose portal pgshard answers; the
    /// portal's name (any held portal of that name is gone).
    pub(super) fn bind_complete(&mut self) -> Bytes {
        let portal = std::mem::take(&mut self.route.bind_portal);
        self.route.portals.remove(&portal);
        self.relay.push(super::Pending::Synth {
            frame: super::portal::empty(b'2'),
            undo: None,
        });
        portal
    }

    pub(super) fn stream_error(&mut self, e: PgError) {
        self.db.shards[self.home_shard()].stats.error(e.code);
        e.write(&mut self.cout);
    }
}
