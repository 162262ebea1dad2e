//! Ordering values pgshard cannot compare by their bytes or numbers, when it merges rows
//! (ORDER BY, min, max): text in a collation other than C (`en_US.UTF-8`, ICU), enums (in
//! the order of their labels), intervals, network addresses and any other type. PostgreSQL
//! orders them: pgshard sends one server the distinct values of each such column and gets
//! back their order, in one round trip per merge that needs it.
//!
//! Which columns need it depends on their type and collation: the column's own (from the
//! RowDescription's table and column number), the ORDER BY item's `COLLATE`, or the
//! database's default. These facts are read from the server once per column and kept for
//! the life of the database's configuration.

use super::datetime;
use super::merge::{columns, fields, sort_keys, sources};
use super::scatter::{Request, run_on_shards};
use super::values::{compare, compare_binary};
use crate::cluster::Database;
use crate::protocol::PgError;
use crate::router::analyze::MergeSpec;
use crate::router::merge::Column;
use bytes::BytesMut;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

/// A column whose type and collation the merge needs: (type OID, table OID, column
/// number), the table 0 for an expression.
pub type FactKey = (u32, u32, i16);

/// What the server says of a column's type and collation.
#[derive(Debug, Clone)]
pub struct Fact {
    /// The type's name, schema-qualified and quoted (`pg_catalog."interval"`): a cast to
    /// it keeps any length of the value (`"bit"`, `bpchar`).
    typname: String,
    /// `pg_type.typcategory`: string types ('S') and enums ('E') send their text as their
    /// binary format, so their binary values can be ranked too.
    category: u8,
    /// The column's collation (`"default"`, `"en-x-icu"`), for collatable types.
    collation: Option<String>,
    /// Whether that collation orders as bytes do (C, POSIX, C.UTF-8).
    bytewise: bool,
}

/// How a merge orders each column it compares (min/max columns and ORDER BY keys): by
/// pgshard (no class) or by the rank PostgreSQL gave the value within its class, a SQL
/// expression over `v` (`v::pg_catalog.text COLLATE "default"`).
#[derive(Debug, Default)]
pub struct Ordered {
    /// By column: min and max.
    columns: Vec<Option<String>>,
    /// By ORDER BY key.
    keys: Vec<Option<String>>,
    ranks: Ranks,
}

impl Ordered {
    pub fn column_class(&self, i: usize) -> Option<&str> {
        self.columns.get(i).and_then(Option::as_deref)
    }

    pub fn key_class(&self, k: usize) -> Option<&str> {
        self.keys.get(k).and_then(Option::as_deref)
    }

    /// Compares two values of a column: by their ranks in `class`, else as pgshard
    /// compares the type (None: it cannot, in binary).
    pub fn compare(
        &self,
        class: Option<&str>,
        oid: u32,
        binary: bool,
        a: &[u8],
        b: &[u8],
    ) -> Option<Ordering> {
        if let Some(ranks) = class.and_then(|c| self.ranks.get(c)) {
            // Ranked values first, should one lack a rank: a total order either way (a
            // sort may panic on one that is not).
            match (ranks.get(a), ranks.get(b)) {
                (Some(x), Some(y)) => return Some(x.cmp(y)),
                (Some(_), None) => return Some(Ordering::Less),
                (None, Some(_)) => return Some(Ordering::Greater),
                (None, None) => {}
            }
        }
        if binary {
            compare_binary(oid, a, b)
        } else {
            Some(compare(oid, a, b))
        }
    }
}

/// How a merge of these results orders its min/max columns and ORDER BY keys: the
/// columns' facts (cached, else read from `node`), then one query on `node` ranking the
/// distinct values of the columns pgshard cannot order itself.
pub async fn prepare(
    db: &Database,
    node: (usize, Option<usize>),
    results: &[Vec<BytesMut>],
    spec: &MergeSpec,
    binary: &[bool],
    settings: (Option<&str>, u64),
) -> Result<Ordered, PgError> {
    let Some(t) = results.iter().flatten().find(|f| f[0] == b'T') else {
        return Ok(Ordered::default());
    };
    let cols = columns(t);
    let src = sources(t);
    let keys = sort_keys(&cols, spec)?;
    let binary_at = |i: usize| match binary.len() {
        0 => false,
        1 => binary[0],
        _ => binary.get(i).copied().unwrap_or(false),
    };
    // Columns holding values of their own type: group keys, min and max (counts, sums
    // and averages are numbers).
    let min_max = |i: usize| {
        spec.aggregates
            .as_ref()
            .is_some_and(|r| matches!(r.get(i), Some(Column::Min | Column::Max)))
    };
    let raw = |i: usize| match &spec.aggregates {
        None => true,
        Some(roles) => matches!(roles.get(i), Some(Column::Key | Column::Min | Column::Max)),
    };
    let wants = |i: usize| raw(i) && cols.get(i).is_some_and(|c| needs_fact(c.1));
    let mut ordered = Ordered {
        columns: vec![None; cols.len()],
        keys: vec![None; keys.len()],
        ranks: HashMap::new(),
    };
    let fact_key = |i: usize| {
        let (table, attnum) = src.get(i).copied().unwrap_or((0, 0));
        (cols[i].1, table, attnum)
    };
    let wanted: Vec<FactKey> = (0..cols.len())
        .filter(|&i| min_max(i) && wants(i))
        .chain(keys.iter().map(|k| k.idx).filter(|&i| wants(i)))
        .map(fact_key)
        .collect();
    // Dates and timestamps pgshard reads itself in DateStyle ISO; in another style a
    // server reads and orders them (in the client's settings).
    let styled = |i: usize| {
        let oid = cols[i].1;
        let other_style = raw(i)
            && !binary_at(i)
            && datetime::is_datetime(oid)
            && results.iter().flatten().filter(|f| f[0] == b'D').any(
                |r| matches!(fields(r).get(i), Some(Some(v)) if datetime::parse(oid, v).is_none()),
            );
        other_style.then(|| datetime::class(oid))
    };
    for i in (0..cols.len()).filter(|&i| min_max(i)) {
        ordered.columns[i] = styled(i);
    }
    for (k, c) in keys.iter().zip(ordered.keys.iter_mut()) {
        *c = styled(k.idx);
    }
    let facts = if wanted.is_empty() {
        HashMap::new()
    } else {
        facts(db, node, &wanted).await?
    };
    let class_of = |i: usize, explicit: Option<&str>| {
        class(cols[i].1, facts.get(&fact_key(i)), explicit, binary_at(i))
    };
    for i in (0..cols.len()).filter(|&i| min_max(i) && wants(i)) {
        ordered.columns[i] = class_of(i, None);
    }
    for (k, c) in keys.iter().zip(ordered.keys.iter_mut()) {
        if wants(k.idx) {
            *c = class_of(k.idx, k.collation.as_deref());
        }
    }
    if ordered
        .columns
        .iter()
        .chain(&ordered.keys)
        .all(Option::is_none)
    {
        return Ok(ordered);
    }
    // The distinct values of each class, from the shards' rows (the merged rows hold no
    // others).
    let at: Vec<(usize, &String)> = ordered
        .columns
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
        .chain(
            keys.iter()
                .zip(&ordered.keys)
                .filter_map(|(k, c)| c.as_ref().map(|c| (k.idx, c))),
        )
        .collect();
    let mut values: HashMap<String, HashSet<Vec<u8>>> = at
        .iter()
        .map(|(_, class)| ((*class).clone(), HashSet::new()))
        .collect();
    for r in results.iter().flatten().filter(|f| f[0] == b'D') {
        let f = fields(r);
        for &(i, class) in &at {
            if let (Some(Some(v)), Some(set)) = (f.get(i), values.get_mut(class.as_str()))
                && !set.contains(*v)
            {
                set.insert(v.to_vec());
            }
        }
    }
    values.retain(|_, set| !set.is_empty());
    let values = values
        .into_iter()
        .map(|(c, s)| (c, s.into_iter().collect()))
        .collect();
    ordered.ranks = rank(db, node, values, settings).await?;
    Ok(ordered)
}

/// Types pgshard orders exactly itself (numbers, booleans, uuid, bytea, ISO dates and
/// times): no fact is needed.
fn native(oid: u32) -> bool {
    matches!(
        oid,
        16 | 17 | 20 | 21 | 23 | 26 | 700 | 701 | 1700 | 2950 | 1082 | 1083 | 1114 | 1184
    )
}

/// Collations written in a query that order as bytes.
fn bytewise_name(c: &str) -> bool {
    let c = c.strip_prefix("pg_catalog.").unwrap_or(c);
    matches!(c, "\"C\"" | "\"POSIX\"" | "ucs_basic" | "\"ucs_basic\"")
}

/// Whether a column of this type may need PostgreSQL to order it (a fact to look up).
pub fn needs_fact(oid: u32) -> bool {
    !native(oid)
}

/// The class a column is ordered in, or None when pgshard compares it itself; `explicit`
/// is the ORDER BY item's COLLATE.
pub fn class(
    oid: u32,
    fact: Option<&Fact>,
    explicit: Option<&str>,
    binary: bool,
) -> Option<String> {
    let fact = fact?;
    if binary && !matches!(fact.category, b'S' | b'E') {
        return None;
    }
    let collation = explicit.or(fact.collation.as_deref());
    if crate::protocol::text_type(oid) {
        let bytewise = match explicit {
            Some(c) => bytewise_name(c),
            None => fact.bytewise,
        };
        if bytewise {
            return None;
        }
    }
    Some(match collation {
        Some(c) => format!("v::{} COLLATE {c}", fact.typname),
        None => format!("v::{}", fact.typname),
    })
}

/// Whether pgshard orders these ORDER BY keys (each its column's fact key, the item's
/// `COLLATE` and whether the column is in binary) itself, knowing so without asking a
/// server: every type it orders natively, or a fact already cached that needs no rank.
pub fn ordered_without_ranks(db: &Database, keys: &[(FactKey, Option<&str>, bool)]) -> bool {
    let cache = db.order_facts.lock().unwrap_or_else(|e| e.into_inner());
    keys.iter().all(|&(key, explicit, binary)| {
        if !needs_fact(key.0) {
            return true;
        }
        match cache.get(&key) {
            // Not known yet: the held merge reads it (and caches it for next time).
            None => false,
            Some(fact) => class(key.0, fact.as_ref(), explicit, binary).is_none(),
        }
    })
}

/// The facts of these columns: from the database's cache, else read from the server of
/// `node` in one query (and cached). A column the server does not know has none.
pub async fn facts(
    db: &Database,
    node: (usize, Option<usize>),
    keys: &[FactKey],
) -> Result<HashMap<FactKey, Fact>, PgError> {
    let mut out = HashMap::new();
    let mut missing = Vec::new();
    {
        let cache = db.order_facts.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            match cache.get(k) {
                Some(Some(f)) => {
                    out.insert(*k, f.clone());
                }
                Some(None) => {}
                None if !missing.contains(k) => missing.push(*k),
                None => {}
            }
        }
    }
    if missing.is_empty() {
        return Ok(out);
    }
    let list = |f: &dyn Fn(&FactKey) -> String| -> Vec<u8> {
        format!(
            "{{{}}}",
            missing.iter().map(f).collect::<Vec<_>>().join(",")
        )
        .into_bytes()
    };
    let frames = query(
        db,
        node,
        FACTS_SQL,
        &[
            list(&|k| k.0.to_string()),
            list(&|k| k.1.to_string()),
            list(&|k| k.2.to_string()),
        ],
    )
    .await?;
    let mut found: HashMap<usize, Fact> = HashMap::new();
    for r in frames.iter().filter(|f| f[0] == b'D') {
        let v = fields(r);
        let text = |i: usize| {
            v.get(i)
                .copied()
                .flatten()
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let (Some(n), Some(typname), Some(category)) = (text(0), text(1), text(2)) else {
            continue;
        };
        let Ok(n) = n.parse::<usize>() else { continue };
        found.insert(
            n,
            Fact {
                typname,
                category: category.bytes().next().unwrap_or(b'U'),
                collation: text(3),
                bytewise: text(4).as_deref() == Some("t"),
            },
        );
    }
    let mut cache = db.order_facts.lock().unwrap_or_else(|e| e.into_inner());
    for (i, k) in missing.iter().enumerate() {
        let f = found.remove(&(i + 1));
        if let Some(f) = &f {
            out.insert(*k, f.clone());
        }
        cache.insert(*k, f);
    }
    Ok(out)
}

/// The collation each column of a merged result must be read in by a final query
/// (`exec::finalize`) where it is not the database's default: a column of the shards'
/// tables declared with its own (`COLLATE "C"` in an ICU database).
pub async fn collations(
    db: &Database,
    node: (usize, Option<usize>),
    merged: &[u8],
) -> Result<Vec<Option<String>>, PgError> {
    let Some(t) = crate::protocol::frames(merged).find(|f| f[0] == b'T') else {
        return Ok(Vec::new());
    };
    let keys: Vec<FactKey> = columns(t)
        .iter()
        .zip(sources(t))
        .map(|((_, oid), (table, attnum))| (*oid, table, attnum))
        .collect();
    let wanted: Vec<FactKey> = keys
        .iter()
        .filter(|k| k.1 != 0 && needs_fact(k.0))
        .copied()
        .collect();
    if wanted.is_empty() {
        return Ok(vec![None; keys.len()]);
    }
    let facts = facts(db, node, &wanted).await?;
    Ok(keys
        .iter()
        .map(|k| {
            facts
                .get(k)
                .and_then(|f| f.collation.clone())
                .filter(|c| c != "\"default\"")
        })
        .collect())
}

/// For each column (type, table, column number): the type's quoted name, category,
/// collation and whether that collation is bytewise. `pg_database` and `pg_collation`
/// are read as JSON so that one text serves PostgreSQL 13 to 17 (`datlocprovider`
/// appeared in 15, `datlocale`/`colllocale` and the builtin provider in 17).
const FACTS_SQL: &str = "SELECT k.n, pg_catalog.quote_ident(s.nspname) || '.' || pg_catalog.quote_ident(t.typname), t.typcategory::text, \
CASE WHEN c.oid IS NOT NULL THEN c.oid::pg_catalog.regcollation::text END, \
CASE WHEN c.oid = 100 THEN coalesce(d.j->>'datlocprovider', 'c') IN ('c', 'b') AND coalesce(d.j->>'datlocale', d.j->>'datcollate') IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8') \
ELSE coalesce(pg_catalog.to_jsonb(c)->>'collprovider', 'c') IN ('c', 'b') AND coalesce(pg_catalog.to_jsonb(c)->>'colllocale', pg_catalog.to_jsonb(c)->>'collcollate') IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8') END \
FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.oid[]), pg_catalog.unnest($2::pg_catalog.oid[]), pg_catalog.unnest($3::pg_catalog.int2[])) WITH ORDINALITY AS k(typ, rel, att, n) \
JOIN pg_catalog.pg_type t ON t.oid = k.typ \
JOIN pg_catalog.pg_namespace s ON s.oid = t.typnamespace \
LEFT JOIN pg_catalog.pg_attribute a ON k.rel <> 0 AND a.attrelid = k.rel AND a.attnum = k.att \
LEFT JOIN pg_catalog.pg_collation c ON t.typcollation <> 0 AND c.oid = coalesce(nullif(a.attcollation, 0), t.typcollation) \
CROSS JOIN (SELECT pg_catalog.to_jsonb(x) AS j FROM pg_catalog.pg_database x WHERE x.datname = pg_catalog.current_database()) d";

/// Each class's values and their ranks.
type Ranks = HashMap<String, HashMap<Vec<u8>, u32>>;

/// Ranks each class's values (distinct, non-null) on `node`, in the client's settings
/// (a DateStyle or client encoding the values are written in).
pub async fn rank(
    db: &Database,
    node: (usize, Option<usize>),
    values: HashMap<String, Vec<Vec<u8>>>,
    settings: (Option<&str>, u64),
) -> Result<Ranks, PgError> {
    let mut out = Ranks::new();
    if values.is_empty() {
        return Ok(out);
    }
    let classes: Vec<(String, Vec<Vec<u8>>)> = values.into_iter().collect();
    let sql = classes
        .iter()
        .enumerate()
        .map(|(i, (class, _))| {
            format!(
                "SELECT {i}, pg_catalog.array_agg(n ORDER BY {class}, n) FROM pg_catalog.unnest(${}::pg_catalog.text[]) WITH ORDINALITY AS u(v, n)",
                i + 1
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let params: Vec<Vec<u8>> = classes
        .iter()
        .map(|(_, vs)| {
            let vs: Vec<Option<&[u8]>> = vs.iter().map(|v| Some(&v[..])).collect();
            super::finalize::array_literal(&vs)
        })
        .collect();
    let frames = query_with(db, node, &sql, &params, settings).await?;
    for r in frames.iter().filter(|f| f[0] == b'D') {
        let v = fields(r);
        let (Some(Some(i)), Some(Some(order))) = (v.first(), v.get(1)) else {
            continue;
        };
        let Some((class, vs)) = std::str::from_utf8(i)
            .ok()
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| classes.get(i))
        else {
            continue;
        };
        let order = String::from_utf8_lossy(order);
        let mut ranks = HashMap::with_capacity(vs.len());
        for (rank, n) in order
            .trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .filter_map(|n| n.parse::<usize>().ok())
            .enumerate()
        {
            if let Some(v) = vs.get(n.wrapping_sub(1)) {
                ranks.insert(v.clone(), rank as u32);
            }
        }
        out.insert(class.clone(), ranks);
    }
    Ok(out)
}

async fn query(
    db: &Database,
    node: (usize, Option<usize>),
    sql: &str,
    params: &[Vec<u8>],
) -> Result<Vec<BytesMut>, PgError> {
    query_with(db, node, sql, params, (None, 0)).await
}

/// Runs one query with text parameters on `node` of a shard (None: its primary), on a
/// connection of its own (inside a client's transaction too: it reads only the catalog
/// and its parameters).
async fn query_with(
    db: &Database,
    node: (usize, Option<usize>),
    sql: &str,
    params: &[Vec<u8>],
    (prelude, settings_fp): (Option<&str>, u64),
) -> Result<Vec<BytesMut>, PgError> {
    // All text; no result formats (text).
    let values: Vec<Option<&[u8]>> = params.iter().map(|p| Some(&p[..])).collect();
    let mut bind = crate::protocol::bind_params_body(&[], &values);
    bind.extend_from_slice(&[0, 0]);
    let mut r = run_on_shards(
        db,
        &[node],
        Request::Extended {
            query: sql.as_bytes(),
            types: &[0, 0],
            bind_rest: &bind,
        },
        prelude,
        settings_fp,
    )
    .await?;
    let frames = r.pop().unwrap_or_default();
    if let Some(e) = frames.iter().find(|f| f[0] == b'E') {
        let (code, message) = crate::protocol::error_fields(e);
        return Err(PgError::new(
            "XX000",
            format!(
                "ordering values across shards failed on shard {}: {code} {message}",
                node.0
            ),
        ));
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(category: u8, collation: Option<&str>, bytewise: bool) -> Fact {
        Fact {
            typname: "pg_catalog.text".into(),
            category,
            collation: collation.map(str::to_string),
            bytewise,
        }
    }

    #[test]
    fn text_in_a_bytewise_collation_is_ordered_by_pgshard() {
        let c = fact(b'S', Some("\"default\""), true);
        assert_eq!(class(25, Some(&c), None, false), None);
        assert_eq!(class(25, Some(&c), Some("\"C\""), true), None);
        assert_eq!(
            class(25, Some(&c), Some("\"en-x-icu\""), false).as_deref(),
            Some("v::pg_catalog.text COLLATE \"en-x-icu\"")
        );
        let icu = fact(b'S', Some("\"default\""), false);
        assert_eq!(
            class(25, Some(&icu), None, true).as_deref(),
            Some("v::pg_catalog.text COLLATE \"default\"")
        );
        assert_eq!(class(25, Some(&icu), Some("pg_catalog.\"C\""), false), None);
        assert_eq!(class(25, None, None, false), None);
    }

    #[test]
    fn other_types_are_ranked_by_postgresql_in_text_and_in_binary_when_text() {
        let mut e = fact(b'E', None, false);
        e.typname = "public.mood".into();
        assert_eq!(
            class(16384, Some(&e), None, true).as_deref(),
            Some("v::public.mood")
        );
        let mut i = fact(b'T', None, false);
        i.typname = "pg_catalog.\"interval\"".into();
        assert_eq!(
            class(1186, Some(&i), None, false).as_deref(),
            Some("v::pg_catalog.\"interval\"")
        );
        assert_eq!(class(1186, Some(&i), None, true), None);
        assert!(!needs_fact(23) && needs_fact(25) && needs_fact(1186));
    }
}
