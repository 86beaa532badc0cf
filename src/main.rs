//! The `pv-bridge` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use pv_bridge::config::{self, Config};
use pv_bridge::pvctrl::PvCtrl;
use pv_bridge::telemetry::{self, LogFormat};
use tracing::{error, info, warn};

use pv_bridge::cli::{self, Cmd};

fn config_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os(config::ENV_PATH).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
}

fn main() -> ExitCode {
    let env_format = std::env::var("PV_BRIDGE_LOG_FORMAT").ok();
    let cli = match cli::parse(std::env::args_os().skip(1), env_format.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Cmd::Help => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Cmd::Version => {
            println!("pv-bridge {}", pv_bridge::VERSION);
            ExitCode::SUCCESS
        }
        Cmd::CheckConfig { file } => {
            let path = config_path(file);
            match Config::load(&path) {
                Ok(c) => {
                    print!("{}: OK\n{}", path.display(), c.summary());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Run { config } => {
            if pv_bridge::supervise::wanted() {
                let code = pv_bridge::supervise::run();
                return ExitCode::from(u8::try_from(code).unwrap_or(1));
            }
            telemetry::init(cli.log_format);
            let path = config_path(config);
            let cfg = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    error!("{e}");
                    return ExitCode::from(2);
                }
            };
            runtime().block_on(run(cfg))
        }
        Cmd::Demo => demo(cli.log_format),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    // One thread is plenty for a device agent and keeps idle memory low.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime on the current thread")
}

/// The daemon: the engine, plus a note of which Pantavisor answers.
async fn run(mut cfg: Config) -> ExitCode {
    apply_overrides(&mut cfg).await;
    info!(version = pv_bridge::VERSION, socket = %cfg.pantavisor.socket.display(), backends = cfg.backends.len(), "pv-bridge starting");
    tokio::spawn(report_pvctrl(PvCtrl::new(&cfg.pantavisor.socket)));
    let opts = cfg.updates.options();
    match pv_bridge::engine::run(cfg, opts, shutdown_signal()).await {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Applies `pv-bridge.config.*` keys of the device's user-meta (read once, at
/// start; a restart of the container applies changes).
async fn apply_overrides(cfg: &mut Config) {
    let pv = PvCtrl::new(&cfg.pantavisor.socket);
    let meta = tokio::time::timeout(
        Duration::from_secs(2),
        pv.meta(pv_bridge::pvctrl::Meta::User),
    )
    .await;
    let meta = match meta {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            info!(error = %e, "no configuration overrides read from user-meta");
            return;
        }
        Err(_) => {
            info!(
                "no configuration overrides read from user-meta (pv-ctrl did not answer within 2 s)"
            );
            return;
        }
    };
    let (applied, refused) = cfg.apply_user_meta(&meta);
    for a in applied {
        info!(setting = %a, "configuration override from user-meta applied");
    }
    for r in refused {
        warn!(reason = %r, "configuration override from user-meta refused");
    }
}

/// Logs once which pv-ctrl answers, retrying with backoff while it is absent.
async fn report_pvctrl(pv: PvCtrl) {
    let mut wait = Duration::from_millis(500);
    loop {
        match pv.probe().await {
            Ok(s) => {
                info!(generation = ?s.generation, pantavisor = s.version.as_deref().unwrap_or("unknown"), "pv-ctrl reachable");
                return;
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?wait, "pv-ctrl not reachable yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(feature = "demo")]
fn demo(format: LogFormat) -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        telemetry::init(format);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(pv_bridge::demo::run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(feature = "demo"))]
fn demo(_: LogFormat) -> ExitCode {
    eprintln!("this pv-bridge was built without the `demo` feature");
    ExitCode::from(2)
}
