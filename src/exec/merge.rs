//! Merging the rows of a SELECT run on several shards into one result, as PostgreSQL
//! would have returned it: aggregates combined per group (count, sum, min, max, avg),
//! HAVING, DISTINCT (ON), ORDER BY on typed values (text and binary formats), OFFSET and
//! LIMIT, and hidden columns stripped. Only here are rows decoded.

use super::order::{self, Ordered};
use super::scatter::first_error;
use super::values::{add, unmergeable};
use crate::protocol::{self, PgError};
use crate::router::analyze::{MergeSpec, OrderCol};
use crate::router::merge::Column;
use bytes::{BufMut, BytesMut};
use std::cmp::Ordering;
use std::collections::HashMap;

/// The byte offset in a RowDescription (`row` false) or DataRow (`row` true) just after
/// its first `n` fields.
pub(super) fn prefix_end(frame: &[u8], n: usize, row: bool) -> usize {
    let mut i = 7;
    for _ in 0..n {
        if i >= frame.len() {
            break;
        }
        if row {
            let Some(l) = frame.get(i..i + 4) else { break };
            let len = i32::from_be_bytes([l[0], l[1], l[2], l[3]]);
            i += 4 + len.max(0) as usize;
        } else {
            let name_end = frame[i..]
                .iter()
                .position(|&c| c == 0)
                .map_or(frame.len(), |p| i + p);
            i = name_end + 1 + 18;
        }
    }
    i.min(frame.len())
}

/// Each field of a RowDescription: (start of its name, start of its 18 bytes of
/// attributes).
pub(super) fn field_offsets(t: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let Some(n) = t.get(5..7).map(|n| u16::from_be_bytes([n[0], n[1]])) else {
        return out;
    };
    let mut i = 7;
    for _ in 0..n {
        let Some(end) = t.get(i..).and_then(|r| r.iter().position(|&c| c == 0)) else {
            break;
        };
        let attrs = i + end + 1;
        if t.len() < attrs + 18 {
            break;
        }
        out.push((i, attrs));
        i = attrs + 18;
    }
    out
}

/// Each field of a RowDescription: its name and its 18 bytes of attributes (table OID,
/// column number, type OID, length, modifier, format).
fn described(t: &[u8]) -> Vec<(String, &[u8])> {
    field_offsets(t)
        .into_iter()
        .map_while(|(name, attributes)| {
            let name = std::str::from_utf8(&t[name..attributes - 1]).ok()?;
            Some((name.to_string(), &t[attributes..attributes + 18]))
        })
        .collect()
}

/// Field names and type OIDs of a RowDescription.
pub(crate) fn columns(t: &[u8]) -> Vec<(String, u32)> {
    described(t)
        .into_iter()
        .map(|(name, a)| (name, u32::from_be_bytes([a[6], a[7], a[8], a[9]])))
        .collect()
}

/// The values of an answer's DataRows, read as text (the answer's format).
pub(crate) fn text_rows(answer: &[u8]) -> Vec<Vec<Option<String>>> {
    crate::protocol::frames(answer)
        .filter(|f| f[0] == b'D')
        .map(|f| {
            fields(f)
                .into_iter()
                .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                .collect()
        })
        .collect()
}

/// Type OIDs and modifiers of a RowDescription's fields.
pub(crate) fn column_types(t: &[u8]) -> Vec<(u32, i32)> {
    described(t)
        .into_iter()
        .map(|(_, a)| {
            (
                u32::from_be_bytes([a[6], a[7], a[8], a[9]]),
                i32::from_be_bytes([a[12], a[13], a[14], a[15]]),
            )
        })
        .collect()
}

/// Turns each avg column's merged sum into the average (with its hidden count), and its
/// type into avg's: numeric for integer and numeric input, float8 for floating point.
fn finish_avg(
    t: BytesMut,
    rows: Vec<BytesMut>,
    avg: &[(usize, usize)],
    cols: &[(String, u32)],
    binary_at: &dyn Fn(usize) -> bool,
) -> Result<(BytesMut, Vec<BytesMut>), PgError> {
    let mut kinds = Vec::with_capacity(avg.len());
    for &(col, _) in avg {
        let float = match cols.get(col).map(|c| c.1) {
            Some(20 | 1700) => false,
            Some(700 | 701) => true,
            other => {
                return Err(PgError::new(
                    "0A000",
                    format!(
                        "avg across shards over this type (oid {other:?}) is not supported yet"
                    ),
                ));
            }
        };
        kinds.push(float);
    }
    let mut out_rows = Vec::with_capacity(rows.len());
    for r in rows {
        let f = fields(&r);
        let mut values: Vec<Option<Vec<u8>>> = f.iter().map(|x| x.map(<[u8]>::to_vec)).collect();
        for (&(col, count_col), &float) in avg.iter().zip(&kinds) {
            // Merged sums and counts, as text whatever their format.
            let as_text = |i: usize| -> Option<String> {
                let v = f.get(i).copied().flatten()?;
                if binary_at(i) {
                    super::numeric::binary_as_text(cols[i].1, v)
                } else {
                    std::str::from_utf8(v).ok().map(str::to_string)
                }
            };
            let count: u64 = as_text(count_col).and_then(|c| c.parse().ok()).unwrap_or(0);
            let value = match as_text(col) {
                None => None,
                Some(sum) if float => super::numeric::float_avg(&sum, count),
                Some(sum) => super::numeric::numeric_avg(&sum, count),
            };
            values[col] = match (value, binary_at(col)) {
                (None, _) => None,
                (Some(v), false) => Some(v.into_bytes()),
                (Some(v), true) if float => {
                    Some(v.parse::<f64>().unwrap_or(f64::NAN).to_be_bytes().to_vec())
                }
                (Some(v), true) => super::numeric::numeric_to_binary(&v),
            };
        }
        out_rows.push(data_row(&values));
    }
    // The RowDescription: avg's type in place of sum's.
    let types: Vec<(usize, u32, i16)> = avg
        .iter()
        .zip(&kinds)
        .map(|(&(col, _), &float)| {
            if float {
                (col, 701, 8)
            } else {
                (col, 1700, -1)
            }
        })
        .collect();
    Ok((retype(&t, &types), out_rows))
}

/// A DataRow of these values (None = NULL).
fn data_row(values: &[Option<Vec<u8>>]) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_u16(values.len() as u16);
    for v in values {
        match v {
            None => body.put_i32(-1),
            Some(b) => {
                body.put_i32(b.len() as i32);
                body.put_slice(b);
            }
        }
    }
    let mut row = BytesMut::with_capacity(body.len() + 5);
    protocol::write_msg(&mut row, b'D', &body);
    row
}

/// A RowDescription with columns given another type: (position, type OID, type length).
fn retype(t: &[u8], types: &[(usize, u32, i16)]) -> BytesMut {
    let mut b = protocol::body(t).to_vec();
    let n = b
        .get(..2)
        .map_or(0, |n| u16::from_be_bytes([n[0], n[1]]) as usize);
    let mut pos = 2;
    for i in 0..n {
        let Some(end) = b[pos..].iter().position(|&c| c == 0).map(|p| pos + p + 1) else {
            break;
        };
        if end + 18 > b.len() {
            break;
        }
        if let Some(&(_, oid, len)) = types.iter().find(|(c, _, _)| *c == i) {
            b[end + 6..end + 10].copy_from_slice(&oid.to_be_bytes());
            b[end + 10..end + 12].copy_from_slice(&len.to_be_bytes());
            b[end + 12..end + 16].copy_from_slice(&(-1i32).to_be_bytes());
        }
        pos = end + 18;
    }
    let mut desc = BytesMut::new();
    protocol::write_msg(&mut desc, b'T', &b);
    desc
}

/// count(DISTINCT x), between the two merges: each row is one distinct x of its group
/// now, so x becomes a count of 1 (0 for NULL, which count ignores), typed bigint.
fn distinct_as_counts(
    t: &[u8],
    rows: Vec<BytesMut>,
    roles: &[Column],
    binary_at: &dyn Fn(usize) -> bool,
) -> (BytesMut, Vec<BytesMut>) {
    let at: Vec<usize> = (0..roles.len())
        .filter(|&i| roles[i] == Column::DistinctCount)
        .collect();
    let rows = rows
        .iter()
        .map(|r| {
            let mut values: Vec<Option<Vec<u8>>> =
                fields(r).iter().map(|x| x.map(<[u8]>::to_vec)).collect();
            for &i in &at {
                let one = i64::from(values.get(i).is_some_and(Option::is_some));
                if let Some(v) = values.get_mut(i) {
                    *v = Some(if binary_at(i) {
                        one.to_be_bytes().to_vec()
                    } else {
                        one.to_string().into_bytes()
                    });
                }
            }
            data_row(&values)
        })
        .collect();
    let types: Vec<(usize, u32, i16)> = at.iter().map(|&i| (i, 20, 8)).collect();
    (retype(t, &types), rows)
}

/// The fields of a DataRow (None = NULL).
pub(crate) fn fields(d: &[u8]) -> Vec<Option<&[u8]>> {
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

/// Combines per-shard aggregate rows: rows with equal GROUP BY keys become one, counts and
/// sums add up, min/max pick.
fn aggregate(
    rows: Vec<BytesMut>,
    roles: &[Column],
    cols: &[(String, u32)],
    binary_at: &dyn Fn(usize) -> bool,
    order: &Ordered,
) -> Result<Vec<BytesMut>, PgError> {
    type Fields = Vec<Option<Vec<u8>>>;
    let mut groups: Vec<Fields> = Vec::new();
    let mut index: HashMap<Fields, usize> = HashMap::new();
    for row in &rows {
        let f: Fields = fields(row)
            .into_iter()
            .map(|x| x.map(<[u8]>::to_vec))
            .collect();
        if f.len() != roles.len() || f.len() != cols.len() {
            return Err(PgError::new(
                "XX000",
                "shards returned rows of different shapes",
            ));
        }
        let key: Fields = roles
            .iter()
            .zip(&f)
            .filter(|(r, _)| **r == Column::Key)
            .map(|(_, v)| v.clone())
            .collect();
        match index.get(&key) {
            None => {
                index.insert(key, groups.len());
                groups.push(f);
            }
            Some(&g) => {
                let acc = &mut groups[g];
                for (i, role) in roles.iter().enumerate() {
                    let (oid, bin) = (cols[i].1, binary_at(i));
                    let merged = match (role, acc[i].take(), f[i].clone()) {
                        // (DistinctCount is a key in the first merge, a count in the
                        // second: `merge_select`.)
                        (Column::Key | Column::DistinctCount, a, _) => a,
                        (_, None, b) | (_, b, None) => b,
                        (Column::Count | Column::Sum | Column::Avg, Some(a), Some(b)) => {
                            Some(add(oid, bin, &a, &b)?)
                        }
                        (Column::Min | Column::Max, Some(a), Some(b)) => {
                            let class = order.column_class(i);
                            let o = order
                                .compare(class, oid, bin, &a, &b)
                                .ok_or_else(|| unmergeable(oid))?;
                            let keep_a = (o == Ordering::Greater) == (*role == Column::Max)
                                || o == Ordering::Equal;
                            Some(if keep_a { a } else { b })
                        }
                    };
                    acc[i] = merged;
                }
            }
        }
    }
    Ok(groups.into_iter().map(|f| data_row(&f)).collect())
}

/// One ORDER BY key of a merge: its column, direction, and the collation its item names.
pub(super) struct SortKey {
    pub idx: usize,
    pub desc: bool,
    pub nulls_first: bool,
    pub collation: Option<String>,
}

/// The table OID and column number of each field of a RowDescription (0 for an
/// expression).
pub(super) fn sources(t: &[u8]) -> Vec<(u32, i16)> {
    described(t)
        .into_iter()
        .map(|(_, a)| {
            (
                u32::from_be_bytes([a[0], a[1], a[2], a[3]]),
                i16::from_be_bytes([a[4], a[5]]),
            )
        })
        .collect()
}

/// The columns the ORDER BY keys name.
pub(super) fn sort_keys(cols: &[(String, u32)], spec: &MergeSpec) -> Result<Vec<SortKey>, PgError> {
    let visible = cols.len().saturating_sub(spec.hidden.len());
    let by_name = |n: &str| cols[..visible].iter().position(|(c, _)| c == n);
    spec.order
        .iter()
        .map(|k| {
            let idx = match &k.col {
                OrderCol::Position(p) => Some(*p),
                OrderCol::Name(n) => by_name(n),
                OrderCol::Hidden(h) => Some(visible + h),
                OrderCol::NameOr(n, h) => by_name(n).or(Some(visible + h)),
            }
            .filter(|&i| i < cols.len())
            .ok_or_else(|| {
                PgError::new(
                    "0A000",
                    "ORDER BY across shards must name an output column; add it to the select list",
                )
            })?;
            Ok(SortKey {
                idx,
                desc: k.desc,
                nulls_first: k.nulls_first,
                collation: k.collation.clone(),
            })
        })
        .collect()
}

/// Merges the shards' results of a SELECT into one result: RowDescription (when the
/// shards sent one), the rows, and CommandComplete. `binary` gives the result formats
/// (empty: all text; one entry: all columns). Values pgshard cannot order itself (text in
/// a collation other than C, enums, ...) are ranked by `node` of a shard first (None: its
/// primary), in the client's `settings` (`exec::order`).
pub async fn merge_select(
    db: &crate::cluster::Database,
    node: (usize, Option<usize>),
    results: Vec<Vec<BytesMut>>,
    spec: &MergeSpec,
    binary: &[bool],
    settings: (Option<&str>, u64),
) -> Result<BytesMut, PgError> {
    let order = if first_error(&results).is_some() {
        Ordered::default()
    } else {
        order::prepare(db, node, &results, spec, binary, settings).await?
    };
    merge_ordered(results, spec, binary, order)
}

/// [`merge_select`] once the classes and ranks are known.
fn merge_ordered(
    results: Vec<Vec<BytesMut>>,
    spec: &MergeSpec,
    binary: &[bool],
    order: Ordered,
) -> Result<BytesMut, PgError> {
    if let Some(e) = first_error(&results) {
        return Ok(e);
    }
    if spec.limit_param.is_some() || spec.offset_param.is_some() {
        // A path that did not bind them would merge without the client's LIMIT.
        return Err(PgError::new(
            "0A000",
            "LIMIT or OFFSET given as a parameter across shards is supported only in the extended protocol",
        ));
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
    let Some(mut t) = description else {
        return Err(PgError::new("XX000", "no row description from any shard"));
    };
    let mut cols = columns(&t);
    let binary_at = |i: usize| match binary.len() {
        0 => false,
        1 => binary[0],
        _ => binary.get(i).copied().unwrap_or(false),
    };
    if let Some(roles) = &spec.aggregates {
        // An avg column carries sums until the division below.
        let roles: Vec<Column> = roles
            .iter()
            .map(|c| if *c == Column::Avg { Column::Sum } else { *c })
            .collect();
        if roles.contains(&Column::DistinctCount) {
            // Groups with each distinct x first (x a key), then each row counts once.
            let with = |to: Column| -> Vec<Column> {
                roles
                    .iter()
                    .map(|c| if *c == Column::DistinctCount { to } else { *c })
                    .collect()
            };
            rows = aggregate(rows, &with(Column::Key), &cols, &binary_at, &order)?;
            (t, rows) = distinct_as_counts(&t, rows, &roles, &binary_at);
            cols = columns(&t);
            rows = aggregate(rows, &with(Column::Count), &cols, &binary_at, &order)?;
        } else {
            rows = aggregate(rows, &roles, &cols, &binary_at, &order)?;
        }
    }
    if !spec.avg.is_empty() {
        (t, rows) = finish_avg(t, rows, &spec.avg, &cols, &binary_at)?;
        cols = columns(&t);
    }
    if let Some(h) = &spec.having {
        // The condition reads text: binary columns are shown as text first.
        let mut keep = Vec::with_capacity(rows.len());
        for r in rows {
            let f = fields(&r);
            let texts: Vec<Option<Vec<u8>>> = f
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Some(b) if binary_at(i) => {
                        super::numeric::binary_as_text(cols[i].1, b).map(String::into_bytes)
                    }
                    v => v.map(<[u8]>::to_vec),
                })
                .collect();
            let view: Vec<Option<&[u8]>> = texts.iter().map(|t| t.as_deref()).collect();
            if h.eval(&view) == Some(true) {
                keep.push(r);
            }
        }
        rows = keep;
    }
    if spec.distinct {
        // Equal values in the same format are equal bytes.
        let mut seen = std::collections::HashSet::new();
        rows.retain(|r| seen.insert(r.clone()));
    }
    if !spec.order.is_empty() {
        let by = super::sorted::RowOrder::new(&cols, spec, binary, order)?;
        rows.sort_by(|x, y| by.compare(x, y));
    }
    if !spec.distinct_on.is_empty() {
        // Sorted with the DISTINCT ON columns first: the first row of each run is kept.
        let key = |r: &BytesMut| -> Vec<Option<Vec<u8>>> {
            let f = fields(r);
            spec.distinct_on
                .iter()
                .map(|&i| f.get(i).copied().flatten().map(<[u8]>::to_vec))
                .collect()
        };
        let mut last = None;
        rows.retain(|r| {
            let k = key(r);
            let keep = last.as_ref() != Some(&k);
            last = Some(k);
            keep
        });
    }
    let skip = (spec.offset as usize).min(rows.len());
    rows.drain(..skip);
    if let Some(l) = spec.limit {
        rows.truncate(l as usize);
    }
    // Hidden sort columns are the trailing ones: the client never sees them.
    let keep = (!spec.hidden.is_empty()).then(|| cols.len().saturating_sub(spec.hidden.len()));
    super::sorted::strip_hidden(&t, keep, false, &mut out);
    let n = rows.len();
    for r in rows {
        super::sorted::strip_hidden(&r, keep, true, &mut out);
    }
    let tag = format!("SELECT {n}");
    out.put_u8(b'C');
    out.put_i32((4 + tag.len() + 1) as i32);
    out.put_slice(tag.as_bytes());
    out.put_u8(0);
    Ok(out)
}
