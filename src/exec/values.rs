//! Values of PostgreSQL types as shards return them, in text or binary format: compared
//! (ORDER BY, min, max) and added (count, sum) exactly when pgshard merges rows.

use crate::protocol::PgError;
use crate::sharding::value::Decimal;
use std::cmp::Ordering;

/// Compares two binary-format values of a PostgreSQL type; None for types pgshard does
/// not decode (arrays, ...).
pub(super) fn compare_binary(oid: u32, a: &[u8], b: &[u8]) -> Option<Ordering> {
    fn int(x: &[u8]) -> Option<i64> {
        Some(match x.len() {
            2 => i16::from_be_bytes(x.try_into().ok()?) as i64,
            4 => i32::from_be_bytes(x.try_into().ok()?) as i64,
            8 => i64::from_be_bytes(x.try_into().ok()?),
            _ => return None,
        })
    }
    fn float(x: &[u8]) -> Option<f64> {
        Some(match x.len() {
            4 => f32::from_be_bytes(x.try_into().ok()?) as f64,
            8 => f64::from_be_bytes(x.try_into().ok()?),
            _ => return None,
        })
    }
    match oid {
        // int2, int4, int8, oid, date, time, timestamp, timestamptz (all big-endian integers)
        20 | 21 | 23 | 26 | 1082 | 1083 | 1114 | 1184 => Some(int(a)?.cmp(&int(b)?)),
        700 | 701 => Some(float(a)?.total_cmp(&float(b)?)),
        // bool, text, varchar, bpchar, name, uuid, bytea: byte order
        16 | 25 | 1043 | 1042 | 19 | 2950 | 17 => Some(a.cmp(b)),
        1700 => Some(compare_numeric(
            &super::numeric::numeric_from_binary(a)?,
            &super::numeric::numeric_from_binary(b)?,
        )),
        _ => None,
    }
}

/// Whether pgshard can order a column of this type in this format.
pub(super) fn sortable(oid: u32, binary: bool) -> bool {
    !binary
        || compare_binary(oid, &[], &[]).is_some()
        || matches!(
            oid,
            20 | 21 | 23 | 26 | 1082 | 1083 | 1114 | 1184 | 700 | 701 | 1700
        )
}

/// Compares two text-format values of a PostgreSQL type.
pub(super) fn compare(oid: u32, a: &[u8], b: &[u8]) -> Ordering {
    let text = |x: &[u8]| std::str::from_utf8(x).unwrap_or("").trim().to_string();
    match oid {
        // int2, int4, int8, oid
        20 | 21 | 23 | 26 => {
            let p = |x: &[u8]| text(x).parse::<i64>().unwrap_or(0);
            p(a).cmp(&p(b))
        }
        1700 => compare_numeric(&text(a), &text(b)),
        // float4, float8 (NaN sorts last, as in PostgreSQL)
        700 | 701 => {
            let p = |x: &[u8]| text(x).parse::<f64>().unwrap_or(f64::NAN);
            p(a).total_cmp(&p(b))
        }
        // Dates and timestamps as instants (a server ranks other DateStyles, see
        // `order`; bytes are the last resort).
        1082 | 1114 | 1184 => super::datetime::compare(oid, a, b).unwrap_or_else(|| a.cmp(b)),
        // Text and times: byte order (C collation).
        _ => a.cmp(b),
    }
}

/// Compares two `numeric` values in text as PostgreSQL orders them: -Infinity, the
/// numbers (exactly), Infinity, NaN.
fn compare_numeric(a: &str, b: &str) -> Ordering {
    let rank = |s: &str| match s {
        "-Infinity" => 0,
        "Infinity" => 2,
        "NaN" => 3,
        _ => 1,
    };
    match (rank(a), rank(b)) {
        (1, 1) => match (Decimal::parse(a), Decimal::parse(b)) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.cmp(b),
        },
        (x, y) => x.cmp(&y),
    }
}

pub(super) fn unmergeable(oid: u32) -> PgError {
    PgError::new(
        "0A000",
        format!("merging aggregates of type oid {oid} across shards is not supported yet"),
    )
}

/// Adds two counts or sums of a PostgreSQL type, exactly.
pub(super) fn add(oid: u32, binary: bool, a: &[u8], b: &[u8]) -> Result<Vec<u8>, PgError> {
    let overflow = || PgError::new("22003", "sum out of range when merging shards");
    if binary {
        return match (oid, a.len(), b.len()) {
            (20, 8, 8) => {
                let x = i64::from_be_bytes(a.try_into().expect("8"));
                let y = i64::from_be_bytes(b.try_into().expect("8"));
                Ok(x.checked_add(y)
                    .ok_or_else(overflow)?
                    .to_be_bytes()
                    .to_vec())
            }
            (701, 8, 8) => {
                let x = f64::from_be_bytes(a.try_into().expect("8"));
                let y = f64::from_be_bytes(b.try_into().expect("8"));
                Ok((x + y).to_be_bytes().to_vec())
            }
            (700, 4, 4) => {
                let x = f32::from_be_bytes(a.try_into().expect("4"));
                let y = f32::from_be_bytes(b.try_into().expect("4"));
                Ok((x + y).to_be_bytes().to_vec())
            }
            (1700, _, _) => {
                let (x, y) = (
                    super::numeric::numeric_from_binary(a),
                    super::numeric::numeric_from_binary(b),
                );
                x.zip(y)
                    .and_then(|(x, y)| add_decimal(&x, &y))
                    .and_then(|t| super::numeric::numeric_to_binary(&t))
                    .ok_or_else(|| unmergeable(oid))
            }
            _ => Err(unmergeable(oid)),
        };
    }
    let text = |x: &[u8]| std::str::from_utf8(x).unwrap_or("").trim().to_string();
    let (x, y) = (text(a), text(b));
    match oid {
        20 | 21 | 23 => {
            let p = |v: &str| v.parse::<i64>().map_err(|_| unmergeable(oid));
            Ok(p(&x)?
                .checked_add(p(&y)?)
                .ok_or_else(overflow)?
                .to_string()
                .into_bytes())
        }
        700 | 701 => {
            let p = |v: &str| v.parse::<f64>().map_err(|_| unmergeable(oid));
            Ok((p(&x)? + p(&y)?).to_string().into_bytes())
        }
        1700 => add_decimal(&x, &y)
            .ok_or_else(overflow)
            .map(String::into_bytes),
        _ => Err(unmergeable(oid)),
    }
}

/// Exact decimal addition on text (numeric's output form), up to 38 significant digits.
fn add_decimal(a: &str, b: &str) -> Option<String> {
    fn parse(s: &str) -> Option<(i128, u32)> {
        let (neg, body) = match s.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, s),
        };
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        if !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit()) {
            return None;
        }
        let m: i128 = format!("{int}{frac}").parse().ok()?;
        Some((if neg { -m } else { m }, frac.len() as u32))
    }
    let ((ma, sa), (mb, sb)) = (parse(a)?, parse(b)?);
    let scale = sa.max(sb);
    let m = ma
        .checked_mul(10i128.checked_pow(scale - sa)?)?
        .checked_add(mb.checked_mul(10i128.checked_pow(scale - sb)?)?)?;
    let digits = m.unsigned_abs().to_string();
    let digits = format!("{digits:0>width$}", width = scale as usize + 1);
    let (i, f) = digits.split_at(digits.len() - scale as usize);
    let sign = if m < 0 { "-" } else { "" };
    Some(if scale == 0 {
        format!("{sign}{i}")
    } else {
        format!("{sign}{i}.{f}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_sums_are_exact() {
        assert_eq!(add_decimal("1.25", "2.5").as_deref(), Some("3.75"));
        assert_eq!(add_decimal("-1.25", "0.05").as_deref(), Some("-1.20"));
        assert_eq!(add_decimal("0.1", "0.2").as_deref(), Some("0.3"));
        assert_eq!(add_decimal("100", "-0.001").as_deref(), Some("99.999"));
        assert_eq!(add_decimal("-0.5", "0.25").as_deref(), Some("-0.25"));
        assert_eq!(add_decimal("NaN", "1"), None);
    }

    #[test]
    fn numerics_order_as_in_postgresql() {
        let mut v = [
            "NaN",
            "2.50",
            "-Infinity",
            "10",
            "-3.1",
            "Infinity",
            "2.5",
            "0",
        ];
        v.sort_by(|a, b| compare_numeric(a, b));
        assert_eq!(
            v,
            [
                "-Infinity",
                "-3.1",
                "0",
                "2.50",
                "2.5",
                "10",
                "Infinity",
                "NaN"
            ]
        );
        let bin = |t: &str| crate::exec::numeric::numeric_to_binary(t).unwrap();
        assert_eq!(
            compare_binary(1700, &bin("-12.5"), &bin("3")),
            Some(Ordering::Less)
        );
        assert_eq!(
            compare_binary(1700, &bin("100000.0001"), &bin("100000")),
            Some(Ordering::Greater)
        );
    }

    #[test]
    fn binary_and_text_additions() {
        assert_eq!(add(20, false, b"40", b"2").unwrap(), b"42");
        assert_eq!(
            add(20, true, &40i64.to_be_bytes(), &2i64.to_be_bytes()).unwrap(),
            42i64.to_be_bytes()
        );
        assert!(add(20, false, b"9223372036854775807", b"1").is_err());
        assert!(add(1700, true, b"x", b"y").is_err());
    }
}
