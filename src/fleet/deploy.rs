//! `pv-fleet deploy`: offer an export to devices and follow them to the end.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::Digest;

use crate::fleet::conn::{BrokerArgs, Fleet};
use crate::fleet::export::Export;
use crate::fleet::serve;

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// A `pvr export` folder or archive (.tar, .tgz, .tar.gz).
    pub export: PathBuf,
    /// Device ids (repeat, or comma-separated).
    #[arg(long = "device", short = 'd', required = true, value_delimiter = ',')]
    pub devices: Vec<String>,
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
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
}

/// Builds the `revision/set` payload.
fn offer(a: &DeployArgs, id: &str, export: &Export, base: Option<&str>) -> Result<Value, String> {
    let state: Value = serde_json::from_slice(&export.state).map_err(|e| e.to_string())?;
    let mut objects = serde_json::Map::new();
    for (sha, (_, size)) in &export.objects {
        let o = match (a.serve.as_str(), base) {
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
    if a.serve == "url" {
        let t = a
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

#[derive(Default, Clone)]
struct Row {
    status: String,
    msg: String,
    progress: u64,
    bytes: (u64, u64),
    objects: (u64, u64),
}

/// The percentage shown for a device: it never goes back within a deployment.
/// After its download the engine passes through Pantavisor's QUEUED ("Update
/// ready to be run", 0 %) and NEW: those sit above the download, not at its start.
fn shown_progress(before: &Row, status: &str, reported: u64) -> u64 {
    let staged = matches!(status, "QUEUED" | "NEW")
        && (before.status == "DOWNLOADING"
            || (before.bytes.1 > 0 && before.bytes.0 >= before.bytes.1));
    let p = if staged {
        reported.max(before.progress).max(40)
    } else {
        reported
    };
    p.max(before.progress).min(100)
}

fn final_status(s: &str) -> bool {
    matches!(s, "DONE" | "UPDATED" | "WONTGO" | "ERROR" | "CANCELLED")
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

fn line(dev: &str, r: &Row, width: usize) -> String {
    let filled = (r.progress.min(100) as usize * 20) / 100;
    let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(20 - filled));
    let status = if r.status.is_empty() {
        "waiting"
    } else {
        &r.status
    };
    let mut s = format!("{dev:width$}  {bar} {:>3}%  {status:<11}", r.progress);
    if r.bytes.1 > 0 {
        s += &format!(
            "  {}/{} MiB  {}/{} objects",
            mib(r.bytes.0),
            mib(r.bytes.1),
            r.objects.0,
            r.objects.1
        );
    }
    if !r.msg.is_empty() {
        s += &format!("  {}", r.msg);
    }
    s
}

/// Runs a deployment; the exit code is 0 when every device succeeded, 1 when any
/// failed, 3 on timeout.
pub async fn run(b: &BrokerArgs, a: DeployArgs) -> Result<i32, String> {
    let export = Arc::new(Export::open(&a.export)?);
    let id =
        a.id.clone()
            .unwrap_or_else(|| pv_adapter_local::offer_id(&export.name));
    if !pv_adapter_api::valid_offer_id(&id) {
        return Err(format!("--id {id:?} must be 1 to 64 of A-Z a-z 0-9 . _ -"));
    }
    let base = match a.serve.as_str() {
        "http" => {
            let addr = serve::http(a.listen, export.clone()).await?;
            Some(
                a.advertise
                    .clone()
                    .unwrap_or_else(|| format!("http://{addr}")),
            )
        }
        _ => None,
    };
    let offer = offer(&a, &id, &export, base.as_deref())?;
    let root = crate::fleet::conn::Root::new(&b.topic_root)?;
    let mut filters: Vec<String> = a
        .devices
        .iter()
        .map(|d| root.topic(d, "revision/progress"))
        .collect();
    if a.serve == "mqtt" {
        filters.extend(a.devices.iter().map(|d| root.topic(d, "blob/get")));
    }
    let mut fleet = Fleet::connect(b, filters).await?;
    let payload = serde_json::to_vec(&offer).map_err(|e| e.to_string())?;
    for d in &a.devices {
        fleet
            .publish(fleet.root.topic(d, "revision/set"), true, payload.clone())
            .await?;
    }
    eprintln!(
        "offered {id} ({} objects, {} MiB) to {} device(s); objects via {}",
        export.objects.len(),
        mib(export.objects.values().map(|(_, s)| s).sum()),
        a.devices.len(),
        base.as_deref().unwrap_or(&a.serve)
    );
    let tty = std::io::stdout().is_terminal();
    let width = a.devices.iter().map(String::len).max().unwrap_or(6);
    let mut rows: BTreeMap<String, Row> = a
        .devices
        .iter()
        .map(|d| (d.clone(), Row::default()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut drawn = 0;
    let mut out = std::io::stdout();
    loop {
        if rows.values().all(|r| final_status(&r.status)) {
            break;
        }
        let Ok(Some(m)) = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            fleet.rx.recv(),
        )
        .await
        else {
            break;
        };
        if let Some(dev) = fleet.root.device_of(&m.topic, "blob/get") {
            let Ok(req) = serde_json::from_slice::<Value>(&m.payload) else {
                continue;
            };
            let (Some(sha), Some(off), Some(len)) = (
                req["sha256"].as_str(),
                req["offset"].as_u64(),
                req["length"].as_u64(),
            ) else {
                continue;
            };
            let bytes = serve::chunk(&export, sha, off, len).await;
            fleet
                .publish(
                    fleet.root.topic(&dev, &format!("blob/{sha}/{off}")),
                    false,
                    bytes,
                )
                .await?;
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
        let status = p["status"].as_str().unwrap_or("?").to_owned();
        let progress = shown_progress(row, &status, p["progress"].as_u64().unwrap_or(0));
        *row = Row {
            status,
            msg: p["status_msg"].as_str().unwrap_or("").to_owned(),
            progress,
            bytes: (
                p["bytes_done"].as_u64().unwrap_or(0),
                p["bytes_total"].as_u64().unwrap_or(0),
            ),
            objects: (
                p["objects_done"].as_u64().unwrap_or(0),
                p["objects_total"].as_u64().unwrap_or(0),
            ),
        };
        if tty {
            if drawn > 0 {
                let _ = write!(out, "\x1b[{drawn}A");
            }
            for (d, r) in &rows {
                let _ = writeln!(out, "\x1b[2K{}", line(d, r, width));
            }
            drawn = rows.len();
        } else if row.status != before {
            let _ = writeln!(out, "{}", line(&dev, row, width));
        }
        let _ = out.flush();
    }
    fleet.close().await;
    let failed: Vec<&String> = rows
        .iter()
        .filter(|(_, r)| {
            final_status(&r.status) && !matches!(r.status.as_str(), "DONE" | "UPDATED")
        })
        .map(|(d, _)| d)
        .collect();
    let pending: Vec<&String> = rows
        .iter()
        .filter(|(_, r)| !final_status(&r.status))
        .map(|(d, _)| d)
        .collect();
    let ok = rows.len() - failed.len() - pending.len();
    eprintln!(
        "{id}: {ok} succeeded, {} failed, {} unfinished",
        failed.len(),
        pending.len()
    );
    Ok(if !pending.is_empty() {
        3
    } else if !failed.is_empty() {
        1
    } else {
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_never_goes_back_through_staging() {
        let mut row = Row::default();
        for (status, reported, want) in [
            ("QUEUED", 5, 5),
            ("DOWNLOADING", 25, 25),
            ("DOWNLOADING", 38, 38),
            ("QUEUED", 0, 40),
            ("INPROGRESS", 50, 50),
            ("TESTING", 75, 75),
            ("INPROGRESS", 50, 75),
            ("DONE", 100, 100),
        ] {
            let shown = shown_progress(&row, status, reported);
            assert_eq!(shown, want, "{status} {reported}");
            row.status = status.to_owned();
            row.progress = shown;
        }
    }
}
