//! Reads over several shards ordered by ORDER BY (with LIMIT and OFFSET), outside a
//! transaction: each shard sorts its own rows, and pgshard merges the sorted answers as
//! they come (a k-way merge), holding one row per shard: the client gets each row as
//! soon as every shard's next row is known, and memory stays bounded whatever the
//! answer's size (`max_merge_bytes` does not apply). The rows come out exactly as the
//! held merge orders them (ties in shard order). Only where pgshard orders every key
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
    /// (None: the client got an error instead).
    Streamed(Option<Bytes>),
    /// pgshard cannot order the rows alone: the merged answer, as the held merge makes
    /// it (nothing was written to the client).
    Held(Result<BytesMut, PgError>),
}

/// What comes next in one shard's answer.
enum Next {
    Row(BytesMut),
    /// Its ReadyForQuery: the shard has no more rows.
    End,
    /// Its error: the client got it.
    Failed,
}

impl Session {
    /// Runs `req` on `nodes` and merges their sorted rows by `spec`'s ORDER BY, LIMIT
    /// and OFFSET (`formats`: the shards' result formats). The RowDescription goes
    /// first when `describe`; then the rows and the tag (not ReadyForQuery).
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
        let mut sent = match sent {
            Ok(s) => s,
            Err(e) => {
                self.stream_error(e);
                return Ok(Sorted::Streamed(None));
            }
        };
        let k = sent.len();
        // Each shard's frames other than rows (its description and tag), and its next row.
        let mut kept: Vec<Vec<BytesMut>> = vec![Vec::new(); k];
        let mut heads: Vec<Option<BytesMut>> = vec![None; k];
        for i in 0..k {
            match self.next_sorted(&mut sent, i, &mut kept[i]).await? {
                Next::Row(r) => heads[i] = Some(r),
                Next::End => {}
                Next::Failed => return Ok(Sorted::Streamed(None)),
            }
        }
        let Some(t) = kept.iter().flatten().find(|f| f[0] == b'T').cloned() else {
            self.stream_error(PgError::new("XX000", "no row description from any shard"));
            return Ok(Sorted::Streamed(None));
        };
        let Some(by) = sorted::for_stream(&self.db, &t, spec, formats) else {
            return Ok(Sorted::Held(
                self.held(sent, kept, heads, (nodes[0], prelude), spec, formats)
                    .await,
            ));
        };
        let mut description = BytesMut::new();
        by.visible(&t, false, &mut description);
        if describe {
            self.cout.extend_from_slice(&description);
        }
        let mut skip = spec.offset;
        let mut left = spec.limit;
        let mut rows: u64 = 0;
        while left != Some(0) {
            let Some(i) = first(&by, &heads) else { break };
            let Some(row) = heads[i].take() else { break };
            if skip > 0 {
                skip -= 1;
            } else {
                by.visible(&row, true, &mut self.cout);
                rows += 1;
                left = left.map(|l| l - 1);
            }
            match self.next_sorted(&mut sent, i, &mut kept[i]).await? {
                Next::Row(r) => heads[i] = Some(r),
                Next::End => {}
                Next::Failed => return Ok(Sorted::Streamed(None)),
            }
            if self.cout.len() >= FLUSH_AT {
                // (Should the client be gone, dropping `sent` closes the connections
                // still answering.)
                self.flush_client().await?;
            }
        }
        // Past the LIMIT: the rest of each answer (at most OFFSET + LIMIT rows a shard,
        // as the shards run it) is read and dropped, so that the connections go back in
        // step.
        for i in 0..k {
            if heads[i].take().is_none() {
                continue;
            }
            loop {
                match self.next_sorted(&mut sent, i, &mut kept[i]).await? {
                    Next::Row(_) => {}
                    Next::End => break,
                    Next::Failed => return Ok(Sorted::Streamed(None)),
                }
            }
        }
        protocol::write_complete(&mut self.cout, &format!("SELECT {rows}"));
        Ok(Sorted::Streamed(Some(description.freeze())))
    }

    /// Reads shard `i`'s answer up to its next row or its end; its description and tag
    /// go to `kept`, notices to the client. A shard's error goes to the client, and the
    /// other shards' statements still running are cancelled.
    async fn next_sorted(
        &mut self,
        sent: &mut Sent,
        i: usize,
        kept: &mut Vec<BytesMut>,
    ) -> Result<Next, SessionError> {
        loop {
            let f = match sent.next(i).await {
                Ok(f) => f,
                Err(e) => {
                    sent.abandon_unfinished(i, true).await;
                    self.stream_error(e);
                    return Ok(Next::Failed);
                }
            };
            match f[0] {
                b'D' => return Ok(Next::Row(f)),
                b'Z' => return Ok(Next::End),
                b'T' | b'C' => kept.push(f),
                b'E' => {
                    self.cout.extend_from_slice(&f);
                    sent.abandon_unfinished(i, true).await;
                    // Up to this shard's ReadyForQuery, so that its connection goes back
                    // in step.
                    while let Ok(f) = sent.next(i).await {
                        if f[0] == b'Z' {
                            break;
                        }
                    }
                    return Ok(Next::Failed);
                }
                // Notices and the like, as they come.
                _ => self.cout.extend_from_slice(&f),
            }
        }
    }

    /// The held merge of the shards' answers, the frames read so far included (each
    /// shard's answer bounded by `max_merge_bytes`).
    async fn held(
        &mut self,
        mut sent: Sent,
        kept: Vec<Vec<BytesMut>>,
        heads: Vec<Option<BytesMut>>,
        (node, prelude): ((usize, Option<usize>), &str),
        spec: &MergeSpec,
        formats: &[bool],
    ) -> Result<BytesMut, PgError> {
        let limit = crate::exec::MergeLimit::of(&self.db);
        let mut results = Vec::with_capacity(kept.len());
        for (i, (mut frames, head)) in kept.into_iter().zip(heads).enumerate() {
            if let Some(row) = head {
                frames.push(row);
                match sent.answer(i, limit).await {
                    Ok(rest) => frames.extend(rest),
                    Err(e) => {
                        let cancel = limit.bytes > 0 && e.code == "54000";
                        sent.abandon(i, cancel).await;
                        return Err(e);
                    }
                }
            }
            results.push(frames);
        }
        drop(sent);
        crate::exec::finalize::merged_and_finished(
            &self.db,
            node,
            results,
            spec,
            (formats, formats),
            None,
            (Some(prelude), self.settings_fp),
        )
        .await
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
