//! Device Update for IoT Hub (ADU): the signature chain of an update manifest
//! (`shared/reference/azure-device-update.md` §5). The component, the workflow and
//! the handlers build on it (#15).

pub mod config;
pub mod diagnostics;
pub mod download;
pub mod handlers;
pub mod install;
pub mod jws;
pub mod manifest;
pub mod overlay;
pub mod rootkeys;
pub mod wire;
pub mod workflow;
