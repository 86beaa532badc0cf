//! pv-bridge's Azure IoT Hub adapter: the IoT Hub MQTT device protocol spoken
//! directly on rumqttc (ADR 0010), with SAS tokens renewed before they expire,
//! X.509 client certificates and DPS provisioning. See `docs/azure.md`.
//!
//! The protocol is kept in pure modules ([`connstr`], [`sas`], [`topics`],
//! [`twin`]) that are tested without sockets.

pub mod connstr;
pub mod sas;
pub mod topics;
pub mod twin;
