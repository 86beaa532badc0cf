//! `device_update = { manufacturer = "…", model = "…", test_root_keys_file = "…" }`
//! in an `azure` backend turns the Device Update component on.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use super::jws::RootKey;
use super::rootkeys::{exponent, modulus};

/// Settings of the Device Update component.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceUpdateConfig {
    /// `deviceProperties.manufacturer`: what deployments are matched against.
    pub manufacturer: String,
    /// `deviceProperties.model`.
    pub model: String,
    /// Extra root keys, for tests and private deployments only: a root key package
    /// or a `{"<kid>": {"n": "<base64url>", "e": 65537}}` map. Never needed with
    /// Microsoft's service; without it only Microsoft's keys are trusted.
    #[serde(default)]
    pub test_root_keys_file: Option<PathBuf>,
}

fn property(what: &str, v: &str) -> Result<(), String> {
    if v.trim().is_empty() || v.len() > 64 || v.contains(char::is_control) {
        return Err(format!(
            "device_update.{what} must be 1 to 64 printable characters, got {v:?}"
        ));
    }
    Ok(())
}

impl DeviceUpdateConfig {
    /// Checks what can be checked without the network; reads the test keys.
    pub fn validate(&self) -> Result<(), String> {
        property("manufacturer", &self.manufacturer)?;
        property("model", &self.model)?;
        self.test_root_keys()?;
        Ok(())
    }

    /// The configured test root keys (none without `test_root_keys_file`).
    pub fn test_root_keys(&self) -> Result<Vec<RootKey>, String> {
        let Some(path) = &self.test_root_keys_file else {
            return Ok(Vec::new());
        };
        let what = format!("device_update.test_root_keys_file {}", path.display());
        let bytes = std::fs::read(path).map_err(|e| format!("{what}: {e}"))?;
        parse_test_keys(&bytes).map_err(|e| format!("{what}: {e}"))
    }
}

/// Root keys from a root key package (`protected.rootKeys`) or a bare
/// `kid → {n, e}` map.
pub fn parse_test_keys(bytes: &[u8]) -> Result<Vec<RootKey>, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let map = v
        .get("protected")
        .and_then(|p| p.get("rootKeys"))
        .unwrap_or(&v)
        .as_object()
        .ok_or("expected a root key package or an object of kid → {n, e}")?;
    let mut keys = Vec::new();
    for (kid, k) in map {
        let n = k
            .get("n")
            .and_then(modulus)
            .filter(|n| n.len() >= 256)
            .ok_or_else(|| {
                format!("{kid}: n must be a base64url RSA modulus of 2048 bits or more")
            })?;
        let e = k
            .get("e")
            .and_then(exponent)
            .filter(|e| e.len() > 1 || e.first().is_some_and(|b| *b >= 3))
            .ok_or_else(|| format!("{kid}: e must be a number"))?;
        keys.push(RootKey {
            kid: kid.clone(),
            n,
            e,
        });
    }
    if keys.is_empty() {
        return Err("no root keys in it".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/adu")
            .join(name);
        std::fs::read(path).unwrap()
    }

    #[test]
    fn test_keys_come_from_a_package_or_a_map_and_are_checked() {
        let keys = parse_test_keys(&fixture("test-rootkeypackage.valid.json")).unwrap();
        assert_eq!(
            keys.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
            ["testrootkey1", "testrootkey2"]
        );
        assert_eq!(keys[0].e, vec![1, 0, 1]);
        let map =
            serde_json::json!({"k1": {"n": URL_SAFE_NO_PAD.encode([0xc3u8; 256]), "e": 65537}});
        assert_eq!(
            parse_test_keys(map.to_string().as_bytes()).unwrap().len(),
            1
        );
        for (bad, want) in [
            ("[]", "expected a root key package"),
            ("{}", "no root keys"),
            (r#"{"k": {"n": "AQAB", "e": 65537}}"#, "2048 bits or more"),
        ] {
            let e = parse_test_keys(bad.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn manufacturer_and_model_are_checked() {
        let c = |m: &str, mo: &str| DeviceUpdateConfig {
            manufacturer: m.into(),
            model: mo.into(),
            test_root_keys_file: None,
        };
        c("pantacor", "pv-arm64").validate().unwrap();
        assert!(c("", "x").validate().unwrap_err().contains("manufacturer"));
        assert!(
            c("p", &"m".repeat(65))
                .validate()
                .unwrap_err()
                .contains("model")
        );
        let missing = DeviceUpdateConfig {
            test_root_keys_file: Some("/nonexistent/keys.json".into()),
            ..c("p", "m")
        };
        assert!(
            missing
                .validate()
                .unwrap_err()
                .contains("/nonexistent/keys.json")
        );
    }
}
