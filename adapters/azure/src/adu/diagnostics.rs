//! ADU log collection, the `diagnosticInformation` component (reference §9):
//! the request, where each log file goes in the Blob container, the ACK (never
//! the SAS URL: it is a credential) and the report, and replay protection.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The component's name in the twin.
pub const COMPONENT: &str = "diagnosticInformation";

/// `agent.resultCode` values.
pub mod result {
    pub const SUCCESS: i64 = 200;
    pub const FAILURE: i64 = 0;
    pub const NO_LOGS: i64 = -1;
    pub const UPLOAD_FAILED: i64 = -2;
    pub const BAD_CREDENTIAL: i64 = -4;
    pub const NO_COMPONENTS: i64 = -5;
    pub const NO_OPERATION_ID: i64 = -6;
    pub const NO_SAS_URL: i64 = -7;
}

/// A log upload request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub operation_id: String,
    /// `https://<account>.blob.core.windows.net/<container>?<sas>`.
    pub container: String,
    pub sas: String,
}

/// Reads the desired `service`; `Err` carries the result code to report (and
/// the operation id when there is one).
pub fn parse(v: &Value) -> Result<Request, (i64, Option<String>)> {
    let op = v
        .get("operationId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map(str::to_owned);
    let Some(op) = op else {
        return Err((result::NO_OPERATION_ID, None));
    };
    let Some(url) = v.get("storageSasUrl").and_then(Value::as_str) else {
        return Err((result::NO_SAS_URL, Some(op)));
    };
    let Some((container, sas)) = url.split_once('?') else {
        return Err((result::BAD_CREDENTIAL, Some(op)));
    };
    let path_ok = container
        .strip_prefix("https://")
        .or_else(|| container.strip_prefix("http://"))
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(host, path)| !host.is_empty() && !path.is_empty() && !path.contains('/'));
    if !path_ok || sas.is_empty() {
        return Err((result::BAD_CREDENTIAL, Some(op)));
    }
    Ok(Request {
        operation_id: op,
        container: container.to_owned(),
        sas: sas.to_owned(),
    })
}

fn encode(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Request {
    /// The URL of one log file's blob: `<device>/<operation>/<component>/<file>`,
    /// each segment URL-encoded (`device` is `deviceId` or `deviceId/moduleId`).
    pub fn blob_url(&self, device: &str, component: &str, file: &str) -> String {
        let name: Vec<String> = device
            .split('/')
            .chain([self.operation_id.as_str(), component, file])
            .map(encode)
            .collect();
        format!("{}/{}?{}", self.container, name.join("/"), self.sas)
    }
}

/// The ACK: only the operation id is echoed, never the SAS URL.
pub fn ack(av: u64, operation_id: Option<&str>) -> Value {
    let value = match operation_id {
        Some(op) => json!({"operationId": op}),
        None => json!({}),
    };
    json!({COMPONENT: {"__t": "c", "service": {"value": value, "ac": 200, "ad": "", "av": av}}})
}

/// The report of an operation.
pub fn report(result_code: i64, operation_id: &str) -> Value {
    json!({COMPONENT: {"__t": "c", "agent": {"resultCode": result_code, "operationId": operation_id}}})
}

/// The recent completed operations, kept durably: a replay (restart, reconnect)
/// re-sends the stored report without uploading again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done(VecDeque<(String, i64)>);

impl Done {
    pub const KEPT: usize = 16;

    pub fn result_of(&self, operation_id: &str) -> Option<i64> {
        self.0
            .iter()
            .find(|(op, _)| op == operation_id)
            .map(|(_, r)| *r)
    }

    pub fn record(&mut self, operation_id: &str, result_code: i64) {
        self.0.retain(|(op, _)| op != operation_id);
        self.0.push_back((operation_id.to_owned(), result_code));
        while self.0.len() > Self::KEPT {
            self.0.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAS: &str = "https://acct.blob.core.windows.net/logs?sv=2024&sig=SECRET";

    #[test]
    fn requests_are_read_and_malformed_ones_get_adus_codes() {
        let r = parse(&json!({"operationId": "op1", "storageSasUrl": SAS})).unwrap();
        assert_eq!(r.container, "https://acct.blob.core.windows.net/logs");
        assert_eq!(
            parse(&json!({"storageSasUrl": SAS})).unwrap_err(),
            (result::NO_OPERATION_ID, None)
        );
        assert_eq!(
            parse(&json!({"operationId": "op1"})).unwrap_err(),
            (result::NO_SAS_URL, Some("op1".into()))
        );
        for bad in [
            "https://acct.blob.core.windows.net/logs",
            "https://acct.blob.core.windows.net/?sig=x",
            "https://acct.blob.core.windows.net/a/b?sig=x",
            "ftp://x/logs?sig=x",
        ] {
            assert_eq!(
                parse(&json!({"operationId": "op1", "storageSasUrl": bad}))
                    .unwrap_err()
                    .0,
                result::BAD_CREDENTIAL,
                "{bad}"
            );
        }
    }

    #[test]
    fn blobs_are_named_as_adu_names_them() {
        let r = parse(&json!({"operationId": "op 1", "storageSasUrl": SAS})).unwrap();
        assert_eq!(
            r.blob_url("dev-1/mod-a", "pv-bridge", "pantavisor.log"),
            "https://acct.blob.core.windows.net/logs/dev-1/mod-a/op%201/pv-bridge/pantavisor.log?sv=2024&sig=SECRET"
        );
    }

    #[test]
    fn the_ack_never_carries_the_sas_and_replays_are_recognised() {
        let a = ack(7, Some("op1")).to_string();
        assert!(!a.contains("SECRET") && a.contains("op1"), "{a}");
        assert_eq!(report(200, "op1")[COMPONENT]["agent"]["resultCode"], 200);
        let mut d = Done::default();
        for i in 0..20 {
            d.record(&format!("op{i}"), 200);
        }
        assert_eq!(d.result_of("op19"), Some(200));
        assert_eq!(d.result_of("op0"), None, "only the last 16 are kept");
        d.record("op19", -2);
        assert_eq!(d.result_of("op19"), Some(-2));
    }
}
