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

/// Each message is whole on its own (a refused reload sends it to `ctl` as it is), so a cause
/// it prints is not also its `source()`: a printer of the chain would say it twice.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{} is not valid ({} problem{}):\n{}", origin, problems.len(),
        if problems.len() == 1 { "" } else { "s" }, list(problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}
