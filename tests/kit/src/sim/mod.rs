//! pv-sim: a simulated Pantavisor device serving pv-ctrl on a Unix socket.
//!
//! Faithful to `shared/reference/pantavisor-pvctrl.md`: endpoints, status codes and
//! error texts of gen-2 (Pantavisor 029) or gen-1 (023), the one-slot command queue,
//! the update state machine with reboot and non-reboot transitions, rollback, GC,
//! metadata files and the log tree. Start it in-process with [`Sim::start`] or as the
//! `pv-sim` binary.

mod api;
mod device;
pub mod factory;
mod revision;
mod store;
mod upload;
mod wire;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use device::{Device, hex};
pub use store::{Boot, MetaKind, Store};

use device::Power;
use wire::{HeadError, Reply};

/// Which pv-ctrl implementation to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// Pantavisor ≤ 023.
    Gen1,
    /// Pantavisor 024+ (029 behaviour).
    Gen2,
}

/// How to run a simulated device.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Persistent storage (objects, trails, metadata, logs).
    pub storage: PathBuf,
    /// The mgmt socket (what `/pantavisor/pv-ctrl` is inside the bridge container).
    pub socket: PathBuf,
    /// Optional socket as seen by a non-mgmt container.
    pub nonmgmt_socket: Option<PathBuf>,
    pub generation: Generation,
    /// TESTING lasts this long before DONE/UPDATED (`PV_UPDATER_COMMIT_DELAY`).
    pub commit_delay: Duration,
    /// The socket is gone this long during a reboot.
    pub reboot: Duration,
    /// Status goals must be reached within this (`PV_UPDATER_GOALS_TIMEOUT`).
    pub goals_timeout: Duration,
    /// Period of Pantavisor's WAIT loop, which consumes the command slot.
    pub tick: Duration,
    /// Synthetic container log lines per second.
    pub log_rate: f64,
    /// Simulated storage size in bytes.
    pub capacity: u64,
    /// Keep revision `0` on GC (`PV_STORAGE_GC_KEEP_FACTORY`).
    pub gc_keep_factory: bool,
    /// Imitate Pantavisor 024 rather than 029 (gen-2 only): a refused `/commands`
    /// request gets no answer at all (fixed in 025 by 976a3d13), `PUT /steps`
    /// creates no NEW progress (025+), and there is no `POST /storage/gc` (029+).
    pub pv_024: bool,
    /// A log file that reaches this size is gzipped to `<file>.<n>.gz` and started
    /// again (`logserver/logserver_rotation.c`); 0 = Pantavisor's default, a
    /// 200th of the capacity (`PV_LOG_DIR_MAXSIZE` 10 %, hysteresis 4, rotate 5).
    pub log_rotate_bytes: u64,
    /// The container whose processes use the mgmt socket.
    pub mgmt_caller: String,
    /// The container whose processes use the non-mgmt socket.
    pub nonmgmt_caller: String,
    /// A directory the factory objects are hard-linked from (many devices on
    /// one machine share one copy); `None`: each device writes its own.
    pub object_pool: Option<PathBuf>,
}

impl SimConfig {
    /// Pantavisor's defaults (commit delay 25 s, goals timeout 120 s, 1 s ticks).
    pub fn new(storage: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Self {
        Self {
            storage: storage.into(),
            socket: socket.into(),
            nonmgmt_socket: None,
            generation: Generation::Gen2,
            commit_delay: Duration::from_secs(25),
            reboot: Duration::from_secs(3),
            goals_timeout: Duration::from_secs(120),
            tick: Duration::from_secs(1),
            log_rate: 1.0,
            capacity: 1 << 30,
            gc_keep_factory: false,
            pv_024: false,
            log_rotate_bytes: 0,
            mgmt_caller: "pv-bridge".into(),
            nonmgmt_caller: "app".into(),
            object_pool: None,
        }
    }

    /// The size at which a log file rotates.
    pub fn log_rotation(&self) -> u64 {
        if self.log_rotate_bytes > 0 {
            self.log_rotate_bytes
        } else {
            (self.capacity / 200).max(4096)
        }
    }

    /// Short timers for tests: 100 ms ticks, 300 ms reboots, 500 ms commit delay.
    pub fn fast(storage: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Self {
        Self {
            commit_delay: Duration::from_millis(500),
            reboot: Duration::from_millis(300),
            goals_timeout: Duration::from_secs(5),
            tick: Duration::from_millis(100),
            ..Self::new(storage, socket)
        }
    }
}

/// Whether the device is serving, rebooting or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    On,
    Rebooting,
    Off,
}

struct Shared {
    cfg: SimConfig,
    dev: Mutex<Device>,
    /// Ticks are skipped: the command slot is not consumed, nothing moves.
    paused: std::sync::atomic::AtomicBool,
    /// How the answers to the next accepted commands are lost.
    lost_answers: Mutex<std::collections::VecDeque<LostAnswer>>,
    /// Requests served, by "METHOD target".
    requests: Mutex<std::collections::BTreeMap<String, u64>>,
}

/// How the answer to an accepted command is lost (the command itself is queued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostAnswer {
    /// No answer; the connection stays open until the client gives up.
    Silence,
    /// The connection closes without an answer.
    HangUp,
}

impl Shared {
    fn dev(&self) -> MutexGuard<'_, Device> {
        // A panic while holding the lock is a simulator bug; keep serving anyway.
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running simulated device.
pub struct Sim {
    shared: Arc<Shared>,
    power: watch::Sender<PowerState>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sim {
    /// Boots the device (creating its factory revision on first start) and starts
    /// serving. Returns once the sockets accept connections.
    pub async fn start(cfg: SimConfig) -> io::Result<Sim> {
        let dev = Device::boot(cfg.clone())?;
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            dev: Mutex::new(dev),
            paused: Default::default(),
            lost_answers: Default::default(),
            requests: Default::default(),
        });
        let (power, power_rx) = watch::channel(PowerState::On);
        let mut tasks = Vec::new();
        let mut sockets = vec![(cfg.socket.clone(), cfg.mgmt_caller.clone())];
        if let Some(p) = &cfg.nonmgmt_socket {
            sockets.push((p.clone(), cfg.nonmgmt_caller.clone()));
        }
        for (path, caller) in sockets {
            let listener = bind(&path)?;
            tasks.push(tokio::spawn(listen(
                path,
                caller,
                Some(listener),
                shared.clone(),
                power_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(run_device(shared.clone(), power.clone())));
        Ok(Sim {
            shared,
            power,
            tasks,
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.cfg
    }

    pub fn storage(&self) -> &Path {
        &self.shared.cfg.storage
    }

    pub fn socket(&self) -> &Path {
        &self.shared.cfg.socket
    }

    pub fn power(&self) -> PowerState {
        *self.power.borrow()
    }

    /// The running revision.
    pub fn running(&self) -> String {
        self.shared.dev().running().to_owned()
    }

    /// How many times `container` started since the last boot: a restart in a
    /// non-reboot transition adds one, a reboot starts again from one.
    pub fn container_starts(&self, container: &str) -> u64 {
        self.shared.dev().starts(container)
    }

    /// The op of the command waiting in the slot (accepted with 200, not yet
    /// carried out), if any.
    pub fn pending_command(&self) -> Option<String> {
        self.shared.dev().pending_command().map(str::to_owned)
    }

    /// Stops (or resumes) Pantavisor's main loop: requests are still served, but
    /// the command slot is not consumed and updates do not move. With
    /// [`Sim::crash`] this cuts the power at a chosen moment, e.g. between a
    /// command's 200 and its processing.
    pub fn pause(&self, paused: bool) {
        self.shared
            .paused
            .store(paused, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next command accepted with 200 is queued, but its answer is lost this
    /// way (a client timeout or a broken connection after Pantavisor took it).
    pub fn lose_next_command_answer(&self, how: LostAnswer) {
        self.shared
            .lost_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(how);
    }

    /// How many requests were served, by "METHOD target" (what a client costs the
    /// device).
    pub fn requests(&self) -> std::collections::BTreeMap<String, u64> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the device reaches `state`.
    pub async fn wait_power(&self, state: PowerState) {
        let mut rx = self.power.subscribe();
        let _ = rx.wait_for(|s| *s == state).await;
    }

    /// Stops like `kill -9`: tasks die where they are, the socket file stays.
    pub fn crash(self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Stops cleanly, removing the sockets.
    pub async fn stop(self) {
        let _ = self.power.send(PowerState::Off);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.shared.cfg.socket);
        if let Some(p) = &self.shared.cfg.nonmgmt_socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    UnixListener::bind(path)
}

/// Serves one socket; it disappears while the device reboots.
async fn listen(
    path: PathBuf,
    caller: String,
    mut listener: Option<UnixListener>,
    shared: Arc<Shared>,
    mut power: watch::Receiver<PowerState>,
) {
    let caller: Arc<str> = caller.into();
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => {
                if power
                    .wait_for(|s| *s != PowerState::Rebooting)
                    .await
                    .is_err()
                    || *power.borrow() == PowerState::Off
                {
                    return;
                }
                match bind(&path) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("pv-sim: cannot bind {}: {e}", path.display());
                        return;
                    }
                }
            }
        };
        loop {
            tokio::select! {
                r = l.accept() => {
                    if let Ok((s, _)) = r {
                        tokio::spawn(serve(s, caller.clone(), shared.clone(), power.clone()));
                    }
                }
                r = power.changed() => {
                    if r.is_err() || *power.borrow() != PowerState::On {
                        break;
                    }
                }
            }
        }
        drop(l);
        let _ = std::fs::remove_file(&path);
        if *power.borrow() == PowerState::Off {
            return;
        }
    }
}

/// The WAIT loop: tick, and carry out reboots and power-off.
async fn run_device(shared: Arc<Shared>, power: watch::Sender<PowerState>) {
    let mut interval = tokio::time::interval(shared.cfg.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if shared.paused.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        let action = shared.dev().tick(Instant::now());
        match action {
            Ok(None) => {}
            Ok(Some(Power::Reboot)) => {
                let _ = power.send(PowerState::Rebooting);
                tokio::time::sleep(shared.cfg.reboot).await;
                match Device::boot(shared.cfg.clone()) {
                    Ok(d) => *shared.dev() = d,
                    Err(e) => {
                        eprintln!("pv-sim: boot failed: {e}");
                        let _ = power.send(PowerState::Off);
                        return;
                    }
                }
                let _ = power.send(PowerState::On);
            }
            Ok(Some(Power::Poweroff)) => {
                let _ = power.send(PowerState::Off);
                return;
            }
            Err(e) => eprintln!("pv-sim: storage error: {e}"),
        }
    }
}

/// One client connection: gen-2 keeps it alive, gen-1 answers once.
async fn serve(
    stream: UnixStream,
    caller: Arc<str>,
    shared: Arc<Shared>,
    mut power: watch::Receiver<PowerState>,
) {
    let generation = shared.cfg.generation;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let req = tokio::select! {
            r = wire::read_request(&mut rd, generation) => r,
            _ = power.changed() => return,
        };
        let req = match req {
            Ok(r) => r,
            Err(HeadError::Closed | HeadError::Io) => return,
            Err(HeadError::BadFormat(why)) => {
                shared
                    .dev()
                    .log("WARN", "ctrl", &format!("bad request: {why}"));
                let fake = wire::Request {
                    method: String::new(),
                    target: String::new(),
                    http10: true,
                    headers: vec![],
                };
                let reply = Reply::err(400, "Request has bad format");
                let _ = wire::write_reply(&mut wr, generation, &fake, reply).await;
                return;
            }
        };
        let keep = tokio::select! {
            r = exchange(&req, &mut rd, &mut wr, &caller, &shared) => r,
            _ = power.changed() => return,
        };
        match keep {
            Ok(true) => continue,
            _ => return,
        }
    }
}

async fn exchange(
    req: &wire::Request,
    rd: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    caller: &str,
    shared: &Shared,
) -> io::Result<bool> {
    let generation = shared.cfg.generation;
    if req
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        wr.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let reply = decide(req, rd, caller, shared).await?;
    let silent = matches!(reply, Reply::Silence);
    let keep = wire::write_reply(wr, generation, req, reply).await?;
    if silent {
        // Never answered: hold the connection until the client gives up.
        let mut sink = [0u8; 256];
        while rd.read(&mut sink).await? > 0 {}
        return Ok(false);
    }
    Ok(keep)
}

async fn decide(
    req: &wire::Request,
    rd: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    caller: &str,
    shared: &Shared,
) -> io::Result<Reply> {
    let generation = shared.cfg.generation;
    if generation == Generation::Gen2 {
        if let Some(host) = req.header("host") {
            let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
            if host != "localhost" {
                return Ok(Reply::Drop);
            }
        }
    }
    *shared
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(format!("{} {}", req.method, req.target))
        .or_default() += 1;
    let m = match api::route(generation, shared.cfg.pv_024, &req.method, &req.target) {
        Ok(m) => m,
        Err(reply) => {
            drain(rd, req).await?;
            return Ok(reply);
        }
    };
    let mgmt = shared.dev().caller_mgmt(caller);
    let Some(mgmt) = mgmt else {
        drain(rd, req).await?;
        return Ok(Reply::err(500, "Internal error, unknown caller"));
    };
    if m.mgmt && !mgmt {
        drain(rd, req).await?;
        return Ok(api::forbidden(generation, m.exact));
    }
    if m.ep == api::Ep::Object && req.method == "PUT" {
        return upload::put_object(req, rd, &m.arg, shared).await;
    }
    let limit = api::body_limit(m.ep);
    let Some(body) = wire::read_body(rd, req, limit).await? else {
        return Ok(match generation {
            Generation::Gen2 => Reply::err(507, "Not enough disk space available"),
            Generation::Gen1 => Reply::err(400, "Request has bad format"),
        });
    };
    if generation == Generation::Gen1 && limit == 4096 && body.len() >= 4096 {
        return Ok(Reply::err(400, "Request has bad format"));
    }
    if generation == Generation::Gen2 && body.is_empty() && api::silent_when_empty(m.ep) {
        return Ok(Reply::Silence);
    }
    let reply = api::handle(
        &mut shared.dev(),
        generation,
        caller,
        &m,
        &req.method,
        &body,
    );
    if m.ep == api::Ep::Commands && matches!(reply, Reply::Ok) {
        let lost = shared
            .lost_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        match lost {
            Some(LostAnswer::Silence) => return Ok(Reply::Silence),
            Some(LostAnswer::HangUp) => return Ok(Reply::Drop),
            None => {}
        }
    }
    Ok(reply)
}

/// Reads and discards a request body so a keep-alive connection stays usable.
pub(super) async fn drain(
    rd: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    req: &wire::Request,
) -> io::Result<()> {
    if req.chunked() {
        wire::read_body(rd, req, usize::MAX).await?;
    } else if let Some(n) = req.content_length() {
        tokio::io::copy(&mut (&mut *rd).take(n), &mut tokio::io::sink()).await?;
    }
    Ok(())
}
