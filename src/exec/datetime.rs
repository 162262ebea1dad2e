//! Dates and timestamps in the text PostgreSQL writes with `DateStyle` ISO (the
//! default), read as instants so that merges order them as PostgreSQL does. Their bytes
//! are not in that order: BC dates (`0044-03-15 BC`), years past 9999 (`10000-01-01`),
//! and the hour a time zone repeats when its clocks go back (`01:15:00-05` comes after
//! `01:45:00-04`). Text in other DateStyles (`15/03/2026`, `Sun Mar 15 ...`) is not
//! read here: a server ranks it (see `order`).

use std::cmp::Ordering;

/// A date, or a timestamp's instant, in a form that compares as PostgreSQL orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Moment {
    NegInfinity,
    /// Days (a date) or microseconds (a timestamp, at UTC for timestamptz) since
    /// 1970-01-01, in the proleptic Gregorian calendar PostgreSQL uses.
    At(i128),
    Infinity,
}

impl Moment {
    fn finite(self) -> bool {
        matches!(self, Moment::At(_))
    }
}

/// date, timestamp and timestamptz: the types whose text pgshard reads here.
pub(super) fn is_datetime(oid: u32) -> bool {
    matches!(oid, 1082 | 1114 | 1184)
}

/// The ranking class of a date/time column whose text is in another DateStyle (see
/// `order::class`): a server reads the text in the client's settings and orders it.
pub(super) fn class(oid: u32) -> String {
    match oid {
        1082 => "v::pg_catalog.date",
        1114 => "v::pg_catalog.\"timestamp\"",
        _ => "v::pg_catalog.timestamptz",
    }
    .to_string()
}

/// Compares two values of a date/time type in ISO text; None when either is in another
/// style.
pub(super) fn compare(oid: u32, a: &[u8], b: &[u8]) -> Option<Ordering> {
    Some(parse(oid, a)?.cmp(&parse(oid, b)?))
}

/// Whether these values of a date/time type show that the session writes ISO text:
/// every one reads as ISO, and one at least is a finite date or time (`infinity` is
/// written alike in every style).
pub(super) fn shows_iso<'a>(oid: u32, values: impl IntoIterator<Item = &'a [u8]>) -> bool {
    let mut finite = false;
    for v in values {
        match parse(oid, v) {
            Some(m) => finite |= m.finite(),
            None => return false,
        }
    }
    finite
}

/// `text`, a value of type `oid` (date, timestamp, timestamptz) as PostgreSQL writes it
/// in DateStyle ISO; None when it is not in that form.
pub(super) fn parse(oid: u32, text: &[u8]) -> Option<Moment> {
    let s = std::str::from_utf8(text).ok()?.trim();
    match s {
        "infinity" => return Some(Moment::Infinity),
        "-infinity" => return Some(Moment::NegInfinity),
        _ => {}
    }
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let (date, time) = match oid {
        1082 => (s, None),
        _ => {
            let (d, t) = s.split_once(' ')?;
            (d, Some(t))
        }
    };
    // YYYY-MM-DD, the year at least four digits (ISO), never a sign (BC is a suffix).
    let (year, month_day) = date.split_once('-')?;
    let (month, day) = month_day.split_once('-')?;
    if year.len() < 4 || month.len() != 2 || day.len() != 2 {
        return None;
    }
    let year: i64 = digits(year)?;
    let (month, day) = (digits(month)?, digits(day)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // 1 BC is year 0 of the proleptic calendar.
    let days = days_from_civil(if bc { 1 - year } else { year }, month, day) as i128;
    let Some(time) = time else {
        return Some(Moment::At(days));
    };
    // HH:MM:SS[.ffffff], then for timestamptz the offset: +HH[:MM[:SS]].
    let (clock, offset) = if oid == 1184 {
        let at = time.find(['+', '-'])?;
        (&time[..at], Some(&time[at..]))
    } else {
        (time, None)
    };
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, f)) => (hms, f),
        None => (clock, ""),
    };
    let mut parts = hms.split(':');
    let (h, m, sec) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || h.len() != 2 || m.len() != 2 || sec.len() != 2 {
        return None;
    }
    if fraction.len() > 6 || (clock.contains('.') && fraction.is_empty()) {
        return None;
    }
    let micros_of_fraction = if fraction.is_empty() {
        0
    } else {
        digits(fraction)? * 10i64.pow(6 - fraction.len() as u32)
    };
    let mut micros = ((digits(h)? * 60 + digits(m)?) * 60 + digits(sec)?) as i128 * 1_000_000
        + micros_of_fraction as i128;
    if let Some(offset) = offset {
        let (sign, rest) = offset.split_at(1);
        let mut secs = 0i64;
        let mut n = 0;
        for (part, unit) in rest.split(':').zip([3600, 60, 1]) {
            if part.len() != 2 {
                return None;
            }
            secs += digits(part)? * unit;
            n += 1;
        }
        if n == 0 || rest.split(':').count() > 3 {
            return None;
        }
        // Local time = UTC + offset.
        micros -= if sign == "+" { secs } else { -secs } as i128 * 1_000_000;
    }
    Some(Moment::At(days * 86_400_000_000 + micros))
}

fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (year 0 is 1 BC).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let year_of_era = y - era * 400;
    let march_based = (month + 9) % 12;
    let day_of_year = (153 * march_based + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(oid: u32, s: &str) -> Moment {
        parse(oid, s.as_bytes()).unwrap_or_else(|| panic!("{s}"))
    }

    #[test]
    fn dates_order_as_postgresql() {
        assert_eq!(at(1082, "1970-01-01"), Moment::At(0));
        assert_eq!(at(1082, "2000-03-01"), Moment::At(11_017));
        let ordered = [
            "-infinity",
            "0044-03-15 BC",
            "0001-12-31 BC",
            "0001-01-01",
            "2024-02-29",
            "9999-12-31",
            "10000-01-01",
            "infinity",
        ];
        for w in ordered.windows(2) {
            assert!(at(1082, w[0]) < at(1082, w[1]), "{w:?}");
        }
    }

    #[test]
    fn timestamptz_is_its_instant() {
        // The hour New York repeats: 01:15 EST is 45 minutes after 01:45 EDT.
        assert!(at(1184, "2026-11-01 01:45:00-04") < at(1184, "2026-11-01 01:15:00-05"));
        assert_eq!(
            at(1184, "2026-01-01 05:30:00+05:30"),
            at(1184, "2026-01-01 00:00:00+00")
        );
        assert_eq!(
            at(1184, "1900-01-01 00:00:00+00:53:28"),
            at(1184, "1899-12-31 23:06:32+00")
        );
        assert!(at(1184, "2026-01-01 00:00:00.000001+00") > at(1184, "2026-01-01 00:00:00+00"));
        assert!(at(1184, "0044-03-15 12:00:00+00 BC") < at(1184, "0001-01-01 00:00:00+00"));
        assert_eq!(
            at(1114, "2026-03-08 06:59:59.5"),
            Moment::At(at(1082, "2026-03-08").at_days() * 86_400_000_000 + 25_199_500_000)
        );
    }

    #[test]
    fn other_styles_are_not_read() {
        for (oid, s) in [
            (1082, "15/03/2026"),
            (1082, "03-15-2026"),
            (1082, "15.03.2026"),
            (1114, "Sun Mar 15 10:00:00 2026"),
            (1184, "03/15/2026 10:00:00 EDT"),
            (1184, "2026-03-15 10:00:00"),
            (1114, "2026-03-15 10:00"),
            (1082, "2026-3-15"),
        ] {
            assert_eq!(parse(oid, s.as_bytes()), None, "{s}");
        }
        assert!(!shows_iso(1082, [&b"infinity"[..], b"-infinity"]));
        assert!(shows_iso(1082, [&b"infinity"[..], b"2026-01-01"]));
        assert!(!shows_iso(1082, [&b"2026-01-01"[..], b"01/02/2026"]));
    }

    impl Moment {
        fn at_days(self) -> i128 {
            match self {
                Moment::At(d) => d,
                _ => panic!("not finite"),
            }
        }
    }
}
