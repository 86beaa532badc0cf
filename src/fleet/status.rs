//! `pv-fleet status`: the fleet from its retained messages. A few devices get
//! a row each; many get counts per state, revision and last update, with the
//! failed and the offline ones listed. `--watch` keeps it up to date.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde_json::{Value, json};

use crate::fleet::conn::{BrokerArgs, Fleet, Root};
use crate::fleet::select::{self, Device, Inventory, SelectArgs};

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// One row per device even for a large fleet (default up to 20 devices).
    #[arg(long)]
    pub list: bool,
    /// Keep watching and redraw when something changes (Ctrl-C ends).
    #[arg(long)]
    pub watch: bool,
    /// Every selected device as JSON.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Milliseconds of quiet that end the collection of retained messages.
    #[arg(long, default_value_t = 700)]
    pub wait_ms: u64,
}

impl StatusArgs {
    /// Every device, one row each up to 20: what `pv-fleet status` does alone.
    pub fn all(wait_ms: u64) -> StatusArgs {
        StatusArgs {
            select: SelectArgs::default(),
            list: false,
            watch: false,
            json: false,
            wait_ms,
        }
    }
}

fn s(v: Option<&Value>, k: &str) -> String {
    v.and_then(|v| v.get(k))
        .map(|x| {
            x.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| x.to_string())
        })
        .unwrap_or_else(|| "-".into())
}

/// What the view shows of one device.
struct Seen {
    online: String,
    state: String,
    revision: String,
    update: Option<(String, String, String)>,
    bridge: String,
}

fn seen(d: &Device) -> Seen {
    let st = d.get("status");
    let revision = match s(st, "revision") {
        r if r == "-" || r == "null" => s(d.get("revision/current"), "rev"),
        r => r,
    };
    let update = d.get("revision/progress").map(|p| {
        (
            s(Some(p), "id"),
            s(Some(p), "status"),
            p.get("status_msg")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        )
    });
    Seen {
        online: s(st, "online"),
        state: s(st, "state"),
        revision,
        update,
        bridge: st
            .and_then(|v| v.get("bridge"))
            .and_then(|b| b.get("version"))
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_owned(),
    }
}

fn failed(u: &Option<(String, String, String)>) -> bool {
    u.as_ref()
        .is_some_and(|u| matches!(u.1.as_str(), "ERROR" | "WONTGO"))
}

fn count_line(title: &str, counts: &BTreeMap<String, usize>) -> String {
    let mut v: Vec<_> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let shown: Vec<String> = v.iter().take(8).map(|(k, n)| format!("{k} {n}")).collect();
    let mut line = format!("{title:<12}{}", shown.join(" · "));
    if v.len() > 8 {
        let rest: usize = v[8..].iter().map(|(_, n)| **n).sum();
        line += &format!(" · {} others {rest}", v.len() - 8);
    }
    line
}

/// The view of `devices` (already selected).
pub fn render(devices: &BTreeMap<&String, &Device>, list: bool) -> String {
    let rows: Vec<(&String, Seen)> = devices.iter().map(|(d, v)| (*d, seen(v))).collect();
    let mut out = String::new();
    let mut online: BTreeMap<String, usize> = BTreeMap::new();
    let mut states = BTreeMap::new();
    let mut revs = BTreeMap::new();
    let mut updates = BTreeMap::new();
    for (_, r) in &rows {
        let o = match r.online.as_str() {
            "true" => "online",
            "false" => "offline",
            _ => "unknown",
        };
        *online.entry(o.to_owned()).or_default() += 1;
        *states.entry(r.state.clone()).or_default() += 1;
        *revs.entry(r.revision.clone()).or_default() += 1;
        if let Some(u) = &r.update {
            *updates.entry(format!("{} {}", u.0, u.1)).or_default() += 1;
        }
    }
    out += &format!("{} devices\n", rows.len());
    out += &(count_line("online", &online) + "\n");
    out += &(count_line("state", &states) + "\n");
    out += &(count_line("revision", &revs) + "\n");
    if !updates.is_empty() {
        out += &(count_line("last update", &updates) + "\n");
    }
    let fails: Vec<_> = rows.iter().filter(|(_, r)| failed(&r.update)).collect();
    let offline: Vec<_> = rows.iter().filter(|(_, r)| r.online == "false").collect();
    if !fails.is_empty() {
        out += &format!("failed ({}):\n", fails.len());
        for (d, r) in fails.iter().take(20) {
            if let Some(u) = &r.update {
                out += &format!("  {d}  {} {}  {}\n", u.0, u.1, u.2);
            }
        }
        if fails.len() > 20 {
            out += &format!("  … and {} more (--list or --json)\n", fails.len() - 20);
        }
    }
    if !offline.is_empty() {
        let names: Vec<&str> = offline.iter().take(20).map(|(d, _)| d.as_str()).collect();
        out += &format!("offline ({}): {}", offline.len(), names.join(" "));
        if offline.len() > 20 {
            out += " …";
        }
        out += "\n";
    }
    if list || rows.len() <= 20 {
        let w = rows.iter().map(|(d, _)| d.len()).max().unwrap_or(6).max(6);
        out += &format!(
            "\n{:w$}  {:7}  {:8}  {:24}  {:28}  BRIDGE\n",
            "DEVICE", "ONLINE", "STATE", "REVISION", "LAST UPDATE"
        );
        for (d, r) in &rows {
            let upd = r
                .update
                .as_ref()
                .map(|u| format!("{} {}", u.0, u.1))
                .unwrap_or_else(|| "-".into());
            out += &format!(
                "{d:w$}  {:7}  {:8}  {:24}  {upd:28}  {}\n",
                r.online, r.state, r.revision, r.bridge
            );
        }
    }
    out
}

fn json_view(devices: &BTreeMap<&String, &Device>) -> Value {
    let list: Vec<Value> = devices
        .iter()
        .map(|(d, v)| {
            let r = seen(v);
            json!({
                "device": d,
                "online": v.get("status").and_then(|s| s.get("online")).cloned().unwrap_or(Value::Null),
                "state": r.state,
                "revision": r.revision,
                "last_update": r.update.map(|u| json!({"id": u.0, "status": u.1, "status_msg": u.2})),
                "bridge": r.bridge,
            })
        })
        .collect();
    json!({"v": 1, "devices": list})
}

/// Applies the selection to what the broker retains (a device is one that has
/// a `status`).
fn selected<'a>(
    inv: &'a Inventory,
    sel: &SelectArgs,
) -> Result<BTreeMap<&'a String, &'a Device>, String> {
    let known: Inventory = inv
        .iter()
        .filter(|(_, d)| d.contains_key("status"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let names = if sel.is_empty() {
        known.keys().cloned().collect()
    } else {
        sel.resolve(Some(&known))?
    };
    Ok(inv
        .iter()
        .filter(|(k, d)| d.contains_key("status") && names.binary_search(k).is_ok())
        .collect())
}

/// `status`: once, or with `--watch` until Ctrl-C.
pub async fn run(b: &BrokerArgs, a: &StatusArgs) -> Result<i32, String> {
    let root = Root::new(&b.topic_root)?;
    let plain: Option<Vec<String>> = (!a.select.devices.is_empty() && !a.select.needs_inventory())
        .then(|| a.select.devices.clone());
    let mut f = Fleet::connect(b, select::filters(&root, plain.as_deref())).await?;
    let mut inv = select::collect(&mut f, Duration::from_millis(a.wait_ms)).await;
    let view = selected(&inv, &a.select)?;
    if view.is_empty() {
        f.close().await;
        eprintln!("no device answered under {}", root.filter("status"));
        return Ok(1);
    }
    if a.json {
        println!("{}", json_view(&view));
        f.close().await;
        return Ok(0);
    }
    let tty = std::io::stdout().is_terminal();
    let mut out = std::io::stdout();
    let mut shown = render(&view, a.list);
    let _ = write!(
        out,
        "{}{shown}",
        if tty && a.watch { "\x1b[H\x1b[2J" } else { "" }
    );
    let _ = out.flush();
    if !a.watch {
        f.close().await;
        return Ok(0);
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut dirty = false;
    loop {
        tokio::select! {
            m = f.rx.recv() => {
                let Some(m) = m else { break };
                dirty |= select::absorb(&mut inv, &f.root, &m.topic, &m.payload).is_some();
            }
            _ = tick.tick() => {
                if !dirty {
                    continue;
                }
                dirty = false;
                let now = render(&selected(&inv, &a.select)?, a.list);
                if now != shown {
                    if tty {
                        let _ = write!(out, "\x1b[H\x1b[2J{now}");
                    } else {
                        let _ = write!(out, "\n{}\n{now}", humantime::format_rfc3339_seconds(std::time::SystemTime::now()));
                    }
                    let _ = out.flush();
                    shown = now;
                }
            }
            _ = &mut ctrl_c => break,
        }
    }
    f.close().await;
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fleet(n: usize) -> Inventory {
        let root = Root::new("pv/<device_id>").unwrap();
        let mut inv = Inventory::new();
        for i in 0..n {
            let d = format!("d{i:04}");
            let put = |inv: &mut Inventory, rest: &str, v: Value| {
                select::absorb(inv, &root, &root.topic(&d, rest), v.to_string().as_bytes());
            };
            let online = i % 100 != 7;
            put(
                &mut inv,
                "status",
                json!({"v":1,"online":online,"state":if online {"ready"} else {"lost"},"revision":if i % 3 == 0 {"locals/r2"} else {"locals/r1"}}),
            );
            let st = if i % 250 == 1 { "ERROR" } else { "UPDATED" };
            put(
                &mut inv,
                "revision/progress",
                json!({"v":1,"id":"r2","status":st,"status_msg":"A container could not be started"}),
            );
        }
        inv
    }

    #[test]
    fn a_thousand_devices_fit_on_a_screen() {
        let inv = fleet(1000);
        let view = selected(&inv, &SelectArgs::default()).unwrap();
        let text = render(&view, false);
        eprintln!("{text}");
        assert!(text.lines().count() <= 12, "{text}");
        assert!(text.starts_with("1000 devices\n"));
        assert!(text.contains("online      online 990 · offline 10"));
        assert!(text.contains("revision    locals/r1 666 · locals/r2 334"));
        assert!(text.contains("last update r2 UPDATED 996 · r2 ERROR 4"));
        assert!(text.contains("failed (4):\n  d0001  r2 ERROR  A container could not be started"));
        assert!(text.contains("offline (10): d0007 d0107"));
        // --list adds a row per device.
        assert_eq!(
            render(&view, true).lines().count(),
            text.lines().count() + 2 + 1000
        );
    }

    #[test]
    fn a_few_devices_get_a_row_each() {
        let inv = fleet(3);
        let view = selected(&inv, &SelectArgs::default()).unwrap();
        let text = render(&view, false);
        let row = text.lines().find(|l| l.starts_with("d0001")).unwrap();
        assert!(row.contains("true") && row.contains("r2 ERROR"), "{row}");
        let j = json_view(&view);
        assert_eq!(j["devices"][1]["last_update"]["status"], "ERROR");
    }
}
