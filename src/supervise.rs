//! The device build's supervisor (ADR 0019). The device build aborts on panic
//! (`panic = "abort"`, 850 KB smaller than unwinding), so a panic ends the whole
//! process instead of one adapter task. When pv-bridge is the container's init
//! (PID 1), or `PV_BRIDGE_SUPERVISE=1` asks for it, `pv-bridge run` starts itself
//! again as a child and restarts that child whenever it dies by a signal (a
//! panic's abort, the OOM killer), with a backoff from 1 s to 60 s that resets
//! after 10 minutes of good running. A child that exits with a code (a clean
//! stop, a configuration error) ends the supervisor with that code. SIGTERM,
//! SIGINT and SIGPWR (what `lxc-stop` sends to init) are passed to the child.
//!
//! Everything the bridge keeps is durable against kill -9 at any moment, so a
//! restart resumes where the last process was.

use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// SIGPWR on Linux (x86, arm, aarch64).
const SIGPWR: i32 = 30;

/// Set in the child so that it runs the bridge itself.
pub const CHILD: &str = "PV_BRIDGE_SUPERVISED";
/// Asks for supervision when not PID 1 (tests, systemd-less hosts).
pub const ASK: &str = "PV_BRIDGE_SUPERVISE";

/// Whether this `run` should supervise a child instead of running the bridge.
pub fn wanted() -> bool {
    if std::env::var_os(CHILD).is_some() {
        return false;
    }
    std::process::id() == 1 || std::env::var(ASK).is_ok_and(|v| v == "1")
}

/// Sends `sig` to `pid`.
fn signal(pid: u32, sig: i32) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let (Some(pid), Some(sig)) = (pid, rustix::process::Signal::from_named_raw(sig)) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn describe(st: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match st.signal() {
        Some(6) => "aborted (a panic; its message is above)".into(),
        Some(9) => "killed (SIGKILL, e.g. the OOM killer)".into(),
        Some(s) => format!("killed by signal {s}"),
        None => format!("exited with {}", st.code().unwrap_or(-1)),
    }
}

/// Runs the child until it exits with a code; returns that code.
pub fn run() -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pv-bridge supervisor: cannot start: {e}");
            return 1;
        }
    };
    rt.block_on(supervise())
}

async fn supervise() -> i32 {
    use tokio::signal::unix::{SignalKind, signal as listen};
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("pv-bridge supervisor: cannot find its own binary: {e}");
            return 1;
        }
    };
    let mut signals = Vec::new();
    for kind in [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::from_raw(SIGPWR),
    ] {
        match listen(kind) {
            Ok(s) => signals.push((kind.as_raw_value(), s)),
            Err(e) => eprintln!("pv-bridge supervisor: cannot listen for signal: {e}"),
        }
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let child = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env(CHILD, "1")
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                eprintln!("pv-bridge supervisor: cannot start the bridge: {e}");
                return 1;
            }
        };
        let pid = child.id();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let mut stopping = false;
        let status = loop {
            tokio::select! {
                st = &mut rx => break st,
                n = next_signal(&mut signals) => {
                    stopping = true;
                    signal(pid, n);
                }
            }
        };
        let status = match status {
            Ok(Ok(st)) => st,
            _ => {
                eprintln!("pv-bridge supervisor: lost the bridge process");
                return 1;
            }
        };
        if let Some(code) = status.code() {
            return code;
        }
        if stopping {
            return 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0);
        }
        if started.elapsed() >= Duration::from_secs(600) {
            backoff = Duration::from_secs(1);
        }
        eprintln!(
            "pv-bridge supervisor: the bridge {}; restarting in {} s",
            describe(&status),
            backoff.as_secs()
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            n = next_signal(&mut signals) => return 128 + n,
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// The next of the listened-for signals to arrive.
async fn next_signal(signals: &mut [(i32, tokio::signal::unix::Signal)]) -> i32 {
    if signals.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(|cx| {
        for (n, s) in signals.iter_mut() {
            if s.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(*n);
            }
        }
        std::task::Poll::Pending
    })
    .await
}
