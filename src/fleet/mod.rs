//! pv-fleet, the operator tool: the operator's side of pv-bridge's MQTT protocol v1
//! (docs/mqtt-protocol.md). Deploy a `pvr export` to devices and watch it land,
//! see the fleet, edit user-meta, run commands, follow logs.
//!
//! Exit codes: 0 success, 1 a device reported failure (or a rollout halted),
//! 2 usage or connection error, 3 timeout, 4 stopped by the operator.

pub mod conn;
pub mod deploy;
pub mod export;
pub mod ops;
pub mod render;
pub mod rollout;
pub mod select;
pub mod serve;
pub mod status;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pv-fleet",
    version,
    about = "Operate pv-bridge devices over MQTT"
)]
struct Cli {
    #[command(flatten)]
    broker: conn::BrokerArgs,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Offer a pvr export to devices and follow each to its final status.
    Deploy(Box<deploy::DeployArgs>),
    /// The fleet from its retained messages: counts per state, revision and
    /// last update, the failed and offline devices, a row each for a few.
    Status(status::StatusArgs),
    /// Desired user-meta of a device.
    Meta {
        #[command(subcommand)]
        op: MetaOp,
    },
    /// Run a command on a device and wait for its answer.
    Cmd {
        device: String,
        /// reboot, poweroff, gc, ssh, resync, cancel, ping
        name: String,
        /// Arguments as key=value (JSON values allowed: enable=true).
        #[arg(long = "arg", value_parser = ops::kv)]
        args: Vec<(String, serde_json::Value)>,
        /// Seconds to wait for the final answer.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Refuse to run if delivered later than this many seconds from now.
        #[arg(long)]
        expires_in: Option<u64>,
    },
    /// Follow a device's forwarded logs.
    Logs {
        device: String,
        #[arg(long)]
        platform: Option<String>,
        /// Show this level and more severe ones (FATAL, ERROR, WARN, INFO, DEBUG).
        #[arg(long)]
        level: Option<String>,
        /// Stop after this many lines.
        #[arg(long, short = 'n')]
        count: Option<u64>,
    },
}

#[derive(Subcommand)]
enum MetaOp {
    /// Set keys (key=value; JSON values allowed) and wait until applied.
    Set {
        device: String,
        #[arg(required = true, value_parser = ops::kv)]
        pairs: Vec<(String, serde_json::Value)>,
    },
    /// Remove keys and wait until applied.
    Unset {
        device: String,
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Show the desired and the applied user-meta.
    Get { device: String },
}

/// Runs pv-fleet with the process's arguments; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pv-fleet: cannot start: {e}");
            return 2;
        }
    };
    let b = &cli.broker;
    let result = rt.block_on(async move {
        match cli.cmd {
            Command::Deploy(a) => deploy::run(b, *a).await,
            Command::Status(a) => status::run(b, &a).await,
            Command::Meta { op } => match op {
                MetaOp::Set { device, pairs } => ops::meta(b, &device, &pairs, &[]).await,
                MetaOp::Unset { device, keys } => ops::meta(b, &device, &[], &keys).await,
                MetaOp::Get { device } => ops::meta(b, &device, &[], &[]).await,
            },
            Command::Cmd {
                device,
                name,
                args,
                timeout,
                expires_in,
            } => ops::cmd(b, &device, &name, &args, timeout, expires_in).await,
            Command::Logs {
                device,
                platform,
                level,
                count,
            } => ops::logs(b, &device, platform.as_deref(), level.as_deref(), count).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pv-fleet: {e}");
            2
        }
    }
}
