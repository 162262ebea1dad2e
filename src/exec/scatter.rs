//! Statements that run on several shards: sent to each in parallel (a SELECT, then merged
//! by `merge`), or broadcast to every shard all or none (DDL and writes), with their
//! results combined.

pub use super::merge::merge_select;

use crate::cluster::Database;
use crate::frontend::CancelSlot;
use crate::net::ServerAddr;
use crate::protocol::{self, PgError};
use bytes::{BufMut, BytesMut};
use std::sync::Arc;

tokio::task_local! {
    /// The cancel slot of the client session the task serves. A statement run here on
    /// pooled connections of several shards (the session has none of them attached)
    /// points the client's cancel requests at the shard whose answer it awaits, so that
    /// psql's Ctrl-C reaches a server: the statement then fails with 57014, and the other
    /// shards are cancelled too. (Set around each session's task; without it, as in
    /// pgshard's own background work, nothing is pointed.)
    pub static CANCEL: Arc<CancelSlot>;
}

/// The client's cancel requests pointed at one connection after another while a
/// statement runs on several shards; where they went before, again when dropped.
struct CancelPointer {
    before: Option<Option<(ServerAddr, i32, i32)>>,
}

impl CancelPointer {
    fn new() -> CancelPointer {
        CancelPointer {
            before: CANCEL.try_with(|slot| slot.get()).ok(),
        }
    }

    fn at(&self, c: &crate::backend::BackendConn) {
        if self.before.is_some() {
            let _ = CANCEL.try_with(|slot| slot.set(Some((&c.addr, c.pid, c.secret))));
        }
    }
}

impl Drop for CancelPointer {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            let _ = CANCEL.try_with(|slot| slot.set(before.as_ref().map(|(a, p, s)| (a, *p, *s))));
        }
    }
}

/// Whether a shard's answer is the error of a cancelled statement.
fn cancelled(frames: &[BytesMut]) -> bool {
    frames
        .iter()
        .any(|f| f[0] == b'E' && crate::metrics::sqlstate_of(f) == Some("57014"))
}

/// What to run on each shard.
#[derive(Clone, Copy)]
pub enum Request<'a> {
    /// A simple Query.
    Simple(&'a str),
    /// Parse (unnamed) + Bind (unnamed portal, the client's parameters and result
    /// formats: the Bind body after the two names) + Describe portal + Execute + Sync.
    Extended {
        query: &'a [u8],
        types: &'a [u8],
        bind_rest: &'a [u8],
    },
}

/// Runs a request on each given (shard, node) in parallel (node None: the shard's
/// primary), and returns each shard's response frames up to (not including)
/// ReadyForQuery. `prelude` (the client's session settings) runs first on connections
/// whose settings fingerprint differs.
pub async fn run_on_shards(
    db: &Database,
    shards: &[(usize, Option<usize>)],
    req: Request<'_>,
    prelude: Option<&str>,
    settings_fp: u64,
) -> Result<Vec<Vec<BytesMut>>, PgError> {
    let mut sent = Sent::start(db, shards, req, prelude, settings_fp).await?;
    let limit = super::MergeLimit::of(db);
    let mut results = Vec::with_capacity(sent.conns.len());
    let pointer = CancelPointer::new();
    for i in 0..sent.conns.len() {
        pointer.at(&sent.conns[i]);
        match sent.answer(i, limit).await {
            Ok(frames) if cancelled(&frames) => {
                // The client's cancel: the statement fails, on the other shards too.
                sent.abandon(i + 1, true).await;
                return Err(PgError::new(
                    "57014",
                    "canceling statement due to user request",
                ));
            }
            Ok(frames) => results.push(frames),
            Err(e) => {
                let cancel = limit.bytes > 0 && e.code == "54000";
                sent.abandon(i, cancel).await;
                return Err(e);
            }
        }
    }
    Ok(results)
}

/// A request sent to several shards at once, whose answers are read shard after shard.
/// A connection whose answer was not read to its end is closed when this is dropped
/// (an error, the client gone), never handed to the next client out of step.
pub struct Sent {
    conns: Vec<crate::pool::Pooled>,
    /// Whether the connection's next answer is the settings prelude's.
    skip: Vec<bool>,
    /// Whether the connection's answer was read up to its ReadyForQuery.
    done: Vec<bool>,
}

impl Drop for Sent {
    fn drop(&mut self) {
        for (c, done) in self.conns.iter_mut().zip(&self.done) {
            if !done {
                c.broken = true;
            }
        }
    }
}

impl Sent {
    /// Sends the request to every shard first, so that they work at the same time
    /// (`run_on_shards`).
    pub async fn start(
        db: &Database,
        shards: &[(usize, Option<usize>)],
        req: Request<'_>,
        prelude: Option<&str>,
        settings_fp: u64,
    ) -> Result<Sent, PgError> {
        let mut sent = Sent {
            conns: Vec::with_capacity(shards.len()),
            skip: Vec::with_capacity(shards.len()),
            // Nothing sent yet: clean, should a later checkout fail.
            done: Vec::with_capacity(shards.len()),
        };
        for &(s, node) in shards {
            sent.conns.push(checkout_shard(db, s, node).await?);
            sent.skip.push(false);
            sent.done.push(true);
        }
        for i in 0..sent.conns.len() {
            let c = &mut sent.conns[i];
            let mut out = BytesMut::new();
            let replay = prelude.is_some() && c.settings != settings_fp;
            if let (true, Some(p)) = (replay, prelude) {
                protocol::write_query(&mut out, p);
                c.settings = settings_fp;
            }
            match &req {
                Request::Simple(sql) => protocol::write_query(&mut out, sql),
                Request::Extended {
                    query,
                    types,
                    bind_rest,
                } => {
                    protocol::write_parse(&mut out, b"", query, types);
                    protocol::write_bind(&mut out, b"", b"", bind_rest);
                    protocol::write_target(&mut out, b'D', b'P', b"");
                    protocol::write_msg(&mut out, b'E', &[0, 0, 0, 0, 0]);
                    protocol::write_msg(&mut out, b'S', &[]);
                }
            }
            sent.skip[i] = replay;
            sent.done[i] = false;
            c.send(&out).await.map_err(lost)?;
        }
        Ok(sent)
    }

    /// Where a client's cancel request goes to stop shard `i`'s statement: its server
    /// and BackendKeyData (a shard's error ends a stream, which then cancels the rest).
    pub fn cancel_target(&self, i: usize) -> Option<(&crate::net::ServerAddr, i32, i32)> {
        self.conns.get(i).map(|c| (&c.addr, c.pid, c.secret))
    }

    /// How many shards answer.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no shard does.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The next frame of shard `i`'s answer (after the prelude's, without the extended
    /// request's acknowledgements), ReadyForQuery last; an error where the connection
    /// failed or the answer is COPY (which cannot be merged).
    pub async fn next(&mut self, i: usize) -> Result<BytesMut, PgError> {
        let f = next_frame(&mut self.conns[i], &mut self.skip[i]).await?;
        self.done[i] = f[0] == b'Z';
        Ok(f)
    }

    /// The rest of shard `i`'s answer, up to (not including) its ReadyForQuery
    /// ([`read_answer`]).
    pub async fn answer(
        &mut self,
        i: usize,
        limit: super::MergeLimit<'_>,
    ) -> Result<Vec<BytesMut>, PgError> {
        let frames = read_answer(&mut self.conns[i], self.skip[i], limit).await?;
        self.skip[i] = false;
        self.done[i] = true;
        Ok(frames)
    }

    /// The answers not read to their end, but shard `except`'s, will not be read: as
    /// [`Sent::abandon`].
    pub async fn abandon_unfinished(&mut self, except: usize, cancel: bool) {
        for (i, c) in self.conns.iter_mut().enumerate() {
            if i == except || self.done[i] {
                continue;
            }
            if cancel {
                let _ = crate::backend::BackendConn::cancel(&c.addr, c.pid, c.secret).await;
            }
            c.broken = true;
        }
    }

    /// The answers from shard `from` on will not be read: their connections are closed
    /// rather than handed to the next client out of step (with `cancel`, their
    /// statements are cancelled first, to stop the work itself).
    pub async fn abandon(&mut self, from: usize, cancel: bool) {
        for c in &mut self.conns[from..] {
            if cancel {
                let _ = crate::backend::BackendConn::cancel(&c.addr, c.pid, c.secret).await;
            }
            c.broken = true;
        }
    }
}

/// The next frame of an answer: after the settings prelude's (while `skip`), without the
/// extended request's acknowledgements; ReadyForQuery last. COPY cannot be merged.
async fn next_frame(
    c: &mut crate::backend::BackendConn,
    skip: &mut bool,
) -> Result<BytesMut, PgError> {
    loop {
        let f = c.read_frame().await.map_err(lost)?;
        match f[0] {
            b'Z' if *skip => *skip = false,
            _ if *skip => {}
            b'1' | b'2' => {}
            b'G' | b'H' | b'W' => {
                return Err(PgError::new(
                    "0A000",
                    "COPY over several shards is not supported yet",
                ));
            }
            _ => return Ok(f),
        }
    }
}

/// One shard's answer, up to (not including) ReadyForQuery ([`next_frame`]), holding at
/// most `limit`.
async fn read_answer(
    c: &mut crate::backend::BackendConn,
    mut skip: bool,
    limit: super::MergeLimit<'_>,
) -> Result<Vec<BytesMut>, PgError> {
    let mut frames = Vec::new();
    let mut held = 0usize;
    loop {
        let f = next_frame(c, &mut skip).await?;
        if f[0] == b'Z' {
            return Ok(frames);
        }
        held += f.len();
        if limit.passed(held) {
            return Err(limit.exceeded());
        }
        frames.push(f);
    }
}

/// A server connection to a node of a shard (None: its primary), or the error a client
/// gets.
async fn checkout_shard(
    db: &Database,
    s: usize,
    node: Option<usize>,
) -> Result<crate::pool::Pooled, PgError> {
    let r = match node {
        Some(n) => super::checkout(db, s, n).await,
        None => super::checkout_primary(db, s).await,
    };
    r.map_err(|e| match e {
        crate::pool::PoolError::Timeout(..) => PgError::new("53300", e.to_string()),
        crate::pool::PoolError::Down(m) => {
            PgError::new("08006", format!("shard {s} unavailable: {m}"))
        }
    })
}

fn lost(e: crate::backend::BackendError) -> PgError {
    PgError::new("08006", format!("server connection lost: {e}"))
}

/// The first ErrorResponse any shard sent, with that shard's frames up to it.
pub(super) fn first_error(results: &[Vec<BytesMut>]) -> Option<BytesMut> {
    results.iter().find_map(|frames| {
        frames.iter().position(|f| f[0] == b'E').map(|i| {
            let mut out = BytesMut::new();
            for f in &frames[..=i] {
                if matches!(f[0], b'E' | b'N') {
                    out.extend_from_slice(f);
                }
            }
            out
        })
    })
}

/// Whether PostgreSQL refuses to run a statement inside a transaction block.
pub fn needs_autocommit(sql: &str) -> bool {
    let up = sql.trim_start().to_ascii_uppercase();
    up.starts_with("VACUUM")
        || up.starts_with("ALTER SYSTEM")
        || up.starts_with("REINDEX")
        || up.contains("CONCURRENTLY")
        || ((up.starts_with("CREATE") || up.starts_with("DROP")) && up.contains("DATABASE"))
        || up.contains("TABLESPACE")
}

/// Runs a statement (DDL, or a write allowed on several shards) on every given shard, all
/// or none as far as one-phase commit allows: in a transaction on each shard, committed
/// everywhere only if it succeeded everywhere, rolled back everywhere otherwise. A COMMIT
/// that fails after others succeeded is reported loudly (the shards then differ; two-phase
/// commit will close this window). Statements that cannot run in a transaction block run
/// shard by shard. Returns each shard's response frames (errors among them).
pub async fn run_all_or_none(
    db: &Database,
    shards: &[usize],
    sql: &str,
    prelude: Option<&str>,
    settings_fp: u64,
) -> Result<Vec<Vec<BytesMut>>, PgError> {
    if needs_autocommit(sql) {
        let primaries: Vec<_> = shards.iter().map(|&s| (s, None)).collect();
        return run_on_shards(db, &primaries, Request::Simple(sql), prelude, settings_fp).await;
    }
    let per_shard: Vec<(usize, String)> = shards.iter().map(|&s| (s, sql.to_string())).collect();
    run_each_all_or_none(db, &per_shard, prelude, settings_fp).await
}

/// Like [`run_all_or_none`], with each shard's own statement (a split INSERT).
pub async fn run_each_all_or_none(
    db: &Database,
    per_shard: &[(usize, String)],
    prelude: Option<&str>,
    settings_fp: u64,
) -> Result<Vec<Vec<BytesMut>>, PgError> {
    let mut conns = Vec::with_capacity(per_shard.len());
    for &(s, _) in per_shard {
        conns.push((s, checkout_shard(db, s, None).await?));
    }
    let result = all_or_none_on(db, &mut conns, per_shard, prelude, settings_fp).await;
    if result.is_err() {
        // A connection may be in the middle of an answer, or inside the transaction: closed,
        // never handed to the next client so.
        for (_, c) in &mut conns {
            c.broken = true;
        }
    }
    result
}

/// [`run_each_all_or_none`] on its checked-out connections, one per part.
async fn all_or_none_on(
    db: &Database,
    conns: &mut [(usize, crate::pool::Pooled)],
    per_shard: &[(usize, String)],
    prelude: Option<&str>,
    settings_fp: u64,
) -> Result<Vec<Vec<BytesMut>>, PgError> {
    // Each shard's part holds its locks while another part waits: the deadlock detectors
    // must know these backends are one transaction (registered here, marked on the
    // servers right after BEGIN).
    let txn = crate::cluster::deadlock::TRANSACTIONS.register(
        conns
            .iter()
            .map(|(s, c)| crate::cluster::deadlock::Participant {
                shard: *s,
                addr: c.addr.clone(),
                pid: c.pid,
                secret: c.secret,
            })
            .collect(),
    );
    let tag = txn.tag_sql();
    let marked = db.config.deadlock_detection_ms > 0;
    let mut results = Vec::with_capacity(conns.len());
    for ((_, c), (_, sql)) in conns.iter_mut().zip(per_shard) {
        let mut out = BytesMut::new();
        if let Some(p) = prelude.filter(|_| c.settings != settings_fp) {
            protocol::write_query(&mut out, p);
            c.settings = settings_fp;
            c.send(&out).await.map_err(lost)?;
            c.read_until_ready().await.map_err(lost)?;
            out.clear();
        }
        protocol::write_query(&mut out, "BEGIN");
        if marked {
            protocol::write_query(&mut out, &tag);
        }
        protocol::write_query(&mut out, sql);
        c.send(&out).await.map_err(lost)?;
    }
    let limit = super::MergeLimit::of(db);
    let pointer = CancelPointer::new();
    let mut cancelling = false;
    for i in 0..conns.len() {
        let c = &mut conns[i].1;
        pointer.at(c);
        c.read_until_ready().await.map_err(lost)?; // BEGIN
        if marked {
            c.read_until_ready().await.map_err(lost)?;
        }
        let mut frames = match read_answer(c, false, limit).await {
            Ok(frames) => frames,
            Err(e) if e.code == "54000" => {
                // RETURNING rows past the limit: the statement stops there, and its error
                // rolls every shard back.
                c.discard_answer().await.map_err(lost)?;
                let mut f = BytesMut::new();
                e.write(&mut f);
                vec![f]
            }
            Err(e) => return Err(e),
        };
        txn.rewrite(&mut frames);
        if !cancelling && cancelled(&frames) {
            // The client's cancel: the other shards' parts stop too (all roll back).
            cancelling = true;
            for (_, other) in &conns[i + 1..] {
                let _ =
                    crate::backend::BackendConn::cancel(&other.addr, other.pid, other.secret).await;
            }
        }
        results.push(frames);
    }
    drop(pointer);
    drop(txn);
    let failed = first_error(&results);
    let finish = if failed.is_some() {
        "ROLLBACK"
    } else {
        "COMMIT"
    };
    let mut committed = Vec::new();
    let mut commit_error = None;
    for (s, c) in conns.iter_mut() {
        let r = c.run_quiet(finish).await;
        match r {
            Ok(None) => committed.push(*s),
            Ok(Some((code, msg))) => commit_error = Some((*s, code, msg)),
            Err(e) => commit_error = Some((*s, "08006".into(), e.to_string())),
        }
    }
    if failed.is_some() {
        return Ok(results);
    }
    if let Some((s, code, msg)) = commit_error {
        tracing::error!(shard = s, committed = ?committed, %code, %msg, "DDL committed on some shards only");
        return Err(PgError::new(
            "XX000",
            format!(
                "DDL committed on shards {committed:?} but its COMMIT failed on shard {s}: {code} {msg}"
            ),
        )
        .with_hint("The shards now differ: apply or revert the statement on them by hand."));
    }
    Ok(results)
}

/// The answer to a write run on several shards: the first error, or RETURNING rows from
/// every shard with the command tag's row count summed (`sum`), or, for a reference table
/// (the same rows on every shard), the first shard's answer.
pub fn combine_writes(results: Vec<Vec<BytesMut>>, sum: bool) -> BytesMut {
    if !sum || first_error(&results).is_some() {
        return broadcast_result(results);
    }
    let mut out = BytesMut::new();
    let mut total: u64 = 0;
    let mut tag = String::new();
    let mut described = false;
    for frames in &results {
        for f in frames {
            match f[0] {
                b'T' if !described => {
                    described = true;
                    out.extend_from_slice(f);
                }
                b'D' => out.extend_from_slice(f),
                b'C' => {
                    let t = String::from_utf8_lossy(protocol::body(f))
                        .trim_end_matches('\0')
                        .to_string();
                    if let Some((head, n)) = t.rsplit_once(' ') {
                        total += n.parse::<u64>().unwrap_or(0);
                        tag = head.to_string();
                    }
                }
                _ => {}
            }
        }
    }
    let tag = format!("{tag} {total}");
    out.put_u8(b'C');
    out.put_i32((4 + tag.len() + 1) as i32);
    out.put_slice(tag.as_bytes());
    out.put_u8(0);
    out
}

/// The answers of an INSERT split over shards (`results`: each part's, from the shards
/// `from`) with its RETURNING rows in the order of the statement's rows (`row_shards`:
/// each row's shard), as one server returns them: one answer in place of the parts'
/// (the first part's description, the rows, every part's command tag). Unchanged after an
/// error, or when a shard returned another number of rows than it was sent (ON CONFLICT
/// DO NOTHING, a trigger that skipped rows): that order cannot be known.
pub fn in_row_order(
    results: Vec<Vec<BytesMut>>,
    from: &[usize],
    row_shards: &[usize],
) -> Vec<Vec<BytesMut>> {
    let rows_of = |frames: &[BytesMut]| frames.iter().filter(|f| f[0] == b'D').count();
    let whole = results.len() == from.len()
        && first_error(&results).is_none()
        && results.iter().any(|r| rows_of(r) > 0)
        && results
            .iter()
            .zip(from)
            .all(|(r, s)| rows_of(r) == row_shards.iter().filter(|&r| r == s).count());
    let Some(part_of_row) = row_shards
        .iter()
        .map(|s| from.iter().position(|f| f == s))
        .collect::<Option<Vec<usize>>>()
        .filter(|_| whole)
    else {
        return results;
    };
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut rows: Vec<std::collections::VecDeque<BytesMut>> = Vec::with_capacity(results.len());
    for (i, frames) in results.into_iter().enumerate() {
        let mut mine = std::collections::VecDeque::new();
        for f in frames {
            match f[0] {
                b'D' => mine.push_back(f),
                b'T' | b'n' if i == 0 => head.push(f),
                b'T' | b'n' => {}
                _ => tail.push(f),
            }
        }
        rows.push(mine);
    }
    let mut one = head;
    one.extend(part_of_row.into_iter().filter_map(|p| rows[p].pop_front()));
    one.extend(tail);
    vec![one]
}

/// A broadcast's answer: the first error, or the first shard's response.
pub fn broadcast_result(results: Vec<Vec<BytesMut>>) -> BytesMut {
    if let Some(e) = first_error(&results) {
        return e;
    }
    let mut out = BytesMut::new();
    if let Some(first) = results.into_iter().next() {
        for f in first {
            out.extend_from_slice(&f);
        }
    }
    out
}

/// The shards' EXPLAIN output, one shard after the other (in the text format under a
/// `Shard N` line each; JSON, YAML and XML plans are one row per shard).
pub fn explain_result(results: Vec<Vec<BytesMut>>, shards: &[usize]) -> BytesMut {
    if let Some(e) = first_error(&results) {
        return e;
    }
    let mut out = BytesMut::new();
    let mut text = false;
    if let Some(t) = results.iter().flatten().find(|f| f[0] == b'T') {
        out.extend_from_slice(t);
        // One column of type text (oid 25); json, xml and yaml plans are not text.
        text = crate::protocol::body(t)
            .get(2..)
            .and_then(|c| memchr::memchr(0, c).map(|n| &c[n + 1..]))
            .and_then(|c| c.get(6..10))
            == Some(&25u32.to_be_bytes()[..]);
    }
    let mut tag = None;
    for (frames, s) in results.into_iter().zip(shards) {
        if text {
            let line = format!("Shard {s}");
            let mut body = 1u16.to_be_bytes().to_vec();
            body.extend((line.len() as i32).to_be_bytes());
            body.extend(line.as_bytes());
            protocol::write_msg(&mut out, b'D', &body);
        }
        for f in frames {
            match f[0] {
                b'T' => {}
                b'C' => tag = Some(f),
                _ => out.extend_from_slice(&f),
            }
        }
    }
    if let Some(t) = tag {
        out.extend_from_slice(&t);
    }
    out
}

/// A Bind remainder whose result-format list also covers `extra` trailing (text)
/// columns: needed when pgshard adds hidden sort columns and the client gave one format
/// per column.
pub fn with_extra_result_columns(bind_rest: &[u8], extra: usize) -> Vec<u8> {
    let formats = result_formats(bind_rest);
    if extra == 0 || formats.len() <= 1 {
        return bind_rest.to_vec();
    }
    // The list is at the end: 2-byte count, then 2 bytes per column.
    let start = bind_rest.len() - 2 - 2 * formats.len();
    let mut out = bind_rest[..start].to_vec();
    out.extend(((formats.len() + extra) as u16).to_be_bytes());
    out.extend_from_slice(&bind_rest[start + 2..]);
    out.extend(std::iter::repeat_n([0u8, 0], extra).flatten());
    out
}

/// A Bind remainder asking for every result column in text (a DECLARE's query: the
/// cursor's rows are text whatever formats the DECLARE's own Bind asked for).
pub fn with_text_results(bind_rest: &[u8]) -> Vec<u8> {
    let n = result_formats(bind_rest).len();
    let mut out = bind_rest[..bind_rest.len() - 2 - 2 * n].to_vec();
    out.extend([0u8, 0]);
    out
}

/// Per-column result formats from a Bind's remainder (after the parameters): true for
/// binary. Empty: all text.
pub fn result_formats(bind_rest: &[u8]) -> Vec<bool> {
    fn parse(b: &[u8]) -> Option<Vec<bool>> {
        let u16_at = |i: usize| -> Option<usize> {
            Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize)
        };
        let mut i = 0;
        let nfmt = u16_at(i)?;
        i += 2 + 2 * nfmt;
        let n = u16_at(i)?;
        i += 2;
        for _ in 0..n {
            let len = i32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?);
            i += 4 + len.max(0) as usize;
        }
        let nres = u16_at(i)?;
        i += 2;
        (0..nres)
            .map(|k| b.get(i + 2 * k..i + 2 * k + 2).map(|c| c == [0, 1]))
            .collect()
    }
    parse(bind_rest).unwrap_or_default()
}
