//! The state file: written atomically (temporary file, fsync, rename, fsync of the folder)
//! before a change is acknowledged, and read at start.
//!
//! A file that exists but cannot be read or parsed stops the start: it holds the maintenance
//! switch, and silently replacing it could put a site back online mid-incident. A file a newer
//! version wrote is read (a rollback must not refuse to start), said so, and kept as it was
//! beside the file before anything overwrites it.

use super::mode::{
    shows_nothing, Persisted, MAX_AHEAD, MAX_MESSAGE_CHARS, MAX_RETRY_AFTER, MAX_UPDATES,
    MAX_WINDOWS, MIN_RETRY_AFTER, STATE_VERSION,
};
use crate::time::{ceil_second, Timestamp};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read state file {}: {source}; {}, or move it away to start with maintenance off", path.display(), read_advice(.source))]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {} is corrupt ({source}); repair it, or move it away to start with maintenance off", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("control.state_file: cannot write in the folder of {} ({source}), so every change would be refused as not saved; let the proxy's user write there, or name another path", path.display())]
    Unwritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control.state_file: {} is in use by another intermission, which holds {}: give each instance a state file of its own (each would overwrite the other's changes)", path.display(), lock.display())]
    InUse { path: PathBuf, lock: PathBuf },
    #[error("control.state_file: cannot lock {}: {source}", lock.display())]
    Lock {
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write state file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// What to do about a save that failed, by its cause, for an operator mid-incident whose
    /// change it refused: a full disk and a folder that is gone call for different things.
    pub fn advice(&self) -> &'static str {
        let os = match self {
            StoreError::Write { source, .. } => source.raw_os_error(),
            // Found by the running proxy (`StateLock::renew`): another one took the state
            // file while its lock file was gone with its folder.
            StoreError::InUse { .. } => {
                return "Stop the other intermission, which took the state file while its lock \
                        file was gone (its folder removed?), or give it a state file of its own";
            }
            _ => None,
        };
        match os {
            Some(libc::ENOSPC | libc::EDQUOT) => "Make room on that file system",
            Some(libc::EACCES | libc::EPERM) => "Let the proxy's user write in its folder",
            Some(libc::EROFS) => {
                "Its file system is read-only: mount it read-write (the proxy's user writing there)"
            }
            Some(libc::ENOENT | libc::ENOTDIR) => {
                "Its folder is gone or no folder any more (moved, removed, a mount lost?): make \
                 it again, writable by the proxy's user"
            }
            _ => "Make room on that file system (or let the proxy's user write there)",
        }
    }
}

/// What to do about a state file that cannot be read: its permissions only when they are
/// the cause; a loop of symlinks, a device or a file too large is no matter of permissions.
fn read_advice(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "fix its permissions",
        _ => "repair it",
    }
}

/// The state file at most: 500 windows and 50 updates of 2,000 characters each, escaped,
/// take about 8 MiB.
const MAX_STATE_BYTES: u64 = 16 << 20;

/// The saved state, or the default when no file exists yet. Read as the operator's files are
/// (`files::read`): a FIFO in its place blocked the start for ever, deaf to SIGTERM.
pub fn load(path: &Path) -> Result<Persisted, StoreError> {
    let Some((bytes, mut state, unknown)) = read(path)? else {
        // Said, so that an operator whose maintenance did not survive a restart (a state
        // file moved, a mount that failed) finds why in the log.
        tracing::info!(
            "no state file at {}: starting with no maintenance on and no windows",
            path.display()
        );
        return Ok(Persisted::default());
    };
    for said in unknown {
        tracing::warn!("state file {}: {said}", path.display());
    }
    if state.version > STATE_VERSION {
        keep_newer(path, &bytes, state.version);
        // What this build writes is its own format, whatever it read.
        state.version = STATE_VERSION;
    }
    for problem in mend(&mut state, std::time::SystemTime::now()) {
        tracing::warn!("state file {}: {problem}", path.display());
    }
    Ok(state)
}

/// Holds a file edited by hand to what a change can leave (the control protocol's bounds),
/// as the start reads it and `check` tells it: what was mended, one sentence each, for the
/// start's log and `check`'s warnings. Mended rather than refused, as the texts are: the
/// file can be read, and a start refused over it (mid-incident) would leave every client
/// without an answer at all.
fn mend(state: &mut Persisted, now: std::time::SystemTime) -> Vec<String> {
    let mut said = Vec::new();
    // A file edited by hand may list more updates than a change ever keeps; the pages'
    // bound on their rendered size (`hold::pages`) counts on at most `MAX_UPDATES`, and the
    // timeline shows the latest alone.
    let over = state.updates.len().saturating_sub(MAX_UPDATES);
    if over > 0 {
        said.push(format!(
            "it lists {} updates: the first {over} are dropped, as a change drops them past {MAX_UPDATES}",
            state.updates.len()
        ));
        state.updates.drain(..over);
    }
    said.extend(mend_windows(state));
    // Held to the bound before they are held apart: a window past it is not said to lie
    // within one that no longer reaches it.
    said.extend(mend_ahead(state, now));
    said.extend(mend_overlaps(state));
    said.extend(mend_bounds(state, now));
    let mended = mend_texts(state);
    if mended > 0 {
        said.push(format!(
            "{mended} of its messages and reasons were longer than {MAX_MESSAGE_CHARS} characters, held control characters or showed nothing, as no change can leave them: cut at {MAX_MESSAGE_CHARS}, the control characters removed, those showing nothing dropped"
        ));
    }
    said
}

/// Holds the numbers of a file edited by hand to the control protocol's bounds: at most
/// `MAX_WINDOWS` windows to come (every change rewrites the file and every `status` carries
/// them all: 10,000 were read as they were), and a `retry_after` from `MIN_RETRY_AFTER` to
/// `MAX_RETRY_AFTER` (the pages held it there already, while `status` showed the file's).
/// The windows to come first are kept: the later ones, months ahead, are the ones an
/// operator has time to add again.
fn mend_bounds(state: &mut Persisted, now: std::time::SystemTime) -> Vec<String> {
    let mut said = Vec::new();
    // Ended windows are tidied at start, and `schedule add` does not count them either.
    let to_come = state.schedules.iter().filter(|w| w.end.0 > now).count();
    if to_come > MAX_WINDOWS {
        let mut kept = 0;
        let mut first_dropped = None;
        // In order of their start (`mend_windows`).
        state.schedules.retain(|w| {
            if w.end.0 <= now {
                return true;
            }
            kept += 1;
            if kept > MAX_WINDOWS {
                first_dropped.get_or_insert(w.start);
                return false;
            }
            true
        });
        let from = first_dropped.map_or_else(String::new, |t| format!(" (from {})", t.rfc3339()));
        said.push(format!(
            "schedules lists {to_come} windows to come, more than the {MAX_WINDOWS} the control protocol keeps (schedule add refuses more): the {} that start last{from} are dropped, and the next change saves the file without them",
            to_come - MAX_WINDOWS
        ));
    }
    let (least, most) = (MIN_RETRY_AFTER.as_secs(), MAX_RETRY_AFTER.as_secs());
    if let Some(planned) = state.planned.as_mut() {
        if let Some(r) = planned.retry_after.filter(|r| !(least..=most).contains(r)) {
            let held = r.clamp(least, most);
            planned.retry_after = Some(held);
            said.push(format!(
                "planned.retry_after is {r}, outside the {least} to {most} seconds (1s to 24h) the control protocol takes: read as {held}"
            ));
        }
    }
    said
}

/// Holds the ends of a file edited by hand to `MAX_AHEAD` from `now`, as `on --until` and
/// `schedule add` are held (the end of the 366th day, in whole seconds): an end years ahead
/// is a typo, and `Retry-After`, the page's "back by" and `status` all told it as written. A
/// window that starts past the bound goes (no `schedule add` could make it; an operator adds
/// it again nearer its time), said with its times.
fn mend_ahead(state: &mut Persisted, now: std::time::SystemTime) -> Vec<String> {
    let mut said = Vec::new();
    let Some(bound) = now.checked_add(MAX_AHEAD).map(ceil_second).map(Timestamp) else {
        return said;
    };
    let days = MAX_AHEAD.as_secs() / 86_400;
    if let Some(planned) = state.planned.as_mut() {
        if let Some(until) = planned.until.filter(|&u| u > bound) {
            said.push(format!(
                "planned.until is {}, more than the {days} days ahead the control protocol takes (on --until refuses it): read as {}",
                until.rfc3339(),
                bound.rfc3339()
            ));
            planned.until = Some(bound);
        }
    }
    state.schedules.retain_mut(|w| {
        if w.end <= bound {
            return true;
        }
        let (start, end) = (w.start.rfc3339(), w.end.rfc3339());
        if w.start >= bound {
            said.push(format!(
                "window {} ({start} to {end}) starts more than the {days} days ahead that schedule add takes: dropped; add it again nearer its time",
                w.id
            ));
            return false;
        }
        said.push(format!(
            "window {} ({start} to {end}) ends more than the {days} days ahead that schedule add takes: it ends at {} now",
            w.id,
            bound.rfc3339()
        ));
        w.end = bound;
        true
    });
    said
}

/// Holds the texts of a file edited by hand to what a change can leave in it (`text_problem`):
/// the pages' bound on their rendered size counts on `MAX_MESSAGE_CHARS`, and a control
/// character would reach the log and `ctl`'s terminal. Trimmed, as a change keeps them; one
/// left empty, or showing nothing (`shows_nothing`), goes (a message then falls back to the
/// config's, as with none). How many were mended.
fn mend_texts(state: &mut Persisted) -> usize {
    let mut mended = 0;
    let mut mend = |text: &mut String| {
        let kept: String = text
            .chars()
            .filter(|&c| !c.is_control() || c == '\n' || c == '\t')
            .take(MAX_MESSAGE_CHARS)
            .collect();
        let kept = kept.trim();
        // As a change leaves it: a message that shows nothing is refused, a reason is none.
        let kept = if shows_nothing(kept) { "" } else { kept };
        if kept != text.as_str() {
            *text = kept.to_owned();
            mended += 1;
        }
    };
    let mut mend_option = |text: &mut Option<String>| {
        if let Some(t) = text.as_mut() {
            mend(t);
            if t.is_empty() {
                *text = None;
            }
        }
    };
    mend_option(&mut state.message);
    for window in &mut state.schedules {
        mend_option(&mut window.message);
    }
    if let Some(planned) = state.planned.as_mut() {
        mend_option(&mut planned.reason);
    }
    for update in &mut state.updates {
        mend(&mut update.message);
    }
    state.updates.retain(|u| !u.message.is_empty());
    mended
}

/// Holds the windows of a file edited by hand to what `schedule add` can leave: in order of
/// their start, each ending after it starts, each id its own. A window that ends before it
/// starts was told as "ended while the proxy was down"; two with one id were both removed by
/// one `schedule remove`. What was mended, one sentence each, for the log.
fn mend_windows(state: &mut Persisted) -> Vec<String> {
    let mut said = Vec::new();
    state.schedules.retain(|w| {
        let keep = w.end > w.start;
        if !keep {
            said.push(format!(
                "window {} ends ({}) before it starts ({}), as no schedule add leaves one: dropped",
                w.id,
                w.end.rfc3339(),
                w.start.rfc3339()
            ));
        }
        keep
    });
    state.schedules.sort_by_key(|w| w.start);
    let mut next = state
        .schedules
        .iter()
        .map(|w| w.id.saturating_add(1))
        .max()
        .unwrap_or(1)
        .max(state.next_window_id)
        .max(1);
    let mut seen = std::collections::HashSet::new();
    state.schedules.retain_mut(|w| {
        if seen.insert(w.id) {
            return true;
        }
        // No id left past the last (a file that names `u64::MAX`): dropped, as `schedule add`
        // refuses a window then.
        if seen.contains(&next) {
            said.push(format!(
                "two windows have id {}, and no id is left for the one from {}: dropped",
                w.id,
                w.start.rfc3339()
            ));
            return false;
        }
        said.push(format!(
            "two windows have id {}: the one from {} is window {next} now",
            w.id,
            w.start.rfc3339()
        ));
        w.id = next;
        seen.insert(next);
        next = next.saturating_add(1);
        true
    });
    state.next_window_id = next;
    said
}

/// Holds overlapping windows of a file edited by hand apart, as `schedule add` refuses to
/// overlap them, without losing an hour of maintenance the file asks for: a window that
/// starts within an earlier one starts at its end instead (the two then hold one maintenance
/// end to end, each with its own message and id), and one wholly within an earlier one goes,
/// its time held by that one. Read as they were, the second's start was told only at the
/// first's end, and with its own start as the maintenance's `since` (pages, `status`,
/// webhooks), as if it began again mid-way; end to end, it carries the first's on
/// (`Persisted::continues`). Dropped or moved, each is said with its times, so that none is
/// lost unsaid.
/// In order of their start (`mend_windows`), and within `MAX_AHEAD` (`mend_ahead`).
fn mend_overlaps(state: &mut Persisted) -> Vec<String> {
    let mut said = Vec::new();
    // The window reaching furthest so far: its id, start and end.
    let mut reach: Option<(u64, Timestamp, Timestamp)> = None;
    state.schedules.retain_mut(|w| {
        let Some((id, start, end)) = reach.filter(|&(_, _, end)| w.start < end) else {
            reach = Some((w.id, w.start, w.end));
            return true;
        };
        let overlap = format!(
            "window {} ({} to {}) overlaps window {id} ({} to {}), which schedule add refuses",
            w.id,
            w.start.rfc3339(),
            w.end.rfc3339(),
            start.rfc3339(),
            end.rfc3339()
        );
        if w.end <= end {
            let unshown = w.message.as_ref().map_or_else(String::new, |m| {
                format!(
                    " and its message ({} characters) is not shown",
                    m.chars().count()
                )
            });
            said.push(format!(
                "{overlap}: it lies within window {id}, which holds maintenance then, so it is \
                 dropped{unshown}"
            ));
            return false;
        }
        said.push(format!(
            "{overlap}: it starts at {} now, where window {id} ends, and holds maintenance on \
             to its end as the file said",
            end.rfc3339()
        ));
        w.start = end;
        reach = Some((w.id, w.start, w.end));
        true
    });
    said
}

/// Whether the start could load the state file, for `check`: read and parsed as `load`
/// does, and nothing written (a newer version's file is not copied aside). What the start
/// would warn of (its fields, and what it mends: `mend`), as `check`'s warnings.
pub fn inspect(path: &Path) -> Result<Vec<String>, StoreError> {
    let Some((_, mut state, unknown)) = read(path)? else {
        return Ok(Vec::new());
    };
    // What the start would mend, said too: a file edited by hand is seen as it will be read
    // before the restart, not after it in the log.
    let mended = mend(&mut state, std::time::SystemTime::now());
    Ok(unknown
        .into_iter()
        .chain(mended)
        .map(|said| format!("control.state_file {}: {said}", path.display()))
        .collect())
}
/// The fields each object of the state file has, as this version writes them
/// (`Persisted`, `Planned`, `Update`, `Window`, `Continues`).
const FIELDS: &[&str] = &[
    "version",
    "planned",
    "message",
    "updates",
    "force_open",
    "schedules",
    "next_window_id",
    "outage_since",
    "continues",
    "outage_told_from",
];
const PLANNED_FIELDS: &[&str] = &["since", "until", "retry_after", "by", "reason"];
const UPDATE_FIELDS: &[&str] = &["at", "message"];
const WINDOW_FIELDS: &[&str] = &["id", "start", "end", "message", "by", "started"];
const CONTINUES_FIELDS: &[&str] = &["window", "since"];

/// The fields of `file` this version does not know, said in a sentence: ignored, they
/// were a silent "no maintenance" when they were a typo in a file edited by hand
/// (`"planed"`, `"untill"`), and a rollback drops what a newer version added under the
/// same format (a window's `started`). `None` when there is none, or when a newer format
/// says it all already (`keep_newer`).
fn unknown_fields(file: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let newer = file
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .is_some_and(|v| v > u64::from(STATE_VERSION));
    if newer {
        return None;
    }
    let mut found = Vec::new();
    let mut look = |at: &str, object: Option<&serde_json::Map<_, _>>, known: &[&str]| {
        for key in object.into_iter().flat_map(|o| o.keys()) {
            if !known.contains(&key.as_str()) {
                found.push(format!("{at}{key:?}"));
            }
        }
    };
    let object = |key| file.get(key).and_then(serde_json::Value::as_object);
    look("", Some(file), FIELDS);
    look("planned.", object("planned"), PLANNED_FIELDS);
    look("continues.", object("continues"), CONTINUES_FIELDS);
    for (list, known) in [("updates", UPDATE_FIELDS), ("schedules", WINDOW_FIELDS)] {
        let items = file.get(list).and_then(serde_json::Value::as_array);
        for (i, item) in items.into_iter().flatten().enumerate() {
            look(&format!("{list}[{i}]."), item.as_object(), known);
        }
    }
    if found.is_empty() {
        return None;
    }
    // A file of 10,000 windows, each with a typo, is not one line of a megabyte.
    const SHOWN: usize = 10;
    let more = found.len().saturating_sub(SHOWN);
    found.truncate(SHOWN);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    Some(format!(
        "fields this version does not know are ignored: {}{more} (a typo in a file edited by hand, or a field a newer version added), and the next change saves the file without them",
        found.join(", ")
    ))
}

/// The times of `file` written with second 60, said in a sentence: read as the next
/// minute's second 0 (`time::Leap::Next`), where humantime read `12:00:60` as `12:00:59`
/// without a word, and refusing the file as corrupt would stop the start over a second.
fn leap_seconds(file: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let mut found = Vec::new();
    let mut look = |at: String, value: Option<&serde_json::Value>| {
        if let Some(text) = value.and_then(serde_json::Value::as_str) {
            if crate::time::has_second_60(text) {
                found.push(format!("{at} {text:?}"));
            }
        }
    };
    let field = |object: &str, key: &str| file.get(object).and_then(|o| o.get(key));
    look("planned.since".into(), field("planned", "since"));
    look("planned.until".into(), field("planned", "until"));
    look("outage_since".into(), file.get("outage_since"));
    look("continues.since".into(), field("continues", "since"));
    for (list, keys) in [
        ("updates", &["at"][..]),
        ("schedules", &["start", "end"][..]),
    ] {
        let items = file.get(list).and_then(serde_json::Value::as_array);
        for (i, item) in items.into_iter().flatten().enumerate() {
            for key in keys {
                look(format!("{list}[{i}].{key}"), item.get(key));
            }
        }
    }
    if found.is_empty() {
        return None;
    }
    const SHOWN: usize = 10;
    let more = found.len().saturating_sub(SHOWN);
    found.truncate(SHOWN);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    Some(format!(
        "times with second 60 (a leap second, which the system clock does not count, and which \
         the control protocol refuses) are read as the next minute's second 00: {}{more}; the \
         next change saves them so",
        found.join(", ")
    ))
}

/// What `read` found: the file's bytes, what they say, and what the start warns of in them
/// beyond what it mends (`unknown_fields`, `leap_seconds`).
type Read = (Vec<u8>, Persisted, Vec<String>);

/// The file's bytes, what they say, and what the start warns of in them (`Read`), or `None`
/// when there is no file yet.
fn read(path: &Path) -> Result<Option<Read>, StoreError> {
    let bytes = match crate::files::read(path, MAX_STATE_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let corrupt = |source| StoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    // Past a UTF-8 byte order mark, which Windows editors write (Notepad's "UTF-8 with BOM",
    // PowerShell's `Out-File`) and which JSON lets a reader skip (RFC 8259 §8.1): the file was
    // refused as corrupt, "expected value at line 1 column 1", though every editor showed it
    // whole. The config file is read past one too (the `toml` parser skips it).
    let json = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    // Parsed as the state first, for an error that says where the file goes wrong.
    let state = serde_json::from_slice(json).map_err(corrupt)?;
    // Then as any JSON, which cannot fail once the state parsed: a state is one object,
    // and `[]` (which serde reads as a struct of defaults) was read as no maintenance.
    let unknown = match serde_json::from_slice(json).map_err(corrupt)? {
        serde_json::Value::Object(file) => unknown_fields(&file)
            .into_iter()
            .chain(leap_seconds(&file))
            .collect(),
        _ => {
            return Err(corrupt(serde::de::Error::custom(
                "it is not a JSON object, as a state file is: { \"version\": 1, ... }",
            )))
        }
    };
    Ok(Some((bytes, state, unknown)))
}

/// The mode the state file (and a copy of it) is written with. The file holds the
/// operators' internal reasons, which the control socket (0600 by default) shows only to
/// those allowed to ask: readable by the owner alone, unless the file in place was given
/// another mode (a group's backup), which is kept.
fn file_mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600)
}

/// A newer version's file may hold what this one does not read, and its next save drops it:
/// the file as it was goes to `<file>.v<version>` first, so that nothing is lost silently.
fn keep_newer(path: &Path, bytes: &[u8], version: u32) {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".v{version}"));
    let copy = PathBuf::from(name);
    // As private as the file it keeps (`file_mode`), not left to the umask, which made it
    // readable by every local user.
    let mode = file_mode(path);
    // Synced, as the state file is: the first save after a crash must not find the copy
    // empty while the file it kept is gone.
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&copy)
        .and_then(|mut f| {
            // `mode` is filtered by the umask, and a copy in place keeps its own: set as meant.
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.write_all(bytes)?;
            f.sync_all()
        });
    let kept = match written {
        Ok(()) => "the file as it was is kept in the copy".to_owned(),
        Err(e) => format!("and no copy could be kept: {e}"),
    };
    tracing::warn!(
        path = %path.display(),
        copy = %copy.display(),
        "state file written by a newer intermission (format {version}; this one reads {STATE_VERSION}): what this version does not know is dropped at its next save; {kept}"
    );
}

/// Whether the state file can be written where it is: a file is made and removed beside it,
/// in the folder the save makes its temporary file in, as the running user. Under a name of
/// its own (`create_new`), never the save's: a `check` beside a running proxy must not cut
/// short the temporary file of a save under way.
pub fn probe(path: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::Unwritable {
        path: path.to_path_buf(),
        source,
    };
    let probe = beside(&followed(path), &format!("probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(err)?;
    std::fs::remove_file(&probe).map_err(err)
}

/// Holds the state file for this process while the returned file is open: two proxies
/// sharing one state file overwrite each other's changes (a restart then brings back the
/// other's state), and their saves race for the temporary file. An advisory lock (`flock`)
/// on a file beside it, which the kernel lets go when the process dies, however it dies.
/// Beside the file a symlink names, where the saves write: two proxies whose links (in
/// folders of their own, one per container) name one file on a shared volume each held a
/// lock of their own beside their link, and overwrote each other's state.
pub fn lock(path: &Path) -> Result<std::fs::File, StoreError> {
    let lock = beside(&followed(path), "lock");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(|source| StoreError::Lock {
            lock: lock.clone(),
            source,
        })?;
    use rustix::fs::{flock, FlockOperation};
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(StoreError::InUse {
            path: path.to_path_buf(),
            lock,
        }),
        Err(e) => Err(StoreError::Lock {
            lock,
            source: e.into(),
        }),
    }
}

/// The state file's lock as the running proxy holds it, taken again when its file is gone:
/// a folder removed while the proxy runs (a cleanup, by hand) takes the lock file with it,
/// and the lock held on the file unlinked kept out nobody. A second instance started on the
/// same state file once the folder was made again took it, and each overwrote the other's
/// changes.
pub struct StateLock {
    path: PathBuf,
    /// `None` once let go (`release`): the stop hands the state file to the next instance.
    held: std::sync::Mutex<Option<std::fs::File>>,
}

impl StateLock {
    /// Locks the state file at `path` (`lock`).
    pub fn take(path: &Path) -> Result<StateLock, StoreError> {
        Ok(StateLock {
            path: path.to_path_buf(),
            held: std::sync::Mutex::new(Some(lock(path)?)),
        })
    }

    /// Takes the lock again when the file at its path is not the one held (removed, with its
    /// folder or alone): `Ok(true)` when it did. Nothing when the folder is still gone (the
    /// save that follows says so) or the lock was let go. `InUse` when another instance took
    /// the state file meanwhile. Blocking: call it off the async workers.
    pub fn renew(&self) -> Result<bool, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(file) = held.as_ref() else {
            return Ok(false);
        };
        let at = beside(&followed(&self.path), "lock");
        let id = |m: &std::fs::Metadata| (m.dev(), m.ino());
        match std::fs::metadata(&at) {
            Ok(m) if file.metadata().ok().as_ref().map(id) == Some(id(&m)) => return Ok(false),
            Err(_) if !folder(&at).is_dir() => return Ok(false),
            _ => {}
        }
        *held = Some(lock(&self.path)?);
        Ok(true)
    }

    /// Lets the state file go, for the next instance to take.
    pub fn release(&self) {
        drop(
            self.held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
    }
}

/// The file `path` names, through symlinks (a few levels; one that names no file yet is
/// followed too, as the first save will make it); `path` itself when it is none.
fn followed(path: &Path) -> PathBuf {
    let mut at = path.to_path_buf();
    for _ in 0..8 {
        let Ok(target) = std::fs::read_link(&at) else {
            break;
        };
        at = match at.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    at
}

/// The folder `path` is in (`.` for a bare name).
fn folder(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// `.{name}.{suffix}` in the folder of `path`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let dir = folder(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.{suffix}"))
}

/// What tells the state file on disk from another without reading it: its inode, size and
/// modification time. A save replaces the inode; an edit in place changes the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

/// The state file as it is on disk now (through a symlink); `None` when there is none.
/// The running proxy reads the file at start only, and compares it with what it last read
/// or wrote to say that an edit by hand is not in force, and that its next save replaces it.
pub fn seen(path: &Path) -> Option<Seen> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Seen {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
    })
}

/// Writes `state` so that a crash at any moment leaves either the old or the new file whole.
/// Blocking: call it off the async workers.
pub fn save(path: &Path, state: &Persisted) -> Result<(), StoreError> {
    let err = |source| StoreError::Write {
        path: path.to_path_buf(),
        source,
    };
    // Through a symlink to the file it names: renamed over, the link itself would become a
    // regular file, and the file it named (on a volume that outlives the container, say)
    // would keep the old state for the next start to restore.
    let path = &followed(path);
    let mut json = serde_json::to_vec_pretty(state).map_err(|e| err(std::io::Error::other(e)))?;
    json.push(b'\n');
    let dir = folder(path);
    let tmp = beside(path, "tmp");
    // Whatever is in the temporary file's place (a failed save's leftover, or a symlink put
    // there, which `File::create` would write through, onto its target) goes first; the file
    // is then made new. What cannot go is named, not the state file.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(StoreError::Write { path: tmp, source }),
    }
    let mode = file_mode(path);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|f| {
            // `mode` is filtered by the umask; the kept mode is meant as it was.
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            Ok(f)
        })
        .and_then(|mut f| {
            f.write_all(&json)?;
            f.sync_all()
        });
    if let Err(e) = written {
        // A full disk's partial file is not left behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    // The new file is in place; failing to sync the folder only weakens crash safety, and
    // reporting the change as not made would be false.
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(path = %path.display(), error = %e, "state file written, but its folder could not be synced");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file edited by hand with more updates than a change keeps is read with the latest
    /// `MAX_UPDATES`, as a change would have left it.
    #[test]
    fn updates_past_the_most_kept_are_dropped_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut state = Persisted::default();
        for i in 0..MAX_UPDATES + 7 {
            state.updates.push(super::super::mode::Update {
                at: crate::time::Timestamp(std::time::UNIX_EPOCH),
                message: format!("m{i}"),
            });
        }
        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.updates.len(), MAX_UPDATES);
        assert_eq!(loaded.updates[0].message, "m7");
        assert_eq!(
            loaded.updates.last().map(|u| u.message.as_str()),
            Some(format!("m{}", MAX_UPDATES + 6).as_str())
        );
    }

    /// A file edited by hand holds no text a change could not leave: a message past
    /// `MAX_MESSAGE_CHARS` (which the pages' bound on their size counts on) is cut there, a
    /// control character (an escape sequence for the log and terminals) removed, line ends
    /// kept; what a change could leave is read as it is.
    #[test]
    fn texts_edited_by_hand_are_held_to_what_a_change_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let long = "é".repeat(MAX_MESSAGE_CHARS + 500);
        let text = format!(
            r#"{{"version":1,"message":"{long}","planned":{{"since":"2026-12-06T00:00:00Z","by":"ops","reason":"INC\u001b[31m-7"}},
               "updates":[{{"at":"2026-12-06T00:00:00Z","message":"line\none\tand two"}}],
               "schedules":[{{"id":1,"start":"2026-12-06T00:00:00Z","end":"2036-12-06T00:00:00Z","message":"{long}","by":"ops"}}]}}"#
        );
        std::fs::write(&path, text).unwrap();
        let loaded = load(&path).unwrap();
        let message = loaded.message.unwrap();
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS);
        assert!(message.chars().all(|c| c == 'é'));
        assert_eq!(
            loaded.schedules[0].message.as_deref(),
            Some(message.as_str())
        );
        assert_eq!(loaded.planned.unwrap().reason.as_deref(), Some("INC[31m-7"));
        assert_eq!(loaded.updates[0].message, "line\none\tand two");
        // Left empty, a text goes: the message falls back to the config's.
        let text = r#"{"version":1,"message":"\u0007\u001b ","updates":[
            {"at":"2026-12-06T00:00:00Z","message":" \u0000 "},
            {"at":"2026-12-06T00:01:00Z","message":" kept "}]}"#;
        std::fs::write(&path, text).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.message, None);
        let updates: Vec<&str> = loaded.updates.iter().map(|u| u.message.as_str()).collect();
        assert_eq!(updates, ["kept"]);
        // Showing nothing, as no change can leave it: the reason is none, the message goes.
        let text = r#"{"version":1,"message":"\u200b","planned":{"since":"2026-12-06T00:00:00Z",
            "by":"ops","reason":" \u202e "},"updates":[
            {"at":"2026-12-06T00:00:00Z","message":"\ufeff\u2060"},
            {"at":"2026-12-06T00:01:00Z","message":"\u200bkept"}]}"#;
        std::fs::write(&path, text).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.message, None);
        assert_eq!(loaded.planned.map(|p| p.reason), Some(None));
        let updates: Vec<&str> = loaded.updates.iter().map(|u| u.message.as_str()).collect();
        assert_eq!(updates, ["\u{200b}kept"]);
    }

    /// A file edited by hand holds no window `schedule add` could not leave: one that ends
    /// before it starts is dropped, two with one id are told apart (so that `schedule remove`
    /// takes one), and they are read in order of their start.
    #[test]
    fn windows_edited_by_hand_are_held_to_what_schedule_add_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let text = r#"{"version":1,"next_window_id":2,"schedules":[
            {"id":3,"start":"2026-01-02T00:00:00Z","end":"2026-01-02T01:00:00Z","by":"ops"},
            {"id":3,"start":"2026-01-01T00:00:00Z","end":"2026-01-01T01:00:00Z","by":"ops"},
            {"id":4,"start":"2026-01-03T01:00:00Z","end":"2026-01-03T00:00:00Z","by":"ops"}]}"#;
        std::fs::write(&path, text).unwrap();
        let loaded = load(&path).unwrap();
        let windows: Vec<(u64, String)> = loaded
            .schedules
            .iter()
            .map(|w| (w.id, w.start.rfc3339()))
            .collect();
        assert_eq!(
            windows,
            [
                (3, "2026-01-01T00:00:00Z".to_owned()),
                (4, "2026-01-02T00:00:00Z".to_owned())
            ]
        );
        assert_eq!(loaded.next_window_id, 5);
        // With no id left past the last, a duplicate goes, as `schedule add` refuses one then.
        let max = u64::MAX;
        let text = format!(
            r#"{{"version":1,"schedules":[
            {{"id":{max},"start":"2026-01-01T00:00:00Z","end":"2026-01-01T01:00:00Z","by":"ops"}},
            {{"id":{max},"start":"2026-01-02T00:00:00Z","end":"2026-01-02T01:00:00Z","by":"ops"}}]}}"#
        );
        std::fs::write(&path, text).unwrap();
        let full = load(&path).unwrap();
        let ids: Vec<u64> = full.schedules.iter().map(|w| w.id).collect();
        assert_eq!(ids, [max]);
        // What a change leaves is read as it is.
        let mut again = loaded.clone();
        assert!(mend_windows(&mut again).is_empty());
        assert_eq!(again, loaded);
    }

    /// A window by "ops", not yet started, as a hand-edited file may hold it.
    fn window(
        id: u64,
        start: Timestamp,
        end: Timestamp,
        message: Option<&str>,
    ) -> super::super::mode::Window {
        super::super::mode::Window {
            id,
            start,
            end,
            message: message.map(str::to_owned),
            by: "ops".into(),
            started: false,
        }
    }

    /// An end edited by hand past the 366 days `on --until` and `schedule add` take is held
    /// there, said with the field; a window that starts past them goes, said with its times.
    /// They were read as written: a `Retry-After` and a "back by" years ahead.
    #[test]
    fn ends_edited_by_hand_are_held_to_the_protocols_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let now = crate::time::floor_second(std::time::SystemTime::now());
        let day = |d: u64| Timestamp(now + std::time::Duration::from_secs(86_400 * d));
        let bound = Timestamp(now + MAX_AHEAD);
        let state = Persisted {
            planned: Some(super::super::mode::Planned {
                since: Timestamp(crate::time::floor_second(now)),
                until: Some(day(3650)),
                retry_after: None,
                by: "ops".into(),
                reason: None,
            }),
            schedules: vec![
                window(1, day(10), day(11), None),
                window(2, day(300), day(3000), None),
                window(3, day(400), day(401), None),
            ],
            next_window_id: 4,
            ..Persisted::default()
        };
        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
        let said = inspect(&path).unwrap();
        assert_eq!(said.len(), 3, "{said:?}");
        assert!(
            said[0].contains("state.json: planned.until is ") && said[0].contains("366 days"),
            "{said:?}"
        );
        assert!(
            said[1].contains("window 2 (") && said[1].contains("ends more than the 366 days"),
            "{said:?}"
        );
        assert!(
            said[2].contains("window 3 (") && said[2].contains("dropped"),
            "{said:?}"
        );
        assert!(load(&path).is_ok());
        // Held to the bound from the clock as it reads the file.
        let mut loaded = state.clone();
        assert_eq!(mend(&mut loaded, now).len(), 3);
        assert_eq!(loaded.planned.as_ref().unwrap().until, Some(bound));
        let windows: Vec<_> = loaded.schedules.iter().map(|w| (w.id, w.end)).collect();
        assert_eq!(windows, [(1, day(11)), (2, bound)]);
        // What a change can leave is read as it is: the bound itself too.
        let mut again = loaded.clone();
        assert!(mend(&mut again, now).is_empty());
        assert_eq!(again, loaded);
    }

    /// Overlapping windows edited by hand are held apart as `schedule add` keeps them, with
    /// the maintenance the file asks for kept whole: one that starts within another starts at
    /// its end, one wholly within another goes; each said with its times. They were read as
    /// they were: the second's start told at the first's end, with a `since` of its own.
    #[test]
    fn overlapping_windows_edited_by_hand_are_held_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        // Whole seconds, as `schedule add` keeps them.
        let now = crate::time::floor_second(std::time::SystemTime::now());
        let hour = |h: u64| Timestamp(now + std::time::Duration::from_secs(3600 * h));
        let state = Persisted {
            schedules: vec![
                window(1, hour(10), hour(13), Some("one")),
                window(2, hour(12), hour(15), Some("two")),
                window(3, hour(11), hour(12), Some("three")),
                window(4, hour(15), hour(16), None),
                window(5, hour(14), hour(20), None),
            ],
            next_window_id: 6,
            ..Persisted::default()
        };
        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
        let said = inspect(&path).unwrap();
        assert_eq!(said.len(), 4, "{said:?}");
        assert!(
            said[0].contains("window 3 (")
                && said[0].contains("overlaps window 1")
                && said[0].contains("dropped and its message (5 characters) is not shown"),
            "{said:?}"
        );
        assert!(
            said[1].contains("window 2 (")
                && said[1].contains(&format!("starts at {} now", hour(13).rfc3339())),
            "{said:?}"
        );
        assert!(
            said[2].contains("window 5 (") && said[2].contains("overlaps window 2"),
            "{said:?}"
        );
        // Window 5, from 14, is moved to 15 before window 4 is seen: 4 lies within it then.
        assert!(
            said[3].contains("window 4 (")
                && said[3].contains("overlaps window 5")
                && said[3].ends_with("so it is dropped"),
            "{said:?}"
        );
        let loaded = load(&path).unwrap();
        let windows: Vec<_> = loaded
            .schedules
            .iter()
            .map(|w| (w.id, w.start, w.end, w.message.as_deref()))
            .collect();
        // Maintenance from 10 to 20 as the file said, in windows put end to end.
        assert_eq!(
            windows,
            [
                (1, hour(10), hour(13), Some("one")),
                (2, hour(13), hour(15), Some("two")),
                (5, hour(15), hour(20), None),
            ]
        );
        let mut again = loaded.clone();
        assert!(mend(&mut again, now).is_empty());
        // Each is what `schedule add` leaves: none of them overlaps the others.
        for w in &loaded.schedules {
            let mut without = loaded.clone();
            without.schedules.retain(|x| x.id != w.id);
            let added = without.apply(
                super::super::mode::Change::ScheduleAdd {
                    start: w.start.0,
                    end: w.end.0,
                    message: None,
                    by: "ops".into(),
                },
                now,
                true,
            );
            assert!(added.is_ok(), "{}: {added:?}", w.id);
        }
    }

    /// A time written with second 60 by hand is read as the next minute's start, and named,
    /// where humantime read it as second 59 without a word: a window ending at `12:00:60` left
    /// a second's gap before one from `12:01:00`.
    #[test]
    fn a_second_60_edited_by_hand_is_read_as_the_next_minute_and_said() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let text = r#"{"version":1,"planned":{"since":"2026-06-30T23:59:60Z","by":"ops"},
            "schedules":[{"id":1,"start":"2026-01-01T12:00:00Z","end":"2026-01-01T13:00:60+01:00","by":"ops"}]}"#;
        std::fs::write(&path, text).unwrap();
        let said = inspect(&path).unwrap();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].contains(r#"planned.since "2026-06-30T23:59:60Z""#)
                && said[0].contains(r#"schedules[0].end "2026-01-01T13:00:60+01:00""#)
                && said[0].contains("leap second"),
            "{said:?}"
        );
        let loaded = load(&path).unwrap();
        assert_eq!(
            loaded.planned.unwrap().since.rfc3339(),
            "2026-07-01T00:00:00Z"
        );
        assert_eq!(loaded.schedules[0].end.rfc3339(), "2026-01-01T12:01:00Z");
    }

    /// A file edited by hand is held to the control protocol's bounds, as `schedule add` and
    /// `on --retry-after` hold a change, and `check` says so before the start does: 10,000
    /// windows were read as they were, and a `retry_after` of 0 was shown by `status`.
    #[test]
    fn numbers_edited_by_hand_are_held_to_the_protocols_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let now = std::time::SystemTime::now();
        let hour = |i: u64| crate::time::Timestamp(now + std::time::Duration::from_secs(3600 * i));
        let mut state = Persisted::default();
        // One window ended while the proxy was down, which the bound does not count.
        let ago = |s: u64| crate::time::Timestamp(now - std::time::Duration::from_secs(s));
        for i in 0..MAX_WINDOWS as u64 + 3 {
            let (start, end) = match i {
                0 => (ago(60), ago(30)),
                i => (hour(2 * i), hour(2 * i + 1)),
            };
            state.schedules.push(super::super::mode::Window {
                id: i + 1,
                start,
                end,
                message: None,
                by: "ops".into(),
                started: false,
            });
        }
        state.next_window_id = state.schedules.len() as u64 + 1;
        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
        let said = inspect(&path).unwrap();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].contains("state.json")
                && said[0].contains("schedules lists 502 windows to come")
                && said[0].contains("500")
                && said[0].contains("the 2 that start last"),
            "{said:?}"
        );
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.schedules.len(), MAX_WINDOWS + 1);
        assert_eq!(loaded.schedules.last().unwrap().id, MAX_WINDOWS as u64 + 1);
        // Exactly the bound is read as it is.
        let mut again = loaded.clone();
        assert!(mend(&mut again, now).is_empty());

        for (given, held) in [(0, 1), (86_401, 86_400), (u64::MAX, 86_400)] {
            let text = format!(
                r#"{{"version":1,"planned":{{"since":"2026-12-06T00:00:00Z","by":"ops","retry_after":{given}}}}}"#
            );
            std::fs::write(&path, text).unwrap();
            let said = inspect(&path).unwrap();
            assert!(
                said.len() == 1
                    && said[0].contains(&format!("planned.retry_after is {given}"))
                    && said[0].contains("1 to 86400 seconds"),
                "{given}: {said:?}"
            );
            let loaded = load(&path).unwrap();
            assert_eq!(loaded.planned.unwrap().retry_after, Some(held), "{given}");
        }
        for fine in [1, 86_400] {
            let text = format!(
                r#"{{"version":1,"planned":{{"since":"2026-12-06T00:00:00Z","by":"ops","retry_after":{fine}}}}}"#
            );
            std::fs::write(&path, text).unwrap();
            assert_eq!(inspect(&path).unwrap(), Vec::<String>::new(), "{fine}");
        }
        // `check` tells of the texts the start cuts too.
        let long = "x".repeat(MAX_MESSAGE_CHARS + 1);
        std::fs::write(&path, format!(r#"{{"version":1,"message":"{long}"}}"#)).unwrap();
        let said = inspect(&path).unwrap();
        assert!(
            said.len() == 1 && said[0].contains("cut at 2000"),
            "{said:?}"
        );
    }

    /// A new state file is readable by its owner alone (it holds the internal reasons); a
    /// mode given to the file in place is kept across saves.
    #[test]
    fn a_new_state_file_is_private_and_a_given_mode_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        save(&path, &Persisted::default()).unwrap();
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        save(&path, &Persisted::default()).unwrap();
        assert_eq!(mode(&path), 0o640);
    }

    /// A symlink in the temporary file's place is replaced, never written through onto its
    /// target; a folder there is named in the error, not the state file.
    #[test]
    fn what_stands_in_the_temporary_files_place_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let tmp = dir.path().join(".state.json.tmp");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        save(&path, &Persisted::default()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        assert_eq!(load(&path).unwrap(), Persisted::default());
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        std::fs::create_dir(&tmp).unwrap();
        let e = save(&path, &Persisted::default()).unwrap_err().to_string();
        assert!(e.contains(".state.json.tmp"), "{e}");
    }

    /// A state file that is a symlink (to a volume that outlives the container, say) is saved
    /// through it: the link stays, and the file it names holds the new state.
    #[test]
    fn a_symlinked_state_file_is_saved_through_its_link() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        let real = volume.join("state.json");
        let link = dir.path().join("state.json");
        std::os::unix::fs::symlink("volume/state.json", &link).unwrap();
        let on = Persisted {
            force_open: true,
            ..Persisted::default()
        };
        // Named by the link before the file exists, and after.
        for _ in 0..2 {
            save(&link, &on).unwrap();
            assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
            assert_eq!(load(&real).unwrap(), on);
        }
        probe(&link).unwrap();
    }

    #[test]
    fn a_state_file_is_held_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let held = lock(&path).unwrap();
        let e = lock(&path).unwrap_err().to_string();
        assert!(e.contains("in use by another intermission"), "{e}");
        drop(held);
        assert!(lock(&path).is_ok(), "let go when the holder closes it");
    }

    /// A lock file removed with its folder is taken again once the folder is back, unless
    /// another instance took it meanwhile; still held, or let go, nothing is done.
    #[test]
    fn a_removed_lock_is_taken_again_unless_another_took_it() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("state");
        std::fs::create_dir(&folder).unwrap();
        let path = folder.join("state.json");
        let held = StateLock::take(&path).unwrap();
        assert!(!held.renew().unwrap(), "still held: nothing to do");
        std::fs::remove_dir_all(&folder).unwrap();
        assert!(!held.renew().unwrap(), "its folder gone: the save says so");
        std::fs::create_dir(&folder).unwrap();
        let other = lock(&path).expect("nothing held the new lock file");
        let e = held.renew().unwrap_err();
        assert!(matches!(e, StoreError::InUse { .. }), "{e}");
        assert!(e.advice().contains("Stop the other intermission"));
        drop(other);
        assert!(held.renew().unwrap(), "taken again");
        assert!(!held.renew().unwrap());
        assert!(lock(&path).is_err(), "held again");
        held.release();
        assert!(!held.renew().unwrap(), "let go: not taken again");
        assert!(lock(&path).is_ok(), "let go");
    }

    /// Two links, in folders of their own, that name one state file are one state file: the
    /// second proxy is refused, as it is when both name the file itself.
    #[test]
    fn links_to_one_state_file_are_held_as_that_file() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        let real = volume.join("state.json");
        let mut links = Vec::new();
        for name in ["blue", "green"] {
            let folder = dir.path().join(name);
            std::fs::create_dir(&folder).unwrap();
            let link = folder.join("state.json");
            std::os::unix::fs::symlink(&real, &link).unwrap();
            links.push(link);
        }
        let held = lock(&links[0]).unwrap();
        let e = lock(&links[1]).unwrap_err().to_string();
        assert!(e.contains("in use by another intermission"), "{e}");
        let e = lock(&real).unwrap_err().to_string();
        assert!(e.contains("in use by another intermission"), "{e}");
        drop(held);
        assert!(lock(&links[1]).is_ok(), "let go when the holder closes it");
    }

    /// An older version's file has no outage start: read as no outage, which a start then
    /// tells as it did before there was one. An older version reading this one's ignores it.
    #[test]
    fn the_outage_start_is_kept_and_an_older_file_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, r#"{"version": 1, "force_open": false}"#).unwrap();
        assert_eq!(load(&path).unwrap().outage_since, None);
        let since = crate::time::Timestamp(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000),
        );
        let s = Persisted {
            outage_since: Some(since),
            ..Persisted::default()
        };
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap().outage_since, Some(since));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(r#""outage_since": "2030-03-17T17:46:40Z""#),
            "{text}"
        );
    }

    #[test]
    fn missing_file_is_the_default_state() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load(&dir.path().join("none.json")).unwrap(),
            Persisted::default()
        );
    }

    #[test]
    fn saved_state_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let s = Persisted {
            force_open: true,
            message: Some("x".into()),
            ..Persisted::default()
        };
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), s);
        assert!(!dir.path().join(".state.json.tmp").exists());
    }

    /// A rollback reads a newer version's file, and keeps it whole beside it before its
    /// own first save drops what it does not know; its saves say its own format.
    #[test]
    fn a_newer_versions_file_loads_and_is_kept_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let newer = r#"{"version": 7, "force_open": true, "new_thing": [1, 2]}"#;
        std::fs::write(&path, newer).unwrap();
        let state = load(&path).unwrap();
        assert!(state.force_open);
        assert_eq!(state.version, STATE_VERSION);
        let copy = dir.path().join("state.json.v7");
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), newer);
        save(&path, &state).unwrap();
        assert_eq!(
            std::fs::read_to_string(&copy).unwrap(),
            newer,
            "the copy stays"
        );
        assert_eq!(load(&path).unwrap(), state);
        // The current format keeps no copy.
        std::fs::remove_file(&copy).unwrap();
        load(&path).unwrap();
        assert!(!copy.exists());
    }

    /// The copy a rollback keeps of a newer version's file is as private as the file: it
    /// holds the same internal reasons.
    #[test]
    fn the_copy_of_a_newer_versions_file_is_as_private_as_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        std::fs::write(&path, r#"{"version": 7, "new_thing": "internal"}"#).unwrap();
        let copy = dir.path().join("state.json.v7");
        // Made new (the umask would leave it 0644), and over a copy kept before.
        for (given, before) in [(0o600, None), (0o600, Some(0o644)), (0o640, Some(0o600))] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(given)).unwrap();
            let _ = std::fs::remove_file(&copy);
            if let Some(before) = before {
                std::fs::write(&copy, "old").unwrap();
                std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(before)).unwrap();
            }
            load(&path).unwrap();
            assert_eq!(mode(&copy), given, "the copy of a {given:o} file");
        }
    }

    /// A FIFO in the state file's place is refused at once, where reading it waited for a
    /// writer for ever.
    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success(), "mkfifo failed");
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("state.json") && e.contains("FIFO"), "{e}");
    }

    /// The advice that goes with a file that cannot be read fits its cause: permissions only
    /// when they are the cause.
    #[test]
    fn what_cannot_be_read_is_told_with_the_advice_of_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::os::unix::fs::symlink("state.json", &path).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("symbolic links"), "{e}");
        assert!(!e.contains("permissions"), "{e}");
        let denied = StoreError::Read {
            path: path.clone(),
            source: std::io::ErrorKind::PermissionDenied.into(),
        };
        assert!(
            denied.to_string().contains("fix its permissions"),
            "{denied}"
        );
    }

    /// A save that failed is told what to do by its cause: a folder that is gone is not a
    /// full disk.
    #[test]
    fn a_failed_save_is_advised_by_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone").join("state.json");
        let e = save(&gone, &Persisted::default()).unwrap_err();
        assert!(e.advice().contains("make it again"), "{e}: {}", e.advice());
        let full = StoreError::Write {
            path: gone.clone(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(full.advice(), "Make room on that file system");
    }

    /// `check`'s look at the file writes nothing: a newer version's file is copied aside by
    /// the start only.
    #[test]
    fn inspect_reads_as_load_does_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        inspect(&path).unwrap();
        std::fs::write(&path, r#"{"version": 7}"#).unwrap();
        inspect(&path).unwrap();
        assert!(!dir.path().join("state.json.v7").exists());
        std::fs::write(&path, "{not json").unwrap();
        assert!(inspect(&path).unwrap_err().to_string().contains("corrupt"));
    }

    /// A state is one JSON object: an array, which serde reads as a struct of defaults, was
    /// read as no maintenance at all.
    #[test]
    fn a_file_that_is_no_json_object_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for text in ["[]", r#"[1, null, "held"]"#] {
            std::fs::write(&path, text).unwrap();
            let e = load(&path).unwrap_err().to_string();
            assert!(
                e.contains("corrupt") && e.contains("not a JSON object"),
                "{text}: {e}"
            );
            assert!(inspect(&path).is_err(), "{text}");
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                text,
                "never replaced"
            );
        }
        std::fs::write(&path, "{}").unwrap();
        assert_eq!(load(&path).unwrap(), Persisted::default());
    }

    /// A field this version does not know is said, with where it is: a typo in a file edited
    /// by hand (`"planed"`) was read as no maintenance without a word. Every field this
    /// version writes is known (so that this list keeps up with the state's).
    #[test]
    fn fields_this_version_does_not_know_are_said() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let at = crate::time::Timestamp(std::time::UNIX_EPOCH);
        let full = Persisted {
            planned: Some(super::super::mode::Planned {
                since: at,
                until: Some(at),
                retry_after: Some(60),
                by: "ops".into(),
                reason: Some("why".into()),
            }),
            message: Some("m".into()),
            updates: vec![super::super::mode::Update {
                at,
                message: "m".into(),
            }],
            force_open: true,
            schedules: vec![super::super::mode::Window {
                id: 1,
                start: at,
                end: crate::time::Timestamp(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(60),
                ),
                message: Some("w".into()),
                by: "ops".into(),
                started: true,
            }],
            next_window_id: 2,
            outage_since: Some(at),
            continues: Some(super::super::mode::Continues {
                window: 1,
                since: at,
            }),
            outage_told_from: Some(super::super::mode::Mode::Maintenance),
            ..Persisted::default()
        };
        save(&path, &full).unwrap();
        assert_eq!(inspect(&path).unwrap(), Vec::<String>::new());
        assert_eq!(load(&path).unwrap(), full);
        let text = r#"{"version":1,"planed":{"since":"2026-12-06T00:00:00Z","by":"ops"},
            "planned":{"since":"2026-12-06T00:00:00Z","by":"ops","untill":"2026-12-07T00:00:00Z"},
            "schedules":[{"id":1,"start":"2026-01-01T00:00:00Z","end":"2026-01-01T01:00:00Z","by":"ops","mesage":"x"}]}"#;
        std::fs::write(&path, text).unwrap();
        let said = inspect(&path).unwrap();
        assert_eq!(said.len(), 1, "{said:?}");
        for field in [
            r#""planed""#,
            r#"planned."untill""#,
            r#"schedules[0]."mesage""#,
        ] {
            assert!(said[0].contains(field), "{field}: {said:?}");
        }
        assert!(load(&path).unwrap().planned.is_some());
        // Many are named up to a bound, and counted past it.
        let many: Vec<String> = (0..25).map(|i| format!(r#""typo{i:02}":1"#)).collect();
        std::fs::write(&path, format!("{{{}}}", many.join(","))).unwrap();
        let said = inspect(&path).unwrap();
        assert!(
            said[0].contains(r#""typo09""#) && !said[0].contains(r#""typo10""#),
            "{said:?}"
        );
        assert!(said[0].contains("and 15 more"), "{said:?}");
        // A newer format says what it drops already, with its copy.
        std::fs::write(&path, r#"{"version":7,"new_thing":1}"#).unwrap();
        assert_eq!(inspect(&path).unwrap(), Vec::<String>::new());
    }

    /// A file saved by a Windows editor begins with a UTF-8 byte order mark: read past it, as
    /// JSON allows, where it was refused as corrupt at line 1, column 1.
    #[test]
    fn a_byte_order_mark_is_read_past() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let text = "\u{feff}{\"version\": 1, \"force_open\": true}\r\n";
        std::fs::write(&path, text).unwrap();
        assert_eq!(inspect(&path).unwrap(), Vec::<String>::new());
        assert!(load(&path).unwrap().force_open);
        // Only at the start: one inside is no JSON.
        std::fs::write(&path, "{\"version\": 1}\u{feff}").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("corrupt"));
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{not json").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("state.json") && e.contains("corrupt"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{not json",
            "never replaced"
        );
    }
}
