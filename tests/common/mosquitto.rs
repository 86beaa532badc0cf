//! A real mosquitto (Debian package `mosquitto`) on a random loopback port, the
//! `mosquitto_pub`/`mosquitto_sub` clients, a pv-bridge process, and the JSON
//! Schemas of docs/schemas that everything the bridge publishes must satisfy.
//! A missing mosquitto fails the tests that use it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    conf: PathBuf,
    pub log: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn exe(name: &str) -> String {
    // Debian puts the broker in /usr/sbin, often outside a user's PATH.
    let sbin = format!("/usr/sbin/{name}");
    if Path::new(&sbin).exists() {
        sbin
    } else {
        name.to_owned()
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Broker {
    /// A broker with an anonymous plain listener on `port` plus `extra` config
    /// lines (more listeners, authentication).
    pub fn start(dir: &Path, extra: &str) -> Broker {
        let port = free_port();
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let log = dir.join(format!("mosquitto-{port}.log"));
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings true\nlog_dest file {}\nlog_type all\nuser root\nlistener {port} 127.0.0.1\nallow_anonymous true\n{extra}\n",
                log.display()
            ),
        )
        .unwrap();
        let mut b = Broker {
            child: None,
            port,
            conf,
            log,
        };
        b.launch();
        b
    }

    fn launch(&mut self) {
        let child = Command::new(exe("mosquitto"))
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "mosquitto is required for these tests: apt-get install -y mosquitto mosquitto-clients",
            );
        self.child = Some(child);
        wait_port(self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the broker (forgetting retained messages and sessions) and starts it
    /// again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The retained message on `topic`, if any (waits up to 2 s).
/// Runs `pv-fleet --broker mqtt://127.0.0.1:<port> args…` to its end, its
/// output echoed for the test log.
pub fn fleet(port: u16, args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_pv-fleet"))
        .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
        .args(args)
        .output()
        .expect("run pv-fleet");
    eprintln!(
        "pv-fleet {args:?} → {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn retained(port: u16, topic: &str) -> Option<Value> {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
        .args(["-C", "1", "-W", "2", "--retained-only"])
        .stderr(Stdio::null())
        .output()
        .expect("mosquitto_sub is required: apt-get install -y mosquitto-clients");
    serde_json::from_slice(&out.stdout).ok()
}

pub fn publish(port: u16, topic: &str, payload: &str, retain: bool) {
    let mut args = vec!["-t", topic, "-m", payload];
    if retain {
        args.push("-r");
    }
    publish_args(port, &args);
}

/// `mosquitto_pub` at QoS 1 with the given arguments.
pub fn publish_args(port: u16, args: &[&str]) {
    let ok = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(args)
        .status()
        .expect("mosquitto_pub is required: apt-get install -y mosquitto-clients");
    assert!(ok.success(), "mosquitto_pub {args:?}");
}

/// A `mosquitto_sub` that waits for `count` messages; `collect` returns them.
pub struct Sub(Child);

impl Sub {
    /// Subscribes with `args` (topics, `-V 5`, …), printing `-F` `format`.
    pub fn start(port: u16, args: &[&str], format: &str, count: usize, wait_s: u32) -> Sub {
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .args(["-F", format, "-C", &count.to_string()])
            .args(["-W", &wait_s.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub is required: apt-get install -y mosquitto-clients");
        // Let the subscription reach the broker before anything is published.
        std::thread::sleep(Duration::from_millis(300));
        Sub(child)
    }

    pub fn collect(self) -> Vec<String> {
        let out = self.0.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// Records every message under a topic filter (payloads in hex, so binary
/// chunks cannot break lines).
pub struct Recorder {
    child: Child,
    file: PathBuf,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

impl Recorder {
    pub fn start(port: u16, filter: &str, dir: &Path) -> Recorder {
        let file = dir.join(format!("recorded-{port}-{}.txt", filter.len()));
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
            .args(["-t", filter, "-F", "%t %x"])
            .stdout(std::fs::File::create(&file).unwrap())
            .spawn()
            .expect("mosquitto_sub is required: apt-get install -y mosquitto-clients");
        std::thread::sleep(Duration::from_millis(300));
        Recorder { child, file }
    }

    /// Every message so far: (topic, payload).
    pub fn messages(&self) -> Vec<(String, Vec<u8>)> {
        std::fs::read_to_string(&self.file)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let (t, x) = l.split_once(' ').unwrap_or((l, ""));
                (t.to_owned(), unhex(x))
            })
            .collect()
    }

    /// JSON messages on topics ending with `suffix`.
    pub fn json_on(&self, suffix: &str) -> Vec<Value> {
        self.messages()
            .into_iter()
            .filter(|(t, _)| t.ends_with(suffix))
            .filter_map(|(_, p)| serde_json::from_slice(&p).ok())
            .collect()
    }
}

/// The schema file (docs/schemas) of a topic under `root`, if it carries JSON.
pub fn schema_of(root: &str, topic: &str) -> Option<&'static str> {
    let rest = topic.strip_prefix(root)?.strip_prefix('/')?;
    let levels: Vec<&str> = rest.split('/').collect();
    Some(match levels.as_slice() {
        ["status"] => "status",
        ["capabilities"] => "capabilities",
        ["replies", ..] => "cmd-response",
        ["meta", "device"] => "meta-device",
        ["meta", "user"] => "meta-user",
        ["meta", "user", "set"] => "meta-user-set",
        ["revision", "set"] => "revision-set",
        ["revision", "progress"] => "revision-progress",
        ["revision", "current"] => "revision-current",
        ["events"] => "events",
        ["logs", _] => "logs",
        ["cmd", _] => "cmd",
        ["cmd", _, "res", _] => "cmd-response",
        ["blob", "get"] => "blob-get",
        _ => return None,
    })
}

pub fn validator(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("docs/schemas/{name}.json"));
    let schema: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Checks every message the bridge published (device-to-cloud topics) against
/// its schema; returns how many were checked.
pub fn check_published(root: &str, messages: &[(String, Vec<u8>)]) -> usize {
    let mut checked = 0;
    for (topic, payload) in messages {
        let Some(name) = schema_of(root, topic) else {
            continue;
        };
        // Operator input (cloud-to-device) is checked where the tests send it.
        if matches!(name, "meta-user-set" | "revision-set" | "cmd") {
            continue;
        }
        let v: Value = serde_json::from_slice(payload)
            .unwrap_or_else(|e| panic!("{topic}: not JSON ({e}): {payload:?}"));
        let errors: Vec<String> = validator(name)
            .iter_errors(&v)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{topic} does not match docs/schemas/{name}.json: {errors:?}\n{v}"
        );
        checked += 1;
    }
    checked
}

/// A pv-bridge process with one `mqtt` backend named `plant` (device `dev-1`).
pub struct Bridge {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bridge {
    /// `top` goes before the backend (sections such as `[logs]`); `backend` adds
    /// keys to the backend (it may replace `broker`).
    pub fn start(
        d: &crate::common::Device,
        dir: &Path,
        port: u16,
        top: &str,
        backend: &str,
    ) -> Bridge {
        let socket = d.cfg().socket;
        let cfg = dir.join("bridge.toml");
        let broker = if backend.contains("broker =") {
            String::new()
        } else {
            format!("broker = \"mqtt://127.0.0.1:{port}\"\n")
        };
        std::fs::write(
            &cfg,
            format!(
                "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n{top}\n[[backend]]\ntype = \"mqtt\"\nname = \"plant\"\ndevice_id = \"dev-1\"\n{broker}{backend}\n",
                socket.display(),
                d.storage().join("logs").display(),
                dir.join("state").display()
            ),
        )
        .unwrap();
        let log = dir.join("bridge.log");
        let child = Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        Bridge { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the bridge's log satisfies `pred`; fails showing the log.
    pub async fn wait_log(&self, what: &str, within: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log_text();
            if pred(&log) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the bridge's log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Polls `f` (a blocking check) until it yields a value.
pub async fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = tokio::task::block_in_place(&mut f) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
