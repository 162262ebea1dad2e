//! The order of a merge's rows by its ORDER BY keys: `merge.rs` sorts the rows it holds
//! by it, and a streamed merge (`frontend::session::stream`) uses it to pick, among the
//! shards' next rows, the one that comes first. Each shard sends its rows already sorted
//! (the ORDER BY runs there too), so a k-way merge holds one row per shard whatever the
//! answer's size.

use super::datetime;
use super::merge::{SortKey, columns, fields, prefix_end, sort_keys, sources};
use super::order::{self, Ordered};
use super::values::sortable;
use crate::cluster::Database;
use crate::protocol::PgError;
use crate::router::analyze::MergeSpec;
use bytes::{BufMut, BytesMut};
use std::cmp::Ordering;

/// Whether column `i` is in binary format, given a Bind's result formats (none: all
/// text; one: all columns alike; else one per column).
pub(super) fn binary_at(binary: &[bool], i: usize) -> bool {
    match binary.len() {
        0 => false,
        1 => binary[0],
        _ => binary.get(i).copied().unwrap_or(false),
    }
}

/// How rows compare by a merge's ORDER BY keys, and which of their columns the client
/// sees.
pub struct RowOrder {
    keys: Vec<SortKey>,
    oids: Vec<u32>,
    binary: Vec<bool>,
    order: Ordered,
    /// The columns the client sees: the hidden sort columns after them are stripped.
    keep: usize,
    hidden: bool,
}

impl RowOrder {
    /// The order of rows with these columns (name, type OID) in these result formats;
    /// `order` ranks the values pgshard cannot compare itself. An error when a key's type
    /// cannot be ordered in binary format.
    pub(super) fn new(
        cols: &[(String, u32)],
        spec: &MergeSpec,
        binary: &[bool],
        order: Ordered,
    ) -> Result<RowOrder, PgError> {
        let keys = sort_keys(cols, spec)?;
        let binary: Vec<bool> = (0..cols.len()).map(|i| binary_at(binary, i)).collect();
        for (n, k) in keys.iter().enumerate() {
            let oid = cols[k.idx].1;
            if order.key_class(n).is_none() && !sortable(oid, binary[k.idx]) {
                return Err(PgError::new(
                    "0A000",
                    format!(
                        "ORDER BY across shards on a column of type oid {oid} in binary format is not supported yet"
                    ),
                ));
            }
        }
        Ok(RowOrder {
            keys,
            oids: cols.iter().map(|c| c.1).collect(),
            binary,
            order,
            keep: cols.len().saturating_sub(spec.hidden.len()),
            hidden: !spec.hidden.is_empty(),
        })
    }

    /// Compares two DataRows by the keys.
    pub fn compare(&self, x: &[u8], y: &[u8]) -> Ordering {
        let (fx, fy) = (fields(x), fields(y));
        for (n, k) in self.keys.iter().enumerate() {
            let o = match (
                fx.get(k.idx).copied().flatten(),
                fy.get(k.idx).copied().flatten(),
            ) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) if k.nulls_first => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) if k.nulls_first => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => {
                    let o = self
                        .order
                        .compare(
                            self.order.key_class(n),
                            self.oids[k.idx],
                            self.binary[k.idx],
                            a,
                            b,
                        )
                        .unwrap_or(Ordering::Equal);
                    if k.desc { o.reverse() } else { o }
                }
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }

    /// A RowDescription (`row` false) or DataRow (`row` true) as the client gets it:
    /// without the hidden sort columns, which are the trailing ones.
    pub fn visible(&self, frame: &[u8], row: bool, out: &mut BytesMut) {
        strip_hidden(frame, self.hidden.then_some(self.keep), row, out);
    }
}

/// Appends `frame` to `out` with only its first `keep` fields (all when None).
pub(super) fn strip_hidden(frame: &[u8], keep: Option<usize>, row: bool, out: &mut BytesMut) {
    let Some(keep) = keep.filter(|_| frame.len() >= 7) else {
        out.extend_from_slice(frame);
        return;
    };
    let end = prefix_end(frame, keep, row);
    out.put_u8(frame[0]);
    out.put_i32((4 + 2 + end - 7) as i32);
    out.put_u16(keep as u16);
    out.put_slice(&frame[7..end]);
}

/// For a streamed merge: the order of the rows `t` (a RowDescription) describes, when
/// pgshard orders every key itself without asking a server (no value to rank, and every
/// fact it needs already known). None otherwise, or when the spec is not a plain ORDER
/// BY (with LIMIT and OFFSET): the rows are then held and merged. `first` holds each
/// shard's first row: a date or timestamp key streams only when they show DateStyle ISO
/// (the session's style is the same for every row), the text pgshard reads itself.
pub fn for_stream(
    db: &Database,
    t: &[u8],
    spec: &MergeSpec,
    binary: &[bool],
    first: &[&[u8]],
) -> Option<RowOrder> {
    if !streams_ordered(spec) {
        return None;
    }
    let cols = columns(t);
    let keys = sort_keys(&cols, spec).ok()?;
    for k in &keys {
        let oid = cols[k.idx].1;
        if datetime::is_datetime(oid) && !binary_at(binary, k.idx) {
            let values = first
                .iter()
                .filter_map(|r| fields(r).get(k.idx).copied().flatten());
            if !datetime::shows_iso(oid, values) {
                return None;
            }
        }
    }
    let src = sources(t);
    let keyed: Vec<_> = keys
        .iter()
        .map(|k| {
            let (table, attnum) = src.get(k.idx).copied().unwrap_or((0, 0));
            (
                (cols[k.idx].1, table, attnum),
                k.collation.as_deref(),
                binary_at(binary, k.idx),
            )
        })
        .collect();
    if !order::ordered_without_ranks(db, &keyed) {
        return None;
    }
    RowOrder::new(&cols, spec, binary, Ordered::default()).ok()
}

/// Whether a merge is an ORDER BY of the shards' rows (with LIMIT and OFFSET as
/// numbers), nothing else: what a k-way merge of sorted answers computes.
pub fn streams_ordered(spec: &MergeSpec) -> bool {
    !spec.order.is_empty()
        && spec.aggregates.is_none()
        && spec.avg.is_empty()
        && spec.having.is_none()
        && !spec.distinct
        && spec.distinct_on.is_empty()
        && spec.finalize.is_none()
        && spec.limit_param.is_none()
        && spec.offset_param.is_none()
}
