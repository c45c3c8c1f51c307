//! Config errors that say which key is wrong and how to fix it.

use std::fmt;
use std::path::PathBuf;

/// One problem in a config, tied to the key that has it (`proxy.listen[1]`, or a section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Nothing but white space: a file caught while an editor or a deploy rewrote it in
    /// place, or emptied by mistake. Read as "every key left out", it moved a running proxy
    /// to the built-in defaults (127.0.0.1:8080, an application on 127.0.0.1:3000) at a
    /// reload; a file meant to hold the defaults says so with a comment.
    #[error("{} is empty: nothing was read from it (a file caught while it was being written, or emptied by mistake); write the settings, or a comment for the built-in defaults", path.display())]
    Empty { path: PathBuf },
    #[error("{} is not valid ({} problem{}):\n{}", origin, problems.len(),
        if problems.len() == 1 { "" } else { "s" }, list(problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

/// One item a problem, however many lines it takes: a line after its first is indented
/// under it, never read as an item of its own.
fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {}", p.to_string().replace('\n', "\n    ")))
        .collect::<Vec<_>>()
        .join("\n")
}
