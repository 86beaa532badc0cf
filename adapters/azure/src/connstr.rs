//! Device connection strings, the format every Azure tool prints
//! (`az iot hub device-identity connection-string show`):
//! `HostName=…;DeviceId=…;SharedAccessKey=…` with optional `ModuleId`,
//! `GatewayHostName`, `SharedAccessKeyName` and `x509=true`.

use std::fmt;
use std::str::FromStr;

/// A parsed device (or module) connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The hub's host name: what the MQTT user name and the SAS `sr` carry.
    pub host_name: String,
    pub device_id: String,
    pub module_id: Option<String>,
    /// The base64 key that signs SAS tokens.
    pub shared_access_key: Option<String>,
    /// A hub policy name (`skn`) when the key is a policy's, not the device's.
    pub shared_access_key_name: Option<String>,
    /// An IoT Edge gateway to connect through (TLS is checked against this name).
    pub gateway_host_name: Option<String>,
    /// The device authenticates with an X.509 client certificate.
    pub x509: bool,
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .field(
                "shared_access_key",
                &self.shared_access_key.as_ref().map(|_| "<hidden>"),
            )
            .field("shared_access_key_name", &self.shared_access_key_name)
            .field("gateway_host_name", &self.gateway_host_name)
            .field("x509", &self.x509)
            .finish()
    }
}

/// Why a connection string was refused. Never carries the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connection string: {0}")]
pub struct ConnStrError(pub String);

impl FromStr for ConnectionString {
    type Err = ConnStrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |m: String| Err(ConnStrError(m));
        let mut c = ConnectionString {
            host_name: String::new(),
            device_id: String::new(),
            module_id: None,
            shared_access_key: None,
            shared_access_key_name: None,
            gateway_host_name: None,
            x509: false,
        };
        let mut seen: Vec<&str> = Vec::new();
        for part in s.trim().split(';').filter(|p| !p.trim().is_empty()) {
            // Keys are base64 and end in '=': split at the first '=' only.
            let Some((k, v)) = part.split_once('=') else {
                return err(format!("{:?} is not Key=Value", redact(part)));
            };
            let (k, v) = (k.trim(), v.trim());
            if seen.contains(&k) {
                return err(format!("{k} is given twice"));
            }
            seen.push(k);
            if v.is_empty() {
                return err(format!("{k} is empty"));
            }
            match k {
                "HostName" => c.host_name = v.to_owned(),
                "DeviceId" => c.device_id = v.to_owned(),
                "ModuleId" => c.module_id = Some(v.to_owned()),
                "SharedAccessKey" => c.shared_access_key = Some(v.to_owned()),
                "SharedAccessKeyName" => c.shared_access_key_name = Some(v.to_owned()),
                "GatewayHostName" => c.gateway_host_name = Some(v.to_owned()),
                "x509" => {
                    c.x509 = match v.to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return err(format!("x509 must be true or false, not {v:?}")),
                    }
                }
                "SharedAccessSignature" => {
                    return err(
                        "SharedAccessSignature (a fixed token) is not supported: it cannot be renewed; give SharedAccessKey".into(),
                    );
                }
                other => return err(format!("unknown key {other:?}")),
            }
        }
        if c.host_name.is_empty() {
            return err("HostName is missing".into());
        }
        if c.device_id.is_empty() {
            return err("DeviceId is missing".into());
        }
        match (&c.shared_access_key, c.x509) {
            (None, false) => {
                return err("needs SharedAccessKey, or x509=true with a certificate".into());
            }
            (Some(_), true) => {
                return err("SharedAccessKey and x509=true exclude each other".into());
            }
            _ => {}
        }
        if let Some(k) = &c.shared_access_key {
            crate::sas::decode_key(k).map_err(|e| ConnStrError(format!("SharedAccessKey: {e}")))?;
        }
        Ok(c)
    }
}

/// A part as it may be shown in an error: the value of a key-looking part hidden.
fn redact(part: &str) -> String {
    if part.len() > 24 {
        format!("{}…", part.chars().take(12).collect::<String>())
    } else {
        part.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_az_prints() {
        let c: ConnectionString = "HostName=myhub.azure-devices.net;DeviceId=dev-1;SharedAccessKey=O+H9VTcdJP0TQkl7bh4nVG0OJNrEataMpuWB54D0VEc="
            .parse()
            .unwrap();
        assert_eq!(c.host_name, "myhub.azure-devices.net");
        assert_eq!(c.device_id, "dev-1");
        assert_eq!(
            c.shared_access_key.as_deref(),
            Some("O+H9VTcdJP0TQkl7bh4nVG0OJNrEataMpuWB54D0VEc=")
        );
        assert!(!c.x509 && c.module_id.is_none() && c.gateway_host_name.is_none());
        assert!(!format!("{c:?}").contains("O+H9"), "Debug hides the key");
    }

    #[test]
    fn module_gateway_and_x509_forms() {
        let c: ConnectionString =
            "HostName=h.azure-devices.net;DeviceId=d;ModuleId=pv;GatewayHostName=edge.local;SharedAccessKey=YWJj"
                .parse()
                .unwrap();
        assert_eq!(c.module_id.as_deref(), Some("pv"));
        assert_eq!(c.gateway_host_name.as_deref(), Some("edge.local"));
        let c: ConnectionString = "HostName=h;DeviceId=d;x509=true\n".parse().unwrap();
        assert!(c.x509 && c.shared_access_key.is_none());
    }

    #[test]
    fn refusals_name_the_problem_and_never_the_key() {
        for (s, want) in [
            ("DeviceId=d;SharedAccessKey=YWJj", "HostName is missing"),
            ("HostName=h;SharedAccessKey=YWJj", "DeviceId is missing"),
            ("HostName=h;DeviceId=d", "needs SharedAccessKey"),
            (
                "HostName=h;DeviceId=d;DeviceId=e;SharedAccessKey=YWJj",
                "DeviceId is given twice",
            ),
            (
                "HostName=h;DeviceId=d;Colour=red;SharedAccessKey=YWJj",
                "unknown key \"Colour\"",
            ),
            (
                "HostName=h;DeviceId=d;SharedAccessKey=YWJj;x509=true",
                "exclude each other",
            ),
            (
                "HostName=h;DeviceId=d;SharedAccessKey=not*base64!",
                "SharedAccessKey: ",
            ),
            (
                "HostName=h;DeviceId=d;x509=yes",
                "x509 must be true or false",
            ),
            (
                "HostName=h;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=x",
                "cannot be renewed",
            ),
        ] {
            let e = s.parse::<ConnectionString>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
            assert!(!e.contains("not*base64"), "{e}");
        }
    }
}
