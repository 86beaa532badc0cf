//! `pv-bridge demo`: a zero-setup tour of pv-bridge with its MQTT backend. It starts
//! an MQTT broker (rumqttd, embedded), a simulated Pantavisor device (pv-sim) in a
//! temporary directory and pv-bridge itself, then acts as an operator would with
//! `pv-fleet`: deploys a new container image (UPDATED), deploys a failing revision
//! (ERROR and the rollback), sets user-meta, runs a command and reads forwarded
//! logs. Everything stays on loopback; nothing outside this process is needed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::fleet::conn::BrokerArgs;
use crate::fleet::deploy::DeployArgs;
use crate::fleet::{deploy, ops};
use crate::pvctrl::{Meta, PvCtrl, hex};
use pv_testkit::sim::{Sim, SimConfig};

fn say(step: &str) {
    println!("\n==> {step}");
}

fn detail(text: &str) {
    println!("    {text}");
}

async fn running(pv: &PvCtrl) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(m) = pv.meta(Meta::Device).await {
            if let Some(r) = m.get("pantavisor.revision").and_then(Value::as_str) {
                return Ok(r.to_owned());
            }
        }
        if Instant::now() > deadline {
            bail!("device did not come back");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts rumqttd on a free loopback port, in its own threads.
fn start_broker() -> Result<SocketAddr> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg: rumqttd::Config = toml::from_str(&format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "demo"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 2097152
max_inflight_count = 100
dynamic_filters = true
"#
    ))
    .context("rumqttd configuration")?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            if let Err(e) = broker.start() {
                eprintln!("the embedded broker stopped: {e}");
            }
        })?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("the embedded MQTT broker did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(addr)
}

/// Writes a `pvr export` folder: the running state edited, plus objects.
async fn export(
    pv: &PvCtrl,
    dir: &Path,
    name: &str,
    blobs: &[Vec<u8>],
    edit: impl FnOnce(&mut Value),
) -> Result<PathBuf> {
    let folder = dir.join(name);
    std::fs::create_dir_all(folder.join("objects"))?;
    let mut state: Value = serde_json::from_slice(&pv.step("current").await?)?;
    edit(&mut state);
    std::fs::write(folder.join("json"), serde_json::to_vec_pretty(&state)?)?;
    for b in blobs {
        std::fs::write(folder.join("objects").join(hex(&Sha256::digest(b))), b)?;
    }
    Ok(folder)
}

fn deploy_args(export: PathBuf, id: &str, serve: &str) -> DeployArgs {
    DeployArgs {
        export: Some(export),
        select: crate::fleet::select::SelectArgs {
            devices: vec!["demo-1".into()],
            ..Default::default()
        },
        id: Some(id.into()),
        serve: serve.into(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise: None,
        object_url_template: None,
        timeout: 60,
        canary: None,
        wave_size: None,
        max_failures: None,
        device_timeout: None,
        record: None,
        resume: None,
        json: false,
        wait_ms: 700,
    }
}

/// Runs the demo; returns an error if any step does not end as expected.
pub async fn run() -> Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir().context("create a temporary directory")?;

    say("Starting an MQTT broker (rumqttd, embedded in this process)");
    let addr = start_broker()?;
    detail(&format!("listening on mqtt://{addr}"));

    say("Starting a simulated Pantavisor device (pv-sim)");
    let socket = dir.path().join("pv-ctrl");
    let mut cfg = SimConfig::new(dir.path().join("storage"), &socket);
    cfg.commit_delay = Duration::from_secs(1);
    cfg.reboot = Duration::from_millis(800);
    cfg.tick = Duration::from_millis(200);
    cfg.log_rate = 5.0;
    let sim = Sim::start(cfg).await.context("start pv-sim")?;
    let pv = PvCtrl::new(&socket);
    let info = pv.probe().await?;
    detail(&format!(
        "pv-ctrl socket {}: Pantavisor {}",
        socket.display(),
        info.version.unwrap_or_default()
    ));
    for c in pv.containers().await? {
        detail(&format!("container {:<10} {:<8}", c.name, c.status));
    }
    detail(&format!("running revision: {}", running(&pv).await?));

    say("Starting pv-bridge with the MQTT backend (device id demo-1)");
    let toml = format!(
        "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[logs]\npoll_interval_ms = 200\n[metadata]\ndevice_meta_interval_ms = 500\n\n[[backend]]\ntype = \"mqtt\"\nname = \"demo-broker\"\nbroker = \"mqtt://{addr}\"\ndevice_id = \"demo-1\"\nchunk_timeout_secs = 5\n",
        socket.display(),
        dir.path().join("storage/logs").display(),
        dir.path().join("bridge").display()
    );
    println!(
        "{}",
        toml.lines()
            .map(|l| format!("    | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let cfg = crate::config::Config::parse(Path::new("demo.toml"), &toml)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = cfg.updates.options();
    let bridge = tokio::spawn(crate::engine::run(cfg, opts, async {
        let _ = stop_rx.await;
    }));
    let broker = BrokerArgs {
        broker: format!("mqtt://{addr}"),
        protocol: "v311".into(),
        topic_root: "pv/<device_id>".into(),
        username: None,
        password_file: None,
        ca_file: None,
        cert_file: None,
        key_file: None,
    };
    // Wait for the bridge's retained `status`.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut f = crate::fleet::conn::Fleet::connect(&broker, vec!["pv/demo-1/status".into()])
            .await
            .map_err(anyhow::Error::msg)?;
        let got = tokio::time::timeout(Duration::from_millis(500), f.rx.recv()).await;
        f.close().await;
        if let Ok(Some(m)) = got {
            let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            if v["online"] == true {
                detail(&format!("pv/demo-1/status: {v}"));
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("pv-bridge did not come online");
        }
    }

    say("As an operator: `pv-fleet deploy app-v2 -d demo-1` (a new app image, objects over HTTP)");
    let app = b"app v2: a new root filesystem\n".repeat(8192);
    let sha = hex(&Sha256::digest(&app));
    let v2 = export(&pv, dir.path(), "app-v2", std::slice::from_ref(&app), |s| {
        s["app/root.squashfs"] = json!(sha);
    })
    .await?;
    detail("pv-fleet publishes a retained offer on pv/demo-1/revision/set and serves the");
    detail("objects over HTTP; the bridge downloads, checks every sha256, stages the");
    detail("revision through pv-ctrl and Pantavisor runs it:");
    let code = deploy::run(&broker, deploy_args(v2, "app-v2", "http"))
        .await
        .map_err(anyhow::Error::msg)?;
    if code != 0 {
        bail!("deploying app-v2 ended with exit code {code}, expected 0");
    }
    detail(&format!("running revision: {}", running(&pv).await?));

    say(
        "As an operator: deploy a revision whose container cannot start (objects pulled over MQTT)",
    );
    let broken = b"app v3: missing its init\n".repeat(4096);
    let sha3 = hex(&Sha256::digest(&broken));
    let v3 = export(
        &pv,
        dir.path(),
        "app-v3",
        std::slice::from_ref(&broken),
        |s| {
            s["app/root.squashfs"] = json!(sha3);
            s["_sim/behaviour.json"] = json!({"outcome": "error", "container": "app"});
        },
    )
    .await?;
    detail("This time the bridge pulls the object in chunks over MQTT (blob/get) and");
    detail("pv-fleet answers; Pantavisor tries the revision, fails, and rolls back:");
    let code = deploy::run(&broker, deploy_args(v3, "app-v3", "mqtt"))
        .await
        .map_err(anyhow::Error::msg)?;
    if code != 1 {
        bail!("deploying app-v3 ended with exit code {code}, expected 1 (ERROR)");
    }
    detail(&format!(
        "Pantavisor rolled back to its rollback point (the last DONE revision): {}",
        running(&pv).await?
    ));
    detail(
        "(app-v2 was a non-reboot update: UPDATED runs it but does not make it a rollback point)",
    );

    say("As an operator: `pv-fleet meta set demo-1 app.greeting=hello`");
    let code = ops::meta(
        &broker,
        "demo-1",
        &[("app.greeting".into(), json!("hello"))],
        &[],
    )
    .await
    .map_err(anyhow::Error::msg)?;
    if code != 0 {
        bail!("meta set ended with exit code {code}");
    }
    let um = pv.meta(Meta::User).await?;
    detail(&format!(
        "on the device (pv-ctrl user-meta): app.greeting = {}",
        um.get("app.greeting").cloned().unwrap_or(Value::Null)
    ));

    say("As an operator: `pv-fleet cmd demo-1 ping`");
    let code = ops::cmd(&broker, "demo-1", "ping", &[], 15, None)
        .await
        .map_err(anyhow::Error::msg)?;
    if code != 0 {
        bail!("ping ended with exit code {code}");
    }

    say("As an operator: `pv-fleet status`");
    crate::fleet::status::run(&broker, &crate::fleet::status::StatusArgs::all(500))
        .await
        .map_err(anyhow::Error::msg)?;

    say("As an operator: `pv-fleet logs demo-1 -n 4` (forwarded from the device's log tree)");
    ops::logs(&broker, "demo-1", None, None, Some(4))
        .await
        .map_err(anyhow::Error::msg)?;

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), bridge).await;
    sim.stop().await;
    say(&format!("Done in {:.1} s", started.elapsed().as_secs_f64()));
    detail("With a real broker and device:");
    detail("  on the device, /etc/pv-bridge/config.toml with");
    detail(
        "    [[backend]] type = \"mqtt\", name = \"plant\", broker = \"mqtts://broker.example:8883\", device_id = \"<id>\"",
    );
    detail("  and from your desk:");
    detail("    pv-fleet --broker mqtts://broker.example:8883 status");
    detail("    pv-fleet --broker mqtts://broker.example:8883 deploy ./my-export -d <id>");
    detail("  Protocol: docs/mqtt-protocol.md. Configuration: docs/configuration.md.");
    Ok(())
}
