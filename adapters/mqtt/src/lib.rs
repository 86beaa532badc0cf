//! The generic MQTT adapter: pv-bridge over any broker with protocol v1
//! (architecture.md §6).
//!
//! [`protocol`] holds the protocol itself as plain functions (topics, strict
//! parsing of every inbound payload, the payloads the bridge publishes). The
//! broker connection builds on it; [`transport`] hides whether it speaks MQTT
//! 3.1.1 or 5 and sets up TLS.

mod adapter;
pub mod blob;
pub mod protocol;
pub mod transport;

pub use adapter::{MqttAdapter, MqttConfig};
