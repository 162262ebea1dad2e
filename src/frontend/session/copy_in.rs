//! COPY FROM STDIN into a sharded table: it runs on every shard at once, in one
//! transaction over them (the client's, or an implicit one committed with two-phase
//! commit); each row goes to the shard of its key, passed on as the client sent it, in
//! batches (memory stays bounded whatever the size). Into a reference table every row goes
//! to every shard.

use super::copy::BATCH;
use super::{Session, SessionError};
use crate::config::PoolMode;
use crate::protocol::{self, PgError};
use crate::router::copy::{CopyStmt, Key, Piece, RowSplitter};
use crate::router::{self, RouteError};
use crate::sql::{quote_ident, quote_literal};
use bytes::{BufMut, BytesMut};
use tokio::io::AsyncReadExt;

/// Where COPY FROM rows go.
enum Into {
    /// By the key at this position, with this table's shard function.
    Split { table: usize, key: usize },
    /// Every row to every shard (a reference table).
    Every,
}

/// Routes one piece of COPY data into the shards' batches. A directory key that is not
/// cached is put aside with its row (`misses`), for a lookup.
fn route_piece(
    p: Piece<'_>,
    into: &Into,
    rules: &router::Rules,
    zone: &crate::sharding::Zone,
    n: usize,
    batches: &mut [BytesMut],
    misses: &mut Vec<(Vec<u8>, String)>,
) -> Result<(), RouteError> {
    match p {
        Piece::Header(h) => batches.iter_mut().for_each(|b| b.put_slice(h)),
        Piece::End(trailer) => batches.iter_mut().for_each(|b| b.put_slice(trailer)),
        Piece::Row(r) => match into {
            Into::Every => batches.iter_mut().for_each(|b| b.put_slice(r.bytes)),
            Into::Split { table, .. } => {
                let f = &rules.tables[*table];
                let s = match &r.key {
                    Some(Key::Text(k)) => f.shard_of_text(k, n, zone),
                    Some(Key::Binary(k)) => f.shard_of_binary(k, n, zone),
                    None => f.shard_of(&crate::sharding::Value::Null, n),
                };
                match s {
                    Ok(s) => batches[s].put_slice(r.bytes),
                    Err(crate::sharding::ShardError::DirectoryMiss { key, .. }) => {
                        misses.push((r.bytes.to_vec(), key))
                    }
                    Err(e) => return Err(RouteError::Key(e)),
                }
            }
        },
    }
    Ok(())
}

fn copy_data(out: &mut BytesMut, data: &[u8]) {
    out.put_u8(b'd');
    out.put_i32(4 + data.len() as i32);
    out.put_slice(data);
}

impl Session {
    /// COPY FROM STDIN into a sharded table (`table`) or a reference table (None).
    pub(super) async fn copy_in(
        &mut self,
        sql: &str,
        cs: CopyStmt,
        table: Option<usize>,
        extended: bool,
    ) -> Result<(), SessionError> {
        if self.mode != PoolMode::Transaction
            || (self.status != b'I' && !self.can_run_in_transaction())
        {
            let e = PgError::new(
                "0A000",
                "COPY into a sharded or reference table needs transaction pooling mode, outside a failed transaction",
            );
            self.copy_error(e, extended);
            return Ok(());
        }
        let shards: Vec<usize> = (0..self.db.shards.len()).collect();
        let implicit = self.begin_implicit().await?;
        if !self.enter_shards(&shards).await? {
            self.status = b'E';
            return self
                .finish_statement(implicit, BytesMut::new(), extended)
                .await;
        }
        // Where the key is in each row.
        let into = match table {
            None => Into::Every,
            Some(t) => {
                let column = self.db.router.rules.tables[t].column.clone();
                let cols = match &cs.columns {
                    Some(c) => Ok(c.clone()),
                    None => {
                        self.table_columns(cs.schema.as_deref(), cs.table.as_deref().unwrap_or(""))
                            .await
                    }
                };
                match cols.map(|c| c.iter().position(|x| *x == column)) {
                    Ok(Some(key)) => Into::Split { table: t, key },
                    Ok(None) => {
                        return self.copy_refused(implicit, extended, PgError::new("0A000", format!("COPY into sharded table {} must include its shard key {column}", cs.table.as_deref().unwrap_or("")))).await;
                    }
                    Err(e) => return self.copy_refused(implicit, extended, e).await,
                }
            }
        };
        // Every shard enters COPY IN.
        let mut response = None;
        let mut failure = None;
        let mut in_copy = Vec::new();
        for &s in &shards {
            let b = self.participant(s).expect("entered");
            let mut q = BytesMut::new();
            protocol::write_query(&mut q, sql);
            if let Err(e) = b.send(&q).await {
                self.backend_lost(e.to_string());
                return Ok(());
            }
            loop {
                let f = match b.read_frame().await {
                    Ok(f) => f,
                    Err(e) => {
                        self.backend_lost(e.to_string());
                        return Ok(());
                    }
                };
                match f[0] {
                    b'G' => {
                        response.get_or_insert(f);
                        in_copy.push(s);
                        break;
                    }
                    b'E' => failure = Some(f),
                    b'Z' => break,
                    _ => {}
                }
            }
            if failure.is_some() {
                break;
            }
        }
        if let Some(err) = failure {
            self.copy_abort(&in_copy, "COPY failed on another shard")
                .await?;
            self.status = b'E';
            return self.finish_statement(implicit, err, extended).await;
        }
        self.relay.drain_local(&mut self.cout);
        self.cout
            .extend_from_slice(&response.expect("every shard answered"));
        self.flush_client().await?;
        let max = self.max_message;
        let mut splitter = RowSplitter::new(
            cs,
            match into {
                Into::Split { key, .. } => key,
                Into::Every => 0,
            },
            max,
        );
        let mut batches: Vec<BytesMut> = vec![BytesMut::new(); shards.len()];
        let rules = self.db.router.rules.clone();
        let n = shards.len();
        // Rows, until CopyDone or CopyFail.
        let outcome: Result<(), PgError> = loop {
            let frame = match protocol::frame_len(&self.crbuf, max) {
                Ok(Some(len)) => self.crbuf.split_to(len),
                Ok(None) => match self.reader.read_buf(&mut self.crbuf).await {
                    Ok(0) | Err(_) => {
                        self.client_eof = true;
                        break Err(PgError::new("08006", "client connection lost during COPY"));
                    }
                    Ok(_) => continue,
                },
                Err(e) => break Err(PgError::new("08P01", e.to_string())),
            };
            match frame[0] {
                b'd' | b'c' => {
                    let done = frame[0] == b'c';
                    let mut bad = None;
                    let mut misses = Vec::new();
                    let mut route = |p: Piece<'_>| {
                        if bad.is_none()
                            && let Err(e) = route_piece(
                                p,
                                &into,
                                &rules,
                                &self.zone,
                                n,
                                &mut batches,
                                &mut misses,
                            )
                        {
                            bad = Some(e);
                        }
                    };
                    let fed = if done {
                        splitter.finish(&mut route)
                    } else {
                        splitter.feed(protocol::body(&frame), &mut route)
                    };
                    if let Err(e) = fed {
                        break Err(PgError::new("22P04", e));
                    }
                    if let Some(e) = bad {
                        break Err(PgError::new(e.sqlstate(), e.to_string()));
                    }
                    // Directory keys not cached: read (new keys recorded), then routed.
                    if let Err(e) = self.route_misses(&into, misses, &mut batches).await {
                        break Err(e);
                    }
                    let min = if done { 0 } else { BATCH };
                    if let Err(e) = self.send_batches(&mut batches, min).await {
                        break Err(e);
                    }
                    if done {
                        break Ok(());
                    }
                }
                b'f' => {
                    let msg = String::from_utf8_lossy(protocol::body(&frame))
                        .trim_end_matches('\0')
                        .to_string();
                    break Err(PgError::new(
                        "57014",
                        format!("COPY from stdin failed: {msg}"),
                    ));
                }
                // Flush and Sync mean nothing during COPY IN.
                b'H' | b'S' => {}
                other => {
                    break Err(PgError::new(
                        "08P01",
                        format!("unexpected message type 0x{other:02X} during COPY from stdin"),
                    ));
                }
            }
        };
        let out = match outcome {
            Ok(()) => {
                // CopyDone everywhere, then each shard's result.
                let mut results = Vec::with_capacity(n);
                for &s in &shards {
                    let b = self.participant(s).expect("entered");
                    let mut done = BytesMut::new();
                    protocol::write_msg(&mut done, b'c', &[]);
                    let r = match b.send(&done).await {
                        Ok(()) => b.read_until_ready().await,
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(frames) => results.push(frames),
                        Err(e) => {
                            self.backend_lost(e.to_string());
                            return Ok(());
                        }
                    }
                }
                if results.iter().flatten().any(|f| f[0] == b'E') {
                    self.status = b'E';
                }
                crate::exec::scatter::combine_writes(results, matches!(into, Into::Split { .. }))
            }
            Err(e) => {
                self.copy_abort(&shards, &e.message).await?;
                self.status = b'E';
                let mut f = BytesMut::new();
                e.write(&mut f);
                f
            }
        };
        self.reads.executed = true;
        self.finish_statement(implicit, out, extended).await
    }

    /// Routes rows whose directory key was not cached: the directory is read, and keys it
    /// does not have are recorded (these rows are inserted).
    async fn route_misses(
        &mut self,
        into: &Into,
        misses: Vec<(Vec<u8>, String)>,
        batches: &mut [BytesMut],
    ) -> Result<(), PgError> {
        let Into::Split { table, .. } = into else {
            return Ok(());
        };
        let f = self.db.router.rules.tables[*table].clone();
        for (row, key) in misses {
            let s = match f.directory().and_then(|d| d.get(&key)) {
                Some(s) => s,
                None => {
                    crate::exec::directory::lookup(&self.db, &f, &key, true)
                        .await
                        .map_err(|e| {
                            PgError::new("58000", format!("directory lookup failed: {e}"))
                        })?
                        .0
                }
            };
            batches[s].put_slice(&row);
        }
        Ok(())
    }

    /// Sends each shard's buffered rows when more than `min` bytes are waiting.
    async fn send_batches(&mut self, batches: &mut [BytesMut], min: usize) -> Result<(), PgError> {
        for (s, rows) in batches.iter_mut().enumerate() {
            if rows.is_empty() || rows.len() < min {
                continue;
            }
            let mut f = BytesMut::with_capacity(rows.len() + 5);
            copy_data(&mut f, rows);
            rows.clear();
            let b = self.participant(s).expect("entered");
            if let Err(e) = b.send(&f).await {
                return Err(PgError::new(
                    "08006",
                    format!("shard {s} lost during COPY: {e}"),
                ));
            }
        }
        Ok(())
    }

    /// Takes the shards in COPY IN out of it (CopyFail) and reads their answers.
    async fn copy_abort(&mut self, shards: &[usize], why: &str) -> Result<(), SessionError> {
        for &s in shards {
            let Some(b) = self.participant(s) else {
                continue;
            };
            let mut f = BytesMut::new();
            protocol::write_msg(&mut f, b'f', format!("{why}\0").as_bytes());
            if b.send(&f).await.is_err() || b.read_until_ready().await.is_err() {
                b.broken = true;
            }
        }
        Ok(())
    }

    async fn copy_refused(
        &mut self,
        implicit: bool,
        extended: bool,
        e: PgError,
    ) -> Result<(), SessionError> {
        self.status = b'E';
        let mut f = BytesMut::new();
        e.write(&mut f);
        self.finish_statement(implicit, f, extended).await
    }

    /// A table's columns in order, from the attached shard.
    async fn table_columns(
        &mut self,
        schema: Option<&str>,
        table: &str,
    ) -> Result<Vec<String>, PgError> {
        let b = self.backend.as_mut().expect("entered");
        let name = match schema {
            Some(s) => format!("{}.{}", quote_ident(s), quote_ident(table)),
            None => quote_ident(table),
        };
        let sql = format!(
            "SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = pg_catalog.to_regclass({}) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            quote_literal(&name)
        );
        let rows = b
            .query_rows(&sql)
            .await
            .map_err(|e| PgError::new("08006", e.to_string()))?;
        if rows.is_empty() {
            return Err(PgError::new(
                "42P01",
                format!(
                    "relation \"{}{table}\" does not exist",
                    schema.map(|s| format!("{s}.")).unwrap_or_default()
                ),
            ));
        }
        Ok(rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect())
    }
}
