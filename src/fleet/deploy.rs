//! `pv-fleet deploy`: offer an export to the selected devices, in waves when
//! asked, and follow each to its final status. A failure threshold halts the
//! rollout; a per-device timeout bounds each device; `--record` keeps a record
//! on disk so the rollout can be stopped and resumed (`rollout.rs`).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::Digest;

use crate::fleet::conn::{BrokerArgs, Fleet};
use crate::fleet::export::Export;
use crate::fleet::render::{self, Outcome, Row};
use crate::fleet::rollout::{self, Amount, Entry, Record, Serving, State};
use crate::fleet::select::{self, SelectArgs};
use crate::fleet::serve;

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// A `pvr export` folder or archive (.tar, .tgz, .tar.gz).
    #[arg(required_unless_present = "resume")]
    pub export: Option<PathBuf>,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Offer id (the revision becomes locals/<id>); default: the export's name.
    #[arg(long)]
    pub id: Option<String>,
    /// How devices get the objects: http (served by pv-fleet), mqtt (chunk
    /// pulls answered by pv-fleet) or url (--object-url-template).
    #[arg(long, default_value = "http", value_parser = ["http", "mqtt", "url"])]
    pub serve: String,
    /// Address of the HTTP server (with --serve http).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Base URL devices use to reach the HTTP server (default: http://<listen>).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Where objects are hosted (with --serve url), containing {sha256}.
    #[arg(long)]
    pub object_url_template: Option<String>,
    /// Give up after this many seconds (the rollout can be resumed from its
    /// record).
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// The first wave: a count (5) or a share of the selection (5%); the next
    /// wave starts when every canary has its final status.
    #[arg(long)]
    pub canary: Option<Amount>,
    /// The size of each later wave (default: all the rest at once).
    #[arg(long)]
    pub wave_size: Option<Amount>,
    /// Halt the rollout when more devices than this failed (a count, or a share
    /// of the selection rounded down: 2% of 10 tolerates none). A failure is
    /// WONTGO, ERROR or a device timeout. Default: never halt.
    #[arg(long)]
    pub max_failures: Option<Amount>,
    /// A device without a final status this long after its offer times out
    /// (counted as a failure; the offer is withdrawn). E.g. 30m, 2h.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub device_timeout: Option<Duration>,
    /// Keep the rollout's record in this file (written after every outcome) so
    /// it can be resumed.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Continue the rollout of this record (the export, devices and waves come
    /// from it; --max-failures, --device-timeout and --timeout may change).
    #[arg(long, conflicts_with_all = ["export", "devices", "all", "conditions", "id", "canary", "wave_size", "record"])]
    pub resume: Option<PathBuf>,
    /// Print a JSON summary on stdout (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Milliseconds of quiet that end the collection of retained state when
    /// devices are selected by glob, --all or --where.
    #[arg(long, default_value_t = 700)]
    pub wait_ms: u64,
}

/// Builds the `revision/set` payload.
fn offer(s: &Serving, id: &str, export: &Export, base: Option<&str>) -> Result<Value, String> {
    let state: Value = serde_json::from_slice(&export.state).map_err(|e| e.to_string())?;
    let mut objects = serde_json::Map::new();
    for (sha, (_, size)) in &export.objects {
        let o = match (s.serve.as_str(), base) {
            ("http", Some(b)) => json!({"url": format!("{b}/objects/{sha}"), "size": size}),
            ("url", _) => continue,
            _ => json!({"size": size}),
        };
        objects.insert(sha.clone(), o);
    }
    let mut v = json!({"v": 1, "id": id, "objects": objects});
    match (export.state.len() > 512 * 1024, base) {
        // Too big for most brokers' comfort: devices download it instead.
        (true, Some(b)) => {
            v["state_url"] = json!(format!("{b}/state.json"));
            v["state_sha256"] = json!(crate::pvctrl::hex(&sha2::Sha256::digest(&export.state)));
        }
        _ => v["state"] = state,
    }
    if s.serve == "url" {
        let t = s
            .object_url_template
            .as_deref()
            .ok_or("--serve url needs --object-url-template")?;
        if !t.contains("{sha256}") {
            return Err("--object-url-template must contain {sha256}".into());
        }
        v["object_url_template"] = json!(t);
    }
    Ok(v)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new rollout from the command line: the selection resolved, the waves planned.
async fn plan(b: &BrokerArgs, a: &DeployArgs) -> Result<Record, String> {
    let Some(path) = &a.export else {
        return Err("give an export to deploy".into());
    };
    if a.select.is_empty() {
        return Err("choose the devices: --device (ids or globs), --all or --where".into());
    }
    let inv = if a.select.needs_inventory() {
        Some(select::inventory(b, None, Duration::from_millis(a.wait_ms)).await?)
    } else {
        None
    };
    let devices = a.select.resolve(inv.as_ref())?;
    if devices.is_empty() {
        return Err("the selection matches no device".into());
    }
    let export = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let waves = rollout::plan(devices.len(), a.canary, a.wave_size);
    Ok(Record {
        v: 1,
        id: String::new(),
        export,
        serving: Serving {
            serve: a.serve.clone(),
            listen: Some(a.listen),
            advertise: a.advertise.clone(),
            object_url_template: a.object_url_template.clone(),
        },
        max_failures: a.max_failures,
        device_timeout_secs: a.device_timeout.map(|d| d.as_secs().max(1)),
        state: State::Running,
        devices: devices
            .into_iter()
            .zip(waves)
            .map(|(device, wave)| Entry::new(device, wave))
            .collect(),
    })
}

/// Runs a deployment; the exit code is 0 when every device succeeded, 1 when
/// any failed or the rollout halted, 3 on timeout, 4 when stopped (Ctrl-C).
pub async fn run(b: &BrokerArgs, a: DeployArgs) -> Result<i32, String> {
    let (mut rec, record_path) = match &a.resume {
        Some(p) => {
            let mut r = Record::load(p)?;
            if a.max_failures.is_some() {
                r.max_failures = a.max_failures;
            }
            if let Some(t) = a.device_timeout {
                r.device_timeout_secs = Some(t.as_secs().max(1));
            }
            (r, Some(p.clone()))
        }
        None => {
            if let Some(p) = a.record.as_deref().filter(|p| p.exists()) {
                return Err(format!(
                    "--record {}: the file exists (continue that rollout with --resume {}, or choose another file)",
                    p.display(),
                    p.display()
                ));
            }
            (plan(b, &a).await?, a.record.clone())
        }
    };
    let export = Arc::new(Export::open(&rec.export)?);
    if rec.id.is_empty() {
        rec.id =
            a.id.clone()
                .unwrap_or_else(|| pv_adapter_local::offer_id(&export.name));
    }
    let id = rec.id.clone();
    if !pv_adapter_api::valid_offer_id(&id) {
        return Err(format!("--id {id:?} must be 1 to 64 of A-Z a-z 0-9 . _ -"));
    }
    let record_path = record_path.as_deref();
    if rec.state == State::Halted {
        if rec.over_threshold() {
            return Ok(finish(&rec, Outcome::Halted, record_path, a.json));
        }
        eprintln!(
            "{id}: the threshold now tolerates {} failures: continuing",
            rec.failures()
        );
        rec.state = State::Running;
    }
    if rec.state == State::Finished {
        let outcome = Outcome::of(&rec, false, false);
        return Ok(finish(&rec, outcome, record_path, a.json));
    }
    let base = match rec.serving.serve.as_str() {
        "http" => {
            let listen = rec.serving.listen.unwrap_or(a.listen);
            let addr = serve::http(listen, export.clone()).await?;
            rec.serving.listen = Some(addr);
            Some(
                rec.serving
                    .advertise
                    .clone()
                    .unwrap_or_else(|| format!("http://{addr}")),
            )
        }
        _ => None,
    };
    let payload = serde_json::to_vec(&offer(&rec.serving, &id, &export, base.as_deref())?)
        .map_err(|e| e.to_string())?;
    let save = |rec: &Record| match record_path {
        Some(p) => rec.save(p),
        None => Ok(()),
    };
    save(&rec)?;
    let root = crate::fleet::conn::Root::new(&b.topic_root)?;
    let names: Vec<String> = rec.devices.iter().map(|e| e.device.clone()).collect();
    let mut rests = vec!["revision/progress"];
    if rec.serving.serve == "mqtt" {
        rests.push("blob/get");
    }
    // Beyond a few hundred devices one wildcard per topic is cheaper for the
    // broker than a filter per device; other devices' messages are dropped here.
    let filters: Vec<String> = rests
        .iter()
        .flat_map(|r| {
            if names.len() > 256 {
                vec![root.filter(r)]
            } else {
                names.iter().map(|d| root.topic(d, r)).collect()
            }
        })
        .collect();
    let mut fleet = Fleet::connect(b, filters).await?;
    eprintln!(
        "{id}: {} objects, {} MiB, to {} device(s) in {} wave(s); objects via {}",
        export.objects.len(),
        render::mib(export.objects.values().map(|(_, s)| s).sum()),
        names.len(),
        rec.waves(),
        base.as_deref().unwrap_or(&rec.serving.serve)
    );
    let view = View::new(&names, a.json);
    let mut rows: BTreeMap<String, Row> =
        names.iter().map(|d| (d.clone(), Row::default())).collect();
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let (mut stopped, mut timed_out) = (false, false);
    let mut last_counts = Instant::now();
    loop {
        let step = rec.step(unix_now());
        let mut changed = !step.offer.is_empty() || !step.withdraw.is_empty();
        if let Some(w) = step.wave_started {
            view.note(&format!(
                "{id}: wave {}/{} offered to {} device(s)",
                w + 1,
                rec.waves(),
                step.offer.len()
            ));
        }
        for d in &step.offer {
            fleet
                .publish(root.topic(d, "revision/set"), true, payload.clone())
                .await?;
        }
        for d in &step.timed_out {
            view.note(&format!("{d}: no final status within the device timeout"));
        }
        if step.halted {
            view.note(&format!(
                "{id}: halted: {} failures, more than the {} tolerated",
                rec.failures(),
                rec.allowance().unwrap_or(0)
            ));
        }
        for d in &step.withdraw {
            fleet
                .publish(root.topic(d, "revision/set"), true, Vec::new())
                .await?;
        }
        // A device offered now may have answered this id before (a retained
        // final status from an earlier run): it will not run it again.
        for d in &step.offer {
            if let Some(r) = rows.get(d) {
                if rollout::is_final(&r.status) {
                    changed |= rec.report(d, &r.status, &r.msg);
                }
            }
        }
        if changed {
            save(&rec)?;
        }
        if rec.done() {
            break;
        }
        tokio::select! {
            m = fleet.rx.recv() => {
                let Some(m) = m else {
                    return Err("the broker connection ended".into());
                };
                if let Some(dev) = fleet.root.device_of(&m.topic, "blob/get") {
                    if rows.contains_key(&dev) {
                        answer_pull(&fleet, &export, &dev, &m.payload).await?;
                    }
                    continue;
                }
                let Some(dev) = fleet.root.device_of(&m.topic, "revision/progress") else {
                    continue;
                };
                let Ok(p) = serde_json::from_slice::<Value>(&m.payload) else {
                    continue;
                };
                if p["id"] != id.as_str() {
                    continue; // an earlier update's retained progress
                }
                let Some(row) = rows.get_mut(&dev) else {
                    continue;
                };
                let before = row.status.clone();
                *row = render::row_from(row, &p);
                if rec.report(&dev, &row.status, &row.msg) {
                    save(&rec)?;
                }
                view.progress(&rows, &dev, &before);
            }
            _ = tick.tick() => {
                if view.many && !view.tty && last_counts.elapsed() >= Duration::from_secs(10) {
                    view.note(&render::counts_line(&rec, &rows));
                    last_counts = Instant::now();
                } else if view.many && view.tty {
                    view.status_line(&render::counts_line(&rec, &rows));
                }
            }
            _ = &mut ctrl_c => { stopped = true; break; }
            _ = tokio::time::sleep_until(deadline.into()) => { timed_out = true; break; }
        }
    }
    fleet.close().await;
    save(&rec)?;
    let outcome = Outcome::of(&rec, stopped, timed_out);
    Ok(finish(&rec, outcome, record_path, a.json))
}

/// Prints the summary; returns the exit code.
fn finish(rec: &Record, outcome: Outcome, record: Option<&Path>, json: bool) -> i32 {
    eprintln!("{}", render::summary(rec, outcome, record));
    if json {
        println!("{}", render::json_summary(rec, outcome, record));
    }
    outcome.code()
}

/// Answers one chunk pull (`blob/get`).
async fn answer_pull(
    fleet: &Fleet,
    export: &Export,
    dev: &str,
    payload: &[u8],
) -> Result<(), String> {
    let Ok(req) = serde_json::from_slice::<Value>(payload) else {
        return Ok(());
    };
    let (Some(sha), Some(off), Some(len)) = (
        req["sha256"].as_str(),
        req["offset"].as_u64(),
        req["length"].as_u64(),
    ) else {
        return Ok(());
    };
    let bytes = serve::chunk(export, sha, off, len).await;
    fleet
        .publish(
            fleet.root.topic(dev, &format!("blob/{sha}/{off}")),
            false,
            bytes,
        )
        .await
}

/// Where progress goes: a redrawn table for up to 20 devices on a terminal, a
/// line per status change for up to 50 elsewhere, counts beyond.
struct View {
    tty: bool,
    many: bool,
    json: bool,
    width: usize,
    drawn: std::cell::Cell<usize>,
}

impl View {
    fn new(names: &[String], json: bool) -> View {
        let tty = !json && std::io::stdout().is_terminal();
        View {
            tty,
            many: names.len() > if tty { 20 } else { 50 },
            json,
            width: names.iter().map(String::len).max().unwrap_or(6),
            drawn: std::cell::Cell::new(0),
        }
    }

    /// A message for the operator (stderr, so stdout stays the table or JSON).
    fn note(&self, s: &str) {
        if self.tty && !self.many {
            self.drawn.set(0);
        }
        eprintln!("{s}");
    }

    fn status_line(&self, s: &str) {
        eprint!("\r\x1b[2K{s}");
        let _ = std::io::stderr().flush();
    }

    fn progress(&self, rows: &BTreeMap<String, Row>, dev: &str, before: &str) {
        let Some(row) = rows.get(dev) else { return };
        let mut out = std::io::stdout();
        if self.json || (self.many && !rollout::is_final(&row.status)) {
            return;
        }
        if self.many {
            if row.status != before {
                if self.tty {
                    eprint!("\r\x1b[2K");
                }
                eprintln!("{}", render::line(dev, row, self.width));
            }
            return;
        }
        if self.tty {
            let drawn = self.drawn.get();
            if drawn > 0 {
                let _ = write!(out, "\x1b[{drawn}A");
            }
            for (d, r) in rows {
                let _ = writeln!(out, "\x1b[2K{}", render::line(d, r, self.width));
            }
            self.drawn.set(rows.len());
        } else if row.status != before {
            let _ = writeln!(out, "{}", render::line(dev, row, self.width));
        }
        let _ = out.flush();
    }
}
