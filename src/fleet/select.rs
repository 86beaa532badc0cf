//! Which devices an operation is for: names, globs (`plant-*`) and matches on
//! device-meta or user-meta (`--where app.channel=beta`), resolved against the
//! fleet's retained state.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::fleet::conn::{BrokerArgs, Fleet, Root};

/// The retained topics of a device that pv-fleet reads.
pub const RETAINED: [&str; 5] = [
    "status",
    "revision/current",
    "revision/progress",
    "meta/device",
    "meta/user",
];

/// What the broker retains for one device, by topic rest.
pub type Device = BTreeMap<&'static str, Value>;

/// The devices under the topic root, from their retained messages.
pub type Inventory = BTreeMap<String, Device>;

/// Selection arguments shared by `deploy` and `status`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SelectArgs {
    /// Device ids or globs (`plant-*`, `?` for one character); repeat or
    /// comma-separate.
    #[arg(long = "device", short = 'd', value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Every device that has a retained status under the topic root.
    #[arg(long)]
    pub all: bool,
    /// Only devices whose device-meta or user-meta has KEY=VALUE (or not:
    /// KEY!=VALUE); repeat for all of several.
    #[arg(long = "where", value_parser = cond)]
    pub conditions: Vec<Cond>,
}

/// One `--where` condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Cond {
    pub key: String,
    pub value: String,
    pub equal: bool,
}

/// Parses a `--where` condition.
pub fn cond(s: &str) -> Result<Cond, String> {
    let (key, value, equal) = match s.split_once("!=") {
        Some((k, v)) => (k, v, false),
        None => match s.split_once('=') {
            Some((k, v)) => (k, v, true),
            None => return Err(format!("{s:?}: expected KEY=VALUE or KEY!=VALUE")),
        },
    };
    if key.is_empty() {
        return Err(format!("{s:?}: empty key"));
    }
    Ok(Cond {
        key: key.to_owned(),
        value: value.to_owned(),
        equal,
    })
}

/// `*` any run of characters, `?` one character.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// A meta value as the operator writes it: strings bare, the rest as JSON.
fn text(v: &Value) -> String {
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

fn meta<'a>(d: &'a Device, rest: &str, key: &str) -> Option<&'a Value> {
    d.get(rest)?.get("data")?.get(key)
}

impl Cond {
    pub fn matches(&self, d: &Device) -> bool {
        let hit = ["meta/device", "meta/user"]
            .iter()
            .filter_map(|r| meta(d, r, &self.key))
            .any(|v| text(v) == self.value);
        hit == self.equal
    }
}

impl SelectArgs {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && !self.all && self.conditions.is_empty()
    }

    /// Whether resolving needs the fleet's retained state.
    pub fn needs_inventory(&self) -> bool {
        self.all || !self.conditions.is_empty() || self.devices.iter().any(|d| is_glob(d))
    }

    /// The selected devices, sorted. Plain names need no inventory (a device
    /// may not have connected yet: its offer waits, retained, on the broker).
    pub fn resolve(&self, inv: Option<&Inventory>) -> Result<Vec<String>, String> {
        for d in &self.devices {
            if d.is_empty() || d.contains(['/', '+', '#']) {
                return Err(format!("--device {d:?}: not a device id or glob"));
            }
        }
        let empty = Inventory::new();
        let inv = inv.unwrap_or(&empty);
        let mut out = std::collections::BTreeSet::new();
        if self.all || (self.devices.is_empty() && !self.conditions.is_empty()) {
            out.extend(inv.keys().cloned());
        }
        for d in &self.devices {
            if is_glob(d) {
                out.extend(inv.keys().filter(|k| glob(d, k)).cloned());
            } else {
                out.insert(d.clone());
            }
        }
        if !self.conditions.is_empty() {
            out.retain(|d| {
                inv.get(d)
                    .is_some_and(|dev| self.conditions.iter().all(|c| c.matches(dev)))
            });
        }
        Ok(out.into_iter().collect())
    }
}

/// Reads the retained state of every device (`devices`, or all under the
/// root); collection ends after `quiet` without a message.
pub async fn inventory(
    b: &BrokerArgs,
    devices: Option<&[String]>,
    quiet: Duration,
) -> Result<Inventory, String> {
    let root = Root::new(&b.topic_root)?;
    let filters = filters(&root, devices);
    let mut f = Fleet::connect(b, filters).await?;
    let inv = collect(&mut f, quiet).await;
    f.close().await;
    Ok(inv)
}

/// Collects the retained burst after subscribing: until `quiet` passes without
/// a message, 30 s at most.
pub async fn collect(f: &mut Fleet, quiet: Duration) -> Inventory {
    let mut inv = Inventory::new();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(m)) = tokio::time::timeout(
        quiet.min(end.saturating_duration_since(std::time::Instant::now())),
        f.rx.recv(),
    )
    .await
    {
        absorb(&mut inv, &f.root, &m.topic, &m.payload);
    }
    inv
}

/// The subscriptions for the retained state of `devices` (or of all).
pub fn filters(root: &Root, devices: Option<&[String]>) -> Vec<String> {
    RETAINED
        .iter()
        .flat_map(|r| match devices {
            None => vec![root.filter(r)],
            Some(ds) => ds.iter().map(|d| root.topic(d, r)).collect(),
        })
        .collect()
}

/// Takes one message into the inventory; an empty payload clears the topic.
pub fn absorb(inv: &mut Inventory, root: &Root, topic: &str, payload: &[u8]) -> Option<String> {
    for r in RETAINED {
        if let Some(d) = root.device_of(topic, r) {
            if payload.is_empty() {
                if let Some(dev) = inv.get_mut(&d) {
                    dev.remove(r);
                }
            } else if let Ok(v) = serde_json::from_slice::<Value>(payload) {
                inv.entry(d.clone()).or_default().insert(r, v);
            }
            return Some(d);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob("plant-*", "plant-7"));
        assert!(glob("plant-*", "plant-"));
        assert!(!glob("plant-*", "plan-7"));
        assert!(glob("*-7", "plant-7"));
        assert!(glob("p?ant-*-b", "plant-12-b"));
        assert!(!glob("p?ant", "plant-1"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "a-x-b-y-c"));
        assert!(!glob("a*b*c", "a-x-b-y"));
    }

    fn inv() -> Inventory {
        let mut inv = Inventory::new();
        let root = Root::new("pv/<device_id>").unwrap();
        let put = |inv: &mut Inventory, t: &str, v: Value| {
            absorb(inv, &root, t, &serde_json::to_vec(&v).unwrap());
        };
        put(&mut inv, "pv/a1/status", json!({"online": true}));
        put(
            &mut inv,
            "pv/a1/meta/user",
            json!({"v":1,"version":1,"data":{"app.channel":"beta"}}),
        );
        put(&mut inv, "pv/a2/status", json!({"online": false}));
        put(
            &mut inv,
            "pv/a2/meta/device",
            json!({"v":1,"data":{"app.channel":"stable","hw.ram":512}}),
        );
        put(&mut inv, "pv/b1/status", json!({"online": true}));
        inv
    }

    fn sel(devices: &[&str], all: bool, conds: &[&str]) -> SelectArgs {
        SelectArgs {
            devices: devices.iter().map(|s| s.to_string()).collect(),
            all,
            conditions: conds.iter().map(|c| cond(c).unwrap()).collect(),
        }
    }

    #[test]
    fn selects_by_name_glob_and_meta() {
        let inv = inv();
        let r = |s: SelectArgs| s.resolve(Some(&inv)).unwrap();
        assert_eq!(r(sel(&["a*"], false, &[])), ["a1", "a2"]);
        assert_eq!(r(sel(&[], true, &[])), ["a1", "a2", "b1"]);
        assert_eq!(r(sel(&[], false, &["app.channel=beta"])), ["a1"]);
        assert_eq!(r(sel(&[], false, &["hw.ram=512"])), ["a2"]);
        assert_eq!(r(sel(&["a*"], false, &["app.channel!=beta"])), ["a2"]);
        assert_eq!(r(sel(&["zz", "b1"], false, &[])), ["b1", "zz"]);
        // A named device that is not in the inventory does not match a condition.
        assert_eq!(
            r(sel(&["zz"], false, &["app.channel!=beta"])),
            Vec::<String>::new()
        );
        assert!(sel(&["pv/x"], false, &[]).resolve(None).is_err());
        assert!(!sel(&["a1", "b1"], false, &[]).needs_inventory());
        assert!(sel(&["a?"], false, &[]).needs_inventory());
    }

    #[test]
    fn conditions_parse() {
        assert_eq!(
            cond("a.b!=c").unwrap(),
            Cond {
                key: "a.b".into(),
                value: "c".into(),
                equal: false
            }
        );
        assert_eq!(cond("k=").unwrap().value, "");
        assert!(cond("=x").is_err());
        assert!(cond("novalue").is_err());
    }

    #[test]
    fn an_empty_retained_message_clears_the_topic() {
        let mut inv = inv();
        let root = Root::new("pv/<device_id>").unwrap();
        absorb(&mut inv, &root, "pv/a1/meta/user", b"");
        assert!(!inv["a1"].contains_key("meta/user"));
    }
}
