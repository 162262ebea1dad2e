//! Routing: from a statement, its parameters and the session's state to the shards it runs
//! on. `analyze` reads statements with sqlparser (cached by text in the session); `lexer`
//! is the never-failing classifier used for pooling and for routing hints.

pub mod analyze;
mod array;
mod colocation;
pub mod computed;
pub mod copy;
pub mod insert;
pub mod lexer;
pub mod literals;
pub mod merge;
mod nested;
mod predicate;
pub mod preeval;
pub mod sql_prepared;

use crate::config::DatabaseConfig;
use crate::sharding::cast::{Cast, param_value};
use crate::sharding::{ShardError, ShardFn, Value, Zone, time};
pub use analyze::{Analysis, AnalyzeError, KeyRange, KeyRef, Kind, Target};
pub use lexer::{StatementKind, classify, single_statement, split_statements};

/// The sharding rules of one database.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub tables: Vec<ShardFn>,
    reference: Vec<String>,
    /// Configured functions that write, besides the built-in ones.
    writing_functions: Vec<String>,
}

/// Functions a read-only SELECT may call that still need the primary: they write, take
/// locks, or depend on state only the primary session has. Entries ending in `*` are
/// prefixes.
const WRITING_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "currval",
    "lastval",
    "pg_advisory*",
    "pg_try_advisory*",
    "pg_notify",
    "txid_current",
    "pg_current_xact_id",
    "pg_current_wal*",
    "lo_*",
    "dblink*",
];

impl Rules {
    pub fn new(tables: Vec<ShardFn>, reference: Vec<String>) -> Rules {
        Rules {
            tables,
            reference: reference.iter().map(|r| r.to_ascii_lowercase()).collect(),
            writing_functions: Vec::new(),
        }
    }

    /// Whether the text calls a function that must run on the primary (a word followed by
    /// `(`; words inside string literals count too, which only sends a read to the
    /// primary).
    pub fn calls_writing_function(&self, sql: &str) -> bool {
        let b = sql.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if !(b[i].is_ascii_alphabetic() || b[i] == b'_') {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let mut j = i;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            if j < b.len() && b[j] == b'(' {
                let word = sql[start..i].to_ascii_lowercase();
                let matches = |f: &str| match f.strip_suffix('*') {
                    Some(prefix) => word.starts_with(prefix),
                    None => word == f,
                };
                if WRITING_FUNCTIONS.iter().any(|f| matches(f))
                    || self.writing_functions.iter().any(|f| matches(f))
                {
                    return true;
                }
            }
        }
        false
    }

    /// The sharded table of that (unqualified, normalized) name.
    pub fn table(&self, name: &str) -> Option<usize> {
        self.tables.iter().position(|t| t.table == name)
    }

    pub fn is_reference(&self, name: &str) -> bool {
        self.reference.iter().any(|r| r == name)
    }

    /// Whether the text names a sharded or reference table anywhere: for statements pgshard
    /// cannot analyze, those that do not may safely run on the default shard.
    pub fn mentioned_in(&self, sql: &str) -> bool {
        sql.split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .any(|w| {
                let w = w.to_ascii_lowercase();
                self.table(&w).is_some() || self.is_reference(&w)
            })
    }
}

/// One query, read as PostgreSQL's dialect (for queries pgshard writes or rewrites).
pub fn parse_query(sql: &str) -> Result<sqlparser::ast::Query, String> {
    let mut st =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
            .map_err(|e| e.to_string())?;
    match st.pop() {
        Some(sqlparser::ast::Statement::Query(q)) if st.is_empty() => Ok(*q),
        _ => Err(format!("not a query: {sql}")),
    }
}

/// Which shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Wherever the session is (its open transaction's shard) or `default_shard`.
    Default,
    /// Exactly these shards (sorted, at least one).
    Shards(Vec<usize>),
    /// Any one shard (rows whose keys the shard generates): the session's own if it has
    /// one, else the next in turn.
    Any,
}

/// Why a statement cannot be routed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error(transparent)]
    Key(#[from] ShardError),
    #[error("statement refers to parameter ${0}, but only {1} were bound")]
    MissingParam(usize, usize),
    #[error("shard {0} does not exist (there are {1} shards, numbered from 0)")]
    NoSuchShard(usize, usize),
    #[error("invalid pgshard hint: {0}")]
    BadHint(String),
}

impl RouteError {
    /// The SQLSTATE a client gets.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            RouteError::Key(ShardError::BadValue { .. }) => "22P02",
            RouteError::Key(ShardError::Null(_)) => "23502",
            RouteError::Key(_) => "23514",
            RouteError::MissingParam(..) => "08P01",
            RouteError::NoSuchShard(..) | RouteError::BadHint(_) => "22023",
        }
    }
}

/// One Bind's parameters, as the router needs them.
#[derive(Debug, Default)]
pub struct Params<'a> {
    pub values: Vec<Option<&'a [u8]>>,
    /// Per-parameter format (0 text, 1 binary), already expanded.
    pub binary: Vec<bool>,
    /// Declared type OIDs from Parse (0 when unspecified).
    pub oids: Vec<u32>,
}

impl<'a> Params<'a> {
    /// Parameter `i` (zero-based): its value (None: NULL), whether it is binary, and the
    /// type Parse declared for it (0: unspecified).
    fn get(&self, i: usize) -> Result<(Option<&'a [u8]>, bool, u32), RouteError> {
        let Some(v) = self.values.get(i) else {
            return Err(RouteError::MissingParam(i + 1, self.values.len()));
        };
        let binary = self.binary.get(i).copied().unwrap_or(false);
        Ok((*v, binary, self.oids.get(i).copied().unwrap_or(0)))
    }
}

/// Routes statements of one database.
#[derive(Debug, Clone)]
pub struct Router {
    default_shard: usize,
    shards: usize,
    pub rules: Rules,
}

impl Router {
    /// Builds the router; the config was validated, so the shard functions build.
    pub fn new(cfg: &DatabaseConfig) -> Router {
        let tables = cfg
            .sharded_tables
            .iter()
            .enumerate()
            .map(|(i, t)| {
                ShardFn::new(t, cfg.shards.len(), &format!("sharded_tables[{i}]"))
                    .expect("validated at load")
            })
            .collect();
        Router {
            default_shard: cfg.default_shard,
            shards: cfg.shards.len(),
            rules: Rules {
                writing_functions: cfg
                    .writing_functions
                    .iter()
                    .map(|f| {
                        // Schema-qualified names match on the function's own name.
                        let f = f.rsplit('.').next().unwrap_or(f);
                        f.to_ascii_lowercase()
                    })
                    .collect(),
                ..Rules::new(tables, cfg.reference_tables.clone())
            },
        }
    }

    /// Whether statements need analysis at all (otherwise everything goes to the default
    /// shard and nothing is parsed).
    pub fn is_sharded(&self) -> bool {
        self.shards > 1 && (!self.rules.tables.is_empty() || !self.rules.reference.is_empty())
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    pub fn default_shard(&self) -> usize {
        self.default_shard
    }

    /// Checks a forced shard number.
    pub fn check_shard(&self, s: usize) -> Result<usize, RouteError> {
        if s < self.shards {
            Ok(s)
        } else {
            Err(RouteError::NoSuchShard(s, self.shards))
        }
    }

    /// The shards an analyzed statement needs with these parameters, in the session's
    /// time zone `zone` (for timestamp keys).
    pub fn resolve(&self, a: &Analysis, p: &Params<'_>, zone: &Zone) -> Result<Route, RouteError> {
        match &a.target {
            Target::Default => Ok(Route::Default),
            Target::Any => Ok(Route::Any),
            Target::All => Ok(Route::Shards((0..self.shards).collect())),
            Target::Keys(keys) => {
                let mut out = Vec::with_capacity(1);
                for (t, k) in keys {
                    let f = &self.rules.tables[*t];
                    let found = match k {
                        KeyRef::Range(r) => self.shards_between(f, r, p, zone, &mut out),
                        KeyRef::Elements(array) => {
                            self.shards_of_elements(f, array, p, zone, &mut out)
                        }
                        k => self
                            .shard_of_key(f, k, p, zone, a.inserts_sharded)
                            .map(|s| add_shard(&mut out, s)),
                    };
                    match found {
                        Ok(()) => {}
                        // In a filter, a key with no shard narrows nothing, and every
                        // shard is asked as PostgreSQL would be: a value pgshard cannot
                        // read ('now', a zone name in the text, a time while the
                        // session's zone may change) may be one PostgreSQL reads (and one
                        // no server accepts gets the servers' own error); a NULL or a
                        // value outside every range or list matches no row. Rows to
                        // insert are never broadcast: there it stays an error.
                        Err(RouteError::Key(e))
                            if !a.inserts_sharded
                                && !matches!(e, ShardError::DirectoryMiss { .. }) =>
                        {
                            return Ok(Route::Shards((0..self.shards).collect()));
                        }
                        Err(e) => return Err(e),
                    }
                }
                if out.is_empty() {
                    // Only arrays without elements: no row matches, which every shard says.
                    all_shards(self.shards, &mut out);
                }
                out.sort_unstable();
                Ok(Route::Shards(out))
            }
        }
    }

    /// The shard of one key of table `f`, given as `k`; `written`: a key being written
    /// (an inserted row's, an UPDATE's new one), placed as the column stores it. (A
    /// filter's key is compared with the column as written: one the column cannot hold
    /// matches no row on any shard.)
    fn shard_of_key(
        &self,
        f: &ShardFn,
        k: &KeyRef,
        p: &Params<'_>,
        zone: &Zone,
        written: bool,
    ) -> Result<usize, RouteError> {
        let v = self.key_value(f, k, p, zone)?;
        let v = if written { f.stored(v) } else { v };
        Ok(f.shard_of(&v, self.shards)?)
    }

    /// The value of one key of table `f`, given as `k`, as the key's type.
    fn key_value(
        &self,
        f: &ShardFn,
        k: &KeyRef,
        p: &Params<'_>,
        zone: &Zone,
    ) -> Result<Value, RouteError> {
        let v = match k {
            KeyRef::Literal(text) => f.ty.parse_text(text, zone),
            KeyRef::Instant(text) if f.ty.is_timestamp() => time::read(text, true, zone)
                .and_then(|us| time::convert(us, true, f.ty.zoned(), zone))
                .map(Value::Timestamp),
            KeyRef::Instant(text) => f.ty.parse_text(text, zone),
            KeyRef::Null => Ok(Value::Null),
            KeyRef::Param(i, cast) => {
                let (v, binary, declared) = p.get(*i)?;
                param(f, v, binary, declared, *cast, zone)
            }
            KeyRef::Range(_) | KeyRef::Elements(_) => Err("not one value".to_string()),
        };
        Ok(v.map_err(|d| f.bad_value(d))?)
    }

    /// Adds to `out` the shards that may hold keys of table `f` within the bounds `r`:
    /// those whose ranges meet them where bounds narrow (a range-sharded key of an order
    /// pgshard knows; its bounds are not read otherwise), every shard elsewhere or when a
    /// bound is NULL, which no key meets.
    fn shards_between(
        &self,
        f: &ShardFn,
        r: &KeyRange,
        p: &Params<'_>,
        zone: &Zone,
        out: &mut Vec<usize>,
    ) -> Result<(), RouteError> {
        let mut found = None;
        if f.bounds_narrow() {
            let (mut lo, mut hi) = (None::<Value>, None::<Value>);
            for (bounds, lower) in [(&r.lower, true), (&r.upper, false)] {
                for k in bounds {
                    // An integer key reads a decimal bound rounded to the nearest
                    // integer (5.5 as 6): taken as inclusive, that still admits every
                    // integer the bound does (those above 5.5 are at least 6).
                    let v = self.key_value(f, k, p, zone)?;
                    if v == Value::Null {
                        all_shards(self.shards, out);
                        return Ok(());
                    }
                    let slot = if lower { &mut lo } else { &mut hi };
                    // The tightest bound of each side.
                    if slot.as_ref().is_none_or(|b| (v > *b) == lower) {
                        *slot = Some(v);
                    }
                }
            }
            found = f.shards_between(lo.as_ref(), hi.as_ref());
        }
        match found {
            // Bounds no key meets match no row; any shard can say so, and every shard does.
            Some(shards) if !shards.is_empty() => {
                for s in shards {
                    add_shard(out, s);
                }
            }
            _ => all_shards(self.shards, out),
        }
        Ok(())
    }

    /// Adds to `out` the shards of the elements of `array` (a literal or a parameter) as
    /// keys of table `f`. A NULL array or element matches no row; an empty array either.
    fn shards_of_elements(
        &self,
        f: &ShardFn,
        array: &KeyRef,
        p: &Params<'_>,
        zone: &Zone,
        out: &mut Vec<usize>,
    ) -> Result<(), RouteError> {
        let (bytes, binary, declared) = match array {
            KeyRef::Literal(text) => (Some(text.as_bytes()), false, 0),
            KeyRef::Param(i, _) => p.get(*i)?,
            _ => (None, false, 0),
        };
        let bad = |d: String| RouteError::Key(f.bad_value(d));
        let mut add = |elem: Option<&[u8]>, binary: bool, oid: u32| -> Result<(), RouteError> {
            if elem.is_some() {
                let v = param(f, elem, binary, oid, None, zone).map_err(bad)?;
                add_shard(out, f.shard_of(&v, self.shards)?);
            }
            Ok(())
        };
        match bytes {
            Some(b) if binary => {
                let (oid, elements) = array::binary_elements(b).map_err(bad)?;
                for e in elements {
                    add(e, true, oid)?;
                }
            }
            Some(b) => {
                let text = std::str::from_utf8(b).map_err(|_| bad("not valid UTF-8".into()))?;
                let oid = array::element_oid(declared);
                for e in array::text_elements(text).map_err(bad)? {
                    add(e.as_deref().map(str::as_bytes), false, oid)?;
                }
            }
            None => {}
        }
        Ok(())
    }
}

/// Adds shard `s` to `out` once.
fn add_shard(out: &mut Vec<usize>, s: usize) {
    if !out.contains(&s) {
        out.push(s);
    }
}

/// Makes `out` every shard.
fn all_shards(shards: usize, out: &mut Vec<usize>) {
    out.clear();
    out.extend(0..shards);
}

/// A parameter's value for key `f`: read as the type Parse declared for it (`declared`)
/// or, where Parse left it unspecified, as the type it is first cast to, then cast.
fn param(
    f: &ShardFn,
    v: Option<&[u8]>,
    binary: bool,
    declared: u32,
    cast: Option<Cast>,
    zone: &Zone,
) -> Result<Value, String> {
    let Some(bytes) = v else {
        return Ok(Value::Null);
    };
    let oid = match (declared, cast) {
        (0, Some(c)) => c.oid(),
        (o, _) => o,
    };
    let textual = crate::protocol::text_type(oid);
    if f.ty.is_timestamp() {
        // Read as timestamp or timestamptz, rounded as `timestamp(p)` rounds, then seen
        // as the key's type.
        let (us, zoned) = if binary && !textual {
            time::from_binary(bytes, oid, f.ty.zoned())?
        } else {
            let zoned = time::zoned_oid(oid, f.ty.zoned());
            let text = std::str::from_utf8(bytes).map_err(|_| "parameter is not valid UTF-8")?;
            (time::read(text.trim(), zoned, zone)?, zoned)
        };
        let us = match cast {
            Some(Cast::Timestamp {
                precision: Some(p), ..
            }) => time::round(us, p),
            _ => us,
        };
        return time::convert(us, zoned, f.ty.zoned(), zone).map(Value::Timestamp);
    }
    if binary && !textual {
        return f.ty.parse_binary(bytes, oid, zone);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "parameter is not valid UTF-8")?;
    f.ty.parse_text(&param_value(text, declared, cast, f.ty)?, zone)
}

/// A `/* pgshard: shard=N */` hint anywhere in the text (comments are dropped by parsers,
/// so hints are read from the raw text first).
pub fn hint(sql: &str) -> Option<Result<usize, RouteError>> {
    let mut rest = sql;
    while let Some(start) = rest.find("/*") {
        let body = &rest[start + 2..];
        let end = body.find("*/")?;
        let comment = body[..end].trim();
        if let Some(h) = comment.strip_prefix("pgshard:") {
            for part in h.split([',', ' ']).filter(|p| !p.is_empty()) {
                if let Some(v) = part.trim().strip_prefix("shard=") {
                    return Some(
                        v.trim()
                            .parse::<usize>()
                            .map_err(|_| RouteError::BadHint(format!("shard={v}"))),
                    );
                }
            }
        }
        rest = &body[end + 2..];
    }
    None
}

/// The node a `/* pgshard: target=primary|replica */` hint asks for: Some(true) for a
/// replica.
pub fn target_hint(sql: &str) -> Option<bool> {
    let mut rest = sql;
    while let Some(start) = rest.find("/*") {
        let body = &rest[start + 2..];
        let end = body.find("*/")?;
        if let Some(h) = body[..end].trim().strip_prefix("pgshard:") {
            for part in h.split([',', ' ']).filter(|p| !p.is_empty()) {
                match part.trim() {
                    "target=primary" => return Some(false),
                    "target=replica" => return Some(true),
                    _ => {}
                }
            }
        }
        rest = &body[end + 2..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_functions_are_found() {
        let r = Rules {
            writing_functions: vec!["audit_log".into()],
            ..Rules::default()
        };
        assert!(r.calls_writing_function("SELECT nextval('s')"));
        assert!(r.calls_writing_function("select PG_ADVISORY_LOCK (1)"));
        assert!(r.calls_writing_function("SELECT x, audit_log(x) FROM t"));
        assert!(!r.calls_writing_function("SELECT nextval FROM t"));
        assert!(!r.calls_writing_function("SELECT count(*) FROM t"));
        assert_eq!(
            target_hint("/* pgshard: target=primary */ SELECT 1"),
            Some(false)
        );
        assert_eq!(
            target_hint("SELECT 1 /*pgshard: shard=1, target=replica*/"),
            Some(true)
        );
        assert_eq!(target_hint("SELECT 1"), None);
    }

    /// Three shards; `events` ranged by an integer key (below 100, below 200, below 300,
    /// nothing above), `users` hashed, `notes` ranged by time, `names` by text.
    fn ranged() -> Router {
        let t = |y: &str| {
            let c: crate::config::ShardedTableConfig = yaml_serde::from_str(y).unwrap();
            ShardFn::new(&c, 3, "t").unwrap()
        };
        Router {
            default_shard: 0,
            shards: 3,
            rules: Rules::new(
                vec![
                    t(
                        "{ table: events, column: id, method: range, ranges: [ { to: 100, shard: 0 }, { from: 100, to: 200, shard: 1 }, { from: 200, to: 300, shard: 2 } ] }",
                    ),
                    t("{ table: users, column: id, method: hash }"),
                    t(
                        "{ table: notes, column: at, method: range, type: timestamptz, ranges: [ { to: '2026-01-01', shard: 2 }, { from: '2026-01-01', to: '2026-07-01', shard: 1 }, { from: '2026-07-01', shard: 0 } ] }",
                    ),
                    t(
                        "{ table: names, column: n, method: range, type: text, ranges: [ { to: 'm', shard: 0 }, { from: 'm', shard: 1 } ] }",
                    ),
                ],
                vec![],
            ),
        }
    }

    /// The shards `sql` is routed to with text parameters `params`.
    fn routed(r: &Router, sql: &str, params: &[Option<&[u8]>]) -> Vec<usize> {
        let a = analyze::analyze(sql, &r.rules).unwrap();
        let p = Params {
            values: params.to_vec(),
            binary: vec![false; params.len()],
            oids: vec![0; params.len()],
        };
        match r.resolve(&a, &p, &Zone::utc()).unwrap() {
            Route::Shards(v) => v,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn bounds_narrow_range_sharded_tables_only() {
        let r = ranged();
        let shards = |sql: &str, params: &[Option<&[u8]>]| routed(&r, sql, params);
        for (sql, want) in [
            (
                "SELECT * FROM events WHERE id >= 120 AND id < 150",
                &[1][..],
            ),
            ("SELECT * FROM events WHERE id < 50", &[0]),
            ("SELECT * FROM events WHERE id >= 100 AND id <= 199", &[1]),
            ("SELECT * FROM events WHERE id > 150", &[1, 2]),
            (
                "SELECT * FROM events WHERE id BETWEEN 99 AND 200",
                &[0, 1, 2],
            ),
            // A bound is inclusive: `< 100` takes 100's shard too.
            ("SELECT * FROM events WHERE id < 100", &[0, 1]),
            // Rounded as PostgreSQL compares: keys above 99.5 are at least 100.
            ("SELECT * FROM events WHERE id > 99.5", &[1, 2]),
            ("SELECT * FROM events WHERE id > 120 AND id > 250", &[2]),
            ("SELECT * FROM events WHERE id < 50 OR id > 250", &[0, 2]),
            ("SELECT * FROM events WHERE id < 50 OR id = 150", &[0, 1]),
            // No key meets these: every shard answers (no row), or the one whose
            // range meets each bound.
            ("SELECT * FROM events WHERE id > 400", &[0, 1, 2]),
            ("SELECT * FROM events WHERE id > 150 AND id < 120", &[1]),
            ("SELECT * FROM events WHERE id > NULL", &[0, 1, 2]),
            // Text orders by collation; hash keys have no order; unreadable bounds.
            ("SELECT * FROM names WHERE n < 'c'", &[0, 1, 2]),
            ("SELECT * FROM users WHERE id < 5", &[0, 1, 2]),
            ("SELECT * FROM notes WHERE at < 'now'", &[0, 1, 2]),
            (
                "SELECT * FROM notes WHERE at >= '2026-02-01' AND at < '2026-03-01'",
                &[1],
            ),
            ("SELECT * FROM notes WHERE at < '2025-06-01 00:00+02'", &[2]),
        ] {
            assert_eq!(shards(sql, &[]), want, "{sql}");
        }
        let (from, to) = (b"2026-08-01".as_slice(), b"2026-09-01".as_slice());
        assert_eq!(
            shards(
                "SELECT * FROM notes WHERE at BETWEEN $1 AND $2",
                &[Some(from), Some(to)]
            ),
            [0]
        );
        assert_eq!(
            shards(
                "SELECT * FROM notes WHERE at BETWEEN $1 AND $2",
                &[None, Some(to)]
            ),
            [0, 1, 2]
        );
    }

    #[test]
    fn arrays_route_by_their_elements() {
        let r = ranged();
        let shards = |sql: &str, params: &[Option<&[u8]>]| routed(&r, sql, params);
        for (sql, want) in [
            (
                "SELECT * FROM events WHERE id = ANY('{5,150}')",
                &[0, 1][..],
            ),
            ("SELECT * FROM events WHERE id = ANY(ARRAY[250, 260])", &[2]),
            (
                "SELECT * FROM events e WHERE e.id = ANY('{NULL, 120}'::bigint[])",
                &[1],
            ),
            (
                "SELECT * FROM events WHERE id = ANY('{5}') OR id = 250",
                &[0, 2],
            ),
            (
                "SELECT * FROM events WHERE id = ANY('{5}') AND id = ANY('{5,150,250}')",
                &[0],
            ),
            // No element, or not an array pgshard reads: every shard.
            ("SELECT * FROM events WHERE id = ANY('{}')", &[0, 1, 2]),
            ("SELECT * FROM events WHERE id = ANY('{1,{2}}')", &[0, 1, 2]),
            ("SELECT * FROM events WHERE id <> ANY('{5}')", &[0, 1, 2]),
            (
                "SELECT * FROM events WHERE id = ANY(some_function())",
                &[0, 1, 2],
            ),
        ] {
            assert_eq!(shards(sql, &[]), want, "{sql}");
        }
        let q = "SELECT * FROM events WHERE id = ANY($1)";
        assert_eq!(shards(q, &[Some(b"{10,20}")]), [0]);
        assert_eq!(shards(q, &[Some(b"{\"210\", 299}")]), [2]);
        assert_eq!(shards(q, &[None]), [0, 1, 2]);
        let users = |ids: &str| {
            shards(
                &format!("SELECT * FROM users WHERE id = ANY('{{{ids}}}')"),
                &[],
            )
        };
        let mut each: Vec<usize> = ["1", "2", "3"].iter().flat_map(|i| users(i)).collect();
        each.sort_unstable();
        each.dedup();
        assert_eq!(users("1,2,3"), each);
        // A binary int8[] parameter: {5, NULL, 150}.
        let mut b = Vec::new();
        for x in [1i32, 1, 20, 3, 1] {
            b.extend_from_slice(&x.to_be_bytes());
        }
        for v in [Some(5i64), None, Some(150)] {
            match v {
                Some(v) => {
                    b.extend_from_slice(&8i32.to_be_bytes());
                    b.extend_from_slice(&v.to_be_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        let a = analyze::analyze(q, &r.rules).unwrap();
        let p = Params {
            values: vec![Some(&b[..])],
            binary: vec![true],
            oids: vec![0],
        };
        assert_eq!(
            r.resolve(&a, &p, &Zone::utc()).unwrap(),
            Route::Shards(vec![0, 1])
        );
    }

    /// A condition on `events.id`: comparisons with tenths, BETWEEN, a condition on
    /// another column, AND, OR.
    #[derive(Debug, Clone)]
    enum Cond {
        Cmp(usize, i32, bool),
        Between(i32, i32),
        Other,
        And(Box<Cond>, Box<Cond>),
        Or(Box<Cond>, Box<Cond>),
    }

    const OPS: [&str; 5] = ["<", "<=", ">", ">=", "="];

    impl Cond {
        fn sql(&self) -> String {
            // Tenths, as PostgreSQL reads them: `-5.5`, and whole numbers without a point.
            let num = |v: i32| match v % 10 {
                0 => (v / 10).to_string(),
                _ => format!("{:.1}", f64::from(v) / 10.0),
            };
            match self {
                Cond::Cmp(op, v, true) => format!("id {} {}", OPS[*op], num(*v)),
                Cond::Cmp(op, v, false) => format!("{} {} id", num(*v), OPS[*op]),
                Cond::Between(a, b) => format!("id BETWEEN {} AND {}", num(*a), num(*b)),
                Cond::Other => "name = 'x'".into(),
                Cond::And(a, b) => format!("({} AND {})", a.sql(), b.sql()),
                Cond::Or(a, b) => format!("({} OR {})", a.sql(), b.sql()),
            }
        }

        /// Whether a row with key `k` can meet it (the other column as it may be).
        fn holds(&self, k: i32) -> bool {
            let (key, tenths) = (f64::from(k), |v: i32| f64::from(v) / 10.0);
            let cmp = |op: usize, a: f64, b: f64| match op {
                0 => a < b,
                1 => a <= b,
                2 => a > b,
                3 => a >= b,
                _ => a == b,
            };
            match self {
                Cond::Cmp(op, v, true) => cmp(*op, key, tenths(*v)),
                Cond::Cmp(op, v, false) => cmp(*op, tenths(*v), key),
                Cond::Between(a, b) => tenths(*a) <= key && key <= tenths(*b),
                Cond::Other => true,
                Cond::And(a, b) => a.holds(k) && b.holds(k),
                Cond::Or(a, b) => a.holds(k) || b.holds(k),
            }
        }
    }

    fn cond() -> impl proptest::strategy::Strategy<Value = Cond> {
        use proptest::prelude::*;
        // Tenths; often on or next to a range's edge, where a wrong comparison shows.
        let edges = [
            -10, -5, 0, 5, 990, 995, 1000, 1005, 1990, 2000, 2005, 2990, 3000, 3005,
        ];
        let value = || prop_oneof![proptest::sample::select(edges.to_vec()), -300i32..3300];
        let leaf = prop_oneof![
            (0..OPS.len(), value(), any::<bool>()).prop_map(|(o, v, l)| Cond::Cmp(o, v, l)),
            (value(), value()).prop_map(|(a, b)| Cond::Between(a, b)),
            Just(Cond::Other),
        ];
        leaf.prop_recursive(3, 16, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| Cond::And(a.into(), b.into())),
                (inner.clone(), inner).prop_map(|(a, b)| Cond::Or(a.into(), b.into())),
            ]
        })
    }

    proptest::proptest! {
        /// Whatever the comparisons, AND and OR: every key that can meet the WHERE clause
        /// is on a shard the statement goes to.
        #[test]
        fn bounds_never_miss_a_shard(c in cond()) {
            let r = ranged();
            let sql = format!("SELECT * FROM events WHERE {}", c.sql());
            let got = routed(&r, &sql, &[]);
            // Keys of 300 and above are in no range: no row has one.
            for k in -40..300 {
                let shard = (k.max(0) / 100) as usize;
                proptest::prop_assert!(
                    !c.holds(k) || got.contains(&shard),
                    "{sql}: key {k} on shard {shard}, routed to {got:?}"
                );
            }
        }
    }

    #[test]
    fn hints_are_read_from_comments() {
        assert_eq!(hint("SELECT 1 /* pgshard: shard=1 */"), Some(Ok(1)));
        assert_eq!(
            hint("/* app */ /*pgshard: target=primary, shard=0*/ SELECT"),
            Some(Ok(0))
        );
        assert_eq!(hint("SELECT '/* pgshard: nothing */'"), None);
        assert!(matches!(
            hint("/* pgshard: shard=x */ SELECT 1"),
            Some(Err(_))
        ));
        assert_eq!(hint("SELECT 1"), None);
    }
}
