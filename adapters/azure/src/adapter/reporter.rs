//! The reported side: keeps the twin's reported properties the bridge owns equal
//! to what the view says, as merge patches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tracing::warn;

use tokio::sync::watch;

use super::Shared;
use crate::topics::Topics;
use crate::{report, twin};

/// The reported properties pv-bridge writes. Others in the reported section
/// (another agent's, a module's, a person's) are left alone: the difference is
/// taken over these only.
const OWNED_REPORTED: [&str; 3] = ["pantavisor", "revision", "userMeta"];

/// The components the Device Update agent owns (when it is on).
const ADU_COMPONENTS: [&str; 2] = ["deviceUpdate", "diagnosticInformation"];

/// The part of a reported section the bridge owns.
pub(super) fn owned(reported: &Value, adu: bool) -> Value {
    let mut out = serde_json::Map::new();
    let adu_keys: &[&str] = if adu { &ADU_COMPONENTS } else { &[] };
    if let Value::Object(m) = reported {
        for &k in OWNED_REPORTED.iter().chain(adu_keys) {
            if let Some(v) = m.get(k) {
                out.insert(k.to_owned(), v.clone());
            }
        }
    }
    Value::Object(out)
}

/// Keeps the reported section equal to [`report::reported`], starting from what
/// the hub holds (`baseline`, from the twin GET).
pub(super) async fn reporter(sh: Arc<Shared>, mut baseline: watch::Receiver<Option<Value>>) {
    let adu = sh.adu.is_some();
    let Ok(mut have) = baseline
        .wait_for(Option::is_some)
        .await
        .map(|b| owned(&b.clone().unwrap_or_else(|| json!({})), adu))
    else {
        return;
    };
    let mut components = sh.adu.as_ref().map(|a| a.subscribe());
    // A difference the hub refused (400): not sent again until it changes.
    let mut refused: Option<Value> = None;
    let mut view = sh.link.view();
    let mut extra = sh.extra.subscribe();
    let interval = Duration::from_secs(sh.cfg.report_interval_secs);
    let mut last_urgent: Option<Value> = None;
    let mut last_sent = Instant::now() - interval;
    let mut backoff = Duration::from_secs(5);
    let mut last_error: Option<String> = None;
    loop {
        let doc = {
            let v = view.borrow_and_update();
            let x = extra.borrow_and_update();
            let mut doc = report::reported(&sh.name, &v, &x, &sh.cfg.device_meta_keys);
            if let (Some(c), Value::Object(d)) = (components.as_mut(), &mut doc) {
                if let Value::Object(comps) = &*c.borrow_and_update() {
                    d.extend(comps.clone());
                }
            }
            doc
        };
        let mut sleep_for = None;
        let patch = twin::diff(&have, &doc)
            .map(mark_components)
            .filter(|p| refused.as_ref() != Some(p));
        if let Some(patch) = patch {
            let urgent = last_urgent.as_ref() != Some(&report::urgency(&doc));
            if urgent || last_sent.elapsed() >= interval {
                if let Err(e) = twin::validate(&patch) {
                    warn!(backend = %sh.name, reason = %e, "reported patch breaks a twin rule; sending it anyway");
                }
                let body = serde_json::to_vec(&patch).unwrap_or_default();
                match sh.twin_request(Topics::twin_patch, body).await {
                    Some(204) | Some(200) => {
                        have = doc.clone();
                        refused = None;
                        last_urgent = Some(report::urgency(&doc));
                        last_sent = Instant::now();
                        backoff = Duration::from_secs(5);
                        last_error = None;
                        continue;
                    }
                    Some(429) | Some(500..=599) => {
                        warn!(backend = %sh.name, retry_in = ?backoff, "the hub throttles reported properties");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        continue;
                    }
                    Some(status) => {
                        // One bad member must not keep the others from the hub:
                        // each top-level member goes alone, the good ones land, and
                        // what is still refused waits for a change.
                        let mut bad = Vec::new();
                        if let Value::Object(members) = &patch {
                            for (k, v) in members {
                                let one = json!({ k.clone(): v.clone() });
                                let body = serde_json::to_vec(&one).unwrap_or_default();
                                match sh.twin_request(Topics::twin_patch, body).await {
                                    Some(204) | Some(200) => twin::merge_patch(&mut have, &one),
                                    _ => bad.push(k.clone()),
                                }
                            }
                        }
                        let e = format!(
                            "the hub refused a reported patch (HTTP {status}) for {}",
                            bad.join(", ")
                        );
                        if last_error.as_deref() != Some(&e) {
                            warn!(backend = %sh.name, status, refused = ?bad, "{e}; sent again when it changes");
                        }
                        last_error = Some(e);
                        refused = twin::diff(&have, &doc);
                        last_urgent = Some(report::urgency(&doc));
                        last_sent = Instant::now();
                        continue;
                    }
                    None => {
                        // Lost on the way (the task ends anyway if the connection
                        // is gone): the same difference goes again.
                        warn!(backend = %sh.name, "no answer to a reported patch; sending it again");
                        continue;
                    }
                }
            }
            sleep_for = Some(interval.saturating_sub(last_sent.elapsed()));
        }
        let sleep = async {
            match sleep_for {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            r = extra.changed() => if r.is_err() { return },
            r = async {
                match components.as_mut() {
                    Some(c) => c.changed().await,
                    None => std::future::pending().await,
                }
            } => if r.is_err() { return },
            _ = sleep => {}
        }
    }
}

/// Every component object a patch touches carries the PnP marker `"__t": "c"`
/// (IoT Plug and Play convention), not only the first patch that made it.
fn mark_components(mut patch: Value) -> Value {
    if let Value::Object(m) = &mut patch {
        for k in ADU_COMPONENTS {
            if let Some(Value::Object(c)) = m.get_mut(k) {
                c.insert("__t".into(), json!("c"));
            }
        }
    }
    patch
}
