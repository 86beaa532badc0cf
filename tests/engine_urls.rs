//! Objects offered by URL, downloaded from a real HTTP server with faults: resume
//! with Range/If-Range, retries of transient errors, fatal 4xx, wrong bytes, the
//! byte budget, and resuming across a restart of the engine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Backend, engine, eventually, local, sha256_hex};
use pv_adapter_api::{BackendEvent, ObjectRef, ObjectSource, Offer, Progress, UpdateStatus};
use pv_testkit::objects::{Fault, ObjectServer};
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

fn blob(n: usize, tag: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ tag).collect()
}

/// An offer replacing the app's rootfs with an object served at `path`.
async fn url_offer(
    d: &common::Device,
    srv: &ObjectServer,
    id: &str,
    path: &str,
    data: &[u8],
) -> Offer {
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    let sha = sha256_hex(data);
    state["app/root.squashfs"] = json!(sha);
    Offer {
        id: id.into(),
        state: serde_json::to_vec(&state).unwrap(),
        state_url: None,
        objects: BTreeMap::from([(
            sha.clone(),
            ObjectRef {
                sha256: sha,
                size: Some(data.len() as u64),
                source: ObjectSource::Url { url: srv.url(path) },
            },
        )]),
        fetcher: None,
    }
}

async fn final_of(b: &Backend, id: &str) -> Progress {
    let view = b.view().await;
    eventually(Duration::from_secs(40), &format!("{id} final"), || async {
        view.borrow()
            .update
            .clone()
            .filter(|p| p.id == id && p.status.is_final())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_objects_install_and_interrupted_downloads_resume_with_range() {
    let d = common::start(Generation::Gen2).await;
    let srv = ObjectServer::start().await.unwrap();
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    let data = blob(3 * 1024 * 1024, 1);
    srv.put("/obj/root", data.clone());
    // The first answer stops half way; then two 503s.
    srv.fault(Fault::CutAfter(1024 * 1024));
    srv.fault(Fault::Status(503));
    srv.fault(Fault::Status(503));
    b[0].send(BackendEvent::Offer(
        url_offer(&d, &srv, "u1", "/obj/root", &data).await,
    ))
    .await;
    let p = final_of(&b[0], "u1").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    let seen = srv.seen();
    assert_eq!(seen[0].range_start, None);
    assert_eq!((seen[1].status, seen[2].status), (503, 503));
    let resumed = seen.last().unwrap();
    assert_eq!(resumed.status, 206, "{seen:?}");
    assert_eq!(
        resumed.range_start,
        Some(1024 * 1024),
        "resumed where it stopped"
    );
    assert!(resumed.if_range.is_some(), "guarded by the ETag");
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_and_wrong_bytes_are_final_and_name_the_object() {
    let d = common::start(Generation::Gen2).await;
    let srv = ObjectServer::start().await.unwrap();
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    let data = blob(100_000, 2);
    // Not there at all: one request, no retries.
    b[0].send(BackendEvent::Offer(
        url_offer(&d, &srv, "missing", "/nope", &data).await,
    ))
    .await;
    let p = final_of(&b[0], "missing").await;
    assert_eq!(p.status, UpdateStatus::Wontgo);
    // The URL is named by host and fingerprint: its path may be a token.
    assert_eq!(
        p.status_msg,
        format!("{} answered 404", pv_http::redact(&srv.url("/nope")))
    );
    assert!(!p.status_msg.contains("/nope"), "{}", p.status_msg);
    assert_eq!(srv.seen().len(), 1, "a 404 is not retried");
    // Served, but other bytes.
    srv.put("/wrong", blob(100_000, 3));
    b[0].send(BackendEvent::Offer(
        url_offer(&d, &srv, "wrong", "/wrong", &data).await,
    ))
    .await;
    let p = final_of(&b[0], "wrong").await;
    assert_eq!(p.status, UpdateStatus::Wontgo);
    let sha = sha256_hex(&data);
    assert!(
        p.status_msg.starts_with(&format!(
            "object {sha}: the bytes from {} hash to ",
            pv_http::redact(&srv.url("/wrong"))
        )),
        "{}",
        p.status_msg
    );
    assert!(
        d.pv.step("locals/wrong").await.unwrap_err().is_not_found(),
        "nothing staged"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_object_is_fetched_whole_and_the_budget_is_enforced() {
    let d = common::start(Generation::Gen2).await;
    let srv = ObjectServer::start().await.unwrap();
    let toml = format!(
        "[updates]\nmax_update_bytes = 1500000\n{}",
        local("cloud", "")
    );
    let (b, stop, task) = engine(&d, &toml, &["cloud"]);
    let data = blob(1_000_000, 4);
    srv.put("/o", data.clone());
    srv.fault(Fault::CutAfter(300_000));
    b[0].send(BackendEvent::Offer(
        url_offer(&d, &srv, "etag", "/o", &data).await,
    ))
    .await;
    // Same bytes, new ETag, before the retry: If-Range no longer matches.
    eventually(Duration::from_secs(5), "the cut", || async {
        (!srv.seen().is_empty()).then_some(())
    })
    .await;
    srv.replace("/o", data.clone());
    let p = final_of(&b[0], "etag").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    let last = srv.seen().last().cloned().unwrap();
    assert_eq!(
        (last.range_start, last.status),
        (Some(300_000), 200),
        "sent whole"
    );

    // Over the byte budget (1.5 MB per update).
    let big = blob(2_000_000, 5);
    srv.put("/big", big.clone());
    b[0].send(BackendEvent::Offer(
        url_offer(&d, &srv, "big", "/big", &big).await,
    ))
    .await;
    let p = final_of(&b[0], "big").await;
    assert_eq!(p.status, UpdateStatus::Wontgo);
    assert_eq!(
        p.status_msg,
        "the byte budget of 1500000 bytes for this update is exhausted"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_resumes_after_the_bridge_restarts() {
    let d = common::start(Generation::Gen2).await;
    let srv = ObjectServer::start().await.unwrap();
    let data = blob(2 * 1024 * 1024, 6);
    srv.put("/r", data.clone());
    // The first answer stops after 1 MiB; the bridge then stops before retrying.
    srv.fault(Fault::CutAfter(1024 * 1024));
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    b[0].send(BackendEvent::Offer(
        url_offer(&d, &srv, "again", "/r", &data).await,
    ))
    .await;
    eventually(Duration::from_secs(5), "the cut", || async {
        (!srv.seen().is_empty()).then_some(())
    })
    .await;
    stop.send(()).unwrap();
    task.await.unwrap();
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    // The backend offers it again after the restart, as a retained offer would be.
    b[0].send(BackendEvent::Offer(
        url_offer(&d, &srv, "again", "/r", &data).await,
    ))
    .await;
    let p = final_of(&b[0], "again").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    let seen = srv.seen();
    let resumed = seen.last().unwrap();
    assert_eq!(
        (resumed.status, resumed.range_start),
        (206, Some(1024 * 1024)),
        "{seen:?}"
    );
    let fetched: u64 = seen
        .iter()
        .map(|s| if s.status == 206 { 1024 * 1024 } else { 0 })
        .sum();
    assert_eq!(
        fetched,
        1024 * 1024,
        "the verified first half was not fetched again"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_downloads_trust_the_configured_ca_and_refuse_others_at_once() {
    let d = common::start(Generation::Gen2).await;
    let pki = d.dir.path().join("pki");
    let pki = common::test_pki(&pki);
    let ca = pki.ca.clone();
    let srv = ObjectServer::start_tls(&pki.server_cert, &pki.server_key)
        .await
        .unwrap();
    let data = blob(500_000, 7);
    srv.put("/tls", data.clone());
    assert!(srv.url("/tls").starts_with("https://"));

    // Without the CA: final at once, naming TLS.
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    let started = std::time::Instant::now();
    b[0].send(BackendEvent::Offer(
        url_offer(&d, &srv, "untrusted", "/tls", &data).await,
    ))
    .await;
    let p = final_of(&b[0], "untrusted").await;
    assert_eq!(p.status, UpdateStatus::Wontgo);
    assert!(
        p.status_msg.contains("TLS") && p.status_msg.contains("certificate"),
        "{}",
        p.status_msg
    );
    assert!(started.elapsed() < Duration::from_secs(10), "not retried");
    stop.send(()).unwrap();
    task.await.unwrap();

    // With it: installed.
    let toml = format!(
        "[updates]\nca_file = \"{}\"\n{}",
        ca.display(),
        local("cloud", "")
    );
    let (b, stop, task) = engine(&d, &toml, &["cloud"]);
    b[0].send(BackendEvent::Offer(
        url_offer(&d, &srv, "trusted", "/tls", &data).await,
    ))
    .await;
    let p = final_of(&b[0], "trusted").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    stop.send(()).unwrap();
    task.await.unwrap();
}
