//! pv-ctrl routing and endpoint handlers (`ctrl/*.c`), with each generation's
//! status codes and error texts.

use serde_json::Value;

use super::Generation;
use super::device::{Device, progress_json};
use super::store::MetaKind;
use super::wire::Reply;

/// An endpoint, with the wildcard segment (if any) captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ep {
    Containers,
    Container,
    Groups,
    Signal,
    Commands,
    Objects,
    Object,
    Steps,
    Step,
    StepLocal,
    Progress,
    ProgressLocal,
    Commitmsg,
    CommitmsgLocal,
    Meta(MetaKind),
    MetaKey(MetaKind),
    Buildinfo,
    Config,
    Config2,
    Drivers,
    DriversAll { load: bool },
    Driver { load: bool },
    Daemons,
    Daemon,
    Xconnect,
    StorageGc,
    Wakelocks,
}

struct RouteDef {
    pattern: &'static str,
    methods: &'static [&'static str],
    mgmt: bool,
    since_027: bool,
    ep: Ep,
}

const fn r(pattern: &'static str, methods: &'static [&'static str], ep: Ep) -> RouteDef {
    RouteDef {
        pattern,
        methods,
        mgmt: true,
        since_027: false,
        ep,
    }
}

const fn new(pattern: &'static str, methods: &'static [&'static str], ep: Ep) -> RouteDef {
    RouteDef {
        pattern,
        methods,
        mgmt: true,
        since_027: true,
        ep,
    }
}

const ROUTES: &[RouteDef] = &[
    r("/containers", &["GET"], Ep::Containers),
    new("/containers/{}", &["PUT"], Ep::Container),
    r("/groups", &["GET"], Ep::Groups),
    RouteDef {
        pattern: "/signal",
        methods: &["POST"],
        mgmt: false,
        since_027: false,
        ep: Ep::Signal,
    },
    r("/commands", &["POST"], Ep::Commands),
    r("/objects", &["GET"], Ep::Objects),
    r("/objects/{}", &["GET", "PUT"], Ep::Object),
    r("/steps", &["GET"], Ep::Steps),
    r("/steps/locals/{}", &["GET", "PUT"], Ep::StepLocal),
    r("/steps/locals/{}/progress", &["GET"], Ep::ProgressLocal),
    r("/steps/locals/{}/commitmsg", &["PUT"], Ep::CommitmsgLocal),
    r("/steps/{}", &["GET"], Ep::Step),
    r("/steps/{}/progress", &["GET"], Ep::Progress),
    r("/steps/{}/commitmsg", &["PUT"], Ep::Commitmsg),
    r("/user-meta", &["GET"], Ep::Meta(MetaKind::User)),
    r(
        "/user-meta/{}",
        &["PUT", "DELETE"],
        Ep::MetaKey(MetaKind::User),
    ),
    r("/device-meta", &["GET"], Ep::Meta(MetaKind::Device)),
    r(
        "/device-meta/{}",
        &["PUT", "DELETE"],
        Ep::MetaKey(MetaKind::Device),
    ),
    r("/buildinfo", &["GET"], Ep::Buildinfo),
    r("/config", &["GET"], Ep::Config),
    r("/config2", &["GET"], Ep::Config2),
    r("/drivers", &["GET"], Ep::Drivers),
    r("/drivers/load", &["PUT"], Ep::DriversAll { load: true }),
    r("/drivers/unload", &["PUT"], Ep::DriversAll { load: false }),
    r("/drivers/{}/load", &["PUT"], Ep::Driver { load: true }),
    r("/drivers/{}/unload", &["PUT"], Ep::Driver { load: false }),
    new("/daemons", &["GET"], Ep::Daemons),
    new("/daemons/{}", &["PUT"], Ep::Daemon),
    new("/xconnect-graph", &["GET"], Ep::Xconnect),
    new("/storage/gc", &["POST"], Ep::StorageGc),
    new("/wakelocks", &["GET"], Ep::Wakelocks),
];

/// A request matched to an endpoint.
#[derive(Debug, Clone)]
pub struct Matched {
    pub ep: Ep,
    /// The wildcard segment, raw.
    pub arg: String,
    pub mgmt: bool,
    /// Exact (non-wildcard) routes word their 403 differently in gen-2.
    pub exact: bool,
}

fn matches(pattern: &str, target: &str) -> Option<String> {
    let p: Vec<&str> = pattern.split('/').collect();
    let t: Vec<&str> = target.split('/').collect();
    if p.len() != t.len() || t.len() > 11 {
        return None;
    }
    let mut arg = None;
    for (ps, ts) in p.iter().zip(&t) {
        if *ps == "{}" {
            arg = Some((*ts).to_owned());
        } else if ps != ts {
            return None;
        }
    }
    Some(arg.unwrap_or_default())
}

/// Finds the endpoint for a request, or the error Pantavisor answers.
/// `pv_024`: Pantavisor 024, which lacks the 027+ endpoints (`/containers/{}`,
/// `/daemons`, `/xconnect-graph`, 029's `/storage/gc`, master's `/wakelocks`).
pub fn route(
    generation: Generation,
    pv_024: bool,
    method: &str,
    target: &str,
) -> Result<Matched, Reply> {
    let unknown = || match generation {
        Generation::Gen1 => Reply::err(400, "Unknown endpoint"),
        Generation::Gen2 => Reply::err(400, format!("unknown endpoint: {target}")),
    };
    let found = ROUTES
        .iter()
        .filter(|d| !d.since_027 || (generation == Generation::Gen2 && !pv_024))
        .find_map(|d| matches(d.pattern, target).map(|arg| (d, arg)));
    let Some((def, arg)) = found else {
        return Err(unknown());
    };
    if !def.methods.contains(&method) {
        return Err(match generation {
            Generation::Gen1 => unknown(),
            Generation::Gen2 if matches!(method, "GET" | "POST" | "HEAD" | "PUT" | "DELETE") => {
                Reply::err(400, "Method not supported for this endpoint")
            }
            Generation::Gen2 => Reply::err(405, "Method Not Allowed"),
        });
    }
    Ok(Matched {
        ep: def.ep,
        arg,
        mgmt: def.mgmt,
        exact: !def.pattern.contains("{}"),
    })
}

/// The 403 a non-mgmt caller gets.
pub fn forbidden(generation: Generation, exact: bool) -> Reply {
    if generation == Generation::Gen2 && exact {
        Reply::err(403, "Request not sent from a mgmt platform")
    } else {
        Reply::err(403, "Request not sent from mgmt platform")
    }
}

/// Largest body a handler takes; larger ones get 507 in gen-2 (a quirk of the
/// shared body reader) and "bad format" in gen-1.
pub fn body_limit(ep: Ep) -> usize {
    match ep {
        Ep::Container | Ep::Daemon => 1024,
        Ep::Signal | Ep::Commands | Ep::MetaKey(_) => 4096,
        Ep::Commitmsg | Ep::CommitmsgLocal => 256,
        _ => 64 * 1024 * 1024,
    }
}

/// Whether an empty body goes unanswered (gen-2 wildcard PUTs that rely on a
/// "data added" callback).
pub fn silent_when_empty(ep: Ep) -> bool {
    matches!(
        ep,
        Ep::Container | Ep::Daemon | Ep::Commitmsg | Ep::CommitmsgLocal
    )
}

fn meta_word(kind: MetaKind) -> &'static str {
    match kind {
        MetaKind::User => "user meta",
        MetaKind::Device => "device meta",
    }
}

fn not_found() -> Reply {
    Reply::err(404, "Resource does not exist")
}

/// Resolves `/steps/<arg>` to a revision name (the alias `current` included).
fn rev_of(dev: &Device, ep: Ep, arg: &str) -> String {
    match ep {
        Ep::StepLocal | Ep::ProgressLocal | Ep::CommitmsgLocal => format!("locals/{arg}"),
        _ if arg == "current" => dev.running().to_owned(),
        _ => arg.to_owned(),
    }
}

/// Handles every endpoint but object uploads (streamed by the connection).
pub fn handle(
    dev: &mut Device,
    generation: Generation,
    caller: &str,
    m: &Matched,
    method: &str,
    body: &[u8],
) -> Reply {
    let gen1 = generation == Generation::Gen1;
    match m.ep {
        Ep::Containers => Reply::Json(dev.containers_json()),
        Ep::Container => dev.container_action(&m.arg, body),
        Ep::Groups => Reply::Json(dev.groups_json()),
        Ep::Signal => dev.signal(caller, body),
        Ep::Commands => dev.submit(body),
        Ep::Objects => {
            let list = dev
                .store()
                .objects()
                .into_iter()
                .map(|(sha, (size, _))| format!("{{\"sha256\":\"{sha}\",\"size\":\"{size}\"}}"))
                .collect::<Vec<_>>();
            Reply::Json(format!("[{}]", list.join(",")).into_bytes())
        }
        Ep::Object => {
            // GET only; PUT is streamed by the connection.
            let path = dev.store().object(&m.arg);
            if m.arg.len() != 64 {
                Reply::err(400, "Request has bad object name")
            } else if !path.is_file() {
                if gen1 {
                    not_found()
                } else {
                    Reply::err(400, "Request has bad object name")
                }
            } else {
                Reply::File(path)
            }
        }
        Ep::Steps => Reply::Json(dev.steps_text().into_bytes()),
        Ep::Step | Ep::StepLocal if method == "GET" => {
            let rev = rev_of(dev, m.ep, &m.arg);
            match dev.store().state_json(&rev) {
                Some(j) => Reply::Json(j),
                None => not_found(),
            }
        }
        Ep::StepLocal => put_step(dev, gen1, &m.arg, body),
        Ep::Step => Reply::err(400, "Method not supported for this endpoint"),
        Ep::Progress | Ep::ProgressLocal => {
            let rev = rev_of(dev, m.ep, &m.arg);
            match dev.store().progress_raw(&rev) {
                Some(p) => Reply::Json(p),
                None => not_found(),
            }
        }
        Ep::Commitmsg | Ep::CommitmsgLocal => {
            let rev = rev_of(dev, m.ep, &m.arg);
            if !dev.store().trail_exists(&rev) {
                return not_found();
            }
            match dev.store().set_commitmsg(&rev, body) {
                Ok(()) => Reply::Ok,
                Err(_) => Reply::err(500, "Cannot write commit message"),
            }
        }
        Ep::Meta(kind) => {
            let map: serde_json::Map<String, Value> = dev
                .store()
                .meta(kind)
                .into_iter()
                .map(|(k, raw)| {
                    let v = match serde_json::from_slice::<Value>(&raw) {
                        Ok(v @ (Value::Object(_) | Value::Array(_))) => v,
                        _ => Value::String(String::from_utf8_lossy(&raw).into_owned()),
                    };
                    (k, v)
                })
                .collect();
            Reply::json(&Value::Object(map))
        }
        Ep::MetaKey(kind) => meta_key(dev, gen1, kind, method, &m.arg, body),
        Ep::Buildinfo => Reply::Text(
            format!(
                "pv-sim {} (simulated Pantavisor {})\n",
                env!("CARGO_PKG_VERSION"),
                if gen1 { "023" } else { "029" }
            )
            .into_bytes(),
        ),
        Ep::Config => Reply::json(&dev.config_json()),
        Ep::Config2 => Reply::Json(dev.config2_json()),
        Ep::Drivers => Reply::Json(dev.drivers_json(caller)),
        Ep::DriversAll { load } => dev.driver_action(caller, None, load),
        Ep::Driver { load } => dev.driver_action(caller, Some(&m.arg), load),
        Ep::Daemons => Reply::json(&dev.daemons_json()),
        Ep::Daemon => dev.daemon_action(&m.arg, body),
        Ep::Xconnect => Reply::err(404, "xconnect not enabled at build time"),
        Ep::StorageGc => {
            let reclaimed = dev.gc();
            Reply::json(&serde_json::json!({ "reclaimed": reclaimed }))
        }
        Ep::Wakelocks => Reply::json(&serde_json::json!({
            "mode": "none", "count": 0, "degraded": false, "autosleep": false,
            "settling": false, "polling": false, "run_window": 0, "held": {}
        })),
    }
}

fn put_step(dev: &mut Device, gen1: bool, name: &str, body: &[u8]) -> Reply {
    if name.is_empty() || name.chars().count() > 64 || name == "." || name == ".." {
        return Reply::err(
            400,
            if gen1 {
                "Step name has bad name"
            } else {
                "Request has bas step name"
            },
        );
    }
    let rev = format!("locals/{name}");
    let store = dev.store().clone();
    let fail = |msg: &str| {
        let _ = store.remove_trail(&rev);
        Reply::err(
            422,
            if gen1 {
                "State verification has failed"
            } else {
                msg
            },
        )
    };
    // 025+ (`ctrl/ctrl_steps_ep.c`) sets NEW before the body arrives, over any
    // earlier progress; 024 and gen-1 leave an existing trail's progress as it was.
    let new_progress = !gen1 && !dev.config().pv_024;
    if new_progress {
        let _ = store.set_progress(&rev, &progress_json("NEW", "Update not yet installed"));
    }
    if body.is_empty() {
        return fail("Storage: Cannot read state JSON");
    }
    if store.put_state_json(&rev, body).is_err() {
        return fail("Storage: Cannot read state JSON");
    }
    if super::revision::Rev::parse(body).is_err() {
        return fail("Parser: State JSON has bad format");
    }
    if new_progress {
        let _ = store.set_progress(&rev, &progress_json("NEW", "Update ready to be run"));
    }
    dev.log("INFO", "ctrl", &format!("revision {rev} staged"));
    Reply::Ok
}

fn meta_key(
    dev: &mut Device,
    gen1: bool,
    kind: MetaKind,
    method: &str,
    key: &str,
    body: &[u8],
) -> Reply {
    let word = meta_word(kind);
    let cannot = || Reply::err(500, format!("Cannot add or update {word}"));
    if key.is_empty() || key == "." || key == ".." {
        return cannot();
    }
    if method == "DELETE" {
        return match dev.store().delete_meta(kind, key) {
            Ok(true) => Reply::Ok,
            Ok(false) => {
                let text = match kind {
                    MetaKind::User => "User meta does not exist",
                    MetaKind::Device => "Device meta does not exist",
                };
                Reply::Error {
                    code: 404,
                    text: text.into(),
                    retry_after: None,
                    then_ok: gen1,
                }
            }
            Err(_) => cannot(),
        };
    }
    if body.is_empty() {
        return Reply::err(400, format!("Cannot add or update {word}"));
    }
    match dev.store().set_meta(kind, key, body) {
        Ok(_) => Reply::Ok,
        Err(_) => cannot(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(generation: Generation, method: &str, target: &str) -> Result<(Ep, String), String> {
        route(generation, false, method, target)
            .map(|m| (m.ep, m.arg))
            .map_err(|r| match r {
                Reply::Error { code, text, .. } => format!("{code} {text}"),
                other => format!("{other:?}"),
            })
    }

    #[test]
    fn routes_match_pantavisor_paths() {
        use Generation::*;
        assert_eq!(
            ep(Gen2, "GET", "/containers"),
            Ok((Ep::Containers, String::new()))
        );
        assert_eq!(
            ep(Gen2, "PUT", "/steps/locals/r1"),
            Ok((Ep::StepLocal, "r1".into()))
        );
        assert_eq!(
            ep(Gen2, "GET", "/steps/current/progress"),
            Ok((Ep::Progress, "current".into()))
        );
        assert_eq!(
            ep(Gen2, "PUT", "/drivers/load"),
            Ok((Ep::DriversAll { load: true }, String::new()))
        );
        assert_eq!(
            ep(Gen2, "PUT", "/drivers/wifi/load"),
            Ok((Ep::Driver { load: true }, "wifi".into()))
        );
        assert_eq!(
            ep(Gen2, "GET", "/containers?x=1"),
            Err("400 unknown endpoint: /containers?x=1".into())
        );
        assert_eq!(
            ep(Gen2, "PUT", "/steps/5"),
            Err("400 Method not supported for this endpoint".into())
        );
        assert_eq!(
            ep(Gen2, "GET", "http://localhost/containers"),
            Err("400 unknown endpoint: http://localhost/containers".into())
        );
        assert_eq!(
            ep(Gen1, "GET", "/daemons"),
            Err("400 Unknown endpoint".into())
        );
        assert_eq!(
            ep(Gen1, "PUT", "/containers"),
            Err("400 Unknown endpoint".into())
        );
    }
}
