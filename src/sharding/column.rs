//! What a shard key's column does to a value written into it. A column declared
//! `timestamptz(0)`, `numeric(10,1)` or `varchar(3)` stores `23:59:59.7` as `00:00:00` of
//! the next day, `4.96` as `5.0`, `'abc  '` as `'abc'`: a row routed by the value as
//! written would be stored where reads of its stored value never look. Keys being written
//! (INSERT rows, COPY rows, an UPDATE's new key) are therefore routed as the column stores
//! them; keys in filters are not (PostgreSQL compares the column with them as written).
//!
//! The modifier comes from the configuration's `type` (`timestamptz(0)`), and from the
//! servers' catalog, which the database's monitor reads (`KeyColumn::observe`); the
//! catalog wins, and a column whose type is not the configured one is reported.

use super::{KeyType, Value};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

/// PostgreSQL's `atttypmod` of a shard key's column: -1 when it has none.
pub type Typmod = i32;

/// PostgreSQL's VARHDRSZ, which numeric and varchar modifiers include.
const VARHDRSZ: i32 = 4;

/// A declared key type with its modifier (`numeric(10,2)`, `timestamp(3) with time
/// zone`, `varchar(20)`); None for a name pgshard does not know. Modifiers PostgreSQL
/// would refuse are refused.
pub fn declared(name: &str) -> Option<(KeyType, Typmod)> {
    let lower = name.trim().to_ascii_lowercase();
    let Some((base, rest)) = lower.split_once('(') else {
        return Some((KeyType::from_name(&lower)?, -1));
    };
    let (inner, after) = rest.split_once(')')?;
    // `timestamp(3) with time zone`: the words after the modifier belong to the type.
    let base = format!("{} {}", base.trim(), after.trim());
    let ty = KeyType::from_name(base.trim())?;
    let args: Vec<i32> = inner
        .split(',')
        .map(|a| a.trim().parse().ok())
        .collect::<Option<_>>()?;
    let typmod = match (ty, args.as_slice()) {
        (KeyType::Numeric, [p]) if (1..=1000).contains(p) => (p << 16) + VARHDRSZ,
        (KeyType::Numeric, [p, s]) if (1..=1000).contains(p) && (-1000..=1000).contains(s) => {
            (p << 16) + (s & 0x7ff) + VARHDRSZ
        }
        (KeyType::Timestamp | KeyType::TimestampTz, [p]) if (0..=6).contains(p) => *p,
        // varchar(n) only: `text(n)` is not a type.
        (KeyType::Text, [n]) if base.contains("var") && *n >= 1 => n + VARHDRSZ,
        _ => return None,
    };
    Some((ty, typmod))
}

/// `v` as a column of type `ty` with modifier `typmod` stores it.
pub fn stored(ty: KeyType, typmod: Typmod, v: Value) -> Value {
    if typmod < 0 {
        return v;
    }
    match (ty, v) {
        (KeyType::Numeric, Value::Numeric(d)) => {
            // numeric(p, s): s may be negative (rounding to tens, hundreds...).
            let scale = (((typmod - VARHDRSZ) & 0x7ff) ^ 1024) - 1024;
            Value::Numeric(d.rounded(scale))
        }
        (KeyType::Timestamp | KeyType::TimestampTz, Value::Timestamp(us)) => {
            Value::Timestamp(super::time::round(us, typmod as usize))
        }
        (KeyType::Text, Value::Text(s)) => {
            // A longer value is an error unless what is cut off is spaces.
            let max = (typmod - VARHDRSZ).max(0) as usize;
            match s.char_indices().nth(max) {
                Some((cut, _)) if s[cut..].bytes().all(|b| b == b' ') => {
                    Value::Text(s[..cut].to_string())
                }
                _ => Value::Text(s),
            }
        }
        (_, v) => v,
    }
}

/// What the servers' catalog says of a shard key's column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Not read yet, or the read failed.
    Unknown,
    /// The table or the column does not exist (yet) where the monitor looked.
    Missing,
    /// The column's type as PostgreSQL names it (`timestamp(0) with time zone`), and
    /// whether pgshard reads keys as that type.
    Type { name: String, matches: bool },
}

/// A sharded table's key column: the modifier keys being written are rounded to, and
/// what the servers say of it. Shared by the clones of its shard function.
#[derive(Debug)]
pub struct KeyColumn {
    /// From the configuration's `type`.
    declared: Typmod,
    /// The modifier in force: the catalog's once read, else the declared one.
    typmod: AtomicI32,
    observed: Mutex<Observed>,
}

impl KeyColumn {
    pub fn new(declared: Typmod) -> KeyColumn {
        KeyColumn {
            declared,
            typmod: AtomicI32::new(declared),
            observed: Mutex::new(Observed::Unknown),
        }
    }

    /// The modifier keys being written are rounded to.
    pub fn typmod(&self) -> Typmod {
        self.typmod.load(Ordering::Relaxed)
    }

    pub fn observed(&self) -> Observed {
        self.observed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes in what the catalog says (the base type's name, as `regtype` prints it, and
    /// the modifier; None: no such column), for a key read as `ty`. Returns the new
    /// observation when it changed, for the monitor to report.
    pub fn observe(&self, ty: KeyType, found: Option<(&str, Typmod, &str)>) -> Option<Observed> {
        let now = match found {
            None => {
                self.typmod.store(self.declared, Ordering::Relaxed);
                Observed::Missing
            }
            Some((base, typmod, name)) => {
                let matches = KeyType::from_name(base) == Some(ty);
                // A column of another type keeps the declared modifier: its own means
                // nothing to keys read as `ty`.
                self.typmod.store(
                    if matches { typmod } else { self.declared },
                    Ordering::Relaxed,
                );
                Observed::Type {
                    name: name.to_string(),
                    matches,
                }
            }
        };
        let mut seen = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        (*seen != now).then(|| {
            *seen = now.clone();
            now
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharding::{Zone, value::Decimal};

    fn num(s: &str) -> Value {
        Value::Numeric(Decimal::parse(s).unwrap())
    }

    #[test]
    fn declared_types_with_modifiers_as_postgresql_encodes_them() {
        // The values pg_attribute.atttypmod holds for these columns.
        for (name, ty, typmod) in [
            ("numeric(10,1)", KeyType::Numeric, 655365),
            ("NUMERIC(10)", KeyType::Numeric, 655364),
            ("numeric(5,-2)", KeyType::Numeric, 329730),
            ("decimal(12, 2)", KeyType::Numeric, 786438),
            ("timestamptz(0)", KeyType::TimestampTz, 0),
            ("timestamp(3)", KeyType::Timestamp, 3),
            ("timestamp(3) with time zone", KeyType::TimestampTz, 3),
            ("timestamp (2) without time zone", KeyType::Timestamp, 2),
            ("varchar(3)", KeyType::Text, 7),
            ("character varying(20)", KeyType::Text, 24),
            ("bigint", KeyType::Int, -1),
            ("timestamptz", KeyType::TimestampTz, -1),
        ] {
            assert_eq!(declared(name), Some((ty, typmod)), "{name}");
        }
        for name in [
            "text(3)",
            "bigint(5)",
            "timestamp(7)",
            "numeric(0,1)",
            "numeric(10,2000)",
            "varchar(0)",
            "varchar(x)",
            "numeric(10",
            "uuid(1)",
            "date(1)",
        ] {
            assert_eq!(declared(name), None, "{name}");
        }
    }

    #[test]
    fn written_keys_are_rounded_as_the_column_stores_them() {
        let n = |t: &str| declared(t).unwrap().1;
        let numeric = |t: &str, v: &str| stored(KeyType::Numeric, n(t), num(v));
        assert_eq!(numeric("numeric(10,1)", "4.96"), num("5.0"));
        assert_eq!(numeric("numeric(10,1)", "4.94"), num("4.9"));
        assert_eq!(numeric("numeric(10,1)", "-4.95"), num("-5.0"));
        assert_eq!(numeric("numeric(10)", "2.5"), num("3"));
        assert_eq!(numeric("numeric(5,-2)", "1249.9"), num("1200"));
        assert_eq!(numeric("numeric(5,-2)", "1250"), num("1300"));
        assert_eq!(numeric("numeric(5,-2)", "-49"), num("0"));
        assert_eq!(numeric("numeric", "4.96"), num("4.96"));

        let ts = |t: &str, v: &str| {
            let (ty, m) = declared(t).unwrap();
            let v = ty.parse_text(v, &Zone::utc()).unwrap();
            stored(ty, m, v).to_string()
        };
        assert_eq!(
            ts("timestamptz(0)", "2025-12-31 23:59:59.7+00"),
            "2026-01-01 00:00:00"
        );
        assert_eq!(
            ts("timestamp(2)", "2025-12-31 23:59:59.994"),
            "2025-12-31 23:59:59.990000"
        );
        // Half away from zero on PostgreSQL's epoch, 2000-01-01: before it, down.
        assert_eq!(
            ts("timestamp(0)", "1999-12-31 23:59:59.5"),
            "1999-12-31 23:59:59"
        );
        assert_eq!(ts("timestamp(0)", "infinity"), "infinity");

        let text = |t: &str, v: &str| stored(KeyType::Text, n(t), Value::Text(v.into()));
        assert_eq!(text("varchar(3)", "abc  "), Value::Text("abc".into()));
        assert_eq!(text("varchar(3)", "ab   "), Value::Text("ab ".into()));
        assert_eq!(text("varchar(3)", "äöü "), Value::Text("äöü".into()));
        // Too long: the server refuses it; routed as written.
        assert_eq!(text("varchar(3)", "abcd"), Value::Text("abcd".into()));
        assert_eq!(text("varchar", "abc  "), Value::Text("abc  ".into()));
        // Other types have no modifier to apply.
        assert_eq!(stored(KeyType::Int, 7, Value::Int(5)), Value::Int(5));
    }

    #[test]
    fn the_catalog_modifier_wins_over_the_declared_one() {
        let c = KeyColumn::new(-1);
        assert_eq!(c.observed(), Observed::Unknown);
        let seen = c.observe(
            KeyType::TimestampTz,
            Some(("timestamp with time zone", 0, "timestamp(0) with time zone")),
        );
        assert_eq!(
            seen,
            Some(Observed::Type {
                name: "timestamp(0) with time zone".into(),
                matches: true
            })
        );
        assert_eq!(c.typmod(), 0);
        // The same again is no news.
        let again = c.observe(
            KeyType::TimestampTz,
            Some(("timestamp with time zone", 0, "timestamp(0) with time zone")),
        );
        assert_eq!(again, None);
        // Another type: reported, and its modifier not applied.
        let c = KeyColumn::new(3);
        let seen = c.observe(KeyType::TimestampTz, Some(("text", -1, "text")));
        assert!(matches!(seen, Some(Observed::Type { matches: false, .. })));
        assert_eq!(c.typmod(), 3);
        assert_eq!(c.observe(KeyType::Int, None), Some(Observed::Missing));
        assert_eq!(c.typmod(), 3);
    }
}
