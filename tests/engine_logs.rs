//! The log pipeline end to end: pv-sim writes Pantavisor's log tree, the engine
//! tails it into its spool, and backends pull batches and acknowledge them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{engine, local};
use pv_adapter_api::{EngineLink, LogBatch};
use pv_testkit::sim::Generation;

async fn batch(link: &EngineLink) -> LogBatch {
    tokio::time::timeout(Duration::from_secs(10), link.next_logs(1000, 256 * 1024))
        .await
        .expect("a batch within 10 s")
        .expect("logs are on for this backend")
}

/// The N of "synthetic log line N" records, in order.
fn synthetic(b: &LogBatch) -> Vec<u64> {
    b.records
        .iter()
        .filter_map(|r| {
            r.msg
                .split("synthetic log line ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

const FAST_LOGS: &str = "[logs]\npoll_interval_ms = 100\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pantavisor_and_container_lines_reach_the_backend() {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 20.0).await;
    let (b, stop, task) = engine(
        &d,
        &format!("{FAST_LOGS}{}", local("cloud", "")),
        &["cloud"],
    );
    let link = b[0].link().await;
    let mut seen_pv = false;
    let mut seen_app = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(seen_pv && seen_app) {
        assert!(
            std::time::Instant::now() < deadline,
            "pv={seen_pv} app={seen_app}"
        );
        let got = batch(&link).await;
        for r in &got.records {
            if r.plat == "pantavisor" && r.src == "pantavisor" && r.msg == "booted revision 0" {
                seen_pv = true;
            }
            if r.plat == "app" && (r.src == "lxc/console.log" || r.src == "var/log/syslog") {
                seen_app = true;
            }
        }
        link.ack_logs(got.next);
    }
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_stalls_nobody_and_acked_lines_are_not_sent_again() {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 50.0).await;
    let toml = format!("{FAST_LOGS}{}{}", local("fast", ""), local("slow", ""));
    let (b, stop, task) = engine(&d, &toml, &["fast", "slow"]);
    let (fast, slow) = (b[0].link().await, b[1].link().await);
    // The slow backend takes one batch and never acknowledges it.
    let stuck = batch(&slow).await;
    let mut last = 0;
    for _ in 0..5 {
        let got = batch(&fast).await;
        assert!(got.first >= last, "fast moves forward");
        last = got.next;
        fast.ack_logs(got.next);
    }
    assert!(
        last > stuck.next,
        "the fast backend got past the slow one's position"
    );
    assert_eq!(
        batch(&slow).await.first,
        stuck.first,
        "the slow one is offered the same again"
    );
    stop.send(()).unwrap();
    task.await.unwrap();

    // After a restart, the fast backend gets nothing it acknowledged.
    let (b, stop, task) = engine(&d, &toml, &["fast", "slow"]);
    let fast = b[0].link().await;
    let got = batch(&fast).await;
    assert!(
        got.first >= last,
        "resumes at its ack ({} < {last})",
        got.first
    );
    // And the lines themselves are new ones (cursors survived too).
    let before: Vec<u64> = synthetic(&stuck);
    if let (Some(old), Some(new)) = (before.iter().max(), synthetic(&got).iter().min()) {
        assert!(new > old, "line {new} after line {old}");
    }
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_caps_drop_the_oldest_and_count_every_drop() {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 2000.0).await;
    let toml = format!(
        "[logs]\npoll_interval_ms = 100\nspool_max_bytes = 65536\nrate_per_sec = 100000\nburst = 100000\n{}",
        local("cloud", "")
    );
    let (b, stop, task) = engine(&d, &toml, &["cloud"]);
    let link = b[0].link().await;
    // Let far more than 64 KiB of lines pile up unread.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first = batch(&link).await;
    assert!(first.dropped > 0, "drops reported: {first:?}");
    assert_eq!(
        first.first, first.dropped,
        "every position before the first record is counted as dropped"
    );
    // The count comes once; after the ack it is not repeated.
    link.ack_logs(first.next);
    let again = batch(&link).await;
    assert_eq!(again.first, first.next);
    assert!(
        again.dropped < first.dropped,
        "{} then {}",
        first.dropped,
        again.dropped
    );
    let spool_bytes: u64 = std::fs::read_dir(d.dir.path().join("state/spool"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        spool_bytes < 2 * 65536,
        "the spool stays near its cap: {spool_bytes} bytes"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_with_logs_off_gets_no_feed() {
    let d = common::start(Generation::Gen2).await;
    let (b, stop, task) = engine(
        &d,
        &format!("{FAST_LOGS}{}", local("quiet", "logs = false")),
        &["quiet"],
    );
    assert!(b[0].link().await.next_logs(10, 1024).await.is_none());
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// Pantavisor rotates a full log file to `<name>.<n>.gz` and starts it again; the
/// lines written after the last poll and before the rotation are read back from
/// the `.gz`: none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_rotated_away_between_polls_are_not_lost() {
    let d = common::start_with(Generation::Gen2, |c| {
        c.log_rate = 400.0;
        c.log_rotate_bytes = 2048;
    })
    .await;
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    let link = b[0].link().await;
    // Files rotated before the bridge first read them are history to it: count
    // from the newest line of the first batch on.
    let first = batch(&link).await;
    let lo = synthetic(&first).into_iter().max().unwrap_or(0) + 1;
    link.ack_logs(first.next);
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < deadline {
        let got = batch(&link).await;
        seen.extend(synthetic(&got));
        link.ack_logs(got.next);
    }
    let rotations = walk(&d.storage().join("logs/0"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "gz"))
        .count();
    assert!(rotations >= 10, "the files rotated ({rotations} .gz)");
    // Every line is there, but for the last second's (maybe still unread in live
    // files).
    let hi = *seen.last().unwrap();
    let missing: Vec<u64> = (lo..hi.saturating_sub(400))
        .filter(|n| !seen.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} lines lost: {missing:?}",
        missing.len()
    );
    assert!(hi > lo + 800, "{lo}..{hi}");
    stop.send(()).unwrap();
    task.await.unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A revision that fails in its try boot wrote logs there; the device rolls back
/// at once, maybe before the bridge read them. They are read after the rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logs_of_a_failed_try_revision_are_read_after_the_rollback() {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 0.0).await;
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    let link = b[0].link().await;
    let mut state: serde_json::Value =
        serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    // A root-level file: a reboot transition; then the try boot fails.
    state["extra.json"] = serde_json::json!({"try": true});
    state["_sim/behaviour.json"] = serde_json::json!({"outcome": "error"});
    b[0].send(pv_adapter_api::BackendEvent::Offer(pv_adapter_api::Offer {
        id: "fails".into(),
        state: serde_json::to_vec(&state).unwrap(),
        state_url: None,
        objects: Default::default(),
        fetcher: None,
    }))
    .await;
    let want = "revision locals/fails: ERROR A container could not be started";
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "{want:?} never forwarded"
        );
        let got = batch(&link).await;
        link.ack_logs(got.next);
        if let Some(r) = got.records.iter().find(|r| r.msg == want) {
            // Labelled by the log directory it came from, not the revision that
            // runs after the rollback.
            assert_eq!(r.rev, "locals/fails", "{r:?}");
            break;
        }
    }
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// A secret the bridge shows on its console (a claim challenge) reaches
/// Pantavisor's logs with the console; the records backends get have it masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_secrets_are_masked_in_forwarded_lines() {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 0.0).await;
    let (b, stop, task) = engine(
        &d,
        &format!("{FAST_LOGS}{}", local("cloud", "")),
        &["cloud"],
    );
    let link = b[0].link().await;
    let secret = "brave-keen-otter-engine-logs";
    pv_adapter_api::secrets::register(secret);
    let console = d.storage().join("logs/0/app/lxc/console.log");
    std::fs::create_dir_all(console.parent().unwrap()).unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console)
            .unwrap();
        writeln!(f, "waiting to be claimed challenge={secret} device=abc").unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(std::time::Instant::now() < deadline, "the line never came");
        let got = batch(&link).await;
        link.ack_logs(got.next);
        assert!(
            got.records.iter().all(|r| !r.msg.contains(secret)),
            "{:?}",
            got.records
        );
        if let Some(r) = got
            .records
            .iter()
            .find(|r| r.msg.contains("waiting to be claimed"))
        {
            assert!(r.msg.contains("challenge=[secret] device=abc"), "{r:?}");
            assert_eq!(r.rev, "0");
            break;
        }
    }
    stop.send(()).unwrap();
    task.await.unwrap();
}
