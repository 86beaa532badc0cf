//! Device Update for IoT Hub (ADU, `shared/reference/azure-device-update.md`):
//! the signature chain, manifests, handlers and workflow as pure modules, and
//! the [`agent`] that runs them inside the Azure adapter.

pub mod agent;
pub mod config;
pub mod diagnostics;
pub mod download;
pub mod handlers;
pub mod install;
pub mod jws;
pub mod manifest;
pub mod overlay;
mod pipeline;
pub mod rootkeys;
pub mod upload;
pub mod wire;
pub mod workflow;
