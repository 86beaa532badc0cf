//! Supervision: an adapter that panics or fails is restarted with backoff; the
//! others keep running and keep seeing the device view.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pv_adapter_api::{Adapter, AdapterError, BackendEvent, BoxFuture, Capabilities, EngineLink};
use pv_bridge::config::Config;
use pv_bridge::engine::{AdapterFactory, UpdateOptions, run_with};
use pv_testkit::sim::Generation;

/// How an adapter under test behaves after connecting.
#[derive(Clone, Copy)]
enum Mode {
    Panic,
    Fail,
    /// Runs forever; counts the view changes it sees.
    Healthy,
}

struct TestAdapter {
    name: String,
    mode: Mode,
    starts: Arc<AtomicU32>,
    views: Arc<AtomicU32>,
}

impl Adapter for TestAdapter {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn run(self: Box<Self>, link: EngineLink) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            self.starts.fetch_add(1, Ordering::SeqCst);
            link.send(BackendEvent::Connected).await?;
            match self.mode {
                Mode::Panic => panic!("adapter {} hit a bug", self.name),
                Mode::Fail => Err(AdapterError::Connection("broker refused us".into())),
                Mode::Healthy => {
                    let mut view = link.view();
                    while view.changed().await.is_ok() {
                        self.views.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                }
            }
        })
    }
}

fn factory(
    name: &str,
    mode: Mode,
    starts: &Arc<AtomicU32>,
    views: &Arc<AtomicU32>,
) -> (String, AdapterFactory) {
    let (name, starts, views) = (name.to_owned(), starts.clone(), views.clone());
    let f: AdapterFactory = Arc::new(move || {
        Box::new(TestAdapter {
            name: name.clone(),
            mode,
            starts: starts.clone(),
            views: views.clone(),
        }) as Box<dyn Adapter>
    });
    (f.clone()().name().to_owned(), f)
}

fn config(socket: &Path, state: &Path) -> Config {
    let text = format!(
        "[pantavisor]\nsocket = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n",
        socket.display(),
        state.display()
    );
    Config::parse(Path::new("test.toml"), &text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_or_failing_adapter_is_restarted_and_the_others_are_unaffected() {
    let d = common::start(Generation::Gen2).await;
    let counters: Vec<(Arc<AtomicU32>, Arc<AtomicU32>)> = (0..3)
        .map(|_| (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0))))
        .collect();
    let adapters = vec![
        factory("panicky", Mode::Panic, &counters[0].0, &counters[0].1),
        factory("failing", Mode::Fail, &counters[1].0, &counters[1].1),
        factory("healthy", Mode::Healthy, &counters[2].0, &counters[2].1),
    ];
    let cfg = config(&d.cfg().socket, &d.dir.path().join("state"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn(run_with(cfg, adapters, UpdateOptions::default(), async {
        let _ = stop_rx.await;
    }));
    common::eventually(
        Duration::from_secs(10),
        "three starts of each broken adapter",
        || async {
            (counters[0].0.load(Ordering::SeqCst) >= 3 && counters[1].0.load(Ordering::SeqCst) >= 3)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        counters[2].0.load(Ordering::SeqCst),
        1,
        "the healthy adapter was never restarted"
    );
    assert!(
        counters[2].1.load(Ordering::SeqCst) >= 2,
        "the healthy adapter kept receiving view updates (health of the others)"
    );
    // The bridge signalled ready once a backend connected, panics notwithstanding.
    common::eventually(Duration::from_secs(5), "bridge READY", || async {
        let cs = d.pv.containers().await.ok()?;
        cs.iter()
            .any(|c| c.name == "pv-bridge" && c.status == "READY")
            .then_some(())
    })
    .await;
    stop_tx.send(()).unwrap();
    engine.await.unwrap().unwrap();
}
