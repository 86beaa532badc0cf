//! Which objects an update must fetch, given what the device already has. Pure,
//! so the rules are tested without a device.

use std::collections::{BTreeMap, BTreeSet};

use pv_adapter_api::{ObjectSource, Offer};

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

/// Decides which objects must be fetched, given what the device has (sha → size).
/// Pure, so the rules are tested without a device.
pub(super) fn plan(
    state: &State,
    offer: &Offer,
    have: &BTreeMap<String, u64>,
) -> Result<Vec<Fetch>, Refusal> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (path, sha) in state.objects() {
        if !seen.insert(sha) {
            continue;
        }
        let src = offer.objects.get(sha);
        let expected = src.and_then(|s| s.size);
        // A partial upload is listed under its final name: trust only the size.
        if have
            .get(sha)
            .is_some_and(|got| expected.is_none_or(|e| e == *got))
        {
            continue;
        }
        let Some(src) = src else {
            return Err(Refusal::wontgo(format!(
                "object {sha} ({path}) is not on the device and the offer gives no source for it"
            )));
        };
        match &src.source {
            ObjectSource::Adapter { key } if offer.fetcher.is_some() => out.push(Fetch {
                sha: sha.to_owned(),
                source: Src::Adapter(key.clone()),
                size: src.size,
            }),
            ObjectSource::Adapter { key } => {
                return Err(Refusal::wontgo(format!(
                    "object {sha} ({path}): source {key:?} needs the adapter's fetcher, which the offer lacks"
                )));
            }
            ObjectSource::Url { url }
                if url.starts_with("http://") || url.starts_with("https://") =>
            {
                out.push(Fetch {
                    sha: sha.to_owned(),
                    source: Src::Url(url.clone()),
                    size: src.size,
                })
            }
            ObjectSource::Url { url } => {
                return Err(Refusal::wontgo(format!(
                    "object {sha} ({path}): source {url:?} is not an http or https URL"
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pv_adapter_api::{ObjectFetcher, ObjectReader, ObjectRef};
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

    #[test]
    fn plan_skips_objects_on_the_device_and_fetches_the_rest_once() {
        let o = offer(&[(sha(1), Some(10), key("k1")), (sha(2), Some(20), key("k2"))]);
        let have = BTreeMap::from([(sha(1), 10)]);
        let p = plan(&state(), &o, &have).unwrap();
        assert_eq!(
            p,
            vec![Fetch {
                sha: sha(2),
                source: Src::Adapter("k2".into()),
                size: Some(20)
            }]
        );
    }

    #[test]
    fn plan_refetches_a_partial_object() {
        let o = offer(&[(sha(1), Some(10), key("k1")), (sha(2), Some(20), key("k2"))]);
        let have = BTreeMap::from([(sha(1), 3), (sha(2), 20)]);
        let p = plan(&state(), &o, &have).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].sha, sha(1));
    }

    #[test]
    fn plan_names_the_object_without_a_source() {
        let o = offer(&[(sha(2), Some(20), key("k2"))]);
        let e = plan(&state(), &o, &BTreeMap::new()).unwrap_err();
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
        let p = plan(&state(), &o, &BTreeMap::new()).unwrap();
        assert!(p.iter().any(|f| f.source == Src::Url("https://x/1".into())));
        let o = offer(&[
            (
                sha(1),
                None,
                ObjectSource::Url {
                    url: "ftp://x/1".into(),
                },
            ),
            (sha(2), None, key("k")),
        ]);
        let e = plan(&state(), &o, &BTreeMap::new()).unwrap_err();
        assert!(e.msg.contains("is not an http or https URL"), "{}", e.msg);
    }
}
