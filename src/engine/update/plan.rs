//! Which objects an update must fetch, given what the device already has. Pure,
//! so the rules are tested without a device.

use std::collections::{BTreeMap, BTreeSet};

use pv_adapter_api::{ObjectRef, ObjectSource, Offer};

use super::Refusal;
use crate::state::State;

/// An object to fetch and upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Fetch {
    pub(super) sha: String,
    pub(super) source: Src,
    pub(super) size: Option<u64>,
}

/// Where an object's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Src {
    /// The adapter's fetcher, with its key.
    Adapter(String),
    /// An http/https URL.
    Url(String),
}

/// What an update must do about its objects.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// Not on the device, or on it but incomplete: fetch and upload.
    pub(super) fetch: Vec<Fetch>,
    /// Listed by the device, but neither its size nor its use by the running
    /// revision says it is whole: hash it on the device (`GET /objects/<sha>`)
    /// and fall back to the fetch, if the offer gives a source.
    pub(super) check: Vec<Check>,
}

/// A listed object to verify before it is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Check {
    pub(super) sha: String,
    /// Where the state uses it (for messages).
    pub(super) path: String,
    /// Its listed size.
    pub(super) listed: u64,
    /// What to do when it turns out partial; `None`: the offer has no source.
    pub(super) fallback: Option<Fetch>,
}

/// Decides which objects must be fetched or checked, given what the device lists
/// (sha → size) and the objects of the running revision (whole: Pantavisor
/// validated them when it booted or started it).
///
/// A broken upload leaves a partial file under the object's final name, listed
/// with its partial size (gen-2, reference §2.5), so a listed object is trusted
/// only when its size is the one the offer gives, or the running revision uses it.
pub(super) fn plan(
    state: &State,
    offer: &Offer,
    have: &BTreeMap<String, u64>,
    running: &BTreeSet<String>,
) -> Result<Plan, Refusal> {
    let mut seen = BTreeSet::new();
    let mut out = Plan::default();
    for (path, sha) in state.objects() {
        if !seen.insert(sha) {
            continue;
        }
        let src = offer.objects.get(sha);
        let expected = src.and_then(|s| s.size);
        let listed = have.get(sha).copied();
        match (listed, expected) {
            (Some(got), Some(e)) if got == e => continue,
            (Some(_), None) if running.contains(sha) => continue,
            _ => {}
        }
        let fetch = src.map(|s| source(offer, path, sha, s)).transpose()?;
        if let (Some(got), None) = (listed, expected) {
            out.check.push(Check {
                sha: sha.to_owned(),
                path: path.to_owned(),
                listed: got,
                fallback: fetch,
            });
            continue;
        }
        match fetch {
            Some(f) => out.fetch.push(f),
            None => {
                let where_ = match listed {
                    Some(got) => format!("is on the device with only {got} bytes"),
                    None => "is not on the device".to_owned(),
                };
                return Err(Refusal::wontgo(format!(
                    "object {sha} ({path}) {where_} and the offer gives no source for it"
                )));
            }
        }
    }
    Ok(out)
}

/// Where an offered object's bytes come from, or why they cannot be had.
fn source(offer: &Offer, path: &str, sha: &str, src: &ObjectRef) -> Result<Fetch, Refusal> {
    let source = match &src.source {
        ObjectSource::Adapter { key } if offer.fetcher.is_some() => Src::Adapter(key.clone()),
        ObjectSource::Adapter { key } => {
            return Err(Refusal::wontgo(format!(
                "object {sha} ({path}): source {key:?} needs the adapter's fetcher, which the offer lacks"
            )));
        }
        ObjectSource::Url { url } if url.starts_with("http://") || url.starts_with("https://") => {
            Src::Url(url.clone())
        }
        ObjectSource::Url { url } => {
            return Err(Refusal::wontgo(format!(
                "object {sha} ({path}): source {} is not an http or https URL",
                pv_http::redact(url)
            )));
        }
    };
    Ok(Fetch {
        sha: sha.to_owned(),
        source,
        size: src.size,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pv_adapter_api::{ObjectFetcher, ObjectReader};
    use serde_json::json;
    use std::sync::Arc;

    fn sha(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    struct NoFetch;
    impl ObjectFetcher for NoFetch {
        fn open(
            &self,
            key: &str,
        ) -> pv_adapter_api::BoxFuture<'_, Result<(ObjectReader, u64), pv_adapter_api::AdapterError>>
        {
            let key = key.to_owned();
            Box::pin(async move {
                Err(pv_adapter_api::AdapterError::Object {
                    key,
                    reason: "unused".into(),
                })
            })
        }
    }

    fn offer(objects: &[(String, Option<u64>, ObjectSource)]) -> Offer {
        Offer {
            id: "r1".into(),
            state: vec![],
            state_url: None,
            objects: objects
                .iter()
                .map(|(s, size, src)| {
                    (
                        s.clone(),
                        ObjectRef {
                            sha256: s.clone(),
                            size: *size,
                            source: src.clone(),
                        },
                    )
                })
                .collect(),
            fetcher: Some(Arc::new(NoFetch)),
        }
    }

    fn state() -> State {
        State::from_value(json!({
            "#spec": "pantavisor-service-system@1",
            "bsp/kernel.img": sha(1),
            "app/root.squashfs": sha(2),
            "app/copy": sha(2),
        }))
        .unwrap()
    }

    fn key(k: &str) -> ObjectSource {
        ObjectSource::Adapter { key: k.into() }
    }

    fn have(objects: &[(u8, u64)]) -> BTreeMap<String, u64> {
        objects.iter().map(|(n, size)| (sha(*n), *size)).collect()
    }

    fn none() -> BTreeSet<String> {
        BTreeSet::new()
    }

    #[test]
    fn plan_skips_objects_on_the_device_and_fetches_the_rest_once() {
        let o = offer(&[(sha(1), Some(10), key("k1")), (sha(2), Some(20), key("k2"))]);
        let p = plan(&state(), &o, &have(&[(1, 10)]), &none()).unwrap();
        assert_eq!(
            p.fetch,
            vec![Fetch {
                sha: sha(2),
                source: Src::Adapter("k2".into()),
                size: Some(20)
            }]
        );
        assert!(p.check.is_empty());
    }

    #[test]
    fn plan_refetches_a_partial_object() {
        let o = offer(&[(sha(1), Some(10), key("k1")), (sha(2), Some(20), key("k2"))]);
        let p = plan(&state(), &o, &have(&[(1, 3), (2, 20)]), &none()).unwrap();
        assert_eq!(p.fetch.len(), 1);
        assert_eq!(p.fetch[0].sha, sha(1));
    }

    #[test]
    fn a_listed_object_of_unknown_size_is_checked_unless_the_running_revision_uses_it() {
        // A broken upload of sha(2) left 7 bytes; the offer gives no sizes.
        let o = offer(&[(sha(1), None, key("k1")), (sha(2), None, key("k2"))]);
        let listed = have(&[(1, 10), (2, 7)]);
        let p = plan(&state(), &o, &listed, &none()).unwrap();
        assert!(p.fetch.is_empty());
        // In the state's order: app/ before bsp/.
        let checked: Vec<_> = p.check.iter().map(|c| (c.sha.clone(), c.listed)).collect();
        assert_eq!(checked, vec![(sha(2), 7), (sha(1), 10)]);
        assert_eq!(
            p.check[0].fallback,
            Some(Fetch {
                sha: sha(2),
                source: Src::Adapter("k2".into()),
                size: None
            })
        );
        assert_eq!(p.check[0].path, "app/copy", "the first path that uses it");
        // The running revision's objects were validated by Pantavisor: trusted.
        let p = plan(&state(), &o, &listed, &BTreeSet::from([sha(1)])).unwrap();
        assert_eq!(p.check.len(), 1);
        assert_eq!(p.check[0].sha, sha(2));
        // Without a source the check has no fallback.
        let o = offer(&[(sha(1), None, key("k1"))]);
        let p = plan(&state(), &o, &listed, &none()).unwrap();
        assert_eq!(p.check[0].fallback, None);
    }

    #[test]
    fn plan_names_the_object_without_a_source() {
        let o = offer(&[(sha(2), Some(20), key("k2"))]);
        let e = plan(&state(), &o, &BTreeMap::new(), &none()).unwrap_err();
        assert_eq!(
            e.msg,
            format!(
                "object {} (bsp/kernel.img) is not on the device and the offer gives no source for it",
                sha(1)
            )
        );
        let o = offer(&[
            (
                sha(1),
                None,
                ObjectSource::Url {
                    url: "https://x/1".into(),
                },
            ),
            (sha(2), None, key("k")),
        ]);
        let p = plan(&state(), &o, &BTreeMap::new(), &none()).unwrap();
        assert!(
            p.fetch
                .iter()
                .any(|f| f.source == Src::Url("https://x/1".into()))
        );
        let o = offer(&[
            (
                sha(1),
                None,
                ObjectSource::Url {
                    url: "ftp://x/1?token=secret".into(),
                },
            ),
            (sha(2), None, key("k")),
        ]);
        let e = plan(&state(), &o, &BTreeMap::new(), &none()).unwrap_err();
        assert!(e.msg.contains("is not an http or https URL"), "{}", e.msg);
        assert!(!e.msg.contains("secret"), "{}", e.msg);
    }
}
