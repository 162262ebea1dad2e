//! Statements that run on several shards: a SELECT whose rows are merged into one result
//! (concatenation, ORDER BY on typed values, LIMIT), and a statement broadcast to every
//! shard (DDL). Only here are rows decoded: single-shard routes never are.

use crate::cluster::Database;
use crate::protocol::{self, PgError};
use crate::router::analyze::{MergeSpec, OrderCol};
use crate::sharding::value::Decimal;
use bytes::{BufMut, BytesMut};
use std::cmp::Ordering;

/// Runs `sql` (simple protocol) on each shard's primary, in parallel, and returns each
/// shard's response frames up to (not including) ReadyForQuery. `prelude` (the client's
/// session settings) runs first on connections whose settings fingerprint differs.
pub async fn run_on_shards(
    db: &Database,
    shards: &[usize],
    sql: &str,
    prelude: Option<&str>,
    settings_fp: u64,
) -> Result<Vec<Vec<BytesMut>>, PgError> {
    let mut conns = Vec::with_capacity(shards.len());
    for &s in shards {
        let c = super::checkout(db, db.router.plan(s))
            .await
            .map_err(|e| match e {
                crate::pool::PoolError::Timeout(..) => PgError::new("53300", e.to_string()),
                crate::pool::PoolError::Down(m) => {
                    PgError::new("08006", format!("shard {s} unavailable: {m}"))
                }
            })?;
        conns.push(c);
    }
    // Send everything first so that the shards work at the same time.
    let mut skip_prelude = Vec::with_capacity(conns.len());
    for c in conns.iter_mut() {
        let mut out = BytesMut::new();
        let replay = prelude.is_some() && c.settings != settings_fp;
        if let (true, Some(p)) = (replay, prelude) {
            protocol::write_query(&mut out, p);
            c.settings = settings_fp;
        }
        protocol::write_query(&mut out, sql);
        skip_prelude.push(replay);
        c.send(&out).await.map_err(lost)?;
    }
    let mut results = Vec::with_capacity(conns.len());
    for (c, mut skip) in conns.iter_mut().zip(skip_prelude) {
        let mut frames = Vec::new();
        loop {
            let f = c.read_frame().await.map_err(lost)?;
            match f[0] {
                b'Z' if skip => skip = false,
                b'Z' => break,
                _ if skip => {}
                // COPY cannot be merged here; refuse and drop the connection.
                b'G' | b'H' | b'W' => {
                    c.broken = true;
                    return Err(PgError::new(
                        "0A000",
                        "COPY over several shards is not supported yet",
                    ));
                }
                _ => frames.push(f),
            }
        }
        results.push(frames);
    }
    Ok(results)
}

fn lost(e: crate::backend::BackendError) -> PgError {
    PgError::new("08006", format!("server connection lost: {e}"))
}

/// The first ErrorResponse any shard sent, with that shard's frames up to it.
fn first_error(results: &[Vec<BytesMut>]) -> Option<BytesMut> {
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

/// Field names and type OIDs of a RowDescription.
fn columns(t: &[u8]) -> Vec<(String, u32)> {
    let mut b = protocol::body(t);
    if b.len() < 2 {
        return Vec::new();
    }
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    b = &b[2..];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(name) = protocol::read_cstr(&mut b, "RowDescription") else {
            break;
        };
        if b.len() < 18 {
            break;
        }
        let oid = u32::from_be_bytes([b[6], b[7], b[8], b[9]]);
        b = &b[18..];
        out.push((name, oid));
    }
    out
}

/// The fields of a DataRow (None = NULL).
fn fields(d: &[u8]) -> Vec<Option<&[u8]>> {
    let b = protocol::body(d);
    if b.len() < 2 {
        return Vec::new();
    }
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    let mut i = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if i + 4 > b.len() {
            break;
        }
        let len = i32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        i += 4;
        if len < 0 {
            out.push(None);
        } else {
            let end = (i + len as usize).min(b.len());
            out.push(Some(&b[i..end]));
            i = end;
        }
    }
    out
}

/// Compares two text-format values of a PostgreSQL type.
fn compare(oid: u32, a: &[u8], b: &[u8]) -> Ordering {
    let text = |x: &[u8]| std::str::from_utf8(x).unwrap_or("").trim().to_string();
    match oid {
        // int2, int4, int8, oid
        20 | 21 | 23 | 26 => {
            let p = |x: &[u8]| text(x).parse::<i64>().unwrap_or(0);
            p(a).cmp(&p(b))
        }
        // numeric
        1700 => match (Decimal::parse(&text(a)), Decimal::parse(&text(b))) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.cmp(b),
        },
        // float4, float8 (NaN sorts last, as in PostgreSQL)
        700 | 701 => {
            let p = |x: &[u8]| text(x).parse::<f64>().unwrap_or(f64::NAN);
            p(a).total_cmp(&p(b))
        }
        // Text, dates and timestamps in ISO style: byte order (C collation).
        _ => a.cmp(b),
    }
}

/// Merges the shards' results of a SELECT into one result.
pub fn merge_select(results: Vec<Vec<BytesMut>>, spec: &MergeSpec) -> Result<BytesMut, PgError> {
    if let Some(e) = first_error(&results) {
        return Ok(e);
    }
    let mut out = BytesMut::new();
    let mut description = None;
    let mut rows: Vec<BytesMut> = Vec::new();
    for frames in results {
        for f in frames {
            match f[0] {
                b'T' if description.is_none() => description = Some(f),
                b'D' => rows.push(f),
                b'N' => out.extend_from_slice(&f),
                _ => {}
            }
        }
    }
    let Some(t) = description else {
        return Err(PgError::new("XX000", "no row description from any shard"));
    };
    let cols = columns(&t);
    if !spec.order.is_empty() {
        let mut keys = Vec::with_capacity(spec.order.len());
        for k in &spec.order {
            let idx = match &k.col {
                OrderCol::Position(p) => Some(*p),
                OrderCol::Name(n) => cols.iter().position(|(c, _)| c == n),
            }
            .filter(|&i| i < cols.len())
            .ok_or_else(|| {
                PgError::new(
                    "0A000",
                    "ORDER BY across shards must name an output column; add it to the select list",
                )
            })?;
            keys.push((idx, cols[idx].1, k.desc, k.nulls_first));
        }
        rows.sort_by(|x, y| {
            let (fx, fy) = (fields(x), fields(y));
            for &(i, oid, desc, nulls_first) in &keys {
                let o = match (fx.get(i).copied().flatten(), fy.get(i).copied().flatten()) {
                    (None, None) => Ordering::Equal,
                    (None, Some(_)) => {
                        if nulls_first {
                            Ordering::Less
                        } else {
                            Ordering::Greater
                        }
                    }
                    (Some(_), None) => {
                        if nulls_first {
                            Ordering::Greater
                        } else {
                            Ordering::Less
                        }
                    }
                    (Some(a), Some(b)) => {
                        let o = compare(oid, a, b);
                        if desc { o.reverse() } else { o }
                    }
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        });
    }
    if let Some(l) = spec.limit {
        rows.truncate(l as usize);
    }
    out.extend_from_slice(&t);
    let n = rows.len();
    for r in rows {
        out.extend_from_slice(&r);
    }
    let tag = format!("SELECT {n}");
    out.put_u8(b'C');
    out.put_i32((4 + tag.len() + 1) as i32);
    out.put_slice(tag.as_bytes());
    out.put_u8(0);
    Ok(out)
}
