//! `avg` across shards, computed by pgshard from the merged sum and count exactly as
//! PostgreSQL would compute it: for integer and numeric input, `numeric_div(sum, count)`
//! with PostgreSQL's choice of result scale (`select_div_scale`) and rounding; for floating
//! point input, the float8 quotient printed as `float8out` prints it.

/// A decimal number's parts: sign, digits (no leading zeros), and how many of them are
/// after the point (the display scale).
struct Dec {
    negative: bool,
    digits: Vec<u8>,
    scale: usize,
}

fn parse(s: &str) -> Option<Dec> {
    let s = s.trim();
    let (negative, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (i, f) = s.split_once('.').unwrap_or((s, ""));
    if (i.is_empty() && f.is_empty())
        || !i.bytes().all(|c| c.is_ascii_digit())
        || !f.bytes().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let mut digits: Vec<u8> = i.bytes().chain(f.bytes()).map(|c| c - b'0').collect();
    let lead = digits.iter().take_while(|&&d| d == 0).count();
    digits.drain(..lead.min(digits.len()));
    Some(Dec {
        negative,
        digits,
        scale: f.len(),
    })
}

/// PostgreSQL's weight (in base-10000 digits) and first base-10000 digit of a value.
fn weight_and_first(d: &Dec) -> (i64, u32) {
    if d.digits.is_empty() {
        return (0, 0);
    }
    // Position of the most significant decimal digit: 10^e.
    let e = d.digits.len() as i64 - 1 - d.scale as i64;
    let weight = e.div_euclid(4);
    // The base-10000 digit holding 10^e covers exponents 4*weight .. 4*weight+3.
    let top = 4 * weight + 3;
    let mut first = 0u32;
    for k in 0..4 {
        let exp = top - k;
        let idx = d.digits.len() as i64 - 1 - d.scale as i64 - exp;
        let digit = if idx >= 0 && (idx as usize) < d.digits.len() {
            d.digits[idx as usize] as u32
        } else {
            0
        };
        first = first * 10 + digit;
    }
    (weight, first)
}

/// `sum / count` as PostgreSQL's `numeric_div` prints it; None for a count of 0 (NULL).
pub fn numeric_avg(sum: &str, count: u64) -> Option<String> {
    if count == 0 {
        return None;
    }
    let s = parse(sum)?;
    let c = parse(&count.to_string())?;
    let (w1, f1) = weight_and_first(&s);
    let (w2, f2) = weight_and_first(&c);
    let mut qweight = w1 - w2;
    if f1 <= f2 {
        qweight -= 1;
    }
    let rscale = (16 - qweight * 4)
        .max(s.scale as i64)
        .max(c.scale as i64)
        .clamp(0, 1000) as usize;
    // |sum| * 10^rscale / count, rounded half away from zero.
    let mut numerator = s.digits.clone();
    numerator.extend(std::iter::repeat_n(0, rscale - s.scale.min(rscale)));
    let mut q = Vec::with_capacity(numerator.len());
    let mut rem: u128 = 0;
    for d in numerator {
        rem = rem * 10 + d as u128;
        q.push((rem / count as u128) as u8);
        rem %= count as u128;
    }
    if rem * 2 >= count as u128 {
        let mut i = q.len();
        loop {
            if i == 0 {
                q.insert(0, 1);
                break;
            }
            i -= 1;
            if q[i] == 9 {
                q[i] = 0;
            } else {
                q[i] += 1;
                break;
            }
        }
    }
    let lead = q.iter().take_while(|&&d| d == 0).count();
    q.drain(..lead);
    while q.len() < rscale + 1 {
        q.insert(0, 0);
    }
    let (int, frac) = q.split_at(q.len() - rscale);
    let zero = q.iter().all(|&d| d == 0);
    let mut out = String::new();
    if s.negative && !zero {
        out.push('-');
    }
    out.extend(int.iter().map(|d| (b'0' + d) as char));
    if rscale > 0 {
        out.push('.');
        out.extend(frac.iter().map(|d| (b'0' + d) as char));
    }
    Some(out)
}

/// `sum / count` for float input, printed as PostgreSQL's `float8out` (shortest exact
/// digits; exponent form below 1e-4 and from 1e15).
pub fn float_avg(sum: &str, count: u64) -> Option<String> {
    if count == 0 {
        return None;
    }
    let v: f64 = match sum.trim() {
        "NaN" => f64::NAN,
        "Infinity" => f64::INFINITY,
        "-Infinity" => f64::NEG_INFINITY,
        t => t.parse().ok()?,
    };
    Some(float8out(v / count as f64))
}

/// PostgreSQL's text form of a float8.
pub fn float8out(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // Rust's {:e} gives the shortest digits that round-trip, as PostgreSQL's ryu does.
    let e = format!("{v:e}");
    let (mantissa, exp) = e.split_once('e').expect("exponent form");
    let exp: i32 = exp.parse().expect("exponent");
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if !(-4..15).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push_str(&format!(
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        ));
    } else if exp < 0 {
        out.push_str("0.");
        out.push_str(&"0".repeat((-exp - 1) as usize));
        out.push_str(&digits);
    } else {
        let point = exp as usize + 1;
        if digits.len() <= point {
            out.push_str(&digits);
            out.push_str(&"0".repeat(point - digits.len()));
        } else {
            out.push_str(&digits[..point]);
            out.push('.');
            out.push_str(&digits[point..]);
        }
    }
    out
}

/// A binary `numeric` (ndigits, weight, sign, dscale, base-10000 digits) as text.
pub fn numeric_from_binary(b: &[u8]) -> Option<String> {
    let word =
        |i: usize| -> Option<i32> { Some(i16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as i32) };
    let ndigits = word(0)? as usize;
    let weight = word(2)?;
    let sign = u16::from_be_bytes([*b.get(4)?, *b.get(5)?]);
    let dscale = word(6)?.max(0) as usize;
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        _ => {}
    }
    let digits: Vec<u16> = (0..ndigits)
        .map(|k| Some(u16::from_be_bytes([*b.get(8 + 2 * k)?, *b.get(9 + 2 * k)?])))
        .collect::<Option<_>>()?;
    // Integer part: groups at weights weight..=0.
    let mut int = String::new();
    for w in (0..=weight).rev() {
        let idx = weight - w;
        let g = digits.get(idx as usize).copied().unwrap_or(0);
        if int.is_empty() {
            if g != 0 {
                int = g.to_string();
            }
        } else {
            int.push_str(&format!("{g:04}"));
        }
    }
    if int.is_empty() {
        int.push('0');
    }
    let mut frac = String::new();
    let mut w = -1;
    while frac.len() < dscale {
        let idx = weight - w;
        let g = if idx >= 0 {
            digits.get(idx as usize).copied().unwrap_or(0)
        } else {
            0
        };
        frac.push_str(&format!("{g:04}"));
        w -= 1;
    }
    frac.truncate(dscale);
    let negative = sign == 0x4000 && (int != "0" || frac.bytes().any(|c| c != b'0'));
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    out.push_str(&int);
    if dscale > 0 {
        out.push('.');
        out.push_str(&frac);
    }
    Some(out)
}

/// Text (a decimal number) as a binary `numeric`.
pub fn numeric_to_binary(text: &str) -> Option<Vec<u8>> {
    let d = parse(text)?;
    let scale = d.scale;
    // Digits as a string with the point placed: integer part, fraction part.
    let all: String = d.digits.iter().map(|x| (b'0' + x) as char).collect();
    let (int, frac) = if all.len() > scale {
        (
            all[..all.len() - scale].to_string(),
            all[all.len() - scale..].to_string(),
        )
    } else {
        (
            String::new(),
            format!("{}{}", "0".repeat(scale - all.len()), all),
        )
    };
    // Base-10000 groups: integer part padded on the left, fraction on the right.
    let ipad = (4 - int.len() % 4) % 4;
    let int = format!("{}{}", "0".repeat(ipad), int);
    let fpad = (4 - frac.len() % 4) % 4;
    let frac = format!("{}{}", frac, "0".repeat(fpad));
    let mut groups: Vec<u16> = int
        .as_bytes()
        .chunks(4)
        .chain(frac.as_bytes().chunks(4))
        .map(|c| std::str::from_utf8(c).ok()?.parse().ok())
        .collect::<Option<_>>()?;
    let mut weight = (int.len() / 4) as i32 - 1;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    let mut out = Vec::with_capacity(8 + 2 * groups.len());
    out.extend_from_slice(&(groups.len() as i16).to_be_bytes());
    out.extend_from_slice(&(weight as i16).to_be_bytes());
    let sign: u16 = if d.negative && !groups.is_empty() {
        0x4000
    } else {
        0
    };
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(scale as i16).to_be_bytes());
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Some(out)
}

/// A binary integer, float or numeric value as decimal text.
pub fn binary_as_text(oid: u32, b: &[u8]) -> Option<String> {
    Some(match (oid, b.len()) {
        (21, 2) => i16::from_be_bytes(b.try_into().ok()?).to_string(),
        (23, 4) => i32::from_be_bytes(b.try_into().ok()?).to_string(),
        (20, 8) => i64::from_be_bytes(b.try_into().ok()?).to_string(),
        (700, 4) => float8out(f32::from_be_bytes(b.try_into().ok()?) as f64),
        (701, 8) => float8out(f64::from_be_bytes(b.try_into().ok()?)),
        (1700, _) => numeric_from_binary(b)?,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn numeric_binary_round_trips() {
        for t in [
            "0",
            "1",
            "-1",
            "12345.678",
            "0.0001",
            "10000",
            "-0.5",
            "123456789.000000000000",
            "0.00",
        ] {
            let b = super::numeric_to_binary(t).unwrap();
            assert_eq!(super::numeric_from_binary(&b).as_deref(), Some(t), "{t}");
        }
        // As PostgreSQL sends 12345.678: ndigits 3, weight 1, sign 0, dscale 3, 1 2345 6780.
        assert_eq!(
            super::numeric_to_binary("12345.678").unwrap(),
            [0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1A, 0x7C]
        );
    }

    use super::*;

    #[test]
    fn numeric_avg_matches_postgresql() {
        // Values checked against PostgreSQL 15: SELECT x::numeric / n::numeric.
        assert_eq!(numeric_avg("3", 2).as_deref(), Some("1.5000000000000000"));
        assert_eq!(numeric_avg("10", 3).as_deref(), Some("3.3333333333333333"));
        assert_eq!(
            numeric_avg("20000", 3).as_deref(),
            Some("6666.6666666666666667")
        );
        assert_eq!(
            numeric_avg("1.50", 4).as_deref(),
            Some("0.37500000000000000000")
        );
        assert_eq!(numeric_avg("-7", 2).as_deref(), Some("-3.5000000000000000"));
        assert_eq!(
            numeric_avg("0", 5).as_deref(),
            Some("0.00000000000000000000")
        );
        assert_eq!(
            numeric_avg("123456789", 1).as_deref(),
            Some("123456789.000000000000")
        );
        assert_eq!(numeric_avg("5", 0), None);
    }

    #[test]
    fn floats_print_as_postgresql_does() {
        assert_eq!(float8out(1.5), "1.5");
        assert_eq!(float8out(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(float8out(1e20), "1e+20");
        assert_eq!(float8out(123456789012345.0), "123456789012345");
        assert_eq!(float8out(1234567890123456.0), "1.234567890123456e+15");
        assert_eq!(float8out(0.0001), "0.0001");
        assert_eq!(float8out(0.00001234), "1.234e-05");
        assert_eq!(float8out(-2.0), "-2");
        assert_eq!(float_avg("3", 2).as_deref(), Some("1.5"));
    }
}
