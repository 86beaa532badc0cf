//! The `pv-sim` binary as tests drive it: started on a temporary storage, killed
//! with SIGKILL and started again, and spoken to with `curl --unix-socket`.

#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct PvSim {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub args: Vec<String>,
}

impl PvSim {
    pub fn start(extra: &[&str]) -> PvSim {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = vec![
            "--storage".into(),
            dir.path().join("storage").display().to_string(),
            "--socket".into(),
            dir.path().join("pv-ctrl").display().to_string(),
            "--nonmgmt-socket".into(),
            dir.path().join("pv-ctrl-app").display().to_string(),
            "--commit-delay".into(),
            "0.5".into(),
            "--reboot-secs".into(),
            "0.3".into(),
            "--tick-ms".into(),
            "100".into(),
            "--log-rate".into(),
            "50".into(),
        ];
        // An option given in `extra` replaces its default (clap refuses repeats).
        let mut rest = extra.iter();
        while let Some(a) = rest.next() {
            match args.iter().position(|x| x == a) {
                Some(i) if a.starts_with("--") && args.get(i + 1).is_some() => {
                    args[i + 1] = rest.next().map(|v| v.to_string()).unwrap_or_default();
                }
                _ => args.push(a.to_string()),
            }
        }
        let child = spawn(&args);
        let sim = PvSim { child, dir, args };
        sim.wait_up();
        sim
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("pv-ctrl")
    }

    pub fn app_sock(&self) -> PathBuf {
        self.dir.path().join("pv-ctrl-app")
    }

    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(self.sock()).is_err() {
            assert!(Instant::now() < deadline, "pv-sim did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then start again on the same storage.
    pub fn kill9_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        assert!(
            self.sock().exists(),
            "kill -9 leaves the socket file behind"
        );
        self.child = spawn(&self.args);
        self.wait_up();
    }

    pub fn curl(&self, args: &[&str]) -> Reply {
        curl(&self.sock(), args)
    }
}

impl Drop for PvSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pv-sim"))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pv-sim")
}

#[derive(Debug)]
pub struct Reply {
    /// curl's exit code (7: cannot connect, 52: empty reply).
    pub exit: i32,
    pub code: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

pub fn curl(sock: &Path, args: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
        ])
        .arg(sock)
        .args(args)
        .output()
        .expect("curl is required for these tests: apt-get install -y curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Reply {
        exit: out.status.code().unwrap_or(-1),
        code: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
    }
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub const URL: &str = "http://localhost";

pub fn u(path: &str) -> String {
    format!("{URL}{path}")
}

/// Waits until `f` holds, polling.
pub fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(30));
    }
}
