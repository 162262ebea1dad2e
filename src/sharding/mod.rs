//! Shard functions: which shard a key belongs to. Keys are typed values (integers,
//! numerics, text, dates, timestamps, uuids), compared as such, never as strings of digits.

pub mod cast;
pub mod column;
pub mod directory;
pub mod hash;
pub mod keys;
pub mod time;
pub mod value;

use crate::config::{ShardMethod, ShardedTableConfig};
use std::collections::HashMap;
pub use time::Zone;
pub use value::{KeyType, Value};

/// Why a key has no shard.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardError {
    #[error("value {value} of {column} is in no configured range and no default shard is set")]
    OutOfRange { column: String, value: String },
    #[error("value {value} of {column} is in no configured list and no default shard is set")]
    NotListed { column: String, value: String },
    #[error("invalid value for shard key {column} ({ty}): {detail}")]
    BadValue {
        column: String,
        ty: &'static str,
        detail: String,
    },
    #[error("shard key {0} is NULL")]
    Null(String),
    /// A directory-sharded key not in the cache: the directory must be read (by the
    /// session, which then asks again).
    #[error("the directory has no cached shard for {table} key {key}")]
    DirectoryMiss { table: String, key: String },
}

/// How one table is sharded.
#[derive(Debug, Clone)]
pub struct ShardFn {
    pub table: String,
    pub column: String,
    pub ty: KeyType,
    /// The shards generate keys left out of INSERTs (see `keys`).
    pub generate_keys: bool,
    /// The key column: what storing a key does to it, and what the servers say of it.
    pub key: std::sync::Arc<column::KeyColumn>,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Hash,
    /// `[from, to)` ranges, sorted by `from`; `None` is an open end.
    Range {
        ranges: Vec<(Option<Value>, Option<Value>, usize)>,
        default: Option<usize>,
    },
    List {
        map: HashMap<Value, usize>,
        default: Option<usize>,
    },
    /// A lookup table in PostgreSQL, cached here.
    Directory(std::sync::Arc<directory::DirectoryCache>),
}

impl ShardFn {
    /// Whether equal keys of the two tables are always on the same shard: the same shard
    /// function over the same key type (directories only for the same table).
    pub fn co_located(&self, other: &ShardFn) -> bool {
        self.ty == other.ty
            && match (&self.kind, &other.kind) {
                (Kind::Hash, Kind::Hash) => true,
                (
                    Kind::Range {
                        ranges: a,
                        default: da,
                    },
                    Kind::Range {
                        ranges: b,
                        default: db,
                    },
                ) => a == b && da == db,
                (
                    Kind::List {
                        map: a,
                        default: da,
                    },
                    Kind::List {
                        map: b,
                        default: db,
                    },
                ) => a == b && da == db,
                _ => self.table == other.table,
            }
    }

    /// Builds and validates a table's shard function; `key` names the config entry in errors.
    pub fn new(cfg: &ShardedTableConfig, shards: usize, key: &str) -> Result<ShardFn, String> {
        let ty = cfg.key_type();
        if cfg.key_type.is_none() && ty == KeyType::Timestamp {
            return Err(format!(
                "{key}.type: the bounds are timestamps: give the column's type, timestamp or timestamptz (they read a time written without an offset differently)"
            ));
        }
        let check_shard = |s: usize, k: String| {
            if s >= shards {
                Err(format!(
                    "{k}: shard {s} does not exist (there are {shards} shards, numbered from 0)"
                ))
            } else {
                Ok(s)
            }
        };
        let parse = |v: &yaml_serde::Value, k: &str| -> Result<Value, String> {
            let text = match v {
                yaml_serde::Value::String(s) => s.clone(),
                yaml_serde::Value::Number(n) => n.to_string(),
                yaml_serde::Value::Bool(b) => b.to_string(),
                other => return Err(format!("{k}: {other:?} is not a {} value", ty.name())),
            };
            // Bounds without an offset are UTC, whatever a session's time zone.
            ty.parse_text(&text, &Zone::utc())
                .map_err(|e| format!("{k}: '{text}' is not a valid {} value: {e}", ty.name()))
        };
        if let Some(d) = cfg.default_shard {
            check_shard(d, format!("{key}.default_shard"))?;
        }
        let kind = match cfg.method {
            ShardMethod::Directory => {
                if !matches!(ty, KeyType::Int | KeyType::Text | KeyType::Uuid) {
                    return Err(format!(
                        "{key}.type: directory sharding supports bigint/integer/smallint, text/varchar and uuid keys (new keys are hashed), not {}",
                        ty.name()
                    ));
                }
                let d = cfg
                    .directory
                    .clone()
                    .unwrap_or(crate::config::DirectoryConfig {
                        table: "pgshard_directory".into(),
                        on_new_key: crate::config::NewKey::Hash,
                        shard: None,
                        cache_size: 100_000,
                    });
                Kind::Directory(std::sync::Arc::new(directory::DirectoryCache::new(
                    d.table,
                    d.shard,
                    d.cache_size,
                )))
            }
            ShardMethod::Hash => {
                if !matches!(ty, KeyType::Int | KeyType::Text | KeyType::Uuid) {
                    return Err(format!(
                        "{key}.type: hash sharding supports bigint/integer/smallint, text/varchar and uuid keys, not {}",
                        ty.name()
                    ));
                }
                Kind::Hash
            }
            ShardMethod::Range => {
                if cfg.ranges.is_empty() {
                    return Err(format!("{key}.ranges: at least one range is required"));
                }
                let mut ranges = Vec::new();
                for (i, r) in cfg.ranges.iter().enumerate() {
                    let k = format!("{key}.ranges[{i}]");
                    let from = r
                        .from
                        .as_ref()
                        .map(|v| parse(v, &format!("{k}.from")))
                        .transpose()?;
                    let to =
                        r.to.as_ref()
                            .map(|v| parse(v, &format!("{k}.to")))
                            .transpose()?;
                    if let (Some(f), Some(t)) = (&from, &to)
                        && f >= t
                    {
                        return Err(format!(
                            "{k}: from must be below to (ranges are [from, to))"
                        ));
                    }
                    ranges.push((from, to, check_shard(r.shard, format!("{k}.shard"))?));
                }
                ranges.sort_by(|a, b| match (&a.0, &b.0) {
                    (None, None) => std::cmp::Ordering::Equal,
                    (None, _) => std::cmp::Ordering::Less,
                    (_, None) => std::cmp::Ordering::Greater,
                    (Some(x), Some(y)) => x.cmp(y),
                });
                // Adjacent ranges must neither overlap nor leave gaps (unless a default
                // shard takes the gaps).
                for w in ranges.windows(2) {
                    let (a, b) = (&w[0], &w[1]);
                    match (&a.1, &b.0) {
                        (None, _) | (_, None) => {
                            return Err(format!(
                                "{key}.ranges: ranges overlap (more than one open end on the same side)"
                            ));
                        }
                        (Some(to), Some(from)) if to > from => {
                            return Err(format!("{key}.ranges: ranges overlap around {from}"));
                        }
                        (Some(to), Some(from)) if to < from && cfg.default_shard.is_none() => {
                            return Err(format!(
                                "{key}.ranges: gap between {to} and {from}; close it or set default_shard"
                            ));
                        }
                        _ => {}
                    }
                }
                Kind::Range {
                    ranges,
                    default: cfg.default_shard,
                }
            }
            ShardMethod::List => {
                if cfg.lists.is_empty() {
                    return Err(format!("{key}.lists: at least one list is required"));
                }
                let mut map = HashMap::new();
                for (i, l) in cfg.lists.iter().enumerate() {
                    let k = format!("{key}.lists[{i}]");
                    let s = check_shard(l.shard, format!("{k}.shard"))?;
                    for v in &l.values {
                        let v = parse(v, &format!("{k}.values"))?;
                        if map.insert(v.clone(), s).is_some() {
                            return Err(format!("{k}.values: {v} is listed twice"));
                        }
                    }
                }
                Kind::List {
                    map,
                    default: cfg.default_shard,
                }
            }
        };
        if cfg.generate_keys && !(matches!(kind, Kind::Hash) && ty == KeyType::Int) {
            return Err(format!(
                "{key}.generate_keys: the shards generate only hash-sharded bigint/integer/smallint keys (this table is {} by {})",
                match kind {
                    Kind::Hash => "hashed",
                    Kind::Range { .. } => "ranged",
                    Kind::List { .. } => "listed",
                    Kind::Directory(_) => "in a directory",
                },
                ty.name()
            ));
        }
        let declared = cfg
            .key_type
            .as_deref()
            .and_then(column::declared)
            .map_or(-1, |(_, typmod)| typmod);
        Ok(ShardFn {
            table: cfg.table.to_ascii_lowercase(),
            column: cfg.column.to_ascii_lowercase(),
            ty,
            generate_keys: cfg.generate_keys,
            key: std::sync::Arc::new(column::KeyColumn::new(declared)),
            kind,
        })
    }

    /// A key being written (an inserted row's, an UPDATE's new one) as the column stores
    /// it: rounded to its `numeric(p, s)` scale or `timestamp(p)` precision, or cut to its
    /// `varchar(n)` length where only spaces are cut (see `column`).
    pub fn stored(&self, v: Value) -> Value {
        column::stored(self.ty, self.key.typmod(), v)
    }

    /// The shard of a key value.
    pub fn shard_of(&self, v: &Value, shards: usize) -> Result<usize, ShardError> {
        match &self.kind {
            Kind::Hash => {
                let key = match v {
                    Value::Int(i) => hash::HashKey::Int(*i),
                    Value::Text(t) => hash::HashKey::Text(t.as_bytes()),
                    Value::Uuid(u) => hash::HashKey::Uuid(*u),
                    // PostgreSQL's hash partitioning ignores NULLs: the row hash is 0.
                    Value::Null => return Ok(0),
                    other => {
                        let detail = format!("{other} cannot be hashed as {}", self.ty.name());
                        return Err(self.bad_value(detail));
                    }
                };
                Ok(hash::partition_of(&key, shards as u64) as usize)
            }
            Kind::Range { ranges, default } => {
                if *v == Value::Null {
                    return default.ok_or_else(|| ShardError::Null(self.column.clone()));
                }
                ranges
                    .iter()
                    .find(|(from, to, _)| {
                        from.as_ref().is_none_or(|f| v >= f) && to.as_ref().is_none_or(|t| v < t)
                    })
                    .map(|r| r.2)
                    .or(*default)
                    .ok_or_else(|| ShardError::OutOfRange {
                        column: self.column.clone(),
                        value: v.to_string(),
                    })
            }
            Kind::Directory(cache) => {
                if *v == Value::Null {
                    return Err(ShardError::Null(self.column.clone()));
                }
                let key = directory::canonical(v);
                cache.get(&key).ok_or_else(|| ShardError::DirectoryMiss {
                    table: self.table.clone(),
                    key,
                })
            }
            Kind::List { map, default } => {
                map.get(v)
                    .copied()
                    .or(*default)
                    .ok_or_else(|| ShardError::NotListed {
                        column: self.column.clone(),
                        value: v.to_string(),
                    })
            }
        }
    }

    /// Whether bounds on the key narrow its shards: the table is sharded by ranges of a
    /// key whose order pgshard knows (not text, which orders by collation).
    pub fn bounds_narrow(&self) -> bool {
        matches!(self.kind, Kind::Range { .. }) && self.ty != KeyType::Text
    }

    /// For a table whose bounds narrow (see [`ShardFn::bounds_narrow`]), the shards that
    /// may hold keys from `lo` to `hi` (inclusive; None: unbounded): those whose ranges
    /// meet them, and the default shard. None for other tables: any shard may.
    pub fn shards_between(&self, lo: Option<&Value>, hi: Option<&Value>) -> Option<Vec<usize>> {
        let Kind::Range { ranges, default } = &self.kind else {
            return None;
        };
        if !self.bounds_narrow() {
            return None;
        }
        let mut out: Vec<usize> = ranges
            .iter()
            .filter(|(from, to, _)| {
                // A range is [from, to).
                lo.is_none_or(|l| to.as_ref().is_none_or(|t| l < t))
                    && hi.is_none_or(|h| from.as_ref().is_none_or(|f| h >= f))
            })
            .map(|r| r.2)
            .collect();
        out.extend(*default);
        Some(out)
    }

    /// How the table is sharded, as the configuration names it.
    pub fn method(&self) -> &'static str {
        match self.kind {
            Kind::Hash => "hash",
            Kind::Range { .. } => "range",
            Kind::List { .. } => "list",
            Kind::Directory(_) => "directory",
        }
    }

    /// For a directory-sharded table, its directory.
    pub fn directory(&self) -> Option<&std::sync::Arc<directory::DirectoryCache>> {
        match &self.kind {
            Kind::Directory(d) => Some(d),
            _ => None,
        }
    }

    /// The shard PostgreSQL's hash partitioning gives a key (a directory's new keys).
    pub fn hash_shard(&self, key: &str, shards: usize) -> Result<usize, ShardError> {
        // Directory keys are integers, text or uuids, which no time zone changes.
        let v = self
            .ty
            .parse_text(key, &Zone::utc())
            .map_err(|d| self.bad_value(d))?;
        let k = match &v {
            Value::Int(i) => hash::HashKey::Int(*i),
            Value::Text(t) => hash::HashKey::Text(t.as_bytes()),
            Value::Uuid(u) => hash::HashKey::Uuid(*u),
            _ => return Ok(0),
        };
        Ok(hash::partition_of(&k, shards as u64) as usize)
    }

    /// The shard of a row written with a key in PostgreSQL's binary format (a binary COPY
    /// field), as the column stores it.
    pub fn shard_of_binary(
        &self,
        b: &[u8],
        shards: usize,
        zone: &Zone,
    ) -> Result<usize, ShardError> {
        self.shard_of_parsed(self.ty.parse_binary(b, 0, zone), shards)
    }

    /// The shard of a row written with a key given as text (a COPY field), read in the
    /// session's time zone `zone`, as the column stores it.
    pub fn shard_of_text(
        &self,
        text: &str,
        shards: usize,
        zone: &Zone,
    ) -> Result<usize, ShardError> {
        self.shard_of_parsed(self.ty.parse_text(text, zone), shards)
    }

    /// The shard of a row written with a key parsed from text or binary, or the parse
    /// error for this key.
    fn shard_of_parsed(
        &self,
        v: Result<Value, String>,
        shards: usize,
    ) -> Result<usize, ShardError> {
        let v = v.map_err(|d| self.bad_value(d))?;
        self.shard_of(&self.stored(v), shards)
    }

    /// The error for a value this key's type does not accept.
    pub fn bad_value(&self, detail: String) -> ShardError {
        ShardError::BadValue {
            column: self.column.clone(),
            ty: self.ty.name(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ShardedTableConfig;

    fn table(yaml: &str) -> Result<ShardFn, String> {
        let cfg: ShardedTableConfig = yaml_serde::from_str(yaml).unwrap();
        ShardFn::new(&cfg, 3, "sharded_tables[0]")
    }

    #[test]
    fn range_on_dates_and_timestamps_compares_typed_values() {
        let f = table(
            "{ table: events, column: created_at, method: range, type: timestamp, ranges: [ { to: '2026-01-01', shard: 0 }, { from: '2026-01-01', to: '2026-07-01', shard: 1 }, { from: '2026-07-01', shard: 2 } ] }",
        )
        .unwrap();
        assert_eq!(
            f.shard_of_text("2025-12-31 23:59:59.999999", 3, &Zone::utc()),
            Ok(0)
        );
        assert_eq!(f.shard_of_text("2026-01-01", 3, &Zone::utc()), Ok(1));
        assert_eq!(
            f.shard_of_text("2026-06-30T12:00:00", 3, &Zone::utc()),
            Ok(1)
        );
        assert_eq!(
            f.shard_of_text("2027-01-01 00:00:00+00", 3, &Zone::utc()),
            Ok(2)
        );
        assert!(f.shard_of_text("not a date", 3, &Zone::utc()).is_err());
    }

    #[test]
    fn timestamp_bounds_need_the_columns_type() {
        let e = table(
            "{ table: events, column: at, method: range, ranges: [ { to: '2026-01-01', shard: 0 }, { from: '2026-01-01', shard: 1 } ] }",
        )
        .unwrap_err();
        assert!(
            e.starts_with("sharded_tables[0].type: the bounds are timestamps"),
            "{e}"
        );
        // Bounds of a timestamptz without an offset are UTC, in any session's zone.
        let f = table(
            "{ table: events, column: at, method: range, type: timestamptz, ranges: [ { to: '2026-01-01', shard: 0 }, { from: '2026-01-01', shard: 1 } ] }",
        )
        .unwrap();
        let berlin = Zone::new("Europe/Berlin");
        assert_eq!(f.shard_of_text("2026-01-01 00:30", 3, &berlin), Ok(0));
        assert_eq!(f.shard_of_text("2026-01-01 01:00", 3, &berlin), Ok(1));
        assert_eq!(f.shard_of_text("2026-01-01 00:30+00", 3, &berlin), Ok(1));
    }

    #[test]
    fn range_on_integers_is_numeric_not_lexical() {
        let f = table(
            "{ table: t, column: id, method: range, type: bigint, ranges: [ { to: 100, shard: 0 }, { from: 100, to: 1000, shard: 1 }, { from: 1000, shard: 2 } ] }",
        )
        .unwrap();
        assert_eq!(f.shard_of_text("99", 3, &Zone::utc()), Ok(0));
        assert_eq!(f.shard_of_text("100", 3, &Zone::utc()), Ok(1));
        assert_eq!(f.shard_of_text("999", 3, &Zone::utc()), Ok(1));
        assert_eq!(f.shard_of_text("1000", 3, &Zone::utc()), Ok(2));
        assert_eq!(f.shard_of_text("-5", 3, &Zone::utc()), Ok(0));
        let f = table(
            "{ table: t, column: amount, method: range, type: numeric, ranges: [ { to: '10.5', shard: 0 }, { from: '10.5', shard: 1 } ] }",
        )
        .unwrap();
        assert_eq!(f.shard_of_text("9.99", 3, &Zone::utc()), Ok(0));
        assert_eq!(f.shard_of_text("10.50", 3, &Zone::utc()), Ok(1));
        assert_eq!(f.shard_of_text("100", 3, &Zone::utc()), Ok(1));
        assert_eq!(f.shard_of_text("-100.5", 3, &Zone::utc()), Ok(0));
    }

    #[test]
    fn range_validation_names_the_problem() {
        let e = table("{ table: t, column: id, method: range, type: bigint, ranges: [ { to: 10, shard: 0 }, { from: 5, shard: 1 } ] }").unwrap_err();
        assert!(e.contains("overlap"), "{e}");
        let e = table("{ table: t, column: id, method: range, type: bigint, ranges: [ { to: 10, shard: 0 }, { from: 20, shard: 1 } ] }").unwrap_err();
        assert!(e.contains("gap between 10 and 20"), "{e}");
        let f = table("{ table: t, column: id, method: range, type: bigint, default_shard: 2, ranges: [ { to: 10, shard: 0 }, { from: 20, shard: 1 } ] }").unwrap();
        assert_eq!(f.shard_of_text("15", 3, &Zone::utc()), Ok(2));
        let e = table("{ table: t, column: id, method: range, type: bigint, ranges: [ { to: 10, shard: 5 } ] }").unwrap_err();
        assert!(
            e.starts_with("sharded_tables[0].ranges[0].shard: shard 5 does not exist"),
            "{e}"
        );
        let e = table("{ table: t, column: id, method: range, type: date, ranges: [ { to: 'soon', shard: 0 } ] }").unwrap_err();
        assert!(
            e.contains("ranges[0].to: 'soon' is not a valid date"),
            "{e}"
        );
    }

    #[test]
    fn list_with_and_without_default() {
        let f = table("{ table: accounts, column: region, method: list, type: text, lists: [ { values: [eu, uk], shard: 0 }, { values: [us, ca], shard: 1 } ] }").unwrap();
        assert_eq!(f.shard_of_text("uk", 3, &Zone::utc()), Ok(0));
        assert_eq!(f.shard_of_text("ca", 3, &Zone::utc()), Ok(1));
        assert!(matches!(
            f.shard_of_text("jp", 3, &Zone::utc()),
            Err(ShardError::NotListed { .. })
        ));
        let f = table("{ table: accounts, column: region, method: list, type: text, default_shard: 2, lists: [ { values: [eu], shard: 0 } ] }").unwrap();
        assert_eq!(f.shard_of_text("jp", 3, &Zone::utc()), Ok(2));
        let f = table("{ table: t, column: n, method: list, type: integer, lists: [ { values: [1, 2], shard: 1 } ] }").unwrap();
        assert_eq!(
            f.shard_of_text("02", 3, &Zone::utc()),
            Ok(1),
            "integers compare as integers"
        );
    }

    #[test]
    fn hash_uses_the_column_type() {
        let int = table("{ table: users, column: id, method: hash }").unwrap();
        let text = table("{ table: users, column: id, method: hash, type: text }").unwrap();
        assert_eq!(
            int.shard_of_text("42", 3, &Zone::utc()).unwrap() as u64,
            hash::partition_of(&hash::HashKey::Int(42), 3)
        );
        assert_eq!(
            text.shard_of_text("42", 3, &Zone::utc()).unwrap() as u64,
            hash::partition_of(&hash::HashKey::Text(b"42"), 3)
        );
        assert!(int.shard_of_text("forty-two", 3, &Zone::utc()).is_err());
        let e = table("{ table: t, column: c, method: hash, type: date }").unwrap_err();
        assert!(e.contains("hash sharding supports"), "{e}");
    }
}
