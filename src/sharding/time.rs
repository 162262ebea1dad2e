//! Timestamps as shard keys, read as PostgreSQL reads them. A `timestamptz` written
//! without an offset (`'2026-01-01 00:30'`) is a time in the session's `TimeZone`, so the
//! instant it names, and with it the shard of a range-sharded key, depends on that
//! setting; a `timestamp` (without time zone) ignores an offset written in its text, and
//! becomes an instant (or is made from one) in the session's time zone when it meets a
//! `timestamptz`.

use std::sync::{Arc, OnceLock};

/// Microseconds between 1970-01-01 and 2000-01-01, PostgreSQL's epoch.
pub const PG_EPOCH_MICROS: i64 = 10_957 * 86_400_000_000;

/// A session's `TimeZone` setting, as the servers report it (`Europe/Berlin`, `UTC`,
/// `<+05>-05` after `SET TIME ZONE 5`), with its rules when pgshard can read them (from
/// the system's time zone database, the one Debian's PostgreSQL uses). The rules are
/// looked up when a time first needs them: most sessions never route a timestamp.
#[derive(Debug, Clone)]
pub struct Zone {
    setting: Arc<str>,
    tz: OnceLock<Option<jiff::tz::TimeZone>>,
    /// A statement sent with this one, or not yet answered, may change the zone.
    changing: bool,
}

impl Zone {
    pub fn utc() -> Zone {
        Zone {
            setting: "UTC".into(),
            tz: OnceLock::from(Some(jiff::tz::TimeZone::UTC)),
            changing: false,
        }
    }

    /// The zone while a statement that may change it (`SET TIME ZONE`) is in the same
    /// request or not yet answered: a time that needs it cannot be read.
    pub fn changing() -> Zone {
        Zone {
            setting: "".into(),
            tz: OnceLock::from(None),
            changing: true,
        }
    }

    /// The zone a `TimeZone` setting names: a zone name, a POSIX time zone string, or a
    /// number of hours east of UTC (as `SET TIME ZONE 5` takes it).
    pub fn new(setting: &str) -> Zone {
        Zone {
            setting: setting.trim().into(),
            tz: OnceLock::new(),
            changing: false,
        }
    }

    /// The setting this zone was made from.
    pub fn setting(&self) -> &str {
        &self.setting
    }

    fn rules(&self) -> Result<&jiff::tz::TimeZone, String> {
        let s = &*self.setting;
        let tz = self.tz.get_or_init(|| {
            jiff::tz::TimeZone::get(s)
                .ok()
                .or_else(|| {
                    let hours: f64 = s.parse().ok()?;
                    let secs = (hours * 3600.0).round();
                    (secs.abs() < 86_400.0)
                        .then(|| jiff::tz::Offset::from_seconds(secs as i32).ok())
                        .flatten()
                        .map(jiff::tz::TimeZone::fixed)
                })
                .or_else(|| jiff::tz::TimeZone::posix(s).ok())
        });
        tz.as_ref().ok_or_else(|| {
            if self.changing {
                return "the session's TimeZone may change before this statement runs (a SET TIME ZONE, RESET or set_config in the same request, or not yet answered), so the instant of a time without an offset cannot be told: send the SET on its own, or write the offset".to_string();
            }
            format!(
                "the session's TimeZone {:?} is unknown to pgshard, so the instant of a time without an offset cannot be told: write the offset",
                &*self.setting
            )
        })
    }

    /// The instant (microseconds since 1970-01-01 UTC) of a wall-clock time in this zone.
    /// A time skipped by a change to summer time takes the offset before the change, and a
    /// time repeated when it ends the offset after it, as PostgreSQL resolves them.
    pub fn to_utc(&self, local: i64) -> Result<i64, String> {
        use jiff::tz::AmbiguousOffset;
        let dt = jiff::tz::Offset::UTC.to_datetime(micros(local)?);
        let offset = match self.rules()?.to_ambiguous_timestamp(dt).offset() {
            AmbiguousOffset::Unambiguous { offset } => offset,
            AmbiguousOffset::Gap { before, .. } => before,
            AmbiguousOffset::Fold { after, .. } => after,
        };
        Ok(local - offset.seconds() as i64 * 1_000_000)
    }

    /// The wall-clock time (microseconds since 1970-01-01 00:00, no zone) of an instant in
    /// this zone.
    pub fn to_local(&self, utc: i64) -> Result<i64, String> {
        let offset = self.rules()?.to_offset(micros(utc)?);
        Ok(utc + offset.seconds() as i64 * 1_000_000)
    }
}

fn micros(us: i64) -> Result<jiff::Timestamp, String> {
    jiff::Timestamp::from_microsecond(us).map_err(|_| "timestamp out of range".to_string())
}

/// A timestamp's text split into its wall-clock time (microseconds since 1970-01-01
/// 00:00) and the offset written with it, in seconds east of UTC.
pub fn parse(s: &str) -> Result<(i64, Option<i64>), String> {
    if s.len() < 10 {
        return Err("expected YYYY-MM-DD[ HH:MM[:SS[.ffffff]]][offset]".into());
    }
    let days = super::value::parse_date(&s[..10])?;
    let mut rest = s[10..].trim_start_matches([' ', 'T']);
    // Offset: Z, +HH, +HH:MM, -HHMM.
    let mut offset = None;
    if let Some(r) = rest.strip_suffix('Z') {
        rest = r;
        offset = Some(0);
    } else if let Some(p) = rest.rfind(['+', '-']) {
        let (t, off) = rest.split_at(p);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let digits: String = off[1..].chars().filter(|c| *c != ':').collect();
        let (h, m) = match digits.len() {
            2 => (num(&digits, "offset")?, 0),
            4 => (num(&digits[..2], "offset")?, num(&digits[2..], "offset")?),
            _ => return Err("bad offset".into()),
        };
        offset = Some(sign * (h as i64 * 3600 + m as i64 * 60));
        rest = t.trim_end();
    }
    let mut us: i64 = 0;
    if !rest.is_empty() {
        let (hms, frac) = rest.split_once('.').unwrap_or((rest, ""));
        let mut parts = hms.split(':');
        let h = num(parts.next().unwrap_or(""), "hour")?;
        let m = num(parts.next().ok_or("bad time")?, "minute")?;
        let sec = parts
            .next()
            .map(|p| num(p, "second"))
            .transpose()?
            .unwrap_or(0);
        if h > 24 || m > 59 || sec > 60 || parts.next().is_some() || frac.len() > 6 {
            return Err("bad time".into());
        }
        let frac_us = if frac.is_empty() {
            0
        } else {
            num(frac, "fraction")? as i64 * 10i64.pow(6 - frac.len() as u32)
        };
        us = ((h as i64 * 60 + m as i64) * 60 + sec as i64) * 1_000_000 + frac_us;
    }
    Ok((days * 86_400_000_000 + us, offset))
}

fn num(s: &str, what: &str) -> Result<u32, String> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("bad {what}"));
    }
    s.parse().map_err(|_| format!("bad {what}"))
}

/// The value of a timestamp's text read as `timestamptz` (`zoned`: the instant, from the
/// offset written or else the session's zone) or as `timestamp` (the wall-clock time;
/// PostgreSQL ignores an offset written in a `timestamp`).
pub fn read(s: &str, zoned: bool, zone: &Zone) -> Result<i64, String> {
    match s.to_ascii_lowercase().as_str() {
        "infinity" | "+infinity" => return Ok(INFINITY),
        "-infinity" => return Ok(-INFINITY),
        _ => {}
    }
    let (local, offset) = parse(s)?;
    match (zoned, offset) {
        (false, _) => Ok(local),
        (true, Some(o)) => Ok(local - o * 1_000_000),
        (true, None) => zone.to_utc(local),
    }
}

/// Whether a parameter of type `oid` is read as timestamptz: 1184 is, 1114 (timestamp)
/// is not, any other type is read as the key's own (`key_zoned`).
pub fn zoned_oid(oid: u32, key_zoned: bool) -> bool {
    match oid {
        1114 => false,
        1184 => true,
        _ => key_zoned,
    }
}

/// `'infinity'` as microseconds (and its negation `'-infinity'`): after (before) every
/// other timestamp, as in PostgreSQL.
pub const INFINITY: i64 = i64::MAX;

/// Whether a timestamp is `'infinity'` or `'-infinity'` (`i64::MIN` is taken as the
/// latter too: PostgreSQL's binary form).
pub fn infinite(us: i64) -> bool {
    us == INFINITY || us <= -INFINITY
}

/// A timestamp parameter in binary (type `oid`: 1114 timestamp, 1184 timestamptz, 0 the
/// key's own, `zoned` for timestamptz): its microseconds since 1970-01-01 and whether it
/// is an instant.
pub fn from_binary(b: &[u8], oid: u32, zoned: bool) -> Result<(i64, bool), String> {
    match (<[u8; 8]>::try_from(b), oid) {
        (Ok(eight), 0 | 1114 | 1184) => {
            let raw = i64::from_be_bytes(eight);
            // PostgreSQL's infinities are the extreme values on either epoch.
            let us = if infinite(raw) {
                raw.max(-INFINITY)
            } else {
                raw.checked_add(PG_EPOCH_MICROS)
                    .filter(|us| !infinite(*us))
                    .ok_or("timestamp out of range")?
            };
            Ok((us, zoned_oid(oid, zoned)))
        }
        _ => Err(format!(
            "a {}-byte binary parameter (type oid {oid}) is not a timestamp",
            b.len()
        )),
    }
}

/// A value of one timestamp type converted to the other, as PostgreSQL converts
/// `timestamp` and `timestamptz` (in the session's zone).
pub fn convert(us: i64, from_zoned: bool, to_zoned: bool, zone: &Zone) -> Result<i64, String> {
    match (from_zoned, to_zoned) {
        _ if infinite(us) => Ok(us),
        (false, true) => zone.to_utc(us),
        (true, false) => zone.to_local(us),
        _ => Ok(us),
    }
}

/// A timestamp rounded to `precision` fraction digits of a second, half away from zero
/// on PostgreSQL's epoch, as `timestamp(p)` rounds.
pub fn round(us: i64, precision: usize) -> i64 {
    if precision >= 6 || infinite(us) {
        return us;
    }
    let scale = 10i64.pow(6 - precision as u32);
    let pg = us - PG_EPOCH_MICROS;
    let half = scale / 2;
    let rounded = if pg >= 0 {
        (pg + half) / scale * scale
    } else {
        -((-pg + half) / scale * scale)
    };
    rounded + PG_EPOCH_MICROS
}

/// A timestamp's text as a cast to `timestamp(p)` or `timestamptz(p)` leaves it, or None
/// when it is not a plain timestamp: rounded to `precision`; a `timestamp` loses its
/// offset, a `timestamptz` keeps it.
pub fn cast_text(s: &str, precision: Option<usize>, zoned: bool) -> Option<String> {
    let (local, offset) = parse(s.trim()).ok()?;
    let local = precision.map_or(local, |p| round(local, p));
    let mut out = super::Value::Timestamp(local).to_string();
    if let (true, Some(o)) = (zoned, offset) {
        let a = o.abs();
        out.push_str(&format!(
            "{}{:02}:{:02}",
            if o < 0 { '-' } else { '+' },
            a / 3600,
            a / 60 % 60
        ));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        parse(s).unwrap().0
    }

    #[test]
    fn infinities_pass_every_conversion() {
        let berlin = Zone::new("Europe/Berlin");
        // PostgreSQL's binary 'infinity' and '-infinity' (before, an overflow panic).
        for (raw, us) in [(i64::MAX, INFINITY), (i64::MIN, -INFINITY)] {
            for oid in [1114, 1184] {
                let (got, _) = from_binary(&raw.to_be_bytes(), oid, true).unwrap();
                assert_eq!(got, us);
                assert_eq!(convert(got, oid == 1184, oid != 1184, &berlin), Ok(us));
                assert_eq!(round(got, 0), us);
            }
        }
        assert_eq!(read("Infinity", true, &berlin), Ok(INFINITY));
        assert_eq!(read("-infinity", false, &berlin), Ok(-INFINITY));
        assert_eq!(
            super::super::Value::Timestamp(-INFINITY).to_string(),
            "-infinity"
        );
        // The last microseconds PostgreSQL allows do not fit on the Unix epoch.
        let last = (i64::MAX - 1).to_be_bytes();
        assert!(from_binary(&last, 1184, true).is_err());
    }

    #[test]
    fn zones_resolve_times_as_postgresql() {
        let berlin = Zone::new("Europe/Berlin");
        // Winter: UTC+1.
        assert_eq!(
            berlin.to_utc(at("2026-01-01 00:30")),
            Ok(at("2025-12-31 23:30"))
        );
        // Skipped by summer time (02:00 -> 03:00 on 2026-03-29): the offset before, +1.
        assert_eq!(
            berlin.to_utc(at("2026-03-29 02:30")),
            Ok(at("2026-03-29 01:30"))
        );
        // Repeated when it ends (03:00 -> 02:00 on 2026-10-25): the offset after, +1.
        assert_eq!(
            berlin.to_utc(at("2026-10-25 02:30")),
            Ok(at("2026-10-25 01:30"))
        );
        assert_eq!(
            berlin.to_local(at("2026-07-01 10:00")),
            Ok(at("2026-07-01 12:00"))
        );
        // SET TIME ZONE 5 is reported as a POSIX string; a bare number is hours east.
        for s in ["<+05>-05", "5", "+05"] {
            assert_eq!(
                Zone::new(s).to_utc(at("2026-01-01 05:00")),
                Ok(at("2026-01-01 00:00")),
                "{s}"
            );
        }
        assert!(Zone::new("No/Such_Zone").to_utc(0).is_err());
        assert!(Zone::changing().to_local(0).is_err());
        assert_eq!(Zone::utc().to_utc(42), Ok(42));
    }

    #[test]
    fn reading_and_converting() {
        let ny = Zone::new("America/New_York");
        assert_eq!(
            read("2026-01-01 00:30", true, &ny),
            Ok(at("2026-01-01 05:30"))
        );
        assert_eq!(
            read("2026-01-01 00:30+02", true, &ny),
            Ok(at("2025-12-31 22:30"))
        );
        assert_eq!(
            read("2026-01-01 00:30+02", false, &ny),
            Ok(at("2026-01-01 00:30"))
        );
        assert_eq!(
            convert(at("2026-01-01 05:30"), true, false, &ny),
            Ok(at("2026-01-01 00:30"))
        );
    }

    #[test]
    fn rounding_as_timestamp_p() {
        assert_eq!(
            round(at("2026-01-01 10:00:00.5"), 0),
            at("2026-01-01 10:00:01")
        );
        assert_eq!(
            round(at("2026-01-01 10:00:00.49"), 0),
            at("2026-01-01 10:00:00")
        );
        assert_eq!(
            round(at("2026-01-01 23:59:59.96"), 1),
            at("2026-01-02 00:00:00")
        );
        // Before 2000, half rounds away from zero on PostgreSQL's epoch: down.
        assert_eq!(
            round(at("1999-12-31 23:59:59.5"), 0),
            at("1999-12-31 23:59:59")
        );
        assert_eq!(
            cast_text("2026-01-01 10:00:00.7+05:30", Some(0), true).as_deref(),
            Some("2026-01-01 10:00:01+05:30")
        );
        assert_eq!(
            cast_text("2026-01-01 10:00:00.7+05", None, false).as_deref(),
            Some("2026-01-01 10:00:00.700000")
        );
        assert_eq!(cast_text("epoch", Some(0), false), None);
    }
}
