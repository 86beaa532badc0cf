//! `pv-sim`: a simulated Pantavisor device serving pv-ctrl on a Unix socket.
//! See docs/pv-sim.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pv_testkit::sim::{Generation, PowerState, Sim, SimConfig};

#[derive(Parser, Debug)]
#[command(
    name = "pv-sim",
    version,
    about = "A simulated Pantavisor device serving pv-ctrl"
)]
struct Args {
    /// Device storage (objects, trails, metadata, logs); created on first start.
    #[arg(long, value_name = "DIR")]
    storage: PathBuf,
    /// The pv-ctrl socket as the mgmt container `pv-bridge` sees it.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// A second socket as the non-mgmt container `app` sees it.
    #[arg(long, value_name = "PATH")]
    nonmgmt_socket: Option<PathBuf>,
    /// Server generation: 1 = Pantavisor ≤ 023, 2 = 024 and later.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    generation: u8,
    /// Seconds in TESTING before DONE/UPDATED (PV_UPDATER_COMMIT_DELAY).
    #[arg(long, value_name = "SECS", default_value_t = 25.0)]
    commit_delay: f64,
    /// Seconds the socket is gone during a reboot.
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    reboot_secs: f64,
    /// Seconds to reach status goals before ERROR (PV_UPDATER_GOALS_TIMEOUT).
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    goals_timeout: f64,
    /// Synthetic container log lines per second.
    #[arg(long, value_name = "LINES_PER_SEC", default_value_t = 1.0)]
    log_rate: f64,
    /// Simulated storage capacity in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30)]
    capacity: u64,
    /// Keep revision 0 on garbage collection (PV_STORAGE_GC_KEEP_FACTORY=1).
    #[arg(long)]
    gc_keep_factory: bool,
    /// Imitate Pantavisor 024 (with --generation 2): a refused command gets no
    /// answer, PUT /steps creates no NEW progress, no POST /storage/gc.
    #[arg(long)]
    pv_024: bool,
    /// Rotate a log file to <file>.<n>.gz at this size (0: a 200th of --capacity,
    /// as Pantavisor's defaults do).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    log_rotate_bytes: u64,
    /// Milliseconds between ticks of Pantavisor's main loop.
    #[arg(long, value_name = "MS", default_value_t = 1000, hide = true)]
    tick_ms: u64,
}

fn secs(name: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("--{name} must be a non-negative number of seconds, got {v}"))
}

fn config(a: Args) -> Result<SimConfig, String> {
    if !(a.log_rate.is_finite() && a.log_rate >= 0.0) {
        return Err(format!(
            "--log-rate must be zero or more, got {}",
            a.log_rate
        ));
    }
    if a.pv_024 && a.generation == 1 {
        return Err("--pv-024 is a gen-2 release; it cannot go with --generation 1".into());
    }
    if a.tick_ms == 0 {
        return Err("--tick-ms must be at least 1".into());
    }
    Ok(SimConfig {
        nonmgmt_socket: a.nonmgmt_socket,
        generation: if a.generation == 1 {
            Generation::Gen1
        } else {
            Generation::Gen2
        },
        commit_delay: secs("commit-delay", a.commit_delay)?,
        reboot: secs("reboot-secs", a.reboot_secs)?,
        goals_timeout: secs("goals-timeout", a.goals_timeout)?,
        tick: Duration::from_millis(a.tick_ms),
        log_rate: a.log_rate,
        capacity: a.capacity,
        gc_keep_factory: a.gc_keep_factory,
        pv_024: a.pv_024,
        log_rotate_bytes: a.log_rotate_bytes,
        ..SimConfig::new(a.storage, a.socket)
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cfg = match config(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pv-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let gen_name = match cfg.generation {
        Generation::Gen1 => "gen-1 (Pantavisor 023)",
        Generation::Gen2 if cfg.pv_024 => "gen-2 (Pantavisor 024)",
        Generation::Gen2 => "gen-2 (Pantavisor 029)",
    };
    let sim = match Sim::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pv-sim: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    eprintln!(
        "pv-sim: serving {gen_name} pv-ctrl on {} (storage {}, running revision {})",
        sim.socket().display(),
        sim.storage().display(),
        sim.running()
    );
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pv-sim: cannot watch SIGTERM: {e}");
            return ExitCode::from(1);
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => eprintln!("pv-sim: interrupted; stopping"),
        _ = term.recv() => eprintln!("pv-sim: terminated; stopping"),
        _ = sim.wait_power(PowerState::Off) => eprintln!("pv-sim: device powered off"),
    }
    sim.stop().await;
    ExitCode::SUCCESS
}
