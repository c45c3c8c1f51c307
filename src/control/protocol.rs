//! The control protocol: one JSON object per line in each direction (SPEC §5).
//!
//! Pure types and parsing, no I/O, shared by the server, the `ctl` client and the tests.

use crate::state::mode::{Mode, Update, Window};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// Lines longer than this are refused and the connection closed.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    On {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        /// RFC 3339 or `+DURATION`, resolved by the proxy against its clock.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<String>,
        /// A duration; a JSON number is taken as seconds (`seconds_or_text`).
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            deserialize_with = "seconds_or_text"
        )]
        retry_after: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Update {
        message: String,
    },
    Off,
    ForceOpen {
        enabled: bool,
    },
    Health,
    Reload,
    ScheduleAdd {
        /// RFC 3339 or `+DURATION`.
        start: String,
        end: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    ScheduleList,
    ScheduleRemove {
        id: u64,
    },
}

/// A DURATION may be a plain number of seconds (SPEC §1), and a script that builds its request
/// as JSON writes such a number as a number: `"retry_after": 600` means what `"600"` means.
fn seconds_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct SecondsOrText;
    impl<'de> serde::de::Visitor<'de> for SecondsOrText {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration such as \"90s\" or a whole number of seconds")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(SecondsOrText)
}

pub const COMMANDS: &[&str] = &[
    "status",
    "on",
    "update",
    "off",
    "force_open",
    "health",
    "reload",
    "schedule_add",
    "schedule_list",
    "schedule_remove",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

/// One server's health as the proxy knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerHealth {
    pub server: String,
    /// `None` until a health check has said anything.
    pub healthy: Option<bool>,
    #[serde(default)]
    pub since: Option<Timestamp>,
    #[serde(default)]
    pub last_check: Option<Timestamp>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// When `last_error` happened: a server healthy again keeps it shown (so that one that
    /// flaps can be seen), which without its time read as a failure now.
    #[serde(default)]
    pub last_error_at: Option<Timestamp>,
    #[serde(default)]
    pub consecutive: u32,
    #[serde(default)]
    pub last_latency_ms: Option<f64>,
    /// Whether the latest result passed: with `consecutive`, what a reload needs to carry the
    /// rise/fall count on (`Counter::resumed`), and what tells a server down whose latest
    /// checks pass (on its way back) from one whose checks fail.
    #[serde(default)]
    pub last_ok: Option<bool>,
    /// A reload added the server while no server was healthy: it starts down, before any
    /// check, and is back once it passes `rise` checks in a row. Cleared once it is healthy.
    #[serde(default)]
    pub added_in_outage: bool,
    /// For a server that is down: how many passing checks in a row it still needs to be back.
    #[serde(default)]
    pub passes_needed: Option<u32>,
}

/// The state as `ctl status --json` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub mode: Mode,
    pub message: Option<String>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub retry_after: Option<u64>,
    /// The announced end has passed and maintenance is still on.
    pub overrun: bool,
    pub by: Option<String>,
    pub reason: Option<String>,
    pub force_open: bool,
    /// Newest first.
    pub updates: Vec<Update>,
    pub status_page: Option<String>,
    pub upstream: Vec<ServerHealth>,
    pub config: Option<String>,
    /// The next scheduled window, if any.
    #[serde(default)]
    pub next_window: Option<Window>,
    /// Every maintenance window not yet ended (the one in force included), as
    /// `schedule list` gives them.
    #[serde(default)]
    pub schedules: Vec<Window>,
    /// The last reload, when it was refused (the running config kept): when, and why. Gone
    /// once a reload takes. A SIGHUP's refusal (`systemctl reload`, a certbot hook) was
    /// otherwise only in the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_refused: Option<Update>,
    /// What the config file in force changed that takes effect only at a restart
    /// (`proxy.threads`, `admin.listen`, `control.*`, `log.format`/`log.level`): said by the
    /// reload that read it, and here until a restart, or a reload of a file that no longer
    /// changes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_pending: Vec<String>,
    /// The state file's save, under way for over 5 s (a slow or hung disk): every change
    /// waits for it, and is in force only once saved. An operator whose `ctl on` gave up
    /// saw `status` answer the mode before it, with nothing to say why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_overdue: Option<SaveOverdue>,
}

/// A save taking long (`StatusView::save_overdue`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveOverdue {
    /// When it began.
    pub since: Timestamp,
    /// The requests waiting behind it in the controller's queue.
    pub waiting: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StatusView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Vec<ServerHealth>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedules: Option<Vec<Window>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// What a reload that was applied warns of (what `check` says of the files it read, and
    /// settings kept until a restart); left out when there is none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The window a `schedule_add` made, as it is kept (its id for `schedule_remove`, its times
    /// rounded to whole seconds): among many, `state.schedules` does not say which is new.
    /// Left out of every other answer; an older client ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

impl Response {
    pub fn state(state: StatusView) -> Response {
        Response {
            ok: true,
            state: Some(state),
            health: None,
            schedules: None,
            error: None,
            warnings: Vec::new(),
            window: None,
        }
    }

    pub fn schedules(list: Vec<Window>) -> Response {
        Response {
            ok: true,
            state: None,
            health: None,
            schedules: Some(list),
            error: None,
            warnings: Vec::new(),
            window: None,
        }
    }

    pub fn health(health: Vec<ServerHealth>) -> Response {
        Response {
            ok: true,
            state: None,
            health: Some(health),
            schedules: None,
            error: None,
            warnings: Vec::new(),
            window: None,
        }
    }

    pub fn with_warnings(self, warnings: Vec<String>) -> Response {
        Response { warnings, ..self }
    }

    pub fn with_window(self, window: Option<Window>) -> Response {
        Response { window, ..self }
    }

    pub fn error(error: ErrorBody) -> Response {
        Response {
            ok: false,
            state: None,
            health: None,
            schedules: None,
            error: Some(error),
            warnings: Vec::new(),
            window: None,
        }
    }
}

/// The command a request names, when it is one of the protocol's: what a request refused by
/// `parse_request` is counted under.
pub fn named_command(line: &[u8]) -> Option<&'static str> {
    let value: serde_json::Value = serde_json::from_slice(line).ok()?;
    let cmd = value.get("cmd")?.as_str()?;
    COMMANDS.iter().copied().find(|known| *known == cmd)
}

/// Parses one request line, telling an unknown command from a malformed request.
pub fn parse_request(line: &[u8]) -> Result<Request, ErrorBody> {
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| ErrorBody::new("bad_request", format!("not a JSON object: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(ErrorBody::new(
            "bad_request",
            "a request is a JSON object like {\"cmd\": \"status\"}",
        ));
    };
    // Checked before anything is read from it: serde_json keeps the last of a repeated key,
    // so `{"cmd":"status","cmd":"off"}` switched maintenance off; a script that sends two
    // values for one field (a template gone wrong) meant one of them, and only it can say
    // which.
    match serde_json::from_slice::<UniqueKeys>(line) {
        Ok(UniqueKeys(None)) => {}
        Ok(UniqueKeys(Some(key))) => {
            return Err(ErrorBody::new(
                "bad_request",
                format!("the field {key:?} is given twice; give each field once"),
            ))
        }
        Err(e) => return Err(ErrorBody::new("bad_request", e.to_string())),
    }
    let cmd = match obj.get("cmd") {
        Some(serde_json::Value::String(c)) => c.clone(),
        Some(_) => return Err(ErrorBody::new("bad_request", "\"cmd\" must be a string")),
        None => return Err(ErrorBody::new("bad_request", "missing field \"cmd\"")),
    };
    if !COMMANDS.contains(&cmd.as_str()) {
        return Err(ErrorBody::new(
            "unknown_command",
            format!("unknown command '{cmd}'"),
        ));
    }
    // serde does not refuse extra fields next to the tag of a variant without fields.
    if matches!(
        cmd.as_str(),
        "status" | "off" | "health" | "reload" | "schedule_list"
    ) {
        if let Some(extra) = obj.keys().find(|k| *k != "cmd") {
            return Err(ErrorBody::new(
                "bad_request",
                format!("{cmd}: unknown field `{extra}`"),
            ));
        }
    }
    let req = serde_json::from_value(value)
        .map_err(|e| ErrorBody::new("bad_request", format!("{cmd}: {e}")))?;
    check_values(&req)?;
    Ok(req)
}

/// The first key a JSON object gives twice, if any; its values are skipped. Requests have
/// no nested objects, so their top level is all that can be repeated and mean something.
struct UniqueKeys(Option<String>);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut twice = None;
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    if seen.contains(&key) {
                        twice.get_or_insert(key);
                    } else {
                        seen.insert(key);
                    }
                }
                Ok(UniqueKeys(twice))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// Values the protocol refuses whoever sends them. A `retry_after` under a second (zero too)
/// would reach clients as `Retry-After: 1`, a promise nobody made; the config refuses such a
/// `maintenance.retry_after` for the same reason, so the socket refuses it too. Durations that do not parse are
/// left to the controller, which says why.
fn check_values(req: &Request) -> Result<(), ErrorBody> {
    if let Request::On {
        retry_after: Some(r),
        ..
    } = req
    {
        if crate::config::parse_duration(r).is_ok_and(|d| d < crate::state::mode::MIN_RETRY_AFTER) {
            return Err(ErrorBody::new(
                "bad_request",
                format!("on: retry_after {r:?} must be at least 1s: Retry-After is whole seconds"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request(br#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(br#"{"cmd":"on","message":"DB","until":"+45m","reason":"t1"}"#),
            Ok(Request::On {
                message: Some("DB".into()),
                until: Some("+45m".into()),
                retry_after: None,
                reason: Some("t1".into())
            })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"force_open","enabled":true}"#),
            Ok(Request::ForceOpen { enabled: true })
        );
    }

    #[test]
    fn errors_have_codes() {
        let code = |line: &[u8]| parse_request(line).unwrap_err().code;
        assert_eq!(code(br#"{"cmd":"frobnicate"}"#), "unknown_command");
        assert_eq!(code(b"not json"), "bad_request");
        assert_eq!(code(b"[1,2]"), "bad_request");
        assert_eq!(code(br#"{"message":"x"}"#), "bad_request");
        assert_eq!(code(br#"{"cmd":"update"}"#), "bad_request", "missing field");
        assert_eq!(
            code(br#"{"cmd":"force_open","enabled":"yes"}"#),
            "bad_request"
        );
        assert_eq!(code(br#"{"cmd":"off","extra":1}"#), "bad_request");
        // "0.0001s" is no duration (under a millisecond): the controller says so, as of any
        // duration that does not parse.
        for zero in ["0", "0s", "0ms", " 0 ", "500ms", "999ms"] {
            let line = format!(r#"{{"cmd":"on","retry_after":"{zero}"}}"#);
            assert_eq!(code(line.as_bytes()), "bad_request", "retry_after {zero:?}");
        }
        assert!(parse_request(br#"{"cmd":"on","retry_after":"1"}"#).is_ok());
        assert_eq!(code(br#"{"cmd":"on","retry_after":0}"#), "bad_request");
        for bad in ["-5", "1.5", "true", "[]"] {
            let line = format!(r#"{{"cmd":"on","retry_after":{bad}}}"#);
            let e = parse_request(line.as_bytes()).unwrap_err();
            assert_eq!(e.code, "bad_request", "{bad}");
            assert!(
                e.message.contains("whole number of seconds"),
                "{bad}: {}",
                e.message
            );
        }
        assert_eq!(
            parse_request(br#"{"cmd":"frobnicate"}"#)
                .unwrap_err()
                .message,
            "unknown command 'frobnicate'",
            "the message SPEC §5 shows, word for word"
        );
    }

    /// A field given twice is refused, whichever it is: serde_json would keep the last, and
    /// `{"cmd":"status","cmd":"off"}` switched maintenance off.
    #[test]
    fn a_field_given_twice_is_refused() {
        for line in [
            r#"{"cmd":"status","cmd":"off"}"#,
            r#"{"cmd":"frobnicate","cmd":"status"}"#,
            r#"{"cmd":"on","message":"a","message":"b"}"#,
            r#"{"cmd":"force_open","enabled":false, "enabled" :true}"#,
            r#"{"cmd":"on","until":"+1h","retry_after":60,"until":"+2h"}"#,
            r#"{"cmd":"\u0063md","cmd":"off"}"#,
        ] {
            let e = parse_request(line.as_bytes()).unwrap_err();
            assert_eq!(e.code, "bad_request", "{line}");
            assert!(
                e.message.contains("is given twice"),
                "{line}: {}",
                e.message
            );
        }
        let e = parse_request(br#"{"cmd":"status","cmd":"off"}"#).unwrap_err();
        assert!(
            e.message.starts_with("the field \"cmd\" is given twice"),
            "{}",
            e.message
        );
        // The same name in different cases, or inside a value, is no repeat.
        assert_eq!(
            parse_request(br#"{"cmd":"update","message":"{\"message\":1,\"message\":2}"}"#),
            Ok(Request::Update {
                message: r#"{"message":1,"message":2}"#.into()
            })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"off","CMD":"off"}"#)
                .unwrap_err()
                .message,
            "off: unknown field `CMD`"
        );
    }

    #[test]
    fn a_duration_may_be_a_json_number_of_seconds() {
        let retry_after = |line: &[u8]| match parse_request(line) {
            Ok(Request::On { retry_after, .. }) => retry_after,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            retry_after(br#"{"cmd":"on","retry_after":600}"#),
            Some("600".into())
        );
        assert_eq!(
            retry_after(br#"{"cmd":"on","retry_after":"10m"}"#),
            Some("10m".into())
        );
        assert_eq!(retry_after(br#"{"cmd":"on","retry_after":null}"#), None);
        assert_eq!(retry_after(br#"{"cmd":"on"}"#), None);
    }

    #[test]
    fn requests_round_trip() {
        let r = Request::Update {
            message: "x".into(),
        };
        let line = serde_json::to_vec(&r).unwrap();
        assert_eq!(parse_request(&line), Ok(r));
    }
}
