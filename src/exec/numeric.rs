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

#[cfg(test)]
mod tests {
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
