//! The agent's own log lines on stderr, `qlog-agent: LEVEL: message`.
//!
//! Owns the level threshold and the line format; callers decide what is worth saying.
//! There is no global logger: a [`Log`] is a small `Copy` value handed to every thread, so
//! nothing here is process-wide state. Each line is written with one `write_all` on a
//! locked stderr, so lines from different threads never interleave.

use std::fmt;
use std::io::Write;

/// How important a line is. Error: data lost or an operator must act. Warn: recovered,
/// nothing lost. Info: lifecycle an operator wants. Debug: everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    pub fn parse(text: &str) -> Option<Level> {
        match text.trim().to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
        })
    }
}

/// Writes lines at or above a threshold to stderr. By default, the threshold is info.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Log {
    max: Level,
}

impl Default for Log {
    fn default() -> Self {
        Log { max: Level::Info }
    }
}

impl Log {
    pub fn new(max: Level) -> Log {
        Log { max }
    }

    /// True if and only if a line at `level` would be written.
    pub fn enabled(&self, level: Level) -> bool {
        level <= self.max
    }

    pub fn at(&self, level: Level, msg: impl fmt::Display) {
        if !self.enabled(level) {
            return;
        }
        let line = format!("qlog-agent: {level}: {msg}\n");
        // Nothing sensible can be done when stderr itself is gone.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    pub fn error(&self, msg: impl fmt::Display) {
        self.at(Level::Error, msg)
    }

    pub fn warn(&self, msg: impl fmt::Display) {
        self.at(Level::Warn, msg)
    }

    pub fn info(&self, msg: impl fmt::Display) {
        self.at(Level::Info, msg)
    }

    pub fn debug(&self, msg: impl fmt::Display) {
        self.at(Level::Debug, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_levels_and_filters_by_threshold() {
        assert_eq!(Level::parse("DEBUG"), Some(Level::Debug));
        assert_eq!(Level::parse("warning"), Some(Level::Warn));
        assert_eq!(Level::parse("loud"), None);
        let log = Log::new(Level::Warn);
        assert!(log.enabled(Level::Error));
        assert!(log.enabled(Level::Warn));
        assert!(!log.enabled(Level::Info));
    }
}
