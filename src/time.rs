//! Wall-clock instants as they appear outside the process: RFC 3339 in JSON and the state file,
//! `+DURATION` relative times from operators, and whole seconds for `Retry-After`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::{Duration, SystemTime};

/// A wall-clock instant that serializes as RFC 3339 (`2026-12-01T02:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    pub fn rfc3339(&self) -> String {
        humantime::format_rfc3339_seconds(self.0).to_string()
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
        parse_rfc3339(&text)
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
/// who wrote local time. A time without a zone is refused rather than guessed.
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    let b = text.as_bytes();
    if !text.is_ascii() || b.len() < "2026-12-01T02:00:00".len() {
        return Err("not an RFC 3339 time".into());
    }
    let (base, east) = match b[b.len() - 1] {
        b'Z' | b'z' => (&text[..text.len() - 1], 0i64),
        _ if b.len() < "2026-12-01T02:00:00+01:00".len() => {
            return Err("no time zone: end it with Z for UTC or an offset like +01:00".into())
        }
        _ => {
            let zone = &b[b.len() - 6..];
            let digits = |i: usize, j: usize| -> Option<i64> {
                let (x, y) = (zone[i], zone[j]);
                (x.is_ascii_digit() && y.is_ascii_digit())
                    .then(|| i64::from(x - b'0') * 10 + i64::from(y - b'0'))
            };
            let sign = match zone[0] {
                b'+' => 1,
                b'-' => -1,
                _ => {
                    return Err(
                        "no time zone: end it with Z for UTC or an offset like +01:00".into(),
                    )
                }
            };
            match (digits(1, 2), zone[3], digits(4, 5)) {
                (Some(h), b':', Some(m)) if h < 24 && m < 60 => {
                    (&text[..text.len() - 6], sign * (h * 3600 + m * 60))
                }
                _ => return Err(format!("bad offset {:?}", &text[text.len() - 6..])),
            }
        }
    };
    // humantime's reading of a fraction lets a dot with no digits, or junk before `Z`, pass.
    if let Some(fraction) = base.get(19..) {
        let digits = fraction.strip_prefix('.').unwrap_or("x");
        if !fraction.is_empty()
            && (digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()))
        {
            return Err(format!("bad fraction of a second {fraction:?}"));
        }
    }
    // RFC 3339 allows a lowercase `t`, and a space for readability (its §5.6 note).
    let mut utc = base.to_owned();
    if matches!(utc.as_bytes().get(10), Some(b't' | b' ')) {
        utc.replace_range(10..11, "T");
    }
    utc.push('Z');
    let local = humantime::parse_rfc3339(&utc).map_err(|e| e.to_string())?;
    let shift = Duration::from_secs(east.unsigned_abs());
    let at = if east >= 0 {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    };
    // Up to the last second RFC 3339 can write (9999-12-31T23:59:59Z): an offset could move a
    // time past it, which `Timestamp` could then not format.
    let last = std::time::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    at.filter(|t| (std::time::UNIX_EPOCH..=last).contains(t))
        .ok_or_else(|| "out of range".into())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

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
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
        assert!(parse_time("+soon", now).is_err());
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
