//! Reads over several shards ordered by ORDER BY (with LIMIT and OFFSET): each shard
//! sorts its own rows, and pgshard merges the sorted answers as they come (a k-way
//! merge), holding one row per shard: the client gets each row as soon as every shard's
//! next row is known, and memory stays bounded whatever the answer's size
//! (`max_merge_bytes` does not apply). The rows come out exactly as the held merge
//! orders them (ties in shard order). Outside a transaction the shards answer on pooled
//! connections; inside one, on the transaction's own connections, every shard joined
//! first and then sent the statement at once. Only where pgshard orders every key
//! itself: values a server must rank (text in a non-C collation, enums, ...) are merged
//! held, as before, once the shards' descriptions show it.

use super::{Session, SessionError};
use crate::exec::scatter::{Request, Sent};
use crate::exec::sorted::{self, RowOrder};
use crate::protocol::{self, PgError};
use crate::router::merge::MergeSpec;
use bytes::{Bytes, BytesMut};
use std::cmp::Ordering;

/// Rows written to the client are flushed once this many bytes wait.
const FLUSH_AT: usize = 64 * 1024;

/// How a sorted read went.
pub(super) enum Sorted {
    /// The rows went to the client, then the tag; the description the client sees
    /// (None: the client got an error instead; inside a transaction, it is aborted).
    Streamed(Option<Bytes>),
    /// pgshard cannot order the rows alone: the shards' answers, each up to (not
    /// including) its ReadyForQuery, for the held merge (nothing but notices was written
    /// to the client).
    Held(Vec<Vec<BytesMut>>),
}

/// What comes next in one shard's answer.
enum Next {
    Row(BytesMut),
    /// Its ReadyForQuery: the shard has no more rows.
    End,
    /// The client got an error; every answer was read to its end or abandoned.
    Failed,
}

/// Where the shards' answers come from.
enum Source {
    /// Pooled connections, outside a transaction.
    Pool(Sent),
    /// The transaction's participants on these shards, and whether each answer was
    /// read to its ReadyForQuery.
    Tx(Vec<usize>, Vec<bool>),
}

impl Source {
    fn len(&self) -> usize {
        match self {
            Source::Pool(sent) => sent.len(),
            Source::Tx(shards, _) => shards.len(),
        }
    }
}

impl Session {
    /// Runs `req` on `nodes` (pooled connections, outside a transaction) and merges their
    /// sorted rows by `spec` (`formats`: the shards' result formats); the RowDescription
    /// goes first when `describe`, then the rows and the tag (not ReadyForQuery).
    pub(super) async fn stream_sorted(
        &mut self,
        nodes: &[(usize, Option<usize>)],
        req: Request<'_>,
        (prelude, describe): (&str, bool),
        spec: &MergeSpec,
        formats: &[bool],
    ) -> Result<Sorted, SessionError> {
        self.relay.drain_local(&mut self.cout);
        let sent = Sent::start(&self.db, nodes, req, Some(prelude), self.settings_fp).await;
        match sent {
            Ok(sent) => {
                let sorted = self
                    .merge_sorted(Source::Pool(sent), describe, spec, formats)
                    .await;
                self.restore_cancel();
                sorted
            }
            Err(e) => {
                self.stream_error(e);
                Ok(Sorted::Streamed(None))
            }
        }
    }

    /// [`Session::stream_sorted`] inside the client's transaction: every shard joins it,
    /// then each runs `request` (a Query, or an extended request ending in Sync).
    pub(super) async fn stream_sorted_in_transaction(
        &mut self,
        request: &[u8],
        shards: &[usize],
        describe: bool,
        spec: &MergeSpec,
        formats: &[bool],
    ) -> Result<Sorted, SessionError> {
        self.relay.drain_local(&mut self.cout);
        for &s in shards {
            crate::metrics::inc(&self.db.shards[s].stats.cross_shard);
            if !self.enter_shard(s).await? {
                // The client got the error (the shard is unavailable); nothing was sent.
                self.status = b'E';
                return Ok(Sorted::Streamed(None));
            }
        }
        self.reads.executed = true;
        let mut src = Source::Tx(shards.to_vec(), vec![true; shards.len()]);
        for i in 0..shards.len() {
            let sent = match self.participant(shards[i]) {
                Some(b) => b.send(request).await.map_err(|e| e.to_string()),
                None => Err("no server connection".to_string()),
            };
            if let Source::Tx(_, done) = &mut src {
                done[i] = false;
            }
            if let Err(why) = sent {
                self.participant_lost(&mut src, i, why).await;
                return Ok(self.failed(&src));
            }
        }
        let sorted = self.merge_sorted(src, describe, spec, formats).await;
        self.restore_cancel();
        sorted
    }

    /// Points the client's cancel requests at shard `i`'s server while pgshard waits for
    /// its answer: the shards run at once, and a cancel must reach one still running
    /// (its error ends the merge, which cancels the others).
    fn point_cancel(&mut self, src: &Source, i: usize) {
        match src {
            Source::Pool(sent) => self.cancel.set(sent.cancel_target(i)),
            Source::Tx(shards, _) => {
                let target = self
                    .participant(shards[i])
                    .map(|b| (b.addr.clone(), b.pid, b.secret));
                self.cancel
                    .set(target.as_ref().map(|(a, pid, secret)| (a, *pid, *secret)));
            }
        }
    }

    /// The k-way merge over `src`'s answers.
    async fn merge_sorted(
        &mut self,
        mut src: Source,
        describe: bool,
        spec: &MergeSpec,
        formats: &[bool],
    ) -> Result<Sorted, SessionError> {
        let k = src.len();
        // Each shard's frames other than rows (its description and tag), and its next row.
        let mut kept: Vec<Vec<BytesMut>> = vec![Vec::new(); k];
        let mut heads: Vec<Option<BytesMut>> = vec![None; k];
        for i in 0..k {
            self.point_cancel(&src, i);
            match self.next_sorted(&mut src, i, &mut kept[i]).await? {
                Next::Row(r) => heads[i] = Some(r),
                Next::End => {}
                Next::Failed => return Ok(self.failed(&src)),
            }
        }
        let Some(t) = kept.iter().flatten().find(|f| f[0] == b'T').cloned() else {
            self.stream_error(PgError::new("XX000", "no row description from any shard"));
            return Ok(self.failed(&src));
        };
        let firsts: Vec<&[u8]> = heads.iter().flatten().map(|r| &r[..]).collect();
        let Some(by) = sorted::for_stream(&self.db, &t, spec, formats, &firsts) else {
            return self.held(src, kept, heads).await;
        };
        let mut description = BytesMut::new();
        by.visible(&t, false, &mut description);
        if describe {
            self.cout.extend_from_slice(&description);
        }
        let mut skip = spec.offset;
        let mut left = spec.limit;
        let mut rows: u64 = 0;
        // (The loop above left the cancel pointed at the last shard.)
        let mut pointed = k.checked_sub(1);
        while left != Some(0) {
            let Some(i) = first(&by, &heads) else { break };
            let Some(row) = heads[i].take() else { break };
            if pointed != Some(i) {
                self.point_cancel(&src, i);
                pointed = Some(i);
            }
            if skip > 0 {
                skip -= 1;
            } else {
                by.visible(&row, true, &mut self.cout);
                rows += 1;
                left = left.map(|l| l - 1);
            }
            match self.next_sorted(&mut src, i, &mut kept[i]).await? {
                Next::Row(r) => heads[i] = Some(r),
                Next::End => {}
                Next::Failed => return Ok(self.failed(&src)),
            }
            if self.cout.len() >= FLUSH_AT {
                // (Should the client be gone outside a transaction, dropping `sent`
                // closes the connections still answering.)
                self.flush_client().await?;
            }
        }
        // Past the LIMIT: the rest of each answer (at most OFFSET + LIMIT rows a shard,
        // as the shards run it) is read and dropped, so that the connections stay in
        // step.
        for i in 0..k {
            if heads[i].take().is_none() {
                continue;
            }
            self.point_cancel(&src, i);
            loop {
                match self.next_sorted(&mut src, i, &mut kept[i]).await? {
                    Next::Row(_) => {}
                    Next::End => break,
                    Next::Failed => return Ok(self.failed(&src)),
                }
            }
        }
        protocol::write_complete(&mut self.cout, &format!("SELECT {rows}"));
        Ok(Sorted::Streamed(Some(description.freeze())))
    }

    /// The end of a merge the client got an error for: inside a transaction, which is
    /// then aborted, as after any error. The shard that failed may not be the attached
    /// one, whose server then decides the transaction's status for the client's next
    /// statement (and a batch's Sync): it is made to fail too.
    fn failed(&mut self, src: &Source) -> Sorted {
        if matches!(src, Source::Tx(..)) {
            self.fail_attached();
        }
        Sorted::Streamed(None)
    }

    /// The transaction is aborted: so is it on the attached server, whose answers decide
    /// the transaction's status from now on (its ReadyForQuery to the client's next
    /// statement or Sync), also when the statement failed on another shard or in
    /// pgshard's merge.
    pub(super) fn fail_attached(&mut self) {
        self.status = b'E';
        self.raise_on_attached();
    }

    /// Reads shard `i`'s answer up to its next row or its end; its description and tag
    /// go to `kept`, notices to the client. A shard's error goes to the client, and the
    /// other shards' statements still running are cancelled.
    async fn next_sorted(
        &mut self,
        src: &mut Source,
        i: usize,
        kept: &mut Vec<BytesMut>,
    ) -> Result<Next, SessionError> {
        loop {
            let mut f = match self.frame_from(src, i).await {
                Ok(f) => f,
                Err(e) => {
                    match src {
                        Source::Pool(sent) => {
                            sent.abandon_unfinished(i, true).await;
                            self.stream_error(e);
                        }
                        Source::Tx(..) => self.participant_lost(src, i, e.message).await,
                    }
                    return Ok(Next::Failed);
                }
            };
            match f[0] {
                b'D' => return Ok(Next::Row(f)),
                b'Z' => return Ok(Next::End),
                b'T' | b'C' => kept.push(f),
                b'E' => {
                    if let (Source::Tx(..), Some(r)) = (&src, &self.multi.txn)
                        && let Some(e) = r.deadlock_error(&f)
                    {
                        f = e;
                    }
                    self.cout.extend_from_slice(&f);
                    self.abandon_others(src, Some(i)).await;
                    // Up to this shard's ReadyForQuery, so that its connection stays in
                    // step.
                    while let Ok(f) = self.frame_from(src, i).await {
                        if f[0] == b'Z' {
                            break;
                        }
                    }
                    return Ok(Next::Failed);
                }
                b'S' => self.parameter_to_client(&f),
                // Notices and the like, as they come.
                _ => self.cout.extend_from_slice(&f),
            }
        }
    }

    /// The next frame of shard `i`'s answer (without the extended request's
    /// acknowledgements); ReadyForQuery last.
    async fn frame_from(&mut self, src: &mut Source, i: usize) -> Result<BytesMut, PgError> {
        match src {
            Source::Pool(sent) => sent.next(i).await,
            Source::Tx(shards, done) => loop {
                let Some(b) = self.participant(shards[i]) else {
                    return Err(PgError::new("08006", "no server connection"));
                };
                let f = b
                    .read_frame()
                    .await
                    .map_err(|e| PgError::new("08006", format!("server connection lost: {e}")))?;
                match f[0] {
                    b'1' | b'2' => {}
                    // A SELECT answers no COPY; one would desynchronize the connection.
                    b'G' | b'H' | b'W' => {
                        b.broken = true;
                        return Err(PgError::new(
                            "08P01",
                            "unexpected COPY in a read over several shards",
                        ));
                    }
                    b'Z' => {
                        done[i] = true;
                        return Ok(f);
                    }
                    _ => return Ok(f),
                }
            },
        }
    }

    /// The shards' statements still running but shard `except`'s are cancelled and
    /// (inside a transaction) their answers read to their end.
    async fn abandon_others(&mut self, src: &mut Source, except: Option<usize>) {
        match src {
            Source::Pool(sent) => match except {
                Some(i) => sent.abandon_unfinished(i, true).await,
                None => sent.abandon(0, true).await,
            },
            Source::Tx(shards, done) => {
                for j in (0..shards.len()).filter(|&j| Some(j) != except && !done[j]) {
                    if let Some(b) = self.participant(shards[j]) {
                        let (addr, pid, secret) = (b.addr.clone(), b.pid, b.secret);
                        let _ = crate::backend::BackendConn::cancel(&addr, pid, secret).await;
                    }
                }
                for j in (0..shards.len()).filter(|&j| Some(j) != except) {
                    while !done[j] {
                        let Some(b) = self.participant(shards[j]) else {
                            break;
                        };
                        match b.read_frame().await {
                            Ok(f) if f[0] == b'Z' => done[j] = true,
                            Ok(_) => {}
                            Err(_) => {
                                b.broken = true;
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    /// A participant's connection failed while answering: it is closed, the client is
    /// told, the other answers are read to their end, and the transaction is aborted
    /// (its ROLLBACK ends it on the shards still there).
    async fn participant_lost(&mut self, src: &mut Source, i: usize, why: String) {
        if let Source::Tx(shards, done) = src {
            if let Some(b) = self.participant(shards[i]) {
                b.broken = true;
            }
            done[i] = true;
        }
        tracing::warn!(error = %why, "server connection lost in a read over several shards");
        self.stream_error(
            PgError::new("08006", format!("server connection lost: {why}"))
                .with_hint("Roll the transaction back and retry it."),
        );
        self.abandon_others(src, Some(i)).await;
        self.status = b'E';
    }

    /// The shards' whole answers, the frames read so far included, for the held merge;
    /// each bounded by `max_merge_bytes`.
    async fn held(
        &mut self,
        mut src: Source,
        kept: Vec<Vec<BytesMut>>,
        heads: Vec<Option<BytesMut>>,
    ) -> Result<Sorted, SessionError> {
        let db = self.db.clone();
        let limit = crate::exec::MergeLimit::of(&db);
        let mut results = Vec::with_capacity(kept.len());
        for (i, (mut frames, head)) in kept.into_iter().zip(heads).enumerate() {
            let Some(row) = head else {
                results.push(frames);
                continue;
            };
            frames.push(row);
            let mut held: usize = frames.iter().map(|f| f.len()).sum();
            let mut failed = false;
            self.point_cancel(&src, i);
            loop {
                let mut f = match self.frame_from(&mut src, i).await {
                    Ok(f) => f,
                    Err(e) => {
                        match &mut src {
                            Source::Pool(sent) => {
                                sent.abandon(i, false).await;
                                self.stream_error(e);
                            }
                            Source::Tx(..) => self.participant_lost(&mut src, i, e.message).await,
                        }
                        return Ok(self.failed(&src));
                    }
                };
                match f[0] {
                    b'Z' => break,
                    b'E' => {
                        if let (Source::Tx(..), Some(r)) = (&src, &self.multi.txn)
                            && let Some(e) = r.deadlock_error(&f)
                        {
                            f = e;
                        }
                        failed = true;
                    }
                    b'S' => super::server_frames::saw_parameter(&mut self.zone, &f),
                    _ => {}
                }
                held += f.len();
                if limit.passed(held) {
                    // As a held merge past its limit: the statements are cancelled (the
                    // transaction they ran in is aborted), the client gets 54000.
                    match &mut src {
                        Source::Pool(sent) => sent.abandon(i, true).await,
                        Source::Tx(..) => self.abandon_others(&mut src, None).await,
                    }
                    self.stream_error(limit.exceeded());
                    return Ok(self.failed(&src));
                }
                frames.push(f);
            }
            results.push(frames);
            if failed {
                // The held merge answers this shard's error: the others' statements are
                // cancelled rather than read (and held) to their end, and a transaction
                // they ran in is aborted.
                self.abandon_others(&mut src, Some(i)).await;
                if matches!(src, Source::Tx(..)) {
                    self.fail_attached();
                }
                break;
            }
        }
        Ok(Sorted::Held(results))
    }
}

/// The shard whose next row comes first (the first such shard among equals: the held
/// merge's stable sort keeps shard order too).
fn first(by: &RowOrder, heads: &[Option<BytesMut>]) -> Option<usize> {
    let mut best: Option<(usize, &BytesMut)> = None;
    for (i, h) in heads.iter().enumerate() {
        let Some(h) = h else { continue };
        if best.is_none_or(|(_, b)| by.compare(h, b) == Ordering::Less) {
            best = Some((i, h));
        }
    }
    best.map(|(i, _)| i)
}
