//! The generic MQTT adapter: pv-bridge over any broker with protocol v1
//! (architecture.md §6).
//!
//! [`protocol`] holds the protocol itself as plain functions (topics, strict
//! parsing of every inbound payload, the payloads the bridge publishes). The
//! broker connection builds on it.

mod adapter;
pub mod protocol;

pub use adapter::{MqttAdapter, MqttConfig};
