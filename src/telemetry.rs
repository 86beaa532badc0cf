//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as text or
//! as one JSON object per line.
//!
//! `RUST_LOG` takes a level (`warn`) and per-module levels (`info,pv_bridge::engine=debug`).
//! The filter is tracing-subscriber's `Targets`, not `EnvFilter`: the latter's span and
//! field matching pulls in the regex engine and its Unicode tables, hundreds of KB
//! in a binary that must stay small (ADR 0007).

use std::io::{IsTerminal, Write};
use std::str::FromStr;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Output format of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format must be text or json, got {other:?}")),
        }
    }
}

fn default_filter() -> Targets {
    Targets::new().with_default(tracing::Level::INFO)
}

/// Parses `RUST_LOG`: `level` or `target=level`, comma-separated; `off` silences.
pub fn parse_filter(spec: &str) -> Result<Targets, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(default_filter());
    }
    spec.parse::<Targets>().map_err(|e| e.to_string())
}

/// Installs the global subscriber. A malformed `RUST_LOG` falls back to `info`
/// and says so.
pub fn init(format: LogFormat) {
    let (filter, bad) = match std::env::var("RUST_LOG") {
        Ok(spec) => match parse_filter(&spec) {
            Ok(f) => (f, None),
            Err(e) => (
                default_filter(),
                Some(format!("ignoring RUST_LOG={spec:?}: {e}")),
            ),
        },
        Err(_) => (default_filter(), None),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(|| QuietStderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
    };
    if let Some(msg) = bad {
        tracing::warn!("{msg}");
    }
}

/// Standard error that never fails: a daemon whose log reader went away (closed
/// pipe, full disk) keeps running instead of panicking.
struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use tracing_subscriber::filter::LevelFilter;

    #[test]
    fn rust_log_takes_levels_and_per_module_levels() {
        let f = parse_filter("warn").unwrap();
        assert!(f.would_enable("pv_bridge::engine", &Level::WARN));
        assert!(!f.would_enable("pv_bridge::engine", &Level::INFO));
        let f = parse_filter("info,pv_bridge::engine=debug").unwrap();
        assert!(f.would_enable("pv_bridge::engine::update", &Level::DEBUG));
        assert!(!f.would_enable("pv_bridge::pvctrl", &Level::DEBUG));
        assert!(f.would_enable("pv_bridge::pvctrl", &Level::INFO));
        let f = parse_filter("").unwrap();
        assert_eq!(f.default_level(), Some(LevelFilter::INFO));
        let f = parse_filter("off").unwrap();
        assert!(!f.would_enable("pv_bridge", &Level::ERROR));
        assert!(parse_filter("pv_bridge=loud").is_err());
    }
}
