//! The mode and the operator's state, with the pure transitions between states.
//!
//! `Persisted` is exactly what the state file holds: what operators decided (maintenance on,
//! its message, its timeline, force-open). The effective `Mode` is derived from it and from
//! upstream health, never stored, so the two can never disagree.

use crate::time::Timestamp;
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
        }
    }
}

/// An operator's change, with times already resolved against the clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    On {
        message: Option<String>,
        until: Option<SystemTime>,
        retry_after: Option<Duration>,
        reason: Option<String>,
        by: String,
    },
    Update {
        message: String,
    },
    Off,
    ForceOpen(bool),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    BadValue(String),
    #[error("nothing to update: no maintenance or outage is going on")]
    NothingHeld,
}

/// The longest message accepted, in characters: a page, not a novel.
pub const MAX_MESSAGE_CHARS: usize = 2000;
/// An announced end further ahead than this is a typo, not a plan.
pub const MAX_AHEAD: Duration = Duration::from_secs(366 * 24 * 3600);
/// Clients told to wait longer than this would not come back.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The timeline keeps this many entries, dropping the oldest.
pub const MAX_UPDATES: usize = 50;

impl Persisted {
    /// The mode clients see: `on` > outage (unless force-open) > normal.
    pub fn mode(&self, upstream_healthy: bool) -> Mode {
        if self.planned.is_some() {
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
                if let Some(u) = until {
                    if u <= now {
                        return Err(ChangeError::BadValue("until is in the past".into()));
                    }
                    if u.duration_since(now).unwrap_or_default() > MAX_AHEAD {
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
                let planned = next.planned.get_or_insert_with(|| Planned {
                    since: Timestamp(now),
                    until: None,
                    retry_after: None,
                    by: by.clone(),
                    reason: None,
                });
                planned.by = by;
                if let Some(u) = until {
                    planned.until = Some(Timestamp(u));
                }
                if let Some(r) = retry_after {
                    planned.retry_after = Some(crate::time::whole_seconds(r));
                }
                if reason.is_some() {
                    planned.reason = reason;
                }
                if let Some(m) = message {
                    next.set_message(m, now)?;
                }
            }
            Change::Update { message } => {
                if self.mode(upstream_healthy) == Mode::Normal {
                    return Err(ChangeError::NothingHeld);
                }
                next.set_message(message, now)?;
            }
            Change::Off => next.planned = None,
            Change::ForceOpen(enabled) => next.force_open = enabled,
        }
        Ok(next.tidied(upstream_healthy))
    }

    fn set_message(&mut self, message: String, now: SystemTime) -> Result<(), ChangeError> {
        let message = message.trim().to_owned();
        if message.is_empty() {
            return Err(ChangeError::BadValue("message must not be empty".into()));
        }
        if message.chars().count() > MAX_MESSAGE_CHARS {
            return Err(ChangeError::BadValue(format!(
                "message is longer than {MAX_MESSAGE_CHARS} characters"
            )));
        }
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
    pub fn tidied(mut self, upstream_healthy: bool) -> Persisted {
        if self.mode(upstream_healthy) == Mode::Normal {
            self.message = None;
            self.updates.clear();
        }
        self
    }

    /// Whether the announced end of planned maintenance has passed.
    pub fn overrun(&self, now: SystemTime) -> bool {
        self.planned
            .as_ref()
            .and_then(|p| p.until)
            .is_some_and(|u| u.0 <= now)
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

    #[test]
    fn precedence_of_modes() {
        let mut s = Persisted::default();
        assert_eq!(s.mode(true), Mode::Normal);
        assert_eq!(s.mode(false), Mode::Outage);
        s.force_open = true;
        assert_eq!(s.mode(false), Mode::Normal);
        s = s.apply(on(None), t(0), false).unwrap();
        assert_eq!(
            s.mode(false),
            Mode::Maintenance,
            "on beats outage and force-open"
        );
        assert_eq!(s.mode(true), Mode::Maintenance);
    }

    #[test]
    fn on_again_updates_only_the_given_fields() {
        let s = Persisted::default()
            .apply(
                Change::On {
                    message: Some("DB upgrade".into()),
                    until: Some(t(3600)),
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
        assert_eq!(s.mode(false), Mode::Outage);
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
            until: Some(t(0)),
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
        let far = Change::On {
            message: None,
            until: Some(t(400 * 24 * 3600)),
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

    #[test]
    fn overrun_after_until() {
        let s = Persisted::default()
            .apply(
                Change::On {
                    message: None,
                    until: Some(t(100)),
                    retry_after: None,
                    reason: None,
                    by: "a".into(),
                },
                t(0),
                true,
            )
            .unwrap();
        assert!(!s.overrun(t(99)));
        assert!(s.overrun(t(100)));
        assert_eq!(
            s.mode(true),
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
