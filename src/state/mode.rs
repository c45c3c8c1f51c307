//! The mode and the operator's state, with the pure transitions between states.
//!
//! `Persisted` is exactly what the state file holds: what operators decided (maintenance on,
//! its message, its timeline, force-open), and when the outage going on began. The effective
//! `Mode` is derived from it and from upstream health, never stored, so the two can never
//! disagree.

use crate::time::{ceil_second, floor_second, Timestamp};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Normal,
    Maintenance,
    Outage,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Maintenance => "maintenance",
            Mode::Outage => "outage",
        }
    }
}

/// Planned maintenance switched on by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planned {
    pub since: Timestamp,
    #[serde(default)]
    pub until: Option<Timestamp>,
    /// `on --retry-after`, in seconds; else the configured value.
    #[serde(default)]
    pub retry_after: Option<u64>,
    pub by: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// One entry of the public timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub at: Timestamp,
    pub message: String,
}

/// The state file's content. Fields a newer version adds are ignored by an older one, so
/// that rolling back never refuses to start (which would invite moving the file away, and
/// with it the maintenance switch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    #[serde(default = "state_version")]
    pub version: u32,
    #[serde(default)]
    pub planned: Option<Planned>,
    /// The operator's current message (`on --message`, `update`), shown in any held mode.
    #[serde(default)]
    pub message: Option<String>,
    /// Oldest first.
    #[serde(default)]
    pub updates: Vec<Update>,
    #[serde(default)]
    pub force_open: bool,
    /// Scheduled windows, by start; ended ones are removed.
    #[serde(default)]
    pub schedules: Vec<Window>,
    #[serde(default)]
    pub next_window_id: u64,
    /// When the outage going on began (no server healthy), so that a restart during it
    /// tells the same outage, from the same start, and tells its end if the application came
    /// back meanwhile: one write when it begins and one when it ends, never per request.
    /// Absent in an older version's file, which a restart then reads as today: no outage.
    #[serde(default)]
    pub outage_since: Option<Timestamp>,
    /// The maintenance the window in force carries on without a break: it began at the end of
    /// the window before it (windows put end to end), which began at `since`. One maintenance
    /// keeps one `since` on the pages, in `status` and webhooks, and in the all-clear's
    /// duration; the window before is gone from `schedules` once it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continues: Option<Continues>,
    /// The mode the outage going on was last told from (its `mode_changed`'s
    /// `previous_mode`): `maintenance` when an operator's `off` or a window's end showed it.
    /// A restart that tells the outage again tells it as it was told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outage_told_from: Option<Mode>,
}

/// See `Persisted::continues`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Continues {
    pub window: u64,
    pub since: Timestamp,
}

pub const STATE_VERSION: u32 = 1;

fn state_version() -> u32 {
    STATE_VERSION
}

impl Default for Persisted {
    fn default() -> Self {
        Persisted {
            version: STATE_VERSION,
            planned: None,
            message: None,
            updates: Vec::new(),
            force_open: false,
            schedules: Vec::new(),
            next_window_id: 1,
            outage_since: None,
            continues: None,
            outage_told_from: None,
        }
    }
}

/// An operator's change, with times already resolved against the clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    On {
        message: Option<String>,
        /// `Some(None)`: the announced end taken back (`--until ""`).
        until: Option<Option<SystemTime>>,
        retry_after: Option<Duration>,
        reason: Option<String>,
        by: String,
    },
    Update {
        message: String,
    },
    Off,
    ForceOpen(bool),
    ScheduleAdd {
        start: SystemTime,
        end: SystemTime,
        message: Option<String>,
        by: String,
    },
    ScheduleRemove {
        id: u64,
    },
}

/// A maintenance window that switches itself on at `start` and off at `end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub id: u64,
    pub start: Timestamp,
    pub end: Timestamp,
    #[serde(default)]
    pub message: Option<String>,
    pub by: String,
    /// The window has begun (its start was seen to pass). Kept, in the state file too, so that
    /// a wall clock set back before its start (NTP stepping a clock that ran fast, `date -s`)
    /// neither ends it mid-work, sending traffic to an application under maintenance, nor
    /// starts it a second time: it ends at its end, as the wall clock reaches it. An older
    /// version ignores the field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started: bool,
}

impl Window {
    /// Whether the window holds maintenance at `now`: from its start (or once begun, whatever
    /// the clock says since: `started`), until its end.
    pub fn in_force(&self, now: SystemTime) -> bool {
        (self.started || self.start.0 <= now) && now < self.end.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    BadValue(String),
    #[error("nothing to update: no maintenance or outage is going on")]
    NothingHeld,
    #[error("no schedule window has id {0}")]
    NoSuchWindow(u64),
    #[error("{MAX_WINDOWS} windows are scheduled already, the most kept: remove one first")]
    TooManyWindows,
}

/// The most windows scheduled at once: a daily window for a year fits. Every change rewrites
/// the state file, and every `status` and `schedule_list` carries them all, so that without a
/// bound a script gone wrong would make each control command slower than the last.
pub const MAX_WINDOWS: usize = 500;

/// The longest message (and reason) accepted, in characters: a page, not a novel.
pub const MAX_MESSAGE_CHARS: usize = 2000;

/// An operator's text: a message must say something, a reason may be blank (it is then none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text {
    Message,
    Reason,
}

/// Whether `text` shows nothing anyone could see: only spaces and invisible format characters
/// such as U+200B or U+202E (or nothing at all). A message so is refused; a reason so is none.
pub fn shows_nothing(text: &str) -> bool {
    text.chars().all(invisible)
}

fn invisible(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            // Zero-width spaces and joiners, direction marks, embeddings, overrides and
            // isolates, word joiners, the byte-order mark and the soft hyphen.
            '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{061C}'
                | '\u{FEFF}'
                | '\u{00AD}'
                // Fillers and blanks that are letters or symbols but draw nothing.
                | '\u{115F}'
                | '\u{1160}'
                | '\u{3164}'
                | '\u{FFA0}'
                | '\u{2800}'
                | '\u{180E}'
                | '\u{17B4}'
                | '\u{17B5}'
                // Marks with nothing to mark: grapheme joiner, variation selectors, tags.
                | '\u{034F}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{E0000}'..='\u{E007F}'
                | '\u{E0100}'..='\u{E01EF}'
        )
}

/// What is wrong with an operator's text, trimmed, said of it ("must not be empty…"): more
/// than `MAX_MESSAGE_CHARS`, a control character but line ends and tabs (which no page shows,
/// and which the log and terminals would act on), or, for a message, nothing anyone could see
/// (`shows_nothing`). The config's messages and the control socket's are held to the same.
pub fn text_problem(kind: Text, text: &str) -> Option<String> {
    if kind == Text::Message && shows_nothing(text) {
        return Some("must not be empty: it is what people read".to_owned());
    }
    if let Some(c) = text
        .chars()
        .find(|&c| c.is_control() && c != '\n' && c != '\t')
    {
        return Some(format!(
            "contains the control character U+{:04X}",
            u32::from(c)
        ));
    }
    (text.chars().count() > MAX_MESSAGE_CHARS)
        .then(|| format!("is longer than {MAX_MESSAGE_CHARS} characters: a page, not a novel"))
}

/// `text_problem` as the control socket refuses it, naming the field.
fn check_text(kind: Text, text: &str) -> Result<(), ChangeError> {
    let name = match kind {
        Text::Message => "message",
        Text::Reason => "reason",
    };
    match text_problem(kind, text) {
        Some(why) => Err(ChangeError::BadValue(format!("{name} {why}"))),
        None => Ok(()),
    }
}

/// An announced end further ahead than this is a typo, not a plan.
pub const MAX_AHEAD: Duration = Duration::from_secs(366 * 24 * 3600);
/// Clients told to wait longer than this would not come back.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// `Retry-After` is whole seconds: a shorter wait would be announced as one second, a
/// promise nobody made.
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The timeline keeps this many entries, dropping the oldest.
pub const MAX_UPDATES: usize = 50;

impl Persisted {
    /// The mode clients see at `now`: `on` > an active schedule window > outage (unless
    /// force-open) > normal.
    pub fn mode(&self, upstream_healthy: bool, now: SystemTime) -> Mode {
        if self.planned.is_some() || self.active_window(now).is_some() {
            Mode::Maintenance
        } else if !upstream_healthy && !self.force_open {
            Mode::Outage
        } else {
            Mode::Normal
        }
    }

    /// Applies `change` at `now`. `upstream_healthy` decides whether an `update` has a held
    /// mode to speak about. The result is tidied: back in `normal`, the episode's message and
    /// timeline are cleared, so the next incident starts clean.
    pub fn apply(
        &self,
        change: Change,
        now: SystemTime,
        upstream_healthy: bool,
    ) -> Result<Persisted, ChangeError> {
        let mut next = self.clone();
        match change {
            Change::On {
                message,
                until,
                retry_after,
                reason,
                by,
            } => {
                if let Some(Some(u)) = until {
                    // Under a second ahead, an end announced as `Retry-After: 1` has passed
                    // before a client can come back, and `+0s` would be "now": refused alike,
                    // where `+0s` alone was refused as in the past.
                    let Ok(ahead) = u.duration_since(now) else {
                        return Err(ChangeError::BadValue(format!(
                            "until is in the past (read as {}; it is {} now)",
                            Timestamp(u).rfc3339(),
                            Timestamp(now).rfc3339()
                        )));
                    };
                    if ahead < Duration::from_secs(1) {
                        return Err(ChangeError::BadValue(
                            "until must be at least 1s ahead".into(),
                        ));
                    }
                    if ahead > MAX_AHEAD {
                        return Err(ChangeError::BadValue(
                            "until is more than a year ahead".into(),
                        ));
                    }
                }
                if retry_after.is_some_and(|r| r > MAX_RETRY_AFTER) {
                    return Err(ChangeError::BadValue(
                        "retry_after is longer than a day".into(),
                    ));
                }
                // A reason that shows nothing (blank, or a zero-width space alone) is none:
                // given so, it clears the one before it (`on` again changes what it is given;
                // a reason left out stays). It was kept, and shown as "(\u{202e})".
                let reason = reason.map(|r| r.trim().to_owned());
                if let Some(r) = &reason {
                    check_text(Text::Reason, r)?;
                }
                let reason: Option<Option<String>> =
                    reason.map(|r| Some(r).filter(|r| !shows_nothing(r)));
                let since = self.maintenance_since(now).unwrap_or(now);
                let planned = next.planned.get_or_insert_with(|| Planned {
                    since: Timestamp(since),
                    until: None,
                    retry_after: None,
                    by: by.clone(),
                    reason: None,
                });
                planned.by = by;
                if let Some(u) = until {
                    // Up to the whole second it is listed with (`status`, webhooks, the state
                    // file): a relative time's fraction would end it, and start the overrun,
                    // up to a second before the listed end, and a restart, reading the file
                    // back, would move it earlier still.
                    planned.until = u.map(|u| Timestamp(ceil_second(u)));
                }
                if let Some(r) = retry_after {
                    planned.retry_after = Some(crate::time::whole_seconds(r));
                }
                if let Some(r) = reason {
                    planned.reason = r;
                }
                if let Some(m) = message {
                    next.set_message(m, now)?;
                }
            }
            Change::Update { message } => {
                if self.mode(upstream_healthy, now) == Mode::Normal {
                    return Err(ChangeError::NothingHeld);
                }
                next.set_message(message, now)?;
            }
            Change::Off => {
                next.planned = None;
                // SPEC §3: a window is planned maintenance too, and `off` is "planned
                // maintenance off": an operator who says so mid-window wants traffic back
                // now. Left in force, the window took over at once with its own end, which
                // read as a new pending end nobody announced. Later windows stay scheduled.
                next.schedules.retain(|w| !w.in_force(now));
            }
            Change::ForceOpen(enabled) => next.force_open = enabled,
            Change::ScheduleAdd {
                start,
                end,
                message,
                by,
            } => {
                next.add_window(start, end, message, by, now)?;
            }
            Change::ScheduleRemove { id } => {
                let before = next.schedules.len();
                next.schedules.retain(|w| w.id != id);
                if next.schedules.len() == before {
                    return Err(ChangeError::NoSuchWindow(id));
                }
            }
        }
        Ok(next.tidied(upstream_healthy, now))
    }

    fn set_message(&mut self, message: String, now: SystemTime) -> Result<(), ChangeError> {
        let message = message.trim().to_owned();
        check_text(Text::Message, &message)?;
        if self.message.as_deref() != Some(message.as_str()) {
            self.updates.push(Update {
                at: Timestamp(now),
                message: message.clone(),
            });
            if self.updates.len() > MAX_UPDATES {
                self.updates.remove(0);
            }
        }
        self.message = Some(message);
        Ok(())
    }

    /// Clears the episode's message and timeline once nothing is held any more.
    pub fn tidied(mut self, upstream_healthy: bool, now: SystemTime) -> Persisted {
        // By start, so that a chain of windows that all ended while the proxy was down hands
        // the first one's start along to the one in force.
        for i in 0..self.schedules.len() {
            let w = &self.schedules[i];
            if w.end.0 > now {
                continue;
            }
            let since = self.window_since(w);
            if let Some(next) = self.schedules.iter().find(|n| n.start == w.end) {
                self.continues = Some(Continues {
                    window: next.id,
                    since: Timestamp(since),
                });
            }
        }
        self.schedules.retain(|w| w.end.0 > now);
        for w in &mut self.schedules {
            w.started |= w.start.0 <= now;
        }
        let kept = |c: &Continues| self.schedules.iter().any(|w| w.id == c.window);
        self.continues = self.continues.filter(kept);
        if self.mode(upstream_healthy, now) == Mode::Normal {
            self.message = None;
            self.updates.clear();
        }
        self
    }

    /// When the maintenance window `w` holds began: its start, or that of the window it
    /// carries on from without a break (`continues`).
    pub fn window_since(&self, w: &Window) -> SystemTime {
        self.continues
            .filter(|c| c.window == w.id)
            .map_or(w.start.0, |c| c.since.0.min(w.start.0))
    }

    /// When the maintenance window `w` holds ends: its end, or that of the last of the windows
    /// put end to end after it, which carry the same maintenance on (as `window_since` tells
    /// its start). Shown as its end, a window followed by another at its end told clients to
    /// come back (`Retry-After`) and pages to say "back by" a time the proxy already knew it
    /// would hold past: a window added at the end of the one in force, to run later, moved
    /// nothing people were told until the first had ended.
    pub fn window_until(&self, w: &Window) -> SystemTime {
        let mut end = w.end;
        // Each step goes to a later window, so as many steps as windows at most.
        for _ in 0..self.schedules.len() {
            match self.schedules.iter().find(|n| n.start == end) {
                Some(next) => end = next.end,
                None => break,
            }
        }
        end.0
    }

    /// When the maintenance going on at `now` began, if one is: an operator's `on` given
    /// during a window carries on the window's maintenance, and keeps its start.
    fn maintenance_since(&self, now: SystemTime) -> Option<SystemTime> {
        match &self.planned {
            Some(p) => Some(p.since.0),
            None => self.active_window(now).map(|w| self.window_since(w)),
        }
    }

    /// The mode the window in force at `now` took over from at its start, as the running
    /// proxy told it (a start tells the window again, and the repeat must read as the first):
    /// the maintenance of a window it carries on from (`continues`), an operator's `on` given
    /// before it, the outage going on since before it (`outage_since`, kept across restarts),
    /// else `normal`.
    pub fn taken_over(&self, now: SystemTime) -> Option<Mode> {
        let w = self.active_window(now)?;
        if self.continues.is_some_and(|c| c.window == w.id) {
            return Some(Mode::Maintenance);
        }
        let t = w.start.0.checked_sub(Duration::from_nanos(1))?;
        let mut then = self.clone();
        // An `on` given during the window was not in force before it, nor the window itself,
        // begun since.
        then.planned = then.planned.filter(|p| p.since.0 <= t);
        then.schedules.retain(|x| x.id != w.id);
        let healthy = self.outage_since.is_none_or(|s| s.0 > t);
        Some(then.mode(healthy, t))
    }

    /// The window in force at `now`, if any.
    pub fn active_window(&self, now: SystemTime) -> Option<&Window> {
        self.schedules.iter().find(|w| w.in_force(now))
    }

    /// The next window to start after `now` (not one begun already, which a clock set back
    /// puts after `now`).
    pub fn next_window(&self, now: SystemTime) -> Option<&Window> {
        self.schedules
            .iter()
            .filter(|w| w.start.0 > now && !w.started)
            .min_by_key(|w| w.start)
    }

    /// The next moment a window starts or ends, when the mode may change by itself.
    pub fn next_edge(&self, now: SystemTime) -> Option<SystemTime> {
        self.schedules
            .iter()
            .flat_map(|w| [(!w.started).then_some(w.start.0), Some(w.end.0)])
            .flatten()
            .filter(|&t| t > now)
            .min()
    }

    fn add_window(
        &mut self,
        start: SystemTime,
        end: SystemTime,
        message: Option<String>,
        by: String,
        now: SystemTime,
    ) -> Result<(), ChangeError> {
        let bad = |m: &str| Err(ChangeError::BadValue(m.to_owned()));
        // Ended windows are tidied after the change; they do not count.
        if self.schedules.iter().filter(|w| w.end.0 > now).count() >= MAX_WINDOWS {
            return Err(ChangeError::TooManyWindows);
        }
        // Each refusal names the times as they were read, in UTC: an operator who wrote a
        // local time with the offset of the wrong side of a change of daylight saving time
        // (`02:30:00+01:00` to `03:30:00+02:00` is no time at all) sees why.
        let utc = |t: SystemTime| Timestamp(t).rfc3339();
        if end <= start {
            return bad(&format!(
                "end must be after start (read as {} and {}, in UTC)",
                utc(end),
                utc(start)
            ));
        }
        // A second of slack lets "--start +0s" mean now.
        if start + Duration::from_secs(1) < now {
            return bad(&format!(
                "start is in the past (read as {}; it is {} now)",
                utc(start),
                utc(now)
            ));
        }
        if end.duration_since(now).unwrap_or_default() > MAX_AHEAD {
            return bad("end is more than a year ahead");
        }
        // Whole seconds, as every listing writes the window and the state file keeps it: a
        // relative time's fraction of a second made the next window, put at the end or start
        // listed for this one, overlap it by that fraction (refused, "touching is not
        // overlapping" notwithstanding), or leave a gap of it between the two, in which
        // requests were forwarded mid-maintenance and webhooks told of an end and a start.
        // Starts and ends are rounded the same way (up, as `--until`): a start rounded down
        // and an end up made `--start +3s --end +4s` two seconds long, and the window then
        // put after it with `--start +4s` overlapped it. A start that has come (`+0s`) is
        // now, its second rounded down, so that it is in force at once.
        let start = if start <= now {
            floor_second(now)
        } else {
            ceil_second(start)
        };
        let end = ceil_second(end);
        if end <= start {
            return bad("end must be after start, in another second: windows are whole seconds");
        }
        // A window begun holds from now on, even where a clock set back puts its start ahead.
        let from = |w: &Window| match w.started {
            true => w.start.0.min(now),
            false => w.start.0,
        };
        if let Some(w) = self
            .schedules
            .iter()
            .find(|w| start < w.end.0 && from(w) < end)
        {
            return Err(ChangeError::BadValue(format!(
                "overlaps window {} ({} to {})",
                w.id,
                w.start.rfc3339(),
                w.end.rfc3339()
            )));
        }
        let message = message.map(|m| m.trim().to_owned());
        if let Some(m) = &message {
            check_text(Text::Message, m)?;
        }
        // Past every window's id too: a state file edited by hand, or without
        // `next_window_id`, must not give a new window an id that `schedule remove` would
        // take for an older one's, and remove both.
        let taken = self.schedules.iter().map(|w| w.id.saturating_add(1)).max();
        let id = self.next_window_id.max(taken.unwrap_or(1)).max(1);
        // Only a file edited by hand gets here: ids count up from 1, one per window added.
        if self.schedules.iter().any(|w| w.id == id) {
            return bad(&format!(
                "no window id is left past {id}, which window {id} has: remove that window \
                 (schedule remove {id}) before adding another"
            ));
        }
        self.next_window_id = id.saturating_add(1);
        self.schedules.push(Window {
            id,
            start: Timestamp(start),
            end: Timestamp(end),
            message,
            by,
            started: false,
        });
        self.schedules.sort_by_key(|w| w.start);
        Ok(())
    }

    /// Whether the announced end of planned maintenance has passed: the minute people were
    /// told (`time::announced_end`).
    pub fn overrun(&self, now: SystemTime) -> bool {
        self.planned
            .as_ref()
            .and_then(|p| p.until)
            .is_some_and(|u| crate::time::announced_end(u.0) <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn on(message: Option<&str>) -> Change {
        Change::On {
            message: message.map(str::to_owned),
            until: None,
            retry_after: None,
            reason: None,
            by: "alice".into(),
        }
    }

    /// Windows end to end are one maintenance, also when the edges between them passed while
    /// the proxy was down: the one in force keeps the first one's start. A gap breaks it.
    #[test]
    fn windows_end_to_end_keep_the_first_start() {
        let mut s = Persisted::default();
        for (start, end) in [(100, 200), (200, 300), (300, 400), (401, 500)] {
            s = s.apply(window(start, end), t(0), true).unwrap();
        }
        let third = s.schedules[2].id;
        let s = s.tidied(true, t(350));
        assert_eq!(s.schedules.len(), 2);
        let w = s.active_window(t(350)).unwrap();
        assert_eq!(w.id, third);
        assert_eq!(s.window_since(w), t(100));
        let s = s.tidied(true, t(450));
        let w = s.active_window(t(450)).unwrap();
        assert_eq!(s.window_since(w), t(401), "after a gap, a new maintenance");
        assert_eq!(s.continues, None, "forgotten with its window");
    }

    /// What a window in force took over from, as a restart tells it again.
    #[test]
    fn the_mode_a_window_took_over_from() {
        let s = Persisted::default()
            .apply(window(100, 200), t(0), true)
            .unwrap()
            .apply(window(200, 300), t(0), true)
            .unwrap();
        assert_eq!(s.taken_over(t(150)), Some(Mode::Normal));
        assert_eq!(s.taken_over(t(50)), None, "no window in force");
        let carried = s.clone().tidied(true, t(250));
        assert_eq!(carried.taken_over(t(250)), Some(Mode::Maintenance));
        let mut down = s.clone();
        down.outage_since = Some(Timestamp(t(90)));
        assert_eq!(down.taken_over(t(150)), Some(Mode::Outage));
        down.outage_since = Some(Timestamp(t(120)));
        assert_eq!(
            down.taken_over(t(150)),
            Some(Mode::Normal),
            "began after it"
        );
    }

    /// An operator's `on` during a window carries on its maintenance, from the same start.
    #[test]
    fn an_on_during_a_window_keeps_its_since() {
        let s = Persisted::default()
            .apply(window(100, 200), t(0), true)
            .unwrap()
            .apply(window(200, 300), t(0), true)
            .unwrap()
            .tidied(true, t(250))
            .apply(on(None), t(260), true)
            .unwrap();
        assert_eq!(s.planned.unwrap().since, Timestamp(t(100)));
        let s = Persisted::default().apply(on(None), t(260), true).unwrap();
        assert_eq!(
            s.planned.unwrap().since,
            Timestamp(t(260)),
            "none to carry on"
        );
    }

    #[test]
    fn precedence_of_modes() {
        let mut s = Persisted::default();
        assert_eq!(s.mode(true, t(0)), Mode::Normal);
        assert_eq!(s.mode(false, t(0)), Mode::Outage);
        s.force_open = true;
        assert_eq!(s.mode(false, t(0)), Mode::Normal);
        s = s.apply(on(None), t(0), false).unwrap();
        assert_eq!(
            s.mode(false, t(0)),
            Mode::Maintenance,
            "on beats outage and force-open"
        );
        assert_eq!(s.mode(true, t(0)), Mode::Maintenance);
    }

    #[test]
    fn on_again_updates_only_the_given_fields() {
        let s = Persisted::default()
            .apply(
                Change::On {
                    message: Some("DB upgrade".into()),
                    until: Some(Some(t(3600))),
                    retry_after: None,
                    reason: Some("ticket 1".into()),
                    by: "alice".into(),
                },
                t(0),
                true,
            )
            .unwrap();
        let s2 = s.apply(on(None), t(60), true).unwrap();
        let p = s2.planned.as_ref().unwrap();
        assert_eq!(p.since, Timestamp(t(0)), "since stays");
        assert_eq!(p.until, Some(Timestamp(t(3600))));
        assert_eq!(p.reason.as_deref(), Some("ticket 1"));
        assert_eq!(s2.message.as_deref(), Some("DB upgrade"));
        // A blank reason given clears it.
        let blank = Change::On {
            message: None,
            until: None,
            retry_after: None,
            reason: Some("  ".into()),
            by: "alice".into(),
        };
        let s3 = s2.apply(blank, t(120), true).unwrap();
        let p = s3.planned.as_ref().unwrap();
        assert_eq!(p.reason, None);
        assert_eq!(p.until, Some(Timestamp(t(3600))), "an end left out stays");
        // An end given as none (`--until ""`) is taken back; the rest stays.
        let no_end = Change::On {
            message: None,
            until: Some(None),
            retry_after: None,
            reason: None,
            by: "bob".into(),
        };
        let s4 = s3.apply(no_end, t(180), true).unwrap();
        let p = s4.planned.as_ref().unwrap();
        assert_eq!(p.until, None);
        assert_eq!(p.since, Timestamp(t(0)));
        assert_eq!(s4.message.as_deref(), Some("DB upgrade"));
        assert_eq!(s4.mode(true, t(180)), Mode::Maintenance);
    }

    #[test]
    fn messages_build_the_timeline() {
        let s = Persisted::default()
            .apply(on(Some("first")), t(0), true)
            .unwrap();
        let s = s
            .apply(
                Change::Update {
                    message: "second".into(),
                },
                t(10),
                true,
            )
            .unwrap();
        let s = s
            .apply(
                Change::Update {
                    message: "second".into(),
                },
                t(20),
                true,
            )
            .unwrap();
        assert_eq!(s.message.as_deref(), Some("second"));
        let texts: Vec<_> = s.updates.iter().map(|u| u.message.as_str()).collect();
        assert_eq!(
            texts,
            ["first", "second"],
            "a repeated message is not a new update"
        );
    }

    #[test]
    fn off_returns_to_normal_and_clears_the_episode() {
        let s = Persisted::default()
            .apply(on(Some("x")), t(0), true)
            .unwrap();
        let s = s.apply(Change::Off, t(5), true).unwrap();
        assert_eq!(s, Persisted::default());
        // During an outage the operator's words stay after `off`.
        let s = Persisted::default()
            .apply(on(Some("x")), t(0), false)
            .unwrap();
        let s = s.apply(Change::Off, t(5), false).unwrap();
        assert_eq!(s.mode(false, t(0)), Mode::Outage);
        assert_eq!(s.message.as_deref(), Some("x"));
    }

    #[test]
    fn refusals() {
        let s = Persisted::default();
        assert_eq!(
            s.apply(
                Change::Update {
                    message: "x".into()
                },
                t(0),
                true
            ),
            Err(ChangeError::NothingHeld)
        );
        assert!(
            s.apply(
                Change::Update {
                    message: "x".into()
                },
                t(0),
                false
            )
            .is_ok(),
            "outage can be spoken to"
        );
        let past = Change::On {
            message: None,
            until: Some(Some(t(0))),
            retry_after: None,
            reason: None,
            by: "a".into(),
        };
        assert!(matches!(
            s.apply(past, t(1), true),
            Err(ChangeError::BadValue(_))
        ));
        assert!(matches!(
            s.apply(on(Some("   ")), t(0), true),
            Err(ChangeError::BadValue(_))
        ));
        let long = "x".repeat(MAX_MESSAGE_CHARS + 1);
        assert!(matches!(
            s.apply(on(Some(&long)), t(0), true),
            Err(ChangeError::BadValue(_))
        ));
        // Nothing anyone could see, or what a log or terminal would act on.
        for unseen in [
            "\u{200B}",
            " \u{FEFF}\u{2060} ",
            "\u{202E}",
            "\u{2067}\u{2069}",
            "\u{3164}\u{115F}\u{FFA0}",
            "\u{2800}\u{2800}",
            "\u{061C}\u{180E}\u{034F}\u{FE0F}",
            "\u{E0020}\u{E007F}",
            "ok\u{0}",
            "ok\u{1b}[2J",
            "ok\rX",
        ] {
            let refused = s.apply(on(Some(unseen)), t(0), true);
            assert!(
                matches!(refused, Err(ChangeError::BadValue(_))),
                "{unseen:?}"
            );
        }
        let lines = s.apply(on(Some("Two lines:\n\tsecond")), t(0), true);
        assert!(lines.is_ok(), "line ends and tabs are text");
        let with_reason = |reason: &str| Change::On {
            message: None,
            until: None,
            retry_after: None,
            reason: Some(reason.into()),
            by: "a".into(),
        };
        let long_reason = s.apply(with_reason(&long), t(0), true);
        assert!(matches!(long_reason, Err(ChangeError::BadValue(_))));
        let forged = s.apply(with_reason("r\nX"), t(0), true);
        assert!(
            forged.is_ok(),
            "a line end in a reason is escaped where shown"
        );
        let blank = s.apply(with_reason("  "), t(0), true).unwrap();
        assert_eq!(blank.planned.and_then(|p| p.reason), None, "blank is none");
        for unseen in ["\u{202E}", "\u{200B}", " \u{200B}\u{FEFF} "] {
            let kept = s.apply(with_reason(unseen), t(0), true).unwrap();
            let kept = kept.planned.and_then(|p| p.reason);
            assert_eq!(kept, None, "{unseen:?} shows nothing: it is none");
        }
        let marked = s.apply(with_reason("\u{200B}INC-7"), t(0), true).unwrap();
        assert_eq!(
            marked.planned.and_then(|p| p.reason).as_deref(),
            Some("\u{200B}INC-7"),
            "a reason that shows something is kept as given"
        );
        let bell = s.apply(with_reason("\u{7}"), t(0), true);
        assert!(
            matches!(bell, Err(ChangeError::BadValue(_))),
            "a control character is refused, not taken for none: {bell:?}"
        );
        let far = Change::On {
            message: None,
            until: Some(Some(t(400 * 24 * 3600))),
            retry_after: None,
            reason: None,
            by: "a".into(),
        };
        assert!(matches!(
            s.apply(far, t(0), true),
            Err(ChangeError::BadValue(_))
        ));
        let long_retry = Change::On {
            message: None,
            until: None,
            retry_after: Some(Duration::from_secs(90_000)),
            reason: None,
            by: "a".into(),
        };
        assert!(matches!(
            s.apply(long_retry, t(0), true),
            Err(ChangeError::BadValue(_))
        ));
    }

    #[test]
    fn timeline_is_bounded() {
        let mut s = Persisted::default()
            .apply(on(Some("m0")), t(0), true)
            .unwrap();
        for i in 1..=(MAX_UPDATES as u64 + 10) {
            s = s
                .apply(
                    Change::Update {
                        message: format!("m{i}"),
                    },
                    t(i),
                    true,
                )
                .unwrap();
        }
        assert_eq!(s.updates.len(), MAX_UPDATES);
        assert_eq!(
            s.updates.last().unwrap().message,
            format!("m{}", MAX_UPDATES + 10)
        );
    }

    fn window(start: u64, end: u64) -> Change {
        Change::ScheduleAdd {
            start: t(start),
            end: t(end),
            message: Some(format!("window {start}-{end}")),
            by: "ops".into(),
        }
    }

    #[test]
    fn schedule_windows_switch_by_time() {
        let s = Persisted::default()
            .apply(window(100, 200), t(0), true)
            .unwrap();
        assert_eq!(s.mode(true, t(99)), Mode::Normal);
        assert_eq!(s.mode(true, t(100)), Mode::Maintenance);
        assert_eq!(
            s.mode(false, t(150)),
            Mode::Maintenance,
            "a window beats an outage"
        );
        assert_eq!(s.mode(true, t(200)), Mode::Normal);
        assert_eq!(s.next_edge(t(0)), Some(t(100)));
        assert_eq!(s.next_edge(t(100)), Some(t(200)));
        assert_eq!(s.next_edge(t(200)), None);
        assert_eq!(s.next_window(t(0)).map(|w| w.id), Some(1));
        assert_eq!(s.next_window(t(150)), None);
        // Ended windows are dropped when the state is tidied.
        assert!(s.clone().tidied(true, t(200)).schedules.is_empty());
    }

    /// A window seen in force is begun (`Window::started`): a clock set back before its start
    /// leaves it in force until its end, not next nor taking over from itself, and a window
    /// added in the time the clock gave back may not overlap it. Kept in the state file; one
    /// an older version wrote has no such mark.
    #[test]
    fn a_begun_window_stays_in_force_when_the_clock_goes_back() {
        let s = Persisted::default()
            .apply(window(100, 200), t(0), true)
            .unwrap();
        assert!(!s.schedules[0].started);
        let s = s.tidied(true, t(150));
        assert!(s.schedules[0].started);
        // The clock set back to 50: what the running proxy or a restart sees.
        let s = s.tidied(true, t(50));
        assert!(s.schedules[0].started, "kept");
        assert_eq!(s.mode(true, t(50)), Mode::Maintenance);
        assert_eq!(s.active_window(t(50)).map(|w| w.id), Some(1));
        assert_eq!(s.next_window(t(50)), None, "it is not the next window");
        assert_eq!(s.next_edge(t(50)), Some(t(200)), "its end, not its start");
        assert_eq!(s.taken_over(t(50)), Some(Mode::Normal));
        let refused = s.apply(window(60, 80), t(50), true).unwrap_err();
        assert!(
            refused.to_string().contains("overlaps window 1"),
            "{refused}"
        );
        assert_eq!(s.mode(true, t(200)), Mode::Normal, "it ends at its end");
        let off = s.apply(Change::Off, t(50), true).unwrap();
        assert!(off.schedules.is_empty(), "`off` ends it");

        let json = serde_json::to_string(&s).unwrap();
        let back: Persisted = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let older = json.replace(",\"started\":true", "");
        assert_ne!(older, json);
        let older: Persisted = serde_json::from_str(&older).unwrap();
        assert!(!older.schedules[0].started);
        assert_eq!(older.mode(true, t(50)), Mode::Normal);
    }

    #[test]
    fn schedule_refusals() {
        let s = Persisted::default()
            .apply(window(100, 200), t(50), true)
            .unwrap();
        for (change, why) in [
            (window(150, 250), "overlap"),
            (window(50, 101), "overlap at the start"),
            (window(300, 300), "empty"),
            (window(400, 300), "end before start"),
            (window(10, 40), "in the past"),
        ] {
            assert!(s.apply(change, t(50), true).is_err(), "{why}");
        }
        // Touching is not overlapping.
        assert!(s.apply(window(200, 300), t(50), true).is_ok());
        assert!(s.apply(window(60, 100), t(50), true).is_ok());
        assert_eq!(
            s.apply(Change::ScheduleRemove { id: 9 }, t(50), true),
            Err(ChangeError::NoSuchWindow(9))
        );
        let removed = s
            .apply(Change::ScheduleRemove { id: 1 }, t(50), true)
            .unwrap();
        assert!(removed.schedules.is_empty());
    }

    /// A window ending at the start another is listed with (RFC 3339, whole seconds) leaves
    /// no moment between them in `normal`, whatever fraction of a second the clock read when
    /// the later one was added with a relative time.
    #[test]
    fn windows_end_to_end_at_listed_times_leave_no_gap() {
        let now = t(0) + Duration::from_millis(400);
        let later = Change::ScheduleAdd {
            start: now + Duration::from_secs(100),
            end: now + Duration::from_secs(200),
            message: None,
            by: "ops".into(),
        };
        let s = Persisted::default().apply(later, now, true).unwrap();
        let listed = |at: Timestamp| crate::time::parse_rfc3339(&at.rfc3339()).unwrap();
        let (start, end) = (listed(s.schedules[0].start), listed(s.schedules[0].end));
        let earlier = Change::ScheduleAdd {
            start: now,
            end: start,
            message: None,
            by: "ops".into(),
        };
        let s = s.apply(earlier, now, true).unwrap();
        for ms in [0, 200, 400, 600] {
            let at = start + Duration::from_millis(ms);
            assert_eq!(
                s.mode(true, at),
                Mode::Maintenance,
                "{ms} ms after the start"
            );
        }
        let next = Change::ScheduleAdd {
            start: end,
            end: end + Duration::from_secs(100),
            message: None,
            by: "ops".into(),
        };
        assert!(s.apply(next, now, true).is_ok(), "touching the listed end");
    }

    /// `--start +3s --end +4s`, then `--start +4s --end +6s` a moment later, within the same
    /// second: the first was stretched to two seconds (its start rounded down, its end up)
    /// and the second refused as overlapping it. Rounded the same way, they touch; a start
    /// that has come is still now, and a window that rounding would empty is refused.
    #[test]
    fn relative_windows_put_end_to_end_touch() {
        let add = |start: SystemTime, end: SystemTime| Change::ScheduleAdd {
            start,
            end,
            message: None,
            by: "ops".into(),
        };
        let secs = Duration::from_secs;
        let first = t(0) + Duration::from_millis(400);
        let s = Persisted::default()
            .apply(add(first + secs(3), first + secs(4)), first, true)
            .unwrap();
        let w = &s.schedules[0];
        assert_eq!(
            (w.start, w.end),
            (Timestamp(t(4)), Timestamp(t(5))),
            "one second"
        );
        let second = t(0) + Duration::from_millis(700);
        let s = s
            .apply(add(second + secs(4), second + secs(6)), second, true)
            .unwrap();
        let w = &s.schedules[1];
        assert_eq!((w.start, w.end), (Timestamp(t(5)), Timestamp(t(7))));
        // Across a second's change, a gap rather than an overlap.
        let third = t(1) + Duration::from_millis(100);
        let s = s
            .apply(add(third + secs(6), third + secs(8)), third, true)
            .unwrap();
        assert_eq!(s.schedules[2].start, Timestamp(t(8)));
        // `+0s` is in force at once.
        let now = t(100) + Duration::from_millis(400);
        let at_once = Persisted::default()
            .apply(add(now, now + secs(1)), now, true)
            .unwrap();
        assert_eq!(at_once.mode(true, now), Mode::Maintenance);
        assert_eq!(at_once.schedules[0].start, Timestamp(t(100)));
        assert_eq!(at_once.schedules[0].end, Timestamp(t(102)));
        // Both within one second: nothing left of it.
        let empty = Persisted::default().apply(
            add(
                now + Duration::from_millis(100),
                now + Duration::from_millis(500),
            ),
            now,
            true,
        );
        assert!(
            matches!(&empty, Err(ChangeError::BadValue(m)) if m.starts_with("end must be after start")),
            "{empty:?}"
        );
    }

    /// A state file without `next_window_id` (edited by hand) gives no new window an id
    /// already taken: `schedule remove` would remove both.
    #[test]
    fn a_new_window_takes_no_id_already_taken() {
        let mut s = Persisted::default();
        s = s.apply(window(100, 200), t(50), true).unwrap();
        s = s.apply(window(300, 400), t(50), true).unwrap();
        s.next_window_id = 0;
        let s = s.apply(window(500, 600), t(50), true).unwrap();
        let ids: Vec<u64> = s.schedules.iter().map(|w| w.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        // At the top of the range, no id is reused: the window is refused.
        let mut top = s.clone();
        top.schedules[2].id = u64::MAX;
        let refused = top.apply(window(700, 800), t(50), true);
        assert!(
            matches!(&refused, Err(ChangeError::BadValue(why)) if why.contains("no window id")),
            "{refused:?}"
        );
    }

    #[test]
    fn at_most_max_windows_are_scheduled() {
        let mut s = Persisted::default();
        for i in 0..MAX_WINDOWS as u64 {
            s = s
                .apply(window(100 + 10 * i, 105 + 10 * i), t(50), true)
                .unwrap();
        }
        let late = 100 + 10 * MAX_WINDOWS as u64;
        assert_eq!(
            s.apply(window(late, late + 5), t(50), true),
            Err(ChangeError::TooManyWindows)
        );
        let fewer = s
            .apply(Change::ScheduleRemove { id: 3 }, t(50), true)
            .unwrap();
        assert!(fewer.apply(window(late, late + 5), t(50), true).is_ok());
    }

    /// `until` is at least a second ahead: `+0s` and `+0.5s` are refused alike, `+1s` taken.
    #[test]
    fn until_is_at_least_a_second_ahead() {
        let on_until = |until| Change::On {
            message: None,
            until: Some(Some(until)),
            retry_after: None,
            reason: None,
            by: "a".into(),
        };
        let now = t(100);
        let refused =
            |until: SystemTime| match Persisted::default().apply(on_until(until), now, true) {
                Err(ChangeError::BadValue(why)) => why,
                other => panic!("{until:?}: {other:?}"),
            };
        let past = refused(t(99));
        assert!(past.starts_with("until is in the past (read as "), "{past}");
        assert!(past.contains(&Timestamp(t(99)).rfc3339()), "{past}");
        for ahead in [0, 1, 999] {
            assert_eq!(
                refused(now + Duration::from_millis(ahead)),
                "until must be at least 1s ahead",
                "{ahead} ms"
            );
        }
        assert!(Persisted::default()
            .apply(on_until(now + Duration::from_secs(1)), now, true)
            .is_ok());
        // A relative end's fraction of a second is rounded up to the second it is listed with.
        let on = Persisted::default()
            .apply(on_until(now + Duration::from_millis(90_400)), now, true)
            .unwrap();
        let until = on.planned.unwrap().until.unwrap();
        assert_eq!(until, Timestamp(t(191)));
        assert_eq!(crate::time::parse_rfc3339(&until.rfc3339()), Ok(t(191)));
    }

    #[test]
    fn overrun_after_until() {
        let s = Persisted::default()
            .apply(
                Change::On {
                    message: None,
                    until: Some(Some(t(100))),
                    retry_after: None,
                    reason: None,
                    by: "a".into(),
                },
                t(0),
                true,
            )
            .unwrap();
        // The end given is 1:40 past a whole minute, shown as 2:00: overrun from then on.
        assert!(!s.overrun(t(100)));
        assert!(!s.overrun(t(119)));
        assert!(s.overrun(t(120)));
        assert_eq!(
            s.mode(true, t(0)),
            Mode::Maintenance,
            "maintenance stays on after until"
        );
    }

    #[test]
    fn state_file_format_round_trips() {
        let s = Persisted::default()
            .apply(on(Some("hello")), t(0), true)
            .unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Persisted>(&json).unwrap(), s);
        // A file written by a newer version, with fields this one does not know, still loads.
        let newer = r#"{"version": 2, "planned": null, "force_open": true, "schedules": []}"#;
        assert!(serde_json::from_str::<Persisted>(newer).unwrap().force_open);
    }
}
