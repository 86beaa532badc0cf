//! goosebit 0.2.12 (PyPI, Apache-2.0), a third-party hawkBit DDI server, as
//! the real peer of the hawkBit adapter: installed by the README's install
//! step in `.venv-goosebit`, started on a loopback port with its database and
//! artifacts in the test's directory, driven through its management API with
//! `curl` (multipart uploads as an operator's script does them). A missing
//! virtualenv fails the test that needs it, saying how to make one.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Goosebit {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    token: String,
    env: Vec<(String, String)>,
}

impl Drop for Goosebit {
    fn drop(&mut self) {
        self.stop();
    }
}

fn venv() -> PathBuf {
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-goosebit");
    assert!(
        v.join("bin/uvicorn").exists(),
        "goosebit is not installed: run the README's install step \
         (python3 -m venv .venv-goosebit && .venv-goosebit/bin/pip install -r tests/hawkbit/requirements.txt)"
    );
    v
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Goosebit {
    /// A fresh server in `dir/goosebit` polling devices every second, with
    /// `env` settings added (e.g. `GOOSEBIT_DEVICE_AUTH__ENABLE=true`).
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Goosebit {
        let v = venv();
        let dir = dir.join("goosebit");
        std::fs::create_dir_all(&dir).unwrap();
        let pkg = Command::new(v.join("bin/python"))
            .args([
                "-c",
                "import os, goosebit; print(os.path.dirname(goosebit.__file__))",
            ])
            .output()
            .expect("the goosebit virtualenv's python");
        assert!(
            pkg.status.success(),
            "{}",
            String::from_utf8_lossy(&pkg.stderr)
        );
        let pkg = String::from_utf8_lossy(&pkg.stdout).trim().to_owned();
        std::fs::write(
            dir.join("aerich.toml"),
            format!(
                "[tool.aerich]\ntortoise_orm = \"goosebit.db.config.TORTOISE_CONF\"\nlocation = \"{pkg}/db/migrations\"\n"
            ),
        )
        .unwrap();
        let mut all: Vec<(String, String)> = vec![
            (
                "GOOSEBIT_DB_URI".into(),
                format!("sqlite:///{}/db.sqlite3", dir.display()),
            ),
            (
                "GOOSEBIT_ARTIFACTS_DIR".into(),
                dir.join("artifacts").display().to_string(),
            ),
            ("GOOSEBIT_POLL_TIME".into(), "00:00:01".into()),
            ("GOOSEBIT_SECRET_KEY".into(), "pv-bridge-tests-only".into()),
        ];
        all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let out = Command::new(v.join("bin/aerich"))
            .args(["--config", "aerich.toml", "upgrade"])
            .current_dir(&dir)
            .envs(all.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("aerich");
        assert!(
            out.status.success(),
            "goosebit's database migration failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut g = Goosebit {
            child: None,
            port: free_port(),
            dir,
            token: String::new(),
            env: all,
        };
        g.spawn();
        g.token =
            g.form("/setup", "username=ops@example.com&password=pv-bridge-test")["access_token"]
                .as_str()
                .expect("goosebit's /setup gives a token")
                .to_owned();
        g
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let child = Command::new(venv().join("bin/uvicorn"))
            .args(["goosebit:app", "--host", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .current_dir(&self.dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("uvicorn");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("{}/login", self.url()))
                .output()
                // Any answer (302 to /setup before the first user) means up.
                .map(|o| !o.stdout.is_empty() && !o.stdout.starts_with(b"000"))
                .unwrap_or(false);
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "goosebit did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server and starts it again on the same port and database.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn curl(&self, args: &[&str]) -> Value {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-S", "--fail-with-body"]);
        if !self.token.is_empty() {
            cmd.arg("-H")
                .arg(format!("Authorization: Bearer {}", self.token));
        }
        let out = cmd.args(args).output().expect("curl");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {args:?} failed: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    fn form(&self, path: &str, form: &str) -> Value {
        self.curl(&["-X", "POST", "-d", form, &format!("{}{path}", self.url())])
    }

    fn json(&self, method: &str, path: &str, body: &Value) -> Value {
        self.curl(&[
            "-X",
            method,
            "-H",
            "Content-Type: application/json",
            "-d",
            &body.to_string(),
            &format!("{}{path}", self.url()),
        ])
    }

    /// Uploads a software file; returns its id.
    pub fn upload(&self, file: &Path) -> u64 {
        let v = self.curl(&[
            "-X",
            "PUT",
            "-F",
            &format!("file=@{}", file.display()),
            &format!("{}/api/v1/software", self.url()),
        ]);
        v["id"].as_u64().unwrap_or_else(|| panic!("upload: {v}"))
    }

    /// Registers software kept elsewhere (goosebit fetches and parses it;
    /// devices download it from `url`); returns its id.
    pub fn register_url(&self, url: &str) -> u64 {
        let v = self.curl(&[
            "-X",
            "PUT",
            "-F",
            &format!("url={url}"),
            &format!("{}/api/v1/software", self.url()),
        ]);
        v["id"].as_u64().unwrap_or_else(|| panic!("register: {v}"))
    }

    /// A rollout of software `id` to the default feed.
    pub fn rollout(&self, name: &str, software: u64) {
        let v = self.json(
            "PUT",
            "/api/v1/rollouts",
            &json!({"name": name, "feed": "default", "software_id": software}),
        );
        assert_eq!(v["success"], true, "{v}");
    }

    /// Creates devices with tokens (strict mode needs them first).
    pub fn create_device(&self, id: &str, token: &str) {
        let v = self.json(
            "PUT",
            "/api/v1/devices",
            &json!({"devices": [id], "auth_token": token}),
        );
        assert_eq!(v["success"], true, "{v}");
    }

    /// Offers the device its update again after a failure.
    pub fn force_update(&self, id: &str) {
        let v = self.json(
            "PATCH",
            "/api/v1/devices",
            &json!({"devices": [id], "force_update": true}),
        );
        assert_eq!(v["success"], true, "{v}");
    }

    /// The device as the operator sees it (`Value::Null` when unknown).
    pub fn device(&self, id: &str) -> Value {
        let out = Command::new("curl")
            .args(["-s", "-H"])
            .arg(format!("Authorization: Bearer {}", self.token))
            .arg(format!("{}/api/v1/devices/{id}", self.url()))
            .output()
            .expect("curl");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// The device's update log (the feedback details, one per line).
    pub fn device_log(&self, id: &str) -> String {
        self.curl(&["--get", &format!("{}/api/v1/devices/{id}/log", self.url())])["log"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// A `.swu` for goosebit: `sw-description` for board `board` revision
/// `revision` and version `version`, then the `pvr export` archive.
pub fn swu(version: &str, board: &str, revision: &str, export: &[u8]) -> Vec<u8> {
    use pv_adapter_hawkbit::swu::newc;
    let desc = format!(
        "software =\n{{\n\tversion = \"{version}\";\n\t{board} = {{\n\t\thardware-compatibility = [ \"{revision}\" ];\n\t}};\n}};\n"
    );
    let mut out = newc("sw-description", desc.as_bytes(), 1);
    out.extend(newc("pvrevision.tgz", export, 2));
    out.extend(newc("TRAILER!!!", b"", 0));
    out
}
