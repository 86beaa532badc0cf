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
    /// With --devices: the directory holding one storage per device.
    #[arg(long, value_name = "DIR")]
    storage: PathBuf,
    /// The pv-ctrl socket as the mgmt container `pv-bridge` sees it. With
    /// --devices: a directory; device <id> serves <DIR>/<id>/pv-ctrl.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Host this many devices in one process (fleet mode): ids <prefix>1 to
    /// <prefix>N, a storage and a socket each, the factory objects shared by
    /// hard link, no synthetic log lines unless --log-rate is given.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    devices: u32,
    /// The device id prefix in fleet mode.
    #[arg(long, value_name = "PREFIX", default_value = "dev-")]
    id_prefix: String,
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
    /// Synthetic container log lines per second (default 1; 0 in fleet mode).
    #[arg(long, value_name = "LINES_PER_SEC")]
    log_rate: Option<f64>,
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

/// The devices to host: `(id, config)`; one without an id outside fleet mode.
fn configs(a: Args) -> Result<Vec<(Option<String>, SimConfig)>, String> {
    let fleet = a.devices > 1;
    let log_rate = a.log_rate.unwrap_or(if fleet { 0.0 } else { 1.0 });
    if !(log_rate.is_finite() && log_rate >= 0.0) {
        return Err(format!("--log-rate must be zero or more, got {log_rate}"));
    }
    if a.pv_024 && a.generation == 1 {
        return Err("--pv-024 is a gen-2 release; it cannot go with --generation 1".into());
    }
    if a.tick_ms == 0 {
        return Err("--tick-ms must be at least 1".into());
    }
    if fleet && a.nonmgmt_socket.is_some() {
        return Err("--nonmgmt-socket serves one device; it cannot go with --devices".into());
    }
    if !a
        .id_prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "--id-prefix must be letters, digits, - _ or ., got {:?}",
            a.id_prefix
        ));
    }
    let base = SimConfig {
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
        log_rate,
        capacity: a.capacity,
        gc_keep_factory: a.gc_keep_factory,
        pv_024: a.pv_024,
        log_rotate_bytes: a.log_rotate_bytes,
        ..SimConfig::new(a.storage.clone(), a.socket.clone())
    };
    if !fleet {
        return Ok(vec![(None, base)]);
    }
    let pool = a.storage.join(".factory-objects");
    Ok((1..=a.devices)
        .map(|i| {
            let id = format!("{}{i}", a.id_prefix);
            let cfg = SimConfig {
                storage: a.storage.join(&id),
                socket: a.socket.join(&id).join("pv-ctrl"),
                object_pool: Some(pool.clone()),
                ..base.clone()
            };
            (Some(id), cfg)
        })
        .collect())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let configs = match configs(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pv-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let gen_name = match configs[0].1.generation {
        Generation::Gen1 => "gen-1 (Pantavisor 023)",
        Generation::Gen2 if configs[0].1.pv_024 => "gen-2 (Pantavisor 024)",
        Generation::Gen2 => "gen-2 (Pantavisor 029)",
    };
    let mut sims = Vec::with_capacity(configs.len());
    for (id, cfg) in configs {
        if let Some(dir) = cfg.socket.parent() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                eprintln!("pv-sim: cannot create {}: {e}", dir.display());
                return ExitCode::from(1);
            }
        }
        match Sim::start(cfg).await {
            Ok(s) => sims.push((id, s)),
            Err(e) => {
                eprintln!(
                    "pv-sim: cannot start {}: {e}",
                    id.as_deref().unwrap_or("the device")
                );
                return ExitCode::from(1);
            }
        }
    }
    match sims.as_slice() {
        [(None, sim)] => eprintln!(
            "pv-sim: serving {gen_name} pv-ctrl on {} (storage {}, running revision {})",
            sim.socket().display(),
            sim.storage().display(),
            sim.running()
        ),
        _ => eprintln!(
            "pv-sim: serving {} {gen_name} devices ({} to {}), sockets <id>/pv-ctrl",
            sims.len(),
            sims.first().and_then(|s| s.0.clone()).unwrap_or_default(),
            sims.last().and_then(|s| s.0.clone()).unwrap_or_default(),
        ),
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pv-sim: cannot watch SIGTERM: {e}");
            return ExitCode::from(1);
        }
    };
    // One device: its power-off ends the process. Many: only a signal does.
    let off = async {
        match sims.as_slice() {
            [(None, sim)] => sim.wait_power(PowerState::Off).await,
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => eprintln!("pv-sim: interrupted; stopping"),
        _ = term.recv() => eprintln!("pv-sim: terminated; stopping"),
        _ = off => eprintln!("pv-sim: device powered off"),
    }
    for (_, sim) in sims {
        sim.stop().await;
    }
    ExitCode::SUCCESS
}
