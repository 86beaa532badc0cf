//! `status`, `meta`, `cmd` and `logs`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};

use crate::fleet::conn::{BrokerArgs, Fleet};

/// Collects messages until `quiet` passes without one (retained state arrives
/// in a burst after subscribing), or `max` in total.
async fn gather(f: &mut Fleet, quiet: Duration, max: Duration) -> Vec<(String, Value)> {
    let end = Instant::now() + max;
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(
        quiet.min(end.saturating_duration_since(Instant::now())),
        f.rx.recv(),
    )
    .await
    {
        if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
            out.push((m.topic, v));
        }
    }
    out
}

/// A `key=value` argument: the value as JSON when it parses, else as a string.
pub fn kv(s: &str) -> Result<(String, Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected key=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?}: empty key"));
    }
    let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
    Ok((k.to_owned(), v))
}

/// `meta set|unset|get`: edits the retained desired user-meta of a device.
pub async fn meta(
    b: &BrokerArgs,
    device: &str,
    set: &[(String, Value)],
    unset: &[String],
) -> Result<i32, String> {
    let root = crate::fleet::conn::Root::new(&b.topic_root)?;
    let desired_t = root.topic(device, "meta/user/set");
    let applied_t = root.topic(device, "meta/user");
    let mut f = Fleet::connect(b, vec![desired_t.clone(), applied_t.clone()]).await?;
    let msgs = gather(&mut f, Duration::from_millis(700), Duration::from_secs(5)).await;
    let find = |t: &str| {
        msgs.iter()
            .rev()
            .find(|(x, _)| x == t)
            .map(|(_, v)| v.clone())
    };
    let (desired, applied) = (find(&desired_t), find(&applied_t));
    if set.is_empty() && unset.is_empty() {
        println!(
            "desired: {}\napplied: {}",
            desired.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            applied.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
        );
        f.close().await;
        return Ok(0);
    }
    let mut data: serde_json::Map<String, Value> = desired
        .as_ref()
        .and_then(|d| d.get("data"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for (k, v) in set {
        data.insert(k.clone(), v.clone());
    }
    for k in unset {
        data.remove(k);
    }
    let version = desired
        .as_ref()
        .and_then(|d| d["version"].as_u64())
        .unwrap_or(0)
        + 1;
    let payload = json!({"v": 1, "version": version, "data": data});
    f.publish(desired_t, true, payload.to_string().into_bytes())
        .await?;
    // Wait until the bridge says it applied this version.
    let end = Instant::now() + Duration::from_secs(30);
    let mut code = 3;
    while let Ok(Some(m)) =
        tokio::time::timeout(end.saturating_duration_since(Instant::now()), f.rx.recv()).await
    {
        if m.topic == applied_t {
            if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                if v["version"].as_u64() >= Some(version) {
                    println!("applied version {version}: {}", v["data"]);
                    code = 0;
                    break;
                }
            }
        }
    }
    if code != 0 {
        eprintln!("version {version} published; the device has not confirmed it within 30 s");
    }
    f.close().await;
    Ok(code)
}

/// `cmd`: sends a command and waits for its final answer.
pub async fn cmd(
    b: &BrokerArgs,
    device: &str,
    name: &str,
    args: &[(String, Value)],
    timeout: u64,
    expires_in: Option<u64>,
) -> Result<i32, String> {
    let root = crate::fleet::conn::Root::new(&b.topic_root)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let id = format!("pvf-{nanos:x}");
    let v5 = b.protocol == "v5";
    let reply_t = if v5 {
        // Under the device's root: devices answer only there (response_topic_prefix),
        // and the documented ACL lets them write only there.
        root.topic(device, &format!("replies/{id}"))
    } else {
        root.topic(device, &format!("cmd/{name}/res/{id}"))
    };
    // A device on MQTT 3.1.1 never sees the Response Topic: it answers on the
    // fallback topic, so listen there too.
    let fallback = root.topic(device, &format!("cmd/{name}/res/{id}"));
    let f = Fleet::connect(b, vec![reply_t.clone(), fallback]).await?;
    let mut msg = json!({"v": 1, "id": id});
    if !args.is_empty() {
        msg["args"] = Value::Object(args.iter().cloned().collect());
    }
    if let Some(s) = expires_in {
        let t = std::time::SystemTime::now() + Duration::from_secs(s);
        msg["expires_at"] = json!(humantime::format_rfc3339_seconds(t).to_string());
    }
    let topic = root.topic(device, &format!("cmd/{name}"));
    let payload = msg.to_string().into_bytes();
    if v5 {
        f.request(topic, reply_t.clone(), Bytes::from(id.clone()), payload)
            .await?;
    } else {
        f.publish(topic, false, payload).await?;
    }
    let mut f = f;
    let end = Instant::now() + Duration::from_secs(timeout);
    let mut code = 3;
    while let Ok(Some(m)) =
        tokio::time::timeout(end.saturating_duration_since(Instant::now()), f.rx.recv()).await
    {
        let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
            continue;
        };
        if v["id"] != id.as_str() {
            continue;
        }
        let status = v["status"].as_str().unwrap_or("?");
        match v["reason"].as_str() {
            Some(r) => println!("{name} {id}: {status}: {r}"),
            None => println!("{name} {id}: {status}"),
        }
        match status {
            "successful" => {
                code = 0;
                break;
            }
            "failed" | "rejected" => {
                code = 1;
                break;
            }
            _ => {}
        }
    }
    if code == 3 {
        eprintln!("{name} {id}: no final answer within {timeout} s");
    }
    f.close().await;
    Ok(code)
}

const LEVELS: [&str; 6] = ["FATAL", "ERROR", "WARN", "INFO", "DEBUG", "ALL"];

fn level_rank(l: &str) -> usize {
    let l = l.to_ascii_uppercase();
    LEVELS
        .iter()
        .position(|x| l.starts_with(x))
        .unwrap_or(LEVELS.len())
}

/// `logs`: prints forwarded log lines as they arrive.
pub async fn logs(
    b: &BrokerArgs,
    device: &str,
    platform: Option<&str>,
    level: Option<&str>,
    count: Option<u64>,
) -> Result<i32, String> {
    let root = crate::fleet::conn::Root::new(&b.topic_root)?;
    let filter = root.topic(device, &format!("logs/{}", platform.unwrap_or("+")));
    let mut f = Fleet::connect(b, vec![filter]).await?;
    let max = level.map(level_rank);
    let mut printed = 0u64;
    while let Some(m) = f.rx.recv().await {
        let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
            continue;
        };
        if let Some(n) = v["dropped"].as_u64().filter(|n| *n > 0) {
            println!("… {n} line(s) dropped by the device's rate limit");
        }
        for r in v["records"].as_array().into_iter().flatten() {
            let lvl = r["lvl"].as_str().unwrap_or("");
            if max.is_some_and(|m| level_rank(lvl) > m) {
                continue;
            }
            println!(
                "{} {} {} {} {}",
                r["ts"].as_str().unwrap_or(""),
                r["plat"].as_str().unwrap_or(""),
                r["src"].as_str().unwrap_or(""),
                lvl,
                r["msg"].as_str().unwrap_or("")
            );
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                f.close().await;
                return Ok(0);
            }
        }
    }
    Ok(0)
}
