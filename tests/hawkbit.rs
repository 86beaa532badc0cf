//! The hawkBit adapter against the test kit's DDI fake (written from the
//! reference), for what goosebit does not implement: distinct action ids,
//! sha256 and `download-http` links, the gateway token, `skip` and
//! maintenance windows, cancel before and after Pantavisor starts, a bridge
//! killed mid-deployment, and an action the server closed meanwhile.

#![cfg(feature = "hawkbit")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/hawkbit.rs"]
mod hawkbit;
#[path = "common/tinyproxy.rs"]
mod tinyproxy;

use std::time::Duration;

use hawkbit::Bridge;
use pv_testkit::ddi::{Action, Artifact, Deployment, FakeHawkbit, Status};
use serde_json::json;

const GATEWAY: &str = "gateway-token-for-tests-0123";

struct Env {
    d: common::Device,
    srv: FakeHawkbit,
}

async fn env(tweak: impl FnOnce(&mut pv_testkit::sim::SimConfig)) -> Env {
    let d = common::start_with(pv_testkit::sim::Generation::Gen2, tweak).await;
    let srv = FakeHawkbit::start().await.unwrap();
    srv.add_target("dev-1", None);
    srv.set_gateway_token(Some(GATEWAY));
    Env { d, srv }
}

impl Env {
    fn bridge(&self) -> Bridge {
        let token = self.d.dir.path().join("gateway.token");
        std::fs::write(&token, GATEWAY).unwrap();
        Bridge::start(
            &self.d,
            &self.srv.url(),
            &format!("gateway_token_file = \"{}\"\n", token.display()),
        )
    }

    async fn deployment(&self, version: &str, root: &[u8], extra: serde_json::Value) -> Deployment {
        let tgz = hawkbit::export(&self.d, version, root, extra).await;
        Deployment::forced(
            version,
            vec![Artifact::new(&format!("rev-{version}.tgz"), tgz)],
        )
    }

    fn action(&self, id: u64) -> Action {
        self.srv.action(id).unwrap()
    }

    async fn wait_for(
        &self,
        b: &Bridge,
        id: u64,
        what: &str,
        within: Duration,
        f: impl Fn(&Action) -> bool,
    ) -> Action {
        hawkbit::wait(
            b,
            what,
            within,
            || format!("{:?}", self.srv.action(id)),
            || self.srv.action(id).filter(|a| f(a)),
        )
        .await
    }

    fn running(&self) -> String {
        self.d.sim.as_ref().unwrap().running()
    }
}

fn count(a: &Action, execution: &str) -> usize {
    a.executions().iter().filter(|e| *e == execution).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_is_verified_installed_and_closed_once_with_attributes() {
    let e = env(|_| {}).await;
    let b = e.bridge();
    let id = e.srv.deploy(
        "dev-1",
        e.deployment("1.3.0", b"app 1.3.0", json!({})).await,
    );
    let a = e
        .wait_for(
            &b,
            id,
            "the action to close",
            Duration::from_secs(60),
            |a| a.status.closed(),
        )
        .await;
    assert_eq!(a.status, Status::Finished, "{:?}", a.executions());
    assert_eq!(
        e.running(),
        "locals/1.3.0",
        "{}\n{}",
        a.details(),
        b.log_text()
    );
    let ex = a.executions();
    assert_eq!(ex.first().map(String::as_str), Some("proceeding"), "{ex:?}");
    assert_eq!(
        ex.last().map(String::as_str),
        Some("closed:success"),
        "{ex:?}"
    );
    assert_eq!(count(&a, "closed:success"), 1, "{ex:?}");
    let at = |x: &str| ex.iter().position(|e| e == x).unwrap_or(usize::MAX);
    assert!(at("download") < at("downloaded"), "{ex:?}");
    let details = a.details();
    assert!(details.contains("sha256 verified"), "{details}");
    assert!(
        details.contains("installing revision locals/1.3.0"),
        "{details}"
    );
    assert!(ex.len() <= 10, "feedback is sparse: {ex:?}");
    // The artifact came through the `download-http` link with the gateway
    // token, once.
    assert_eq!(e.srv.downloads().len(), 1, "{:?}", e.srv.downloads());
    // Attributes: the board, and after the success (the server asks again)
    // the installed version; device-meta follows at the engine's rate.
    let attrs = hawkbit::wait(
        &b,
        "the new attributes",
        Duration::from_secs(30),
        String::new,
        || {
            let a = e.srv.attributes("dev-1");
            (a.get("sw_version").map(String::as_str) == Some("1.3.0")
                && a.get("pantavisor.revision").map(String::as_str) == Some("locals/1.3.0"))
            .then_some(a)
        },
    )
    .await;
    assert_eq!(attrs["hw_boardname"], "pv-sim");
    assert_eq!(attrs["hw_revision"], "1.0");
    // Idle polling follows the server's sleep (1 s here).
    let before = e.srv.polls("dev-1");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let polls = e.srv.polls("dev-1") - before;
    assert!((3..=7).contains(&polls), "{polls} polls in 5 s");
    assert_eq!(e.srv.refused("dev-1"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_and_a_closed_maintenance_window_wait_for_the_server() {
    let e = env(|_| {}).await;
    let b = e.bridge();
    let mut d = e.deployment("1.4.0", b"app 1.4.0", json!({})).await;
    d.download = "skip".into();
    d.update = "skip".into();
    let id = e.srv.deploy("dev-1", d);
    e.wait_for(&b, id, "the first feedback", Duration::from_secs(20), |a| {
        !a.feedback.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(e.srv.downloads().is_empty(), "download: skip");
    // Download now, but the window is closed: downloaded, not installed.
    e.srv.set_handling(id, "forced", "skip");
    e.srv.set_window(id, Some(false));
    e.wait_for(&b, id, "downloaded", Duration::from_secs(20), |a| {
        count(a, "downloaded") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(e.running(), "0", "not installed while the window is closed");
    assert!(!e.action(id).status.closed());
    e.srv.set_handling(id, "forced", "forced");
    e.srv.set_window(id, Some(true));
    let a = e
        .wait_for(&b, id, "the install", Duration::from_secs(60), |a| {
            a.status.closed()
        })
        .await;
    assert_eq!(a.status, Status::Finished, "{:?}", a.executions());
    assert_eq!(e.running(), "locals/1.4.0");
    assert_eq!(e.srv.downloads().len(), 1, "downloaded once");
    assert!(
        a.details().contains("waiting for the maintenance window")
            || a.details().contains("update: skip")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_is_accepted_before_pantavisor_starts_and_rejected_after() {
    let e = env(|c| c.commit_delay = Duration::from_secs(6)).await;
    let b = e.bridge();
    // Before: downloaded, waiting for its window.
    let mut d = e.deployment("1.5.0", b"app 1.5.0", json!({})).await;
    d.window = Some(false);
    let id = e.srv.deploy("dev-1", d);
    e.wait_for(&b, id, "downloaded", Duration::from_secs(20), |a| {
        count(a, "downloaded") == 1
    })
    .await;
    e.srv.cancel(id);
    let a = e
        .wait_for(&b, id, "the cancel", Duration::from_secs(20), |a| {
            a.status.closed()
        })
        .await;
    assert_eq!(a.status, Status::Canceled);
    assert_eq!(
        a.cancel_feedback[0]["status"]["execution"], "closed",
        "{:?}",
        a.cancel_feedback
    );
    assert_eq!(
        a.cancel_feedback[0]["status"]["result"]["finished"],
        "success"
    );
    assert_eq!(count(&a, "closed:success") + count(&a, "closed:failure"), 0);
    assert_eq!(e.running(), "0");

    // After: Pantavisor is testing the revision when the cancel comes.
    let id = e.srv.deploy(
        "dev-1",
        e.deployment("1.6.0", b"app 1.6.0", json!({})).await,
    );
    e.wait_for(
        &b,
        id,
        "Pantavisor to start",
        Duration::from_secs(30),
        |a| {
            a.details().contains("Pantavisor: TESTING")
                || a.details().contains("Pantavisor: INPROGRESS")
        },
    )
    .await;
    e.srv.cancel(id);
    let a = e
        .wait_for(&b, id, "the rejection", Duration::from_secs(20), |a| {
            !a.cancel_feedback.is_empty()
        })
        .await;
    assert_eq!(a.cancel_feedback[0]["status"]["execution"], "rejected");
    assert!(
        a.cancel_feedback[0]["status"]["details"][0]
            .as_str()
            .unwrap()
            .contains("revision switch in progress")
    );
    let a = e
        .wait_for(&b, id, "the install", Duration::from_secs(60), |a| {
            a.status.closed()
        })
        .await;
    assert_eq!(a.status, Status::Finished, "{:?}", a.executions());
    assert_eq!(e.running(), "locals/1.6.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_killed_mid_deployment_sends_each_feedback_once() {
    let e = env(|c| c.commit_delay = Duration::from_secs(4)).await;
    let mut b = e.bridge();
    let id = e.srv.deploy(
        "dev-1",
        e.deployment("1.7.0", b"app 1.7.0", json!({})).await,
    );
    e.wait_for(
        &b,
        id,
        "Pantavisor to start",
        Duration::from_secs(30),
        |a| a.details().contains("installing revision"),
    )
    .await;
    b.kill9_and_restart();
    let a = e
        .wait_for(
            &b,
            id,
            "the action to close",
            Duration::from_secs(60),
            |a| a.status.closed(),
        )
        .await;
    assert_eq!(a.status, Status::Finished, "{:?}", a.executions());
    assert_eq!(e.running(), "locals/1.7.0");
    assert_eq!(count(&a, "closed:success"), 1, "{:?}", a.executions());
    for once in ["download", "downloaded"] {
        assert_eq!(count(&a, once), 1, "{once}: {:?}", a.executions());
    }
    assert_eq!(
        a.details().matches("pv-bridge accepted action").count(),
        1,
        "{}",
        a.details()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_closed_by_the_server_meanwhile_ends_quietly() {
    let e = env(|c| c.commit_delay = Duration::from_secs(3)).await;
    let b = e.bridge();
    let id = e.srv.deploy(
        "dev-1",
        e.deployment("1.8.0", b"app 1.8.0", json!({})).await,
    );
    e.wait_for(
        &b,
        id,
        "the install to start",
        Duration::from_secs(30),
        |a| a.details().contains("installing revision"),
    )
    .await;
    e.srv.force_quit(id);
    hawkbit::wait(&b, "the 410", Duration::from_secs(30), String::new, || {
        b.log_text()
            .contains("the server had closed the action already")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        b.log_text().matches("final feedback").count(),
        1,
        "the final feedback is not sent again after a 410"
    );
    assert_eq!(e.running(), "locals/1.8.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_feedback_and_artifacts_go_through_the_configured_proxy() {
    let e = env(|_| {}).await;
    let proxy = tinyproxy::Tinyproxy::start(e.d.dir.path());
    let token = e.d.dir.path().join("gateway.token");
    std::fs::write(&token, GATEWAY).unwrap();
    let url = e.srv.url().replace("127.0.0.1", "localhost");
    let b = Bridge::start(
        &e.d,
        &url,
        &format!(
            "gateway_token_file = \"{}\"\nproxy = \"http://127.0.0.1:{}\"\n",
            token.display(),
            proxy.port
        ),
    );
    let id = e.srv.deploy(
        "dev-1",
        e.deployment("1.9.0", b"app 1.9.0", json!({})).await,
    );
    let a = e
        .wait_for(
            &b,
            id,
            "the action to close",
            Duration::from_secs(60),
            |a| a.status.closed(),
        )
        .await;
    assert_eq!(a.status, Status::Finished, "{:?}", a.executions());
    let log = proxy.log_text();
    for want in [
        "/DEFAULT/controller/v1/dev-1 ",
        &format!("/deploymentBase/{id}/feedback"),
        "/artifacts/rev-1.9.0.tgz",
    ] {
        assert!(
            log.contains(want),
            "{want:?} did not go through the proxy:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_update_with_the_bridge_killed_in_the_reboot_is_closed_once_as_done() {
    let e = env(|c| c.reboot = Duration::from_secs(2)).await;
    let mut b = e.bridge();
    let mut state: serde_json::Value =
        serde_json::from_slice(&e.d.pv.step("current").await.unwrap()).unwrap();
    let kernel = b"a new kernel for hawkbit".as_slice();
    state["bsp/kernel.img"] = json!(common::sha256_hex(kernel));
    let tgz = common::pack_export(e.d.dir.path(), "rev-3.0.0.tgz", &state, &[kernel]);
    let id = e.srv.deploy(
        "dev-1",
        Deployment::forced("3.0.0", vec![Artifact::new("rev-3.0.0.tgz", tgz)]),
    );
    hawkbit::wait(
        &b,
        "the reboot",
        Duration::from_secs(30),
        String::new,
        || {
            (e.d.sim.as_ref().unwrap().power() == pv_testkit::sim::PowerState::Rebooting)
                .then_some(())
        },
    )
    .await;
    b.kill9_and_restart();
    let a = e
        .wait_for(
            &b,
            id,
            "the action to close",
            Duration::from_secs(90),
            |a| a.status.closed(),
        )
        .await;
    assert_eq!(a.status, Status::Finished, "{:?}", a.executions());
    assert_eq!(e.running(), "locals/3.0.0");
    assert_eq!(count(&a, "closed:success"), 1, "{:?}", a.executions());
    assert!(a.details().contains("Pantavisor: DONE"), "{}", a.details());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_on_the_deployment_is_retried_at_the_poll_rate() {
    let e = env(|_| {}).await;
    e.srv.set_sleep("00:00:02");
    let b = e.bridge();
    e.srv.fail_deployment(&[500, 500, 500]);
    let id = e.srv.deploy(
        "dev-1",
        e.deployment("1.9.5", b"app 1.9.5", json!({})).await,
    );
    let t0 = std::time::Instant::now();
    let a = e
        .wait_for(
            &b,
            id,
            "the action to close",
            Duration::from_secs(60),
            |a| a.status.closed(),
        )
        .await;
    assert_eq!(a.status, Status::Finished, "{:?}", a.executions());
    // Three refused reads, then the one that worked (and none in a storm):
    // each retry waited for a poll.
    assert_eq!(e.srv.deployment_reads(), 4);
    let paused = b.log_text().matches("deployment paused").count();
    assert_eq!(paused, 3, "{}", b.log_text());
    // Three failed reads cost three poll intervals of 2 s (±10 %), at least.
    assert!(
        t0.elapsed() >= Duration::from_millis(5200),
        "{:?}",
        t0.elapsed()
    );
}
