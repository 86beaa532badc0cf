//! The `pv-bridge` command line, parsed by hand: four commands and two options do
//! not justify an argument-parsing library in the device binary (about 190 KB of
//! it; docs/performance.md).

use std::ffi::OsString;
use std::path::PathBuf;

use crate::telemetry::LogFormat;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    /// `run [--config FILE]`
    Run { config: Option<PathBuf> },
    /// `check-config [FILE]`
    CheckConfig { file: Option<PathBuf> },
    /// `demo`
    Demo,
    /// `--help` (or `help`): print [`USAGE`].
    Help,
    /// `--version`
    Version,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    pub log_format: LogFormat,
    pub command: Cmd,
}

pub const USAGE: &str = "\
Bridge between Pantavisor's pv-ctrl and cloud backends

Usage: pv-bridge [--log-format text|json] <COMMAND>

Commands:
  run [--config FILE]   Run the bridge daemon
  check-config [FILE]   Validate a configuration file: exit 0 with a summary, or 2 with file:line
  demo                  Zero-setup tour against a simulated device; needs nothing external
  help                  Print this help

Options:
  -c, --config FILE     Configuration file [default: $PV_BRIDGE_CONFIG or /etc/pv-bridge/config.toml]
      --log-format F    text or json [env: PV_BRIDGE_LOG_FORMAT; default: text]; level from RUST_LOG
  -h, --help            Print help
  -V, --version         Print version

As PID 1 (the container's init), or with PV_BRIDGE_SUPERVISE=1, `run` supervises the
bridge: it restarts it when it dies by a signal and passes SIGTERM on.
";

/// Parses the arguments after the program name. `env_format` is the value of
/// `PV_BRIDGE_LOG_FORMAT`, if set. Errors are one line, without the usage.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    env_format: Option<&str>,
) -> Result<Cli, String> {
    let mut log_format = match env_format {
        Some(v) => v
            .parse()
            .map_err(|e| format!("PV_BRIDGE_LOG_FORMAT: {e}"))?,
        None => LogFormat::default(),
    };
    let mut command: Option<String> = None;
    let mut config: Option<PathBuf> = None;
    let mut positional: Vec<PathBuf> = Vec::new();
    let mut help = false;
    let mut version = false;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let text = arg
            .to_str()
            .ok_or_else(|| format!("argument {arg:?} is not UTF-8"))?
            .to_owned();
        let (name, inline) = match text.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (text.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .ok_or_else(|| format!("{what} needs a value")),
            }
        };
        match name.as_str() {
            "-h" | "--help" => help = true,
            "-V" | "--version" => version = true,
            "--log-format" => log_format = value("--log-format")?.parse()?,
            "-c" | "--config" => config = Some(PathBuf::from(value("--config")?)),
            s if s.starts_with('-') && s != "-" => {
                return Err(format!("unexpected argument '{s}'"));
            }
            _ if command.is_none() => command = Some(text),
            _ => positional.push(PathBuf::from(text)),
        }
    }
    if help || command.as_deref() == Some("help") {
        return Ok(Cli {
            log_format,
            command: Cmd::Help,
        });
    }
    if version {
        return Ok(Cli {
            log_format,
            command: Cmd::Version,
        });
    }
    let command = match command.as_deref() {
        None => return Err("a command is required: run, check-config or demo".into()),
        Some("run") => {
            if let Some(p) = positional.first() {
                return Err(format!(
                    "unexpected argument '{}' (use --config FILE)",
                    p.display()
                ));
            }
            Cmd::Run { config }
        }
        Some("check-config") => {
            if positional.len() > 1 {
                return Err("check-config takes one file".into());
            }
            let file = positional.into_iter().next().or(config);
            Cmd::CheckConfig { file }
        }
        Some("demo") => {
            if config.is_some() || !positional.is_empty() {
                return Err("demo takes no arguments".into());
            }
            Cmd::Demo
        }
        Some(other) => {
            return Err(format!(
                "unknown command '{other}' (run, check-config, demo)"
            ));
        }
    };
    Ok(Cli {
        log_format,
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Cli, String> {
        parse(args.iter().map(OsString::from), None)
    }

    #[test]
    fn the_fixed_command_names_parse() {
        assert_eq!(
            p(&["run", "--config", "/etc/x.toml"]).unwrap().command,
            Cmd::Run {
                config: Some("/etc/x.toml".into())
            }
        );
        assert_eq!(
            p(&["run", "-c", "a.toml"]).unwrap().command,
            Cmd::Run {
                config: Some("a.toml".into())
            }
        );
        assert_eq!(
            p(&["--log-format=json", "run"]).unwrap(),
            Cli {
                log_format: LogFormat::Json,
                command: Cmd::Run { config: None }
            }
        );
        assert_eq!(
            p(&["check-config", "c.toml"]).unwrap().command,
            Cmd::CheckConfig {
                file: Some("c.toml".into())
            }
        );
        assert_eq!(p(&["demo"]).unwrap().command, Cmd::Demo);
        assert_eq!(p(&["--version"]).unwrap().command, Cmd::Version);
        assert_eq!(p(&["run", "--help"]).unwrap().command, Cmd::Help);
        assert_eq!(p(&["help"]).unwrap().command, Cmd::Help);
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(
            p(&[]).unwrap_err(),
            "a command is required: run, check-config or demo"
        );
        assert_eq!(
            p(&["start"]).unwrap_err(),
            "unknown command 'start' (run, check-config, demo)"
        );
        assert_eq!(
            p(&["run", "--bogus"]).unwrap_err(),
            "unexpected argument '--bogus'"
        );
        assert_eq!(
            p(&["run", "--config"]).unwrap_err(),
            "--config needs a value"
        );
        assert_eq!(
            p(&["--log-format", "xml", "run"]).unwrap_err(),
            "log format must be text or json, got \"xml\""
        );
        assert!(
            parse([OsString::from("run")], Some("yaml"))
                .unwrap_err()
                .starts_with("PV_BRIDGE_LOG_FORMAT: ")
        );
    }
}
