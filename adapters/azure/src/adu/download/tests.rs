//! Downloads against a real HTTP server (the test kit's object server): resume,
//! oversize bodies, wrong bytes.

use super::*;
use pv_testkit::objects::{Fault, ObjectServer};

fn entry(data: &[u8]) -> FileEntry {
    FileEntry {
        name: "pvadu.tgz".into(),
        size: data.len() as u64,
        sha256: sha2::Sha256::digest(data).into(),
    }
}

fn client() -> pv_http::Client {
    pv_http::Client::builder().build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_is_checked_and_a_cut_download_resumes() {
    let srv = ObjectServer::start().await.unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    srv.put("/f", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f");
    srv.fault(Fault::CutAfter(100_000));
    let e = fetch(&client(), &srv.url("/f"), &entry(&data), &dest)
        .await
        .unwrap_err();
    assert_eq!(e.erc, ERC_DOWNLOAD_FAILED, "{e:?}");
    let kept = std::fs::metadata(&dest).unwrap().len();
    assert!(kept > 0 && kept < data.len() as u64, "{kept}");
    fetch(&client(), &srv.url("/f"), &entry(&data), &dest)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let seen = srv.seen();
    assert_eq!(seen.last().unwrap().range_start, Some(kept), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_bytes_or_more_bytes_than_signed_are_refused_and_deleted() {
    let srv = ObjectServer::start().await.unwrap();
    let data = b"the signed bytes".to_vec();
    srv.put("/other", b"other bytes here".to_vec());
    srv.put("/longer", b"the signed bytes and more".to_vec());
    let dir = tempfile::tempdir().unwrap();
    for (path, want) in [
        ("/other", "hashes to"),
        ("/longer", "larger than the 16 bytes"),
    ] {
        let dest = dir.path().join(path.trim_start_matches('/'));
        let e = fetch(&client(), &srv.url(path), &entry(&data), &dest)
            .await
            .unwrap_err();
        assert_eq!(e.erc, ERC_FILE_MISMATCH, "{path}: {e:?}");
        assert!(e.reason.contains(want), "{path}: {}", e.reason);
        assert!(!dest.exists(), "{path}: a refused file stays");
    }
    srv.fault(Fault::Status(404));
    let e = fetch(
        &client(),
        &srv.url("/x?sig=SECRET"),
        &entry(&data),
        &dir.path().join("x"),
    )
    .await
    .unwrap_err();
    assert!(
        e.reason.contains("HTTP 404") && !e.reason.contains("SECRET"),
        "{}",
        e.reason
    );
}
