//! pv-bridge: a bridge container for Pantavisor devices.
//!
//! The engine speaks Pantavisor's local control interface ([`pvctrl`]) on one side
//! and drives backend adapters (see the `pv-adapter-api` crate) on the other.
//! [`state`] holds the state JSON model shared by every part that stages revisions.

pub mod cli;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod engine;
#[cfg(feature = "fleet")]
pub mod fleet;
pub mod pvctrl;
pub mod state;
pub mod supervise;
pub mod telemetry;

/// The bridge's version, as reported to backends and by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
