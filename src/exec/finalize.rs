//! The final query of an aggregate merged over shards (`router::merge::Finalize`): the
//! merged groups go to one PostgreSQL server as array parameters, one per column, and
//! its answer (RowDescription, rows, CommandComplete, or its error) is the client's.

use crate::protocol::{self, PgError};
use crate::router::merge::Finalize;
use bytes::{BufMut, BytesMut};

/// The final query as an extended-protocol request: its text, parameter types (the
/// arrays' types) and Bind body (the arrays, and the client's result formats).
pub struct FinalRequest {
    pub query: Vec<u8>,
    pub types: Vec<u8>,
    pub bind_rest: Vec<u8>,
    /// Output columns that are group keys as they are: (position, the shards' table OID
    /// and column number, their type modifier), for the final description
    /// ([`answer`]).
    pub keys: Vec<(usize, [u8; 6], [u8; 4])>,
    /// Bytes of merged groups or gathered rows it carries.
    pub size: usize,
}

impl FinalRequest {
    /// Counts the final query on `shard`'s statistics.
    pub fn count(&self, db: &crate::cluster::Database, shard: usize) {
        let st = &db.shards[shard].stats;
        crate::metrics::inc(&st.finalized);
        st.finalized_bytes
            .fetch_add(self.size as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The client's parameters of a Bind: their types (from its Parse; 0 unspecified),
/// formats and values.
pub struct ClientParams<'a> {
    pub oids: Vec<u32>,
    pub binary: Vec<bool>,
    pub values: Vec<Option<&'a [u8]>>,
}

impl<'a> ClientParams<'a> {
    /// From a Parse's parameter types and a Bind's body.
    pub fn of(types: &[u8], bind_rest: &'a [u8]) -> Result<Self, PgError> {
        let (binary, values) =
            protocol::bind_params(bind_rest).map_err(|e| PgError::new("08P01", e.to_string()))?;
        Ok(ClientParams {
            oids: protocol::parse_oids(types),
            binary,
            values,
        })
    }
}

/// The shards' Parse types and Bind body for the partial query of `fin`: the client's,
/// with NULL text for the parameters only the final query uses (the partial query does
/// not name them, so the shards could not tell their types).
pub fn shard_params(
    fin: &Finalize,
    types: &[u8],
    bind_rest: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), PgError> {
    if fin.final_only.is_empty() {
        return Ok((types.to_vec(), bind_rest.to_vec()));
    }
    let p = ClientParams::of(types, bind_rest)?;
    let n = p.values.len();
    let mut oids = p.oids.clone();
    oids.resize(oids.len().max(n), 0);
    let mut binary = p.binary.clone();
    let mut values = p.values.clone();
    for &i in &fin.final_only {
        if i < n {
            oids[i] = TEXT;
            binary[i] = false;
            values[i] = None;
        }
    }
    let rest = protocol::with_params(bind_rest, &binary, &values)
        .map_err(|e| PgError::new("08P01", e.to_string()))?;
    let mut t = Vec::with_capacity(2 + 4 * oids.len());
    t.extend_from_slice(&(oids.len() as u16).to_be_bytes());
    for o in oids {
        t.extend_from_slice(&o.to_be_bytes());
    }
    Ok((t, rest))
}

/// The text type's OID.
const TEXT: u32 = 25;

/// The most pgshard sends to one server to finish an aggregate query (PostgreSQL takes
/// messages up to 1 GiB; the rows are in pgshard's memory meanwhile).
const MAX_FINAL_BYTES: usize = 256 << 20;

/// The array type of a built-in element type (the same OIDs on every PostgreSQL server).
fn array_of(oid: u32) -> Option<u32> {
    Some(match oid {
        16 => 1000,
        17 => 1001,
        18 => 1002,
        19 => 1003,
        20 => 1016,
        21 => 1005,
        23 => 1007,
        25 => 1009,
        26 => 1028,
        114 => 199,
        142 => 143,
        650 => 651,
        700 => 1021,
        701 => 1022,
        774 => 775,
        790 => 791,
        829 => 1040,
        869 => 1041,
        1042 => 1014,
        1043 => 1015,
        1082 => 1182,
        1083 => 1183,
        1114 => 1115,
        1184 => 1185,
        1186 => 1187,
        1266 => 1270,
        1560 => 1561,
        1562 => 1563,
        1700 => 1231,
        2950 => 2951,
        3802 => 3807,
        3904 => 3905,
        3906 => 3907,
        3908 => 3909,
        3910 => 3911,
        3912 => 3913,
        3926 => 3927,
        _ => return None,
    })
}

/// One text-format array literal of a column's values.
pub(super) fn array_literal(values: &[Option<&[u8]>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        2 + values
            .iter()
            .map(|v| v.map_or(4, |v| v.len() + 3))
            .sum::<usize>(),
    );
    out.push(b'{');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match v {
            None => out.extend_from_slice(b"NULL"),
            Some(v) => {
                out.push(b'"');
                for &c in *v {
                    if c == b'"' || c == b'\\' {
                        out.push(b'\\');
                    }
                    out.push(c);
                }
                out.push(b'"');
            }
        }
    }
    out.push(b'}');
    out
}

/// The column types of a merged result whose array types are not built in (enums,
/// domains, extension types): the final query's server is asked for them
/// ([`array_types_sql`]).
pub fn unknown_types(merged: &[u8]) -> Vec<u32> {
    let mut out: Vec<u32> = protocol::frames(merged)
        .find(|f| f[0] == b'T')
        .map(super::merge::columns)
        .unwrap_or_default()
        .into_iter()
        .map(|(_, oid)| oid)
        .filter(|&oid| array_of(oid).is_none())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The query that reads the array types of `oids`.
pub fn array_types_sql(oids: &[u32]) -> String {
    let list: Vec<String> = oids.iter().map(u32::to_string).collect();
    format!(
        "SELECT oid::pg_catalog.int8, typarray::pg_catalog.int8 FROM pg_catalog.pg_type WHERE oid IN ({})",
        list.join(", ")
    )
}

/// The answer of [`array_types_sql`]: element type to array type (0: none).
pub fn array_types(frames: &[BytesMut]) -> Vec<(u32, u32)> {
    frames
        .iter()
        .filter(|f| f[0] == b'D')
        .filter_map(|f| {
            let v = super::merge::fields(f);
            let num = |i: usize| -> Option<u32> {
                std::str::from_utf8(v.get(i).copied().flatten()?)
                    .ok()?
                    .parse()
                    .ok()
            };
            Some((num(0)?, num(1)?))
        })
        .collect()
}

/// Splits a merged result (text format, not a shard's error: callers return that as it
/// is) into its notices and the final query that finishes it; `arrays` gives the array
/// types of [`unknown_types`].
pub fn request(
    fin: &Finalize,
    merged: &[u8],
    formats: &[bool],
    (arrays, collations): (&[(u32, u32)], &[Option<String>]),
    client: Option<&ClientParams>,
) -> Result<(BytesMut, FinalRequest), PgError> {
    let mut notices = BytesMut::new();
    let mut types = None;
    let mut keys = Vec::new();
    let mut rows = Vec::new();
    for f in protocol::frames(merged) {
        match f[0] {
            b'N' => notices.extend_from_slice(f),
            b'T' => {
                types = Some(super::merge::columns(f));
                let fields = super::merge::field_offsets(f);
                for &(pos, k) in &fin.key_outputs {
                    if let Some(&(_, a)) = fields.get(k) {
                        let mut table = [0; 6];
                        table.copy_from_slice(&f[a..a + 6]);
                        let mut typmod = [0; 4];
                        typmod.copy_from_slice(&f[a + 12..a + 16]);
                        keys.push((pos, table, typmod));
                    }
                }
            }
            b'D' => rows.push(super::merge::fields(f)),
            _ => {}
        }
    }
    build(
        fin,
        types.unwrap_or_default(),
        &rows,
        formats,
        (arrays, collations),
        client,
    )
    .map(|mut r| {
        r.keys = keys;
        (notices, r)
    })
}

fn build(
    fin: &Finalize,
    cols: Vec<(String, u32)>,
    rows: &[Vec<Option<&[u8]>>],
    formats: &[bool],
    (arrays, collations): (&[(u32, u32)], &[Option<String>]),
    client: Option<&ClientParams>,
) -> Result<FinalRequest, PgError> {
    if cols.len() != fin.columns || rows.iter().any(|r| r.len() != fin.columns) {
        return Err(PgError::new(
            "XX000",
            "the shards' partial aggregates do not have the expected columns",
        ));
    }
    let query = fin.text_collated(collations).ok_or_else(|| {
        PgError::new(
            "0A000",
            "LIMIT or OFFSET given as a parameter across shards is supported only in the extended protocol",
        )
    })?;
    // The client's parameters, by their numbers: those the final query uses with their
    // types and values, the others as NULL text.
    let mut param_types = Vec::with_capacity(fin.params);
    let mut param_values = Vec::with_capacity(fin.params);
    for i in 0..fin.params {
        if !fin.final_params.contains(&i) {
            param_types.push((TEXT, false));
            param_values.push(None);
            continue;
        }
        let Some(c) = client.filter(|c| i < c.values.len()) else {
            return Err(PgError::new(
                "42P02",
                format!("there is no parameter ${}", i + 1),
            ));
        };
        param_types.push((
            c.oids.get(i).copied().unwrap_or(0),
            c.binary.get(i).copied().unwrap_or(false),
        ));
        param_values.push(c.values[i]);
    }
    let mut types = BytesMut::new();
    types.put_u16((fin.params + cols.len()) as u16);
    for (oid, _) in &param_types {
        types.put_u32(*oid);
    }
    for (_, oid) in &cols {
        let array = array_of(*oid)
            .or_else(|| {
                arrays
                    .iter()
                    .find(|(e, a)| e == oid && *a != 0)
                    .map(|(_, a)| *a)
            })
            .ok_or_else(|| {
                PgError::new(
                    "0A000",
                    format!(
                        "an aggregate query across shards whose groups PostgreSQL finishes cannot carry a column of type oid {oid} (it has no array type)"
                    ),
                )
            })?;
        types.put_u32(array);
    }
    let size: usize = rows
        .iter()
        .flatten()
        .map(|v| v.map_or(5, |v| v.len() + 3))
        .sum();
    if size > MAX_FINAL_BYTES {
        return Err(PgError::new(
            "54000",
            format!(
                "the rows this aggregate query needs from the shards ({size} bytes) exceed the {MAX_FINAL_BYTES} bytes pgshard sends to one server to finish it; add a shard key condition or a /* pgshard: shard=N */ hint, or aggregate in a way whose partial results combine"
            ),
        ));
    }
    let arrays: Vec<Vec<u8>> = (0..cols.len())
        .map(|c| {
            let column: Vec<Option<&[u8]>> = rows.iter().map(|r| r[c]).collect();
            array_literal(&column)
        })
        .collect();
    // The client's parameters in their formats, the arrays in text.
    let binary: Vec<bool> = param_types
        .iter()
        .map(|(_, binary)| *binary)
        .chain(std::iter::repeat_n(false, cols.len()))
        .collect();
    let values: Vec<Option<&[u8]>> = param_values
        .iter()
        .copied()
        .chain(arrays.iter().map(|a| Some(&a[..])))
        .collect();
    let mut bind = protocol::bind_params_body(&binary, &values);
    bind.extend_from_slice(&(formats.len() as u16).to_be_bytes());
    for &b in formats {
        bind.extend_from_slice(&u16::from(b).to_be_bytes());
    }
    Ok(FinalRequest {
        query: query.into_bytes(),
        types: types.to_vec(),
        bind_rest: bind,
        keys: Vec::new(),
        size,
    })
}

/// The client's result: the merge's notices, then the final query's frames, its
/// description given the group keys' table, column and type modifier.
pub fn answer(notices: BytesMut, frames: Vec<BytesMut>, req: &FinalRequest) -> BytesMut {
    let mut out = notices;
    for mut f in frames {
        if f[0] == b'T' {
            let fields = super::merge::field_offsets(&f);
            for (pos, table, typmod) in &req.keys {
                if let Some(&(_, a)) = fields.get(*pos) {
                    f[a..a + 6].copy_from_slice(table);
                    f[a + 12..a + 16].copy_from_slice(typmod);
                }
            }
        }
        out.extend_from_slice(&f);
    }
    out
}

/// A read's shard answers merged by `spec` (values in `formats.0`) and, for an aggregate
/// PostgreSQL finishes, its final query run on `node` (results in `formats.1`, with the
/// client's parameters `client`), outside a transaction.
pub async fn merged_and_finished(
    db: &crate::cluster::Database,
    node: (usize, Option<usize>),
    results: Vec<Vec<BytesMut>>,
    spec: &crate::router::merge::MergeSpec,
    formats: (&[bool], &[bool]),
    client: Option<&ClientParams<'_>>,
    settings: (Option<&str>, u64),
) -> Result<BytesMut, PgError> {
    let merged = super::merge::merge_select(db, node, results, spec, formats.0, settings).await?;
    match &spec.finalize {
        Some(fin) => run(db, node, fin, merged, formats.1, client, settings).await,
        None => Ok(merged),
    }
}

/// Runs the final query of `fin` over a merged result on `node` of a shard (outside a
/// transaction: a connection of its own, given the client's settings and their
/// fingerprint), or returns the merged result when it is an error.
pub async fn run(
    db: &crate::cluster::Database,
    node: (usize, Option<usize>),
    fin: &Finalize,
    merged: BytesMut,
    formats: &[bool],
    client: Option<&ClientParams<'_>>,
    (prelude, settings_fp): (Option<&str>, u64),
) -> Result<BytesMut, PgError> {
    if protocol::has_error(&merged) {
        return Ok(merged);
    }
    let unknown = unknown_types(&merged);
    let arrays = if unknown.is_empty() {
        Vec::new()
    } else {
        let sql = array_types_sql(&unknown);
        let mut r = super::scatter::run_on_shards(
            db,
            &[node],
            super::scatter::Request::Simple(&sql),
            None,
            0,
        )
        .await?;
        array_types(&r.pop().unwrap_or_default())
    };
    let collations = super::order::collations(db, node, &merged).await?;
    let (notices, req) = request(fin, &merged, formats, (&arrays, &collations), client)?;
    req.count(db, node.0);
    let mut results = super::scatter::run_on_shards(
        db,
        &[node],
        super::scatter::Request::Extended {
            query: &req.query,
            types: &req.types,
            bind_rest: &req.bind_rest,
        },
        prelude,
        settings_fp,
    )
    .await?;
    Ok(answer(notices, results.pop().unwrap_or_default(), &req))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_literals_quote_every_value() {
        let v: Vec<Option<&[u8]>> =
            vec![Some(b"a\"b"), None, Some(b"c\\d"), Some(b""), Some(b"NULL")];
        assert_eq!(
            String::from_utf8(array_literal(&v)).unwrap(),
            r#"{"a\"b",NULL,"c\\d","","NULL"}"#
        );
        assert_eq!(array_literal(&[]), b"{}");
    }
}
