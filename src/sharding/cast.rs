//! What a cast in SQL does to a shard-key value. `WHERE id = (14.5)::float8::bigint`
//! compares `id` with 14 (float to integer rounds half to even), `'abcdef'::varchar(3)` is
//! `'abc'`: routing by the text as written would pick another shard than the one holding
//! the row, or store a row where routed reads never look. A cast either gives the value's
//! new text, or says that routing cannot tell it (the statement then goes to every shard,
//! or an INSERT is refused).

use super::KeyType;
use std::borrow::Cow;

/// The kinds of type a cast can name, as far as the value's text is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cast {
    /// smallint, integer, bigint (the type's OID): a decimal is rounded half away from zero.
    Int(u32),
    /// real, double precision (the type's OID).
    Float(u32),
    /// numeric, with the scale it rounds to when one is given.
    Numeric(Option<usize>),
    /// text, varchar(n), char(n): the length it cuts to; `padded` for char, whose trailing
    /// spaces do not count when it meets text.
    Chars { len: Option<usize>, padded: bool },
    /// timestamp(p) (`zoned`: with time zone): fractional seconds rounded to p digits.
    Timestamp {
        precision: Option<usize>,
        zoned: bool,
    },
    /// Any other type (date, uuid, boolean, a domain, ...): taken to keep the value.
    Other,
}

impl Cast {
    /// The cast to a type as sqlparser prints it (`BIGINT`, `NUMERIC(5,2)`,
    /// `CHARACTER VARYING(3)`, `pg_catalog.int8`, `TIMESTAMP(0) WITH TIME ZONE`).
    pub fn of(type_name: &str) -> Cast {
        let lower = type_name.to_ascii_lowercase().replace('"', "");
        let name = lower.strip_prefix("pg_catalog.").unwrap_or(&lower).trim();
        let (base, args) = match name.split_once('(') {
            Some((b, rest)) => {
                let inner = rest.split(')').next().unwrap_or("");
                let args: Vec<Option<usize>> =
                    inner.split(',').map(|a| a.trim().parse().ok()).collect();
                (b.trim(), args)
            }
            None => (name, Vec::new()),
        };
        let arg = |i: usize| args.get(i).copied().flatten();
        // `timestamp with time zone` and `timestamp(3) with time zone` alike.
        let zoned = name.contains("with time zone") && !name.contains("without");
        let base = base.split(" with").next().unwrap_or(base).trim();
        match base {
            "smallint" | "int2" => Cast::Int(21),
            "int" | "integer" | "int4" => Cast::Int(23),
            "bigint" | "int8" => Cast::Int(20),
            "real" | "float4" => Cast::Float(700),
            "float8" | "double precision" | "double" => Cast::Float(701),
            "float" => match arg(0) {
                Some(p) if p <= 24 => Cast::Float(700),
                _ => Cast::Float(701),
            },
            // numeric(p) has scale 0.
            "numeric" | "decimal" | "dec" => Cast::Numeric(match args.len() {
                0 => None,
                1 => Some(0),
                _ => arg(1),
            }),
            "text" => Cast::Chars {
                len: None,
                padded: false,
            },
            "varchar" | "character varying" | "char varying" => Cast::Chars {
                len: arg(0),
                padded: false,
            },
            // char without a length is char(1); bpchar without one has no limit.
            "char" | "character" => Cast::Chars {
                len: Some(arg(0).unwrap_or(1)),
                padded: true,
            },
            "bpchar" => Cast::Chars {
                len: arg(0),
                padded: true,
            },
            "timestamp" | "timestamptz" => Cast::Timestamp {
                precision: arg(0),
                zoned: zoned || base == "timestamptz",
            },
            _ => Cast::Other,
        }
    }

    /// The cast a parameter's declared type (its OID in Parse) implies, where it can
    /// change the value a key gets.
    pub fn of_oid(oid: u32) -> Option<Cast> {
        match oid {
            700 | 701 => Some(Cast::Float(oid)),
            1042 => Some(Cast::Chars {
                len: None,
                padded: true,
            }),
            _ => None,
        }
    }

    /// The OID PostgreSQL gives a parameter cast to this type, which tells how it is
    /// encoded when sent in binary with its type left unspecified; 0 where it does not
    /// matter here.
    pub fn oid(self) -> u32 {
        match self {
            Cast::Int(oid) | Cast::Float(oid) => oid,
            Cast::Numeric(_) => 1700,
            Cast::Chars { .. } => 25,
            Cast::Timestamp { zoned: false, .. } => 1114,
            Cast::Timestamp { zoned: true, .. } => 1184,
            Cast::Other => 0,
        }
    }

    /// True when this cast, applied to a value already cast to `first`, leaves it as it
    /// is: a parameter cast twice is read as its first cast says and routed as that
    /// value (`$1::text::timestamptz`, `$1::text::bigint`), unless the second cast could
    /// round or cut it (`$1::numeric::int`, `$1::text::varchar(3)`).
    pub fn keeps(self, first: Cast) -> bool {
        match self {
            Cast::Other
            | Cast::Numeric(None)
            | Cast::Chars {
                len: None,
                padded: false,
            } => true,
            // A timestamp read as text, or as the other timestamp type, is converted in a
            // way routing does not follow; only a cast that changes nothing keeps it.
            Cast::Timestamp { precision, zoned } => {
                precision.is_none_or(|p| p >= 6)
                    && matches!(first, Cast::Timestamp { zoned: z, .. } if z == zoned)
            }
            Cast::Int(_) => matches!(first, Cast::Int(_) | Cast::Chars { .. } | Cast::Other),
            Cast::Numeric(Some(_)) => matches!(first, Cast::Int(_)),
            Cast::Float(_) | Cast::Chars { .. } => false,
        }
    }

    /// The text of a constant after this cast, or None when routing cannot tell it.
    pub fn apply(self, s: &str) -> Option<Cow<'_, str>> {
        match self {
            Cast::Int(_) => {
                let t = s.trim();
                if t.parse::<i64>().is_ok() {
                    Some(Cow::Borrowed(t))
                } else {
                    round_to_scale(t, 0).map(Cow::Owned)
                }
            }
            // A float equals the integer it was written as; any other value is an
            // approximation whose text routing cannot tell.
            Cast::Float(oid) => {
                let t = s.trim();
                let exact: u64 = if oid == 700 { 1 << 24 } else { 1 << 53 };
                t.parse::<i64>()
                    .is_ok_and(|n| n.unsigned_abs() <= exact)
                    .then_some(Cow::Borrowed(t))
            }
            Cast::Numeric(None) | Cast::Other => Some(Cow::Borrowed(s)),
            Cast::Numeric(Some(scale)) => round_to_scale(s.trim(), scale).map(Cow::Owned),
            Cast::Chars { len, padded } => {
                let cut = match len {
                    Some(n) => match s.char_indices().nth(n) {
                        Some((at, _)) => &s[..at],
                        None => s,
                    },
                    None => s,
                };
                Some(Cow::Borrowed(if padded {
                    cut.trim_end_matches(' ')
                } else {
                    cut
                }))
            }
            // A `timestamp` drops an offset written in its text; `timestamp(p)` rounds.
            // Other text ('epoch', a date) is left for the key's type to read.
            Cast::Timestamp { precision, zoned } => match super::time::parse(s.trim()) {
                Ok((_, offset))
                    if (offset.is_some() && !zoned)
                        || (precision.is_some_and(|p| p < 6) && s.contains('.')) =>
                {
                    Some(Cow::Owned(super::time::cast_text(s, precision, zoned)?))
                }
                _ => Some(Cow::Borrowed(s)),
            },
        }
    }

    /// The text of a parameter sent as text after this cast, for a key of type `ty`, or
    /// why it cannot be routed.
    pub fn apply_param(self, s: &str, ty: KeyType) -> Result<Cow<'_, str>, String> {
        if let (Cast::Float(oid), KeyType::Int) = (self, ty) {
            // Stored in an integer column, or compared with one (where only a whole
            // number can match), a float is its rounding half to even.
            let t = s.trim();
            let f = if oid == 700 {
                t.parse::<f32>().ok().map(f64::from)
            } else {
                t.parse::<f64>().ok()
            };
            return float_to_int(f)
                .map(|n| Cow::Owned(n.to_string()))
                .ok_or_else(|| format!("{s:?} as {} is not an integer", self.type_name()));
        }
        self.apply(s).ok_or_else(|| {
            format!(
                "the shard of {s:?} as {} cannot be told: bind the key as the column's type",
                self.type_name()
            )
        })
    }

    fn type_name(self) -> &'static str {
        match self {
            Cast::Int(_) => "an integer",
            Cast::Float(_) => "a float",
            Cast::Numeric(_) => "numeric",
            Cast::Chars { .. } => "text",
            Cast::Timestamp { .. } => "a timestamp",
            Cast::Other => "its type",
        }
    }
}

/// The text a key gets from a parameter sent as text: read as the type Parse declared
/// for it (`declared_oid`), then cast as the statement casts it.
pub fn param_value(
    text: &str,
    declared_oid: u32,
    cast: Option<Cast>,
    ty: KeyType,
) -> Result<Cow<'_, str>, String> {
    let mut v = Cow::Borrowed(text);
    for c in Cast::of_oid(declared_oid).into_iter().chain(cast) {
        v = match v {
            Cow::Borrowed(b) => c.apply_param(b, ty)?,
            Cow::Owned(o) => Cow::Owned(c.apply_param(&o, ty)?.into_owned()),
        };
    }
    Ok(v)
}

/// A float rounded half to even (as PostgreSQL casts it to an integer), if finite and in
/// range.
pub fn float_to_int(f: Option<f64>) -> Option<i64> {
    let r = f?.round_ties_even();
    (r.is_finite() && r >= -(2f64.powi(63)) && r < 2f64.powi(63)).then_some(r as i64)
}

/// A decimal (`-7.25`) rounded to `scale` fraction digits half away from zero, as
/// PostgreSQL rounds numeric; None when `s` is not a plain decimal.
pub fn round_to_scale(s: &str, scale: usize) -> Option<String> {
    let (neg, int, frac) = super::value::split_decimal(s)?;
    let keep = frac.len().min(scale);
    let mut digits: Vec<u8> = int.bytes().chain(frac[..keep].bytes()).collect();
    if frac.as_bytes().get(scale).is_some_and(|d| *d >= b'5') {
        // Carry the rounding up through the nines.
        let mut i = digits.len();
        loop {
            if i == 0 {
                digits.insert(0, b'1');
                break;
            }
            i -= 1;
            if digits[i] == b'9' {
                digits[i] = b'0';
            } else {
                digits[i] += 1;
                break;
            }
        }
    }
    let split = digits.len() - keep;
    let int = std::str::from_utf8(&digits[..split])
        .ok()?
        .trim_start_matches('0');
    let frac = std::str::from_utf8(&digits[split..]).ok()?;
    let zero = int.is_empty() && frac.bytes().all(|d| d == b'0');
    let mut out = String::with_capacity(digits.len() + 3);
    if neg && !zero {
        out.push('-');
    }
    out.push_str(if int.is_empty() { "0" } else { int });
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_as_sqlparser_prints_them() {
        assert_eq!(Cast::of("BIGINT"), Cast::Int(20));
        assert_eq!(Cast::of("pg_catalog.int4"), Cast::Int(23));
        assert_eq!(Cast::of("\"int2\""), Cast::Int(21));
        assert_eq!(Cast::of("DOUBLE PRECISION"), Cast::Float(701));
        assert_eq!(Cast::of("FLOAT(10)"), Cast::Float(700));
        assert_eq!(Cast::of("NUMERIC"), Cast::Numeric(None));
        assert_eq!(Cast::of("NUMERIC(5)"), Cast::Numeric(Some(0)));
        assert_eq!(Cast::of("DECIMAL(5,2)"), Cast::Numeric(Some(2)));
        assert_eq!(
            Cast::of("CHARACTER VARYING(3)"),
            Cast::Chars {
                len: Some(3),
                padded: false
            }
        );
        assert_eq!(
            Cast::of("CHAR"),
            Cast::Chars {
                len: Some(1),
                padded: true
            }
        );
        assert_eq!(
            Cast::of("TIMESTAMP(0) WITH TIME ZONE"),
            Cast::Timestamp {
                precision: Some(0),
                zoned: true
            }
        );
        assert_eq!(
            Cast::of("TIMESTAMPTZ"),
            Cast::Timestamp {
                precision: None,
                zoned: true
            }
        );
        assert_eq!(
            Cast::of("TIMESTAMP WITHOUT TIME ZONE"),
            Cast::Timestamp {
                precision: None,
                zoned: false
            }
        );
        assert_eq!(Cast::of("DATE"), Cast::Other);
        assert_eq!(Cast::of("my_domain"), Cast::Other);
    }

    #[test]
    fn constants_take_the_value_the_cast_gives() {
        let a = |c: &str, s: &str| Cast::of(c).apply(s).map(|v| v.into_owned());
        assert_eq!(a("bigint", "14.5").as_deref(), Some("15"));
        assert_eq!(a("bigint", "-14.5").as_deref(), Some("-15"));
        assert_eq!(a("bigint", " 42 ").as_deref(), Some("42"));
        assert_eq!(a("bigint", "1e3"), None);
        assert_eq!(a("float8", "14.5"), None);
        assert_eq!(a("float8", "14").as_deref(), Some("14"));
        assert_eq!(a("real", "16777217"), None);
        assert_eq!(a("numeric(4,1)", "8.75").as_deref(), Some("8.8"));
        assert_eq!(a("numeric(4,1)", "-9.96").as_deref(), Some("-10.0"));
        assert_eq!(a("numeric(4,2)", "8.7").as_deref(), Some("8.7"));
        assert_eq!(a("numeric", "8.75").as_deref(), Some("8.75"));
        assert_eq!(a("varchar(3)", "abcdef").as_deref(), Some("abc"));
        assert_eq!(a("varchar(3)", "äöüß").as_deref(), Some("äöü"));
        assert_eq!(a("char(5)", "ab ").as_deref(), Some("ab"));
        assert_eq!(a("text", "ab ").as_deref(), Some("ab "));
        assert_eq!(
            a("timestamp(0)", "2024-01-01 10:00:00.7").as_deref(),
            Some("2024-01-01 10:00:01")
        );
        assert_eq!(
            a("timestamp", "2024-01-01 10:00:00.7").as_deref(),
            Some("2024-01-01 10:00:00.7")
        );
        assert_eq!(
            a("timestamp", "2024-01-01 10:00+02").as_deref(),
            Some("2024-01-01 10:00:00")
        );
        assert_eq!(
            a("timestamptz", "2024-01-01 10:00+02").as_deref(),
            Some("2024-01-01 10:00+02")
        );
        assert_eq!(a("timestamp", "epoch").as_deref(), Some("epoch"));
        assert_eq!(a("date", "2024-01-01").as_deref(), Some("2024-01-01"));
    }

    #[test]
    fn second_casts_of_parameters() {
        let keeps = |second: &str, first: &str| Cast::of(second).keeps(Cast::of(first));
        assert!(!keeps("timestamptz", "text"));
        assert!(keeps("timestamptz", "timestamptz(3)"));
        assert!(!keeps("timestamp", "timestamptz"));
        assert!(keeps("bigint", "text"));
        assert!(keeps("numeric", "text"));
        assert!(!keeps("bigint", "numeric"));
        assert!(!keeps("bigint", "float8"));
        assert!(!keeps("varchar(3)", "text"));
        assert!(!keeps("timestamp(0)", "text"));
    }

    #[test]
    fn rounding() {
        assert_eq!(round_to_scale("9.5", 0).as_deref(), Some("10"));
        assert_eq!(round_to_scale("-0.4", 0).as_deref(), Some("0"));
        assert_eq!(round_to_scale("0.05", 1).as_deref(), Some("0.1"));
        assert_eq!(round_to_scale("99.99", 1).as_deref(), Some("100.0"));
        assert_eq!(round_to_scale("007", 2).as_deref(), Some("7"));
        assert_eq!(round_to_scale(".5", 0).as_deref(), Some("1"));
        assert_eq!(round_to_scale("1.2.3", 0), None);
        assert_eq!(float_to_int(Some(14.5)), Some(14));
        assert_eq!(float_to_int(Some(15.5)), Some(16));
        assert_eq!(float_to_int(Some(f64::NAN)), None);
        assert_eq!(float_to_int(Some(1e300)), None);
    }

    #[test]
    fn parameters_as_text() {
        let p = |c: &str, s: &str, ty| Cast::of(c).apply_param(s, ty).map(|v| v.into_owned());
        assert_eq!(p("float8", "14.5", KeyType::Int).as_deref(), Ok("14"));
        assert_eq!(p("float8", " 1e2", KeyType::Int).as_deref(), Ok("100"));
        assert!(p("float8", "NaN", KeyType::Int).is_err());
        assert!(p("float8", "14.5", KeyType::Numeric).is_err());
        assert_eq!(p("varchar(2)", "abc", KeyType::Text).as_deref(), Ok("ab"));
        assert_eq!(p("bigint", "14", KeyType::Int).as_deref(), Ok("14"));
        // Declared float8 in Parse, then cast to bigint in SQL: rounded half to even.
        let chain = |s| param_value(s, 701, Some(Cast::of("bigint")), KeyType::Int);
        assert_eq!(chain("14.5").as_deref(), Ok("14"));
        assert_eq!(
            param_value("ab  ", 1042, None, KeyType::Text).as_deref(),
            Ok("ab")
        );
        assert!(matches!(
            param_value("42", 0, None, KeyType::Int),
            Ok(Cow::Borrowed("42"))
        ));
    }
}
