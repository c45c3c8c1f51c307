//! Wall-clock instants as they appear outside the process: RFC 3339 in JSON and the state file,
//! `+DURATION` relative times from operators, and whole seconds for `Retry-After`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A wall-clock instant that serializes as RFC 3339 (`2026-12-01T02:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    pub fn rfc3339(&self) -> String {
        use std::fmt::Write;
        let mut text = String::new();
        // humantime's formatter fails (and `to_string` would panic) past the year 9999, which
        // an operator's `+2999999d` reaches; such a time is refused as too far ahead, but it
        // is described in the log line before that. The last second RFC 3339 can write stands
        // in for it.
        if write!(text, "{}", humantime::format_rfc3339_seconds(self.0)).is_err() {
            text = "9999-12-31T23:59:59Z".to_owned();
        }
        text
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        // Only the state file is read so, and a second 60 there was written by hand: read
        // as `Leap::Next`, and named by the start's warnings (`store`), not refused as a
        // corrupt file, which would stop the start.
        read_rfc3339(&text, Leap::Next)
            .map(Timestamp)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}")))
    }
}

/// The wall clock the controller reads: the system's, or in tests a manual one that moves
/// only when told, so that schedule edges and announced ends can be tested without waiting.
#[derive(Clone, Default)]
pub struct Clock(Option<std::sync::Arc<std::sync::Mutex<SystemTime>>>);

impl Clock {
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that stands at `start` until `set`.
    pub fn manual(start: SystemTime) -> Clock {
        Clock(Some(std::sync::Arc::new(std::sync::Mutex::new(start))))
    }

    pub fn now(&self) -> SystemTime {
        match &self.0 {
            None => SystemTime::now(),
            // A poisoned lock still holds a valid time.
            Some(t) => *t.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }

    /// Moves a manual clock to `to`; the system clock is not ours to move.
    pub fn set(&self, to: SystemTime) {
        if let Some(t) = &self.0 {
            *t.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = to;
        }
    }

    /// How long from now until `at` (zero once it has passed).
    pub fn until(&self, at: SystemTime) -> Duration {
        at.duration_since(self.now()).unwrap_or_default()
    }
}

/// An operator's `TIME`: RFC 3339, or `+DURATION` from `now`.
pub fn parse_time(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    let t = text.trim();
    if let Some(rel) = t.strip_prefix('+') {
        let d = crate::config::parse_duration(rel)?;
        return now
            .checked_add(d)
            .ok_or_else(|| format!("{text:?} is too far ahead"));
    }
    parse_rfc3339(t).map_err(|e| {
        format!("{text:?} is not a time ({e}); write RFC 3339 like \"2026-12-01T02:00:00Z\", \"2026-12-01T03:00:00+01:00\" or \"+45m\"")
    })
}

/// RFC 3339 with its offset honoured: humantime reads UTC only, and its lenient reader takes
/// a time with no zone, or with a fraction and `+01:00`, as UTC, an hour off for an operator
/// who wrote local time. A time without a zone is refused rather than guessed, and so is a
/// second 60 (`Leap::Refused`).
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    read_rfc3339(text, Leap::Refused)
}

/// What to make of a second 60 (`12:00:60`), which RFC 3339 allows for a leap second. The
/// system clock (Unix time) counts none: humantime read it as the minute's second 59, a window
/// ending at `23:59:60` then ending a second early, and a typo's `12:00:60` as `12:00:59`
/// where the next minute was meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leap {
    /// Refused, with the time it would be: an operator's `TIME` (`ctl`, the control protocol).
    Refused,
    /// Read as the next minute's second 0, as Unix time counts a leap second's end, and as
    /// `mktime` normalises it: a state file edited by hand, which is mended, not refused.
    Next,
}

/// Whether `text`, an RFC 3339 time, writes its seconds as 60: a hand edit the state file's
/// reader names (`Leap::Next`).
pub fn has_second_60(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() >= 19 && b[16] == b':' && &b[17..19] == b"60"
}

fn read_rfc3339(text: &str, leap: Leap) -> Result<SystemTime, String> {
    const NO_ZONE: &str = "no time zone: end it with Z for UTC or an offset like +01:00";
    if !text.is_ascii() || text.len() < "2026-12-01T02:00:00".len() {
        return Err("not an RFC 3339 time".into());
    }
    // ASCII, so every split below is on a character boundary.
    let (base, east) = if let Some(base) = text.strip_suffix(['Z', 'z']) {
        (base, 0i64)
    } else {
        let at = text
            .len()
            .checked_sub(6)
            .filter(|&at| at >= 19)
            .ok_or(NO_ZONE)?;
        let (base, zone) = text.split_at(at);
        let sign = match zone.as_bytes()[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return Err(NO_ZONE.into()),
        };
        let two = |d: &str| -> Option<i64> {
            (d.len() == 2 && d.bytes().all(|c| c.is_ascii_digit())).then(|| d.parse().ok())?
        };
        let (h, m) = zone[1..]
            .split_once(':')
            .and_then(|(h, m)| Some((two(h)?, two(m)?)))
            .filter(|&(h, m)| h < 24 && m < 60)
            .ok_or_else(|| format!("bad offset {zone:?}"))?;
        (base, sign * (h * 3600 + m * 60))
    };
    // The date and time's own shape first: a five-digit year was otherwise read as a date
    // with a fraction of a second gone wrong.
    let shape = base.as_bytes();
    let digit_at = |i: usize| shape.get(i).is_some_and(u8::is_ascii_digit);
    if !(0..19).all(|i| match i {
        4 | 7 => shape[i] == b'-',
        10 => matches!(shape[i], b'T' | b't' | b' '),
        13 | 16 => shape[i] == b':',
        _ => digit_at(i),
    }) {
        return Err("not YYYY-MM-DDTHH:MM:SS with a four-digit year".into());
    }
    // humantime's reading of a fraction lets a dot with no digits, or junk before `Z`, pass.
    let fraction = base.get(19..).unwrap_or_default();
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit());
    if !fraction.is_empty() && !fraction.strip_prefix('.').is_some_and(digits) {
        return Err(format!("bad fraction of a second {fraction:?}"));
    }
    // RFC 3339 allows a lowercase `t`, and a space for readability (its §5.6 note).
    let mut utc = base.to_owned();
    if matches!(utc.as_bytes().get(10), Some(b't' | b' ')) {
        utc.replace_range(10..11, "T");
    }
    utc.push('Z');
    let local = humantime::parse_rfc3339(&utc).map_err(|e| e.to_string())?;
    // humantime reads a second 60 as 59: the next minute's 0 is one on.
    let local = match has_second_60(base) {
        false => local,
        true => local
            .checked_add(Duration::from_secs(1))
            .ok_or("out of range")?,
    };
    let shift = Duration::from_secs(east.unsigned_abs());
    let at = if east >= 0 {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    };
    // Up to the last second RFC 3339 can write (9999-12-31T23:59:59Z): an offset could move a
    // time past it, which `Timestamp` could then not format.
    let last = std::time::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    let at = at
        .filter(|t| (std::time::UNIX_EPOCH..=last).contains(t))
        .ok_or("out of range")?;
    if leap == Leap::Refused && has_second_60(base) {
        // Said with the time likely meant, in the zone it was written in: `local` is the
        // written time as if in UTC, and `Timestamp` writes `YYYY-MM-DDTHH:MM:SSZ`.
        let next = Timestamp(local).rfc3339();
        let zone = text.get(base.len()..).unwrap_or_default();
        return Err(format!(
            "second 60 is a leap second, which the system clock does not count: write the next \
             minute's second 00 ({}{zone}), or 59",
            next.get(..19).unwrap_or_default()
        ));
    }
    Ok(at)
}

/// `t` cut to its whole second, as RFC 3339 is written here and the state file keeps it.
pub fn floor_second(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

/// `t` rounded up to a whole second (unchanged when it is one already, or cannot be).
pub fn ceil_second(t: SystemTime) -> SystemTime {
    let cut = floor_second(t);
    if cut == t {
        return t;
    }
    cut.checked_add(Duration::from_secs(1)).unwrap_or(t)
}

/// An announced end as people are told it: rounded up to its minute ("back by 10:01" for
/// 10:00:23), since "back by 10:00" would be a promise broken. It is also when the end counts
/// as passed (the overrun), so that no page says "we planned to be back by 10:01; it is
/// taking longer" at 10:00:40. Unchanged when it is a whole minute already, or cannot be.
pub fn announced_end(t: SystemTime) -> SystemTime {
    let Ok(since) = t.duration_since(UNIX_EPOCH) else {
        return t;
    };
    let past = Duration::new(since.as_secs() % 60, since.subsec_nanos());
    if past.is_zero() {
        return t;
    }
    t.checked_add(Duration::from_secs(60) - past).unwrap_or(t)
}

/// Whole seconds from `now` until `until`, rounded up, at least 1; `None` once it has passed.
pub fn seconds_until(until: SystemTime, now: SystemTime) -> Option<u64> {
    let left = until.duration_since(now).ok()?;
    if left.is_zero() {
        return None;
    }
    let secs = left
        .as_secs()
        .saturating_add(u64::from(left.subsec_nanos() > 0));
    Some(secs.max(1))
}

/// Whole seconds of a duration, rounded up (a `Retry-After` of "250ms" is 1 second).
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs()
        .saturating_add(u64::from(d.subsec_nanos() > 0))
        .max(1)
}

/// A duration worked out from the clock (what is left of a deadline), for a person to read:
/// to the millisecond under 10 s, to the second from there, as `humantime` writes it (`2s
/// 500ms`, `30s`, `1m 30s`). Written whole, it read `draining for up to 29.998126114s`.
/// Rounded to the nearest: a field meant for machines keeps the exact value.
pub fn for_people(d: Duration) -> String {
    let step: u128 = if d < Duration::from_secs(10) {
        1_000_000
    } else {
        1_000_000_000
    };
    let nanos = (d.as_nanos() + step / 2) / step * step;
    let rounded = Duration::new(
        u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX),
        // Below a second's nanoseconds, which fit.
        u32::try_from(nanos % 1_000_000_000).unwrap_or(0),
    );
    humantime::format_duration(rounded).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn durations_for_people_are_rounded() {
        for (nanos, want) in [
            (999_448_191, "999ms"),
            (2_500_200_000, "2s 500ms"),
            (9_999_600_000, "10s"),
            (29_998_126_114, "30s"),
            (90_400_000_000, "1m 30s"),
            (0, "0s"),
        ] {
            assert_eq!(for_people(Duration::from_nanos(nanos)), want, "{nanos}");
        }
        assert_eq!(for_people(Duration::MAX), for_people(Duration::MAX));
    }

    #[test]
    fn times() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_time("+45m", now), Ok(now + Duration::from_secs(2700)));
        assert_eq!(parse_time("+90", now), Ok(now + Duration::from_secs(90)));
        let t = parse_time("2026-12-01T02:00:00Z", now).unwrap();
        assert_eq!(Timestamp(t).rfc3339(), "2026-12-01T02:00:00Z");
        assert!(parse_time("tomorrow", now).is_err());
        // An offset is honoured, with or without a fraction, and lowercase or spaced forms too.
        for local in [
            "2026-12-01T03:00:00+01:00",
            "2026-12-01T03:00:00.000+01:00",
            "2026-11-30T21:30:00-04:30",
            "2026-12-01t02:00:00z",
            "2026-12-01 02:00:00Z",
            "2026-12-01T02:00:00+00:00",
            "2026-12-01T02:00:00-00:00",
        ] {
            assert_eq!(parse_time(local, now), Ok(t), "{local}");
        }
        let half = parse_time("2026-12-01T03:00:00.5+01:00", now).unwrap();
        assert_eq!(half, t + Duration::from_millis(500));
        // A time without a zone would be a guess: local time or UTC?
        for bad in [
            "2026-12-01T02:00:00",
            "2026-12-01T02:00:00+0100",
            "2026-12-01T02:00:00+25:00",
            "2026-12-01T02:00:00+01:60",
            "2026-12-01T02:00:00 +01:00",
            "2026-12-01T02:00:00Ω",
            "1970-01-01T00:30:00+01:00",
            "9999-12-31T23:00:00-05:00",
            "2026-12-01T02:00:00.Z",
            "2026-12-01T02:00:00.+00:0Z",
            "2026-12-01T02:00:00x5Z",
            "2026-12-01T02:00:0Z",
            "2026-12-01T02:00:00++1:00",
            "2026-12-01T02:00:00+1:000",
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
        assert!(parse_time("+soon", now).is_err());
        // A fifth digit of the year is said as such, not as a fraction of a second.
        let five = parse_time("10000-01-01T00:00:00Z", now).unwrap_err();
        assert!(five.contains("four-digit year"), "{five}");
    }

    /// A second 60 is no time on the system clock: refused from an operator, with the time
    /// likely meant, where humantime read `12:00:60` as `12:00:59`; read as the next minute's
    /// start from the state file (which names it: `store`).
    #[test]
    fn a_second_60_is_refused_or_read_as_the_next_minute() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for (text, meant) in [
            ("2027-06-01T12:00:60Z", "2027-06-01T12:01:00Z"),
            ("2027-06-30T23:59:60Z", "2027-07-01T00:00:00Z"),
            ("2027-06-01T12:00:60.5+02:00", "2027-06-01T12:01:00+02:00"),
        ] {
            let refused = parse_time(text, now).unwrap_err();
            assert!(
                refused.contains("leap second") && refused.contains(meant),
                "{text}: {refused}"
            );
            assert!(parse_rfc3339(text).is_err(), "{text}");
        }
        let read: Timestamp = serde_json::from_str("\"2027-06-30T23:59:60Z\"").unwrap();
        assert_eq!(read.rfc3339(), "2027-07-01T00:00:00Z");
        let read: Timestamp = serde_json::from_str("\"2027-06-01T12:00:60+02:00\"").unwrap();
        assert_eq!(read.rfc3339(), "2027-06-01T10:01:00Z");
        assert!(has_second_60("2027-06-01T12:00:60Z"));
        assert!(!has_second_60("2027-06-01T12:00:59Z"));
        assert!(parse_time("2027-06-01T12:00:61Z", now).is_err());
    }

    #[test]
    fn retry_seconds_round_up() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            seconds_until(now + Duration::from_millis(1500), now),
            Some(2)
        );
        assert_eq!(seconds_until(now + Duration::from_secs(60), now), Some(60));
        assert_eq!(seconds_until(now, now), None);
        assert_eq!(seconds_until(now - Duration::from_secs(1), now), None);
        assert_eq!(whole_seconds(Duration::from_millis(250)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(300)), 300);
    }

    #[test]
    fn timestamps_round_trip_through_json() {
        let t = Timestamp(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2027-01-15T08:00:00Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
    }
}
