//! Shared helpers: a pv-sim per test in a temporary directory, and waiting for
//! observable conditions with deadlines (never bare sleeps).
#![allow(dead_code, unused_macros)]

pub mod faults;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pv_bridge::pvctrl::{Options, Progress, PvCtrl};
use pv_testkit::sim::{Generation, Sim, SimConfig};

/// Defines a module `$name` with one test per pv-ctrl generation, each running the
/// async closure `$body` with that generation.
macro_rules! both_generations {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn gen1() {
                ($body)(pv_testkit::sim::Generation::Gen1).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn gen2() {
                ($body)(pv_testkit::sim::Generation::Gen2).await
            }
        }
    };
}

pub struct Device {
    pub dir: tempfile::TempDir,
    pub sim: Option<Sim>,
    pub pv: PvCtrl,
}

impl Device {
    pub fn cfg(&self) -> SimConfig {
        self.sim.as_ref().expect("sim running").config().clone()
    }

    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// `kill -9` the simulator and boot it again on the same storage.
    pub async fn crash_and_restart(&mut self) {
        let cfg = self.cfg();
        self.sim.take().expect("sim running").crash();
        self.sim = Some(Sim::start(cfg).await.expect("restart pv-sim"));
    }
}

/// Client options for tests: short timeouts so a failure shows quickly.
pub fn test_options() -> Options {
    Options {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(2),
        command_retry_budget: Duration::from_secs(10),
        busy_retry_wait: Duration::from_millis(50),
        retry_after_cap: Duration::from_millis(100),
        ..Options::default()
    }
}

pub async fn start_with(generation: Generation, tweak: impl FnOnce(&mut SimConfig)) -> Device {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = SimConfig::fast(dir.path().join("storage"), dir.path().join("pv-ctrl"));
    cfg.nonmgmt_socket = Some(dir.path().join("pv-ctrl-app"));
    cfg.generation = generation;
    tweak(&mut cfg);
    let sim = Sim::start(cfg.clone()).await.expect("start pv-sim");
    let pv = PvCtrl::with_options(&cfg.socket, test_options());
    Device {
        dir,
        sim: Some(sim),
        pv,
    }
}

pub async fn start(generation: Generation) -> Device {
    start_with(generation, |_| {}).await
}

/// Polls `f` until it yields `Some`, failing the test after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Follows a revision's progress until it is final, tolerating the socket going
/// away during reboots. Returns every distinct (status, status-msg) seen, in order.
/// When `ready` is set, sends the bridge's ready signal whenever goals are awaited.
pub async fn follow(
    pv: &PvCtrl,
    rev: &str,
    ready: bool,
    within: Duration,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + within;
    let mut seen: Vec<(String, String)> = Vec::new();
    loop {
        if let Ok(p) = pv.progress(rev).await {
            let entry = (p.status.to_string(), p.status_msg.clone());
            if seen.last() != Some(&entry) {
                seen.push(entry);
            }
            if ready && p.status.as_str() == "INPROGRESS" {
                let _ = pv.signal_ready().await;
            }
            if p.status.is_final() {
                return seen;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{rev} not final after {within:?}; saw {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn final_progress(pv: &PvCtrl, rev: &str) -> Progress {
    pv.progress(rev).await.expect("progress")
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// --- scripted adapters for engine tests --------------------------------------

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pv_adapter_api::{
    Adapter, AdapterError, BackendEvent, BoxFuture, Capabilities, DeviceView, EngineLink,
};
use pv_bridge::config::Config;
use pv_bridge::engine::{AdapterFactory, run_with};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

/// An adapter the test drives: it forwards events from a channel and hands its view
/// to the test.
struct Scripted {
    name: String,
    events: Arc<Mutex<Option<mpsc::Receiver<BackendEvent>>>>,
    view: Arc<Mutex<Option<watch::Receiver<DeviceView>>>>,
    link: Arc<Mutex<Option<EngineLink>>>,
}

impl Adapter for Scripted {
    fn name(&self) -> &str {
        &self.name
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn run(self: Box<Self>, link: EngineLink) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            *self.view.lock().unwrap() = Some(link.view());
            *self.link.lock().unwrap() = Some(link.clone());
            link.send(BackendEvent::Connected).await?;
            let Some(mut rx) = self.events.lock().unwrap().take() else {
                return Ok(());
            };
            while let Some(ev) = rx.recv().await {
                link.send(ev).await?;
            }
            std::future::pending::<()>().await;
            Ok(())
        })
    }
}

pub struct Backend {
    pub tx: mpsc::Sender<BackendEvent>,
    view: Arc<Mutex<Option<watch::Receiver<DeviceView>>>>,
    link: Arc<Mutex<Option<EngineLink>>>,
}

impl Backend {
    pub async fn send(&self, ev: BackendEvent) {
        self.tx.send(ev).await.unwrap();
    }

    pub async fn user_meta(&self, version: u64, data: Value) {
        let data: BTreeMap<String, Value> = serde_json::from_value(data).unwrap();
        self.tx
            .send(BackendEvent::UserMeta { version, data })
            .await
            .unwrap();
    }

    /// The adapter's link, as the engine gave it.
    pub async fn link(&self) -> EngineLink {
        eventually(Duration::from_secs(5), "adapter running", || async {
            self.link.lock().unwrap().clone()
        })
        .await
    }

    pub async fn view(&self) -> watch::Receiver<DeviceView> {
        eventually(Duration::from_secs(5), "adapter running", || async {
            self.view.lock().unwrap().clone()
        })
        .await
    }
}

pub fn scripted(name: &str) -> ((String, AdapterFactory), Backend) {
    let (tx, rx) = mpsc::channel(16);
    let events = Arc::new(Mutex::new(Some(rx)));
    let view = Arc::new(Mutex::new(None));
    let link = Arc::new(Mutex::new(None));
    let (n, e, v, l) = (name.to_owned(), events.clone(), view.clone(), link.clone());
    let f: AdapterFactory = Arc::new(move || {
        Box::new(Scripted {
            name: n.clone(),
            events: e.clone(),
            view: v.clone(),
            link: l.clone(),
        }) as Box<dyn Adapter>
    });
    ((name.to_owned(), f), Backend { tx, view, link })
}

/// Starts the engine with scripted backends declared in `backends_toml`.
pub fn engine(
    d: &Device,
    backends_toml: &str,
    names: &[&str],
) -> (
    Vec<Backend>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let text = format!(
        "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[metadata]\ndevice_meta_interval_ms = 300\nuser_meta_interval_ms = 500\ndevice_meta_min_interval_secs = 0\n{backends_toml}",
        d.cfg().socket.display(),
        d.storage().join("logs").display(),
        d.dir.path().join("state").display()
    );
    let cfg = Config::parse(Path::new("test.toml"), &text).unwrap();
    let (adapters, backends): (Vec<_>, Vec<_>) = names.iter().map(|n| scripted(n)).unzip();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let opts = cfg.updates.options();
        run_with(cfg, adapters, opts, async {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
    });
    (backends, stop_tx, task)
}

pub fn local(name: &str, extra: &str) -> String {
    format!("[[backend]]\ntype = \"local\"\nname = \"{name}\"\ndir = \"/nonexistent\"\n{extra}\n")
}

/// A test PKI made with openssl: a CA, a server certificate for 127.0.0.1 and
/// localhost, and a client certificate (CN `dev-1`), all signed by the CA.
#[allow(dead_code)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

#[allow(dead_code)]
pub fn test_pki(dir: &Path) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is needed for the TLS tests: apt-get install -y openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let words = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let run_s = |s: String| {
        let w = words(&s);
        run(&w.iter().map(String::as_str).collect::<Vec<_>>());
    };
    run_s(format!(
        "req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=pv-bridge-test-CA"
    ));
    for (name, cn, ext) in [
        (
            "srv",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1,IP:127.0.0.2,DNS:localhost,DNS:fake-hub.azure-devices.net,DNS:global.azure-devices-provisioning.net\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "dev-1",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        ),
    ] {
        run_s(format!(
            "req {ec} -keyout {name}.key -out {name}.csr -subj /CN={cn}"
        ));
        std::fs::write(dir.join(format!("{name}.cnf")), ext).unwrap();
        run_s(format!(
            "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 2 -extfile {name}.cnf"
        ));
    }
    Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("srv.pem"),
        server_key: dir.join("srv.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

/// Waits for `f` to give `Some`; on timeout fails showing the log file `log`
/// (a pv-bridge process's).
#[allow(dead_code)]
pub async fn wait_showing<T>(
    log: &Path,
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; the bridge's log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `pv-bridge run --config cfg` with `RUST_LOG=info`, its log appended to `log`, and
/// no proxy settings inherited from the environment (tests set their own).
#[allow(dead_code)]
pub fn bridge_command(cfg: &Path, log: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pv-bridge"));
    for k in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(k);
    }
    cmd.args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "info")
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        );
    cmd
}

/// A `pvr export` archive (`json`, then `objects/<sha>`), packed with the
/// system `tar` as `pvr export` users do; returns its bytes.
pub fn pack_export(
    dir: &Path,
    name: &str,
    state: &serde_json::Value,
    objects: &[&[u8]],
) -> Vec<u8> {
    let staging = dir.join(format!(".pack-{name}"));
    std::fs::create_dir_all(staging.join("objects")).unwrap();
    std::fs::write(staging.join("json"), serde_json::to_vec(state).unwrap()).unwrap();
    for o in objects {
        std::fs::write(staging.join("objects").join(sha256_hex(o)), o).unwrap();
    }
    let out = dir.join(name);
    let ok = std::process::Command::new("tar")
        .arg("-C")
        .arg(&staging)
        .arg("-czf")
        .arg(&out)
        .args(["json", "objects"])
        .status()
        .expect("tar is needed to build pvr export archives");
    assert!(ok.success());
    std::fs::read(&out).unwrap()
}

/// `n` bytes that do not compress (an archive of them stays as large).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
