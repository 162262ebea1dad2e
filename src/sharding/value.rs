//! Typed shard-key values, parsed from SQL literals and from Bind parameters (text or
//! binary format), compared as PostgreSQL compares them.

use super::time::{self, Zone};
use std::cmp::Ordering;
use std::fmt;

/// The type of a shard-key column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// smallint, integer, bigint (they hash alike in PostgreSQL).
    Int,
    Numeric,
    Text,
    Date,
    /// timestamp (without time zone): the wall-clock time, an offset in its text ignored.
    Timestamp,
    /// timestamptz: the instant, from the offset written or the session's time zone.
    TimestampTz,
    Uuid,
}

/// A key value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Null,
    Int(i64),
    Numeric(Decimal),
    Text(String),
    /// Days since 1970-01-01.
    Date(i64),
    /// Microseconds since 1970-01-01 00:00:00: UTC for timestamptz, the wall-clock time
    /// for timestamp (both hash and compare alike in PostgreSQL).
    Timestamp(i64),
    Uuid([u8; 16]),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => write!(f, "NULL"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Numeric(d) => write!(f, "{d}"),
            Value::Text(t) => write!(f, "'{t}'"),
            Value::Date(d) => {
                let (y, m, dd) = civil_from_days(*d);
                write!(f, "{y:04}-{m:02}-{dd:02}")
            }
            Value::Timestamp(us) if super::time::infinite(*us) => {
                write!(f, "{}infinity", if *us < 0 { "-" } else { "" })
            }
            Value::Timestamp(us) => {
                let days = us.div_euclid(86_400_000_000);
                let rem = us.rem_euclid(86_400_000_000);
                let (y, m, d) = civil_from_days(days);
                let s = rem / 1_000_000;
                write!(
                    f,
                    "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
                    s / 3600,
                    s / 60 % 60,
                    s % 60
                )?;
                if rem % 1_000_000 != 0 {
                    write!(f, ".{:06}", rem % 1_000_000)?;
                }
                Ok(())
            }
            Value::Uuid(u) => {
                for (i, b) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        write!(f, "-")?;
                    }
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

impl KeyType {
    /// Parses a configuration type name.
    pub fn from_name(name: &str) -> Option<KeyType> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "bigint" | "int8" | "integer" | "int" | "int4" | "smallint" | "int2" => KeyType::Int,
            "numeric" | "decimal" => KeyType::Numeric,
            "text" | "varchar" | "character varying" => KeyType::Text,
            "date" => KeyType::Date,
            "timestamp" | "timestamp without time zone" => KeyType::Timestamp,
            "timestamptz" | "timestamp with time zone" => KeyType::TimestampTz,
            "uuid" => KeyType::Uuid,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            KeyType::Int => "integer",
            KeyType::Numeric => "numeric",
            KeyType::Text => "text",
            KeyType::Date => "date",
            KeyType::Timestamp => "timestamp",
            KeyType::TimestampTz => "timestamptz",
            KeyType::Uuid => "uuid",
        }
    }

    /// True for timestamp and timestamptz.
    pub fn is_timestamp(self) -> bool {
        matches!(self, KeyType::Timestamp | KeyType::TimestampTz)
    }

    /// True for timestamptz, whose values are instants.
    pub fn zoned(self) -> bool {
        self == KeyType::TimestampTz
    }

    /// Parses the text form of a value (as in a literal or a text-format parameter), in
    /// the session's time zone `zone`.
    pub fn parse_text(self, s: &str, zone: &Zone) -> Result<Value, String> {
        match self {
            KeyType::Text => Ok(Value::Text(s.to_string())),
            KeyType::Int => s
                .trim()
                .parse::<i64>()
                .ok()
                .or_else(|| round_decimal(s.trim()))
                .map(Value::Int)
                .ok_or_else(|| "not an integer".to_string()),
            KeyType::Numeric => Decimal::parse(s.trim()).map(Value::Numeric),
            KeyType::Date => parse_date(s.trim()).map(Value::Date),
            KeyType::Timestamp | KeyType::TimestampTz => {
                time::read(s.trim(), self.zoned(), zone).map(Value::Timestamp)
            }
            KeyType::Uuid => parse_uuid(s.trim()).map(Value::Uuid),
        }
    }

    /// Parses the binary form of a parameter, for the PostgreSQL type `oid` the client
    /// declared (0: unknown, taken as this key type's natural binary form), in the
    /// session's time zone `zone`.
    pub fn parse_binary(self, b: &[u8], oid: u32, zone: &Zone) -> Result<Value, String> {
        const PG_EPOCH_DAYS: i64 = 10_957; // 2000-01-01 in days since 1970-01-01
        match (self, b.len()) {
            // A float bound to an integer key: its rounding half to even, as PostgreSQL
            // stores it in the column (and only a whole number can equal one).
            (KeyType::Int, 4 | 8) if oid == 700 || oid == 701 => {
                let f = match b.try_into() {
                    Ok(four) => f32::from_be_bytes(four) as f64,
                    Err(_) => f64::from_be_bytes(b.try_into().expect("8")),
                };
                super::cast::float_to_int(Some(f))
                    .map(Value::Int)
                    .ok_or_else(|| format!("{f} is not an integer"))
            }
            (ty, _) if ty == KeyType::Numeric || oid == 1700 => Err(
                "binary numeric parameters are not supported for shard keys; send it as text"
                    .into(),
            ),
            (KeyType::Int, 2) => Ok(Value::Int(i16::from_be_bytes([b[0], b[1]]) as i64)),
            (KeyType::Int, 4) => Ok(Value::Int(
                i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as i64
            )),
            (KeyType::Int, 8) => Ok(Value::Int(i64::from_be_bytes(b.try_into().expect("8")))),
            // An integer bound for a text key is stored as its digits (an assignment
            // cast); other types' binary forms are not text.
            (KeyType::Text, 2 | 4 | 8) if matches!(oid, 20 | 21 | 23) => KeyType::Int
                .parse_binary(b, oid, zone)
                .map(|v| Value::Text(v.to_string())),
            (KeyType::Text, _) if oid == 0 || crate::protocol::text_type(oid) => {
                std::str::from_utf8(b)
                    .map(|s| Value::Text(s.to_string()))
                    .map_err(|_| "text is not valid UTF-8".to_string())
            }
            (KeyType::Uuid, 16) => Ok(Value::Uuid(b.try_into().expect("16"))),
            (KeyType::Date, 4) => Ok(Value::Date(
                i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as i64 + PG_EPOCH_DAYS,
            )),
            // A timestamp bound for a timestamptz key, or the reverse, is converted in the
            // session's zone, as PostgreSQL converts it.
            (KeyType::Timestamp | KeyType::TimestampTz, _) => {
                let (us, from_zoned) = time::from_binary(b, oid, self.zoned())?;
                time::convert(us, from_zoned, self.zoned(), zone).map(Value::Timestamp)
            }
            _ => Err(format!(
                "a {}-byte binary parameter (type oid {oid}) is not a {}",
                b.len(),
                self.name()
            )),
        }
    }
}

/// A decimal number (`1.0`, `-7.5`) rounded to an integer as PostgreSQL casts numeric to
/// bigint (half away from zero): where a numeric literal meets an integer key, the row it
/// inserts has that key, and a comparison can only match the integer it equals.
fn round_decimal(s: &str) -> Option<i64> {
    super::cast::round_to_scale(s, 0)?.parse().ok()
}

/// A plain decimal's sign, integer digits and fraction digits (`-07.50`: true, "07",
/// "50"); None unless `s` is digits with an optional sign and point.
pub fn split_decimal(s: &str) -> Option<(bool, &str, &str)> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let digits = |d: &str| d.bytes().all(|c| c.is_ascii_digit());
    (!(int.is_empty() && frac.is_empty()) && digits(int) && digits(frac))
        .then_some((neg, int, frac))
}

/// An exact decimal, normalized so that equal values are equal structs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decimal {
    neg: bool,
    /// Integer digits without leading zeros.
    int: String,
    /// Fraction digits without trailing zeros.
    frac: String,
}

impl Decimal {
    pub fn parse(s: &str) -> Result<Decimal, String> {
        let (neg, int, frac) = split_decimal(s).ok_or("not a number")?;
        let int = int.trim_start_matches('0').to_string();
        let frac = frac.trim_end_matches('0').to_string();
        let zero = int.is_empty() && frac.is_empty();
        Ok(Decimal {
            neg: neg && !zero,
            int,
            frac,
        })
    }

    /// Rounded to `scale` fraction digits (a negative scale rounds to tens, hundreds...),
    /// half away from zero, as a `numeric(p, scale)` column stores it.
    pub fn rounded(&self, scale: i32) -> Decimal {
        let sign = if self.neg { "-" } else { "" };
        let round = |s: &str, scale: usize| super::cast::round_to_scale(s, scale);
        let text = if scale >= 0 {
            round(&self.to_string(), scale as usize)
        } else {
            // Move the point left, round to an integer, move it back.
            let k = scale.unsigned_abs() as usize;
            let digits = format!("{}{:0>k$}", "", self.int);
            let (high, low) = digits.split_at(digits.len() - k);
            round(&format!("{sign}{high}.{low}{}", self.frac), 0).map(|r| {
                if r.trim_start_matches('-') == "0" {
                    r
                } else {
                    format!("{r}{}", "0".repeat(k))
                }
            })
        };
        text.and_then(|t| Decimal::parse(&t).ok())
            .unwrap_or_else(|| self.clone())
    }

    fn cmp_abs(&self, o: &Decimal) -> Ordering {
        self.int
            .len()
            .cmp(&o.int.len())
            .then_with(|| self.int.cmp(&o.int))
            .then_with(|| self.frac.cmp(&o.frac))
    }
}

impl Ord for Decimal {
    fn cmp(&self, o: &Self) -> Ordering {
        match (self.neg, o.neg) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => self.cmp_abs(o),
            (true, true) => o.cmp_abs(self),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let int = if self.int.is_empty() { "0" } else { &self.int };
        write!(f, "{}{int}", if self.neg { "-" } else { "" })?;
        if !self.frac.is_empty() {
            write!(f, ".{}", self.frac)?;
        }
        Ok(())
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn num(s: &str, what: &str) -> Result<u32, String> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("bad {what}"));
    }
    s.parse().map_err(|_| format!("bad {what}"))
}

pub(super) fn parse_date(s: &str) -> Result<i64, String> {
    let mut it = s.splitn(3, '-');
    let (y, m, d) = (it.next(), it.next(), it.next());
    let (Some(y), Some(m), Some(d)) = (y, m, d) else {
        return Err("expected YYYY-MM-DD".into());
    };
    if y.len() != 4 {
        return Err("expected YYYY-MM-DD".into());
    }
    let (y, m, d) = (num(y, "year")? as i64, num(m, "month")?, num(d, "day")?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mdays = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&m) || d == 0 || d > mdays[m as usize - 1] {
        return Err("no such date".into());
    }
    Ok(days_from_civil(y, m, d))
}

fn parse_uuid(s: &str) -> Result<[u8; 16], String> {
    let hex: Vec<u8> = s
        .trim_start_matches('{')
        .trim_end_matches('}')
        .bytes()
        .filter(|c| *c != b'-')
        .collect();
    if hex.len() != 32 {
        return Err("expected 32 hex digits".into());
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let t = std::str::from_utf8(pair).map_err(|_| "bad hex")?;
        out[i] = u8::from_str_radix(t, 16).map_err(|_| "bad hex digit")?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_literals_for_integer_keys_round_as_postgresql_casts() {
        let int = |s: &str| KeyType::Int.parse_text(s, &Zone::utc());
        for (s, n) in [
            ("1.0", 1),
            ("7.5", 8),
            ("7.49", 7),
            ("-2.5", -3),
            (".6", 1),
            ("42", 42),
        ] {
            assert_eq!(int(s), Ok(Value::Int(n)), "{s}");
        }
        for bad in ["1.x", ".", "abc", "9223372036854775807.9", "1e3"] {
            assert!(int(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dates_and_timestamps_round_trip() {
        for s in ["1970-01-01", "2000-02-29", "2026-11-22", "1899-12-31"] {
            let d = parse_date(s).unwrap();
            assert_eq!(Value::Date(d).to_string(), s);
        }
        assert!(parse_date("2026-02-29").is_err());
        let utc = Zone::utc();
        let t = KeyType::TimestampTz
            .parse_text("2026-01-01 10:30:00.25+02", &utc)
            .unwrap();
        assert_eq!(t.to_string(), "2026-01-01 08:30:00.250000");
        assert_eq!(
            KeyType::TimestampTz
                .parse_text("2026-01-01T00:00:00Z", &utc)
                .unwrap(),
            KeyType::TimestampTz.parse_text("2026-01-01", &utc).unwrap()
        );
        // timestamp ignores the offset; timestamptz without one is in the session's zone.
        let tokyo = Zone::new("Asia/Tokyo");
        assert_eq!(
            KeyType::Timestamp
                .parse_text("2026-01-01 10:30+02", &tokyo)
                .unwrap()
                .to_string(),
            "2026-01-01 10:30:00"
        );
        assert_eq!(
            KeyType::TimestampTz
                .parse_text("2026-01-01 10:30", &tokyo)
                .unwrap()
                .to_string(),
            "2026-01-01 01:30:00"
        );
        // A binary timestamptz for a timestamp key is its wall-clock time in the zone.
        let pg = |s: &str| (time::parse(s).unwrap().0 - time::PG_EPOCH_MICROS).to_be_bytes();
        assert_eq!(
            KeyType::Timestamp
                .parse_binary(&pg("2026-01-01 01:30"), 1184, &tokyo)
                .unwrap()
                .to_string(),
            "2026-01-01 10:30:00"
        );
        assert_eq!(
            KeyType::TimestampTz
                .parse_binary(&pg("2026-01-01 10:30"), 1114, &tokyo)
                .unwrap()
                .to_string(),
            "2026-01-01 01:30:00"
        );
    }

    #[test]
    fn decimals_compare_numerically() {
        let d = |s: &str| Decimal::parse(s).unwrap();
        assert!(d("9.99") < d("10"));
        assert!(d("-10") < d("-9.5"));
        assert_eq!(d("10.500"), d("10.5"));
        assert_eq!(d("-0.0"), d("0"));
        assert!(d("0.001") > d("0"));
        assert!(Decimal::parse("1e5").is_err());
    }

    #[test]
    fn binary_parameters() {
        assert_eq!(
            KeyType::Int.parse_binary(&7i32.to_be_bytes(), 23, &Zone::utc()),
            Ok(Value::Int(7))
        );
        assert_eq!(
            KeyType::Int.parse_binary(&(-7i64).to_be_bytes(), 20, &Zone::utc()),
            Ok(Value::Int(-7))
        );
        assert_eq!(
            KeyType::Date.parse_binary(&0i32.to_be_bytes(), 1082, &Zone::utc()),
            KeyType::Date.parse_text("2000-01-01", &Zone::utc())
        );
        assert!(
            KeyType::Int
                .parse_binary(&[1, 2, 3], 0, &Zone::utc())
                .is_err()
        );
        // An int4 bound for a text key is its digits; a float's bytes are not text.
        assert_eq!(
            KeyType::Text.parse_binary(&42i32.to_be_bytes(), 23, &Zone::utc()),
            Ok(Value::Text("42".into()))
        );
        assert!(
            KeyType::Text
                .parse_binary(&1f64.to_be_bytes(), 701, &Zone::utc())
                .is_err()
        );
        let u = KeyType::Uuid
            .parse_text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", &Zone::utc())
            .unwrap();
        assert_eq!(u.to_string(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    }
}
