//! The `deviceUpdate` PnP component on the twin (reference §1–§4): the desired
//! `service` as the ADU service writes it, the reported `agent` in the shapes ADU
//! reads, and the writable-property ACK.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// The model id announced at CONNECT when Device Update is on.
pub const MODEL_ID: &str = "dtmi:azure:iot:deviceUpdateModel;3";
/// `deviceProperties.contractModelId`.
pub const CONTRACT_MODEL_ID: &str = "dtmi:azure:iot:deviceUpdateContractModel;3";
/// The component's name in the twin.
pub const COMPONENT: &str = "deviceUpdate";

/// `agent.state` (only these go on the wire).
pub mod state {
    pub const IDLE: u8 = 0;
    pub const IN_PROGRESS: u8 = 6;
    pub const FAILED: u8 = 255;
}

/// `lastInstallResult.resultCode`.
pub mod result {
    pub const FAILURE: i64 = 0;
    pub const CANCELLED: i64 = -1;
    pub const IDLE_SUCCESS: i64 = 200;
    pub const IN_PROGRESS: i64 = 400;
    pub const APPLY_SUCCESS: i64 = 700;
}

/// `workflow` of a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workflow {
    pub action: i64,
    pub id: String,
    pub retry_timestamp: Option<String>,
}

impl Workflow {
    fn json(&self) -> Value {
        let mut w = json!({"action": self.action, "id": self.id});
        if let Some(t) = &self.retry_timestamp {
            w["retryTimestamp"] = json!(t);
        }
        w
    }
}

/// What a desired `service` value asks.
#[derive(Debug, Clone, PartialEq)]
pub enum Service {
    /// Action 3: deploy (the manifest still to be verified).
    Deploy {
        workflow: Workflow,
        manifest: String,
        signature: String,
        file_urls: BTreeMap<String, String>,
        root_key_package_url: Option<String>,
    },
    /// Action 255: cancel (or "no deployment").
    Cancel { workflow: Workflow },
    /// Another action (legacy 0–2, unknown): nothing to do, not reported.
    Ignored { action: i64 },
}

impl Service {
    /// Parses `deviceUpdate.service` (the `__t` marker and `null` members are
    /// tolerated). `Err` only for a value that cannot be read at all.
    pub fn parse(v: &Value) -> Result<Service, String> {
        let Value::Object(o) = v else {
            return Err("service must be an object".into());
        };
        let Some(Value::Object(w)) = o.get("workflow") else {
            return Err("service.workflow must be an object".into());
        };
        let action = w
            .get("action")
            .and_then(Value::as_i64)
            .ok_or("service.workflow.action must be an integer")?;
        let id = w
            .get("id")
            .and_then(Value::as_str)
            .ok_or("service.workflow.id must be a string")?
            .to_owned();
        let workflow = Workflow {
            action,
            id,
            retry_timestamp: w
                .get("retryTimestamp")
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        match action {
            3 => {
                let s = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
                let file_urls = match o.get("fileUrls") {
                    Some(Value::Object(m)) => m
                        .iter()
                        .filter_map(|(k, v)| v.as_str().map(|u| (k.clone(), u.to_owned())))
                        .collect(),
                    _ => BTreeMap::new(),
                };
                Ok(Service::Deploy {
                    workflow,
                    manifest: s("updateManifest").unwrap_or_default(),
                    signature: s("updateManifestSignature").unwrap_or_default(),
                    file_urls,
                    root_key_package_url: s("rootKeyPackageUrl").filter(|u| !u.is_empty()),
                })
            }
            255 => Ok(Service::Cancel { workflow }),
            other => Ok(Service::Ignored { action: other }),
        }
    }
}

/// `extendedResultCodes`: the root ERC as 8 upper-case hex digits, then more,
/// comma-separated.
pub fn erc_string(codes: &[u32]) -> String {
    if codes.is_empty() {
        return "00000000".into();
    }
    codes
        .iter()
        .map(|c| format!("{c:08X}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One step's result (`stepResults.step_<i>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepResult {
    pub result_code: i64,
    pub ercs: Vec<u32>,
    pub details: String,
}

fn steps_json(steps: &[StepResult]) -> Value {
    let m: Map<String, Value> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                format!("step_{i}"),
                json!({"resultCode": s.result_code, "extendedResultCodes": erc_string(&s.ercs),
                       "resultDetails": s.details}),
            )
        })
        .collect();
    Value::Object(m)
}

/// The reported PATCH carrying `agent`.
pub fn reported(agent: Value) -> Value {
    json!({COMPONENT: {"__t": "c", "agent": agent}})
}

/// Shape A: at every connection, before anything else.
pub fn startup(manufacturer: &str, model: &str, version: &str) -> Value {
    json!({"deviceProperties": {"manufacturer": manufacturer, "model": model,
            "contractModelId": CONTRACT_MODEL_ID, "aduVer": format!("DU;agent/{version}"),
            "interfaceId": null},
           "compatPropertyNames": "manufacturer,model"})
}

/// Shape B: a deployment accepted and running (`stepResults: null` clears the
/// last run's).
pub fn in_progress(w: &Workflow) -> Value {
    json!({"state": state::IN_PROGRESS, "workflow": w.json(),
           "lastInstallResult": {"resultCode": result::IN_PROGRESS, "extendedResultCodes": "00000000",
                                 "resultDetails": null, "stepResults": null}})
}

/// Shape C (and G, already installed): installed, with the deployed update's id
/// ([`super::manifest::UpdateId::to_json_string`]).
pub fn succeeded(w: &Workflow, installed: &str, steps: &[StepResult]) -> Value {
    json!({"state": state::IDLE, "workflow": w.json(),
           "installedUpdateId": installed,
           "lastInstallResult": {"resultCode": result::APPLY_SUCCESS, "extendedResultCodes": "00000000",
                                 "resultDetails": "", "stepResults": steps_json(steps)}})
}

/// Shape D: failed; the installed update stays what it was.
pub fn failed(w: &Workflow, ercs: &[u32], details: &str, steps: &[StepResult]) -> Value {
    json!({"state": state::FAILED, "workflow": w.json(),
           "lastInstallResult": {"resultCode": result::FAILURE, "extendedResultCodes": erc_string(ercs),
                                 "resultDetails": details, "stepResults": steps_json(steps)}})
}

/// Shape E: a running deployment cancelled.
pub fn cancelled(w: &Workflow, details: &str) -> Value {
    json!({"state": state::IDLE, "workflow": w.json(),
           "lastInstallResult": {"resultCode": result::CANCELLED, "extendedResultCodes": "00000000",
                                 "resultDetails": details, "stepResults": null}})
}

/// Shape F: a cancel seen with nothing running.
pub fn idle(w: &Workflow) -> Value {
    json!({"state": state::IDLE, "workflow": w.json(),
           "lastInstallResult": {"resultCode": result::IDLE_SUCCESS, "extendedResultCodes": "00000000",
                                 "resultDetails": "", "stepResults": null}})
}

/// The writable-property ACK of `service` at desired `$version` `av`: `{}` as
/// the value (the manifest is not echoed), 200 when the value parses, 406 when
/// it cannot be read at all. The outcome goes in `agent`.
pub fn service_ack(av: u64, ac: u16) -> Value {
    json!({COMPONENT: {"__t": "c", "service": {"value": {}, "ac": ac, "ad": "", "av": av}}})
}

#[cfg(test)]
mod tests;
