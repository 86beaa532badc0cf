//! IoT Hub and DPS MQTT topics: building what the device publishes, classifying
//! what it receives. Pure functions, no I/O.

use crate::sas;

/// API version in the CONNECT user name.
pub const API_VERSION: &str = "2021-04-12";
/// API version of DPS registrations.
pub const DPS_API_VERSION: &str = "2019-03-31";

pub const TWIN_RES_FILTER: &str = "$iothub/twin/res/#";
pub const DESIRED_FILTER: &str = "$iothub/twin/PATCH/properties/desired/#";
pub const METHODS_FILTER: &str = "$iothub/methods/POST/#";
pub const DPS_RES_FILTER: &str = "$dps/registrations/res/#";

/// The topics of one device (or module) identity.
#[derive(Debug, Clone)]
pub struct Topics {
    device_id: String,
    module_id: Option<String>,
}

/// What an inbound publish is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// The answer to a twin GET or reported PATCH.
    TwinResponse {
        status: u16,
        rid: String,
        version: Option<u64>,
    },
    /// A desired-properties patch.
    Desired {
        version: Option<u64>,
    },
    /// A direct method call.
    Method {
        name: String,
        rid: String,
    },
    /// A cloud-to-device message and its property bag.
    C2d {
        properties: Vec<(String, String)>,
    },
    Other,
}

/// Parses `k=v&k2=v2` (percent-decoded; a key without `=` has an empty value).
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((sas::decode(k)?, sas::decode(v)?))
        })
        .collect()
}

fn query_get<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Encodes a property bag (`$.ct=application%2Fjson&type=pvlog`).
pub fn property_bag(props: &[(&str, &str)]) -> String {
    props
        .iter()
        .map(|(k, v)| {
            // System properties keep their `$.` prefix readable.
            let key = match k.strip_prefix("$.") {
                Some(rest) => format!("$.{}", sas::encode(rest)),
                None => sas::encode(k),
            };
            format!("{key}={}", sas::encode(v))
        })
        .collect::<Vec<_>>()
        .join("&")
}

impl Topics {
    pub fn new(device_id: &str, module_id: Option<&str>) -> Self {
        Self {
            device_id: device_id.to_owned(),
            module_id: module_id.map(str::to_owned),
        }
    }

    /// MQTT client id: `{device}` or `{device}/{module}`.
    pub fn client_id(&self) -> String {
        match &self.module_id {
            Some(m) => format!("{}/{m}", self.device_id),
            None => self.device_id.clone(),
        }
    }

    /// CONNECT user name.
    pub fn username(&self, host: &str, model_id: Option<&str>) -> String {
        let mut u = format!("{host}/{}/?api-version={API_VERSION}", self.client_id());
        if let Some(m) = model_id {
            u.push_str("&model-id=");
            u.push_str(&sas::encode(m));
        }
        u
    }

    /// Device-to-cloud messages, with a property bag.
    pub fn d2c(&self, props: &[(&str, &str)]) -> String {
        let base = match &self.module_id {
            Some(m) => format!("devices/{}/modules/{m}/messages/events/", self.device_id),
            None => format!("devices/{}/messages/events/", self.device_id),
        };
        base + &property_bag(props)
    }

    /// Cloud-to-device messages (devices only; modules get none).
    pub fn c2d_filter(&self) -> Option<String> {
        match self.module_id {
            Some(_) => None,
            None => Some(format!("devices/{}/messages/devicebound/#", self.device_id)),
        }
    }

    pub fn twin_get(rid: u64) -> String {
        format!("$iothub/twin/GET/?$rid={rid}")
    }

    pub fn twin_patch(rid: u64) -> String {
        format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}")
    }

    pub fn method_response(status: u16, rid: &str) -> String {
        format!("$iothub/methods/res/{status}/?$rid={}", sas::encode(rid))
    }

    /// Classifies an inbound topic.
    pub fn classify(&self, topic: &str) -> Inbound {
        if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
            let (status, q) = rest.split_once("/?").unwrap_or((rest, ""));
            let q = parse_query(q);
            return match (status.parse(), query_get(&q, "$rid")) {
                (Ok(status), Some(rid)) => Inbound::TwinResponse {
                    status,
                    rid: rid.to_owned(),
                    version: query_get(&q, "$version").and_then(|v| v.parse().ok()),
                },
                _ => Inbound::Other,
            };
        }
        if let Some(rest) = topic.strip_prefix("$iothub/twin/PATCH/properties/desired/") {
            let q = parse_query(rest.trim_start_matches('?'));
            return Inbound::Desired {
                version: query_get(&q, "$version").and_then(|v| v.parse().ok()),
            };
        }
        if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
            let (name, q) = rest.split_once("/?").unwrap_or((rest, ""));
            let q = parse_query(q);
            return match query_get(&q, "$rid") {
                Some(rid) if !name.is_empty() => Inbound::Method {
                    name: name.to_owned(),
                    rid: rid.to_owned(),
                },
                _ => Inbound::Other,
            };
        }
        let c2d = format!("devices/{}/messages/devicebound/", self.device_id);
        if self.module_id.is_none() {
            if let Some(bag) = topic.strip_prefix(&c2d) {
                return Inbound::C2d {
                    properties: parse_query(bag),
                };
            }
        }
        Inbound::Other
    }
}

/// DPS topics and names.
pub mod dps {
    use super::*;

    pub fn username(id_scope: &str, registration_id: &str) -> String {
        format!("{id_scope}/registrations/{registration_id}/api-version={DPS_API_VERSION}")
    }

    /// The resource a registration token grants (signed with `skn=registration`).
    pub fn resource(id_scope: &str, registration_id: &str) -> String {
        format!("{id_scope}/registrations/{registration_id}")
    }

    pub fn register(rid: u64) -> String {
        format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}")
    }

    pub fn status(rid: u64, operation_id: &str) -> String {
        format!(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={}",
            sas::encode(operation_id)
        )
    }

    /// An answer: status, `$rid` and `retry-after` seconds.
    pub fn parse_response(topic: &str) -> Option<(u16, String, Option<u64>)> {
        let rest = topic.strip_prefix("$dps/registrations/res/")?;
        let (status, q) = rest.split_once("/?")?;
        let q = parse_query(q);
        Some((
            status.parse().ok()?,
            query_get(&q, "$rid")?.to_owned(),
            query_get(&q, "retry-after").and_then(|v| v.parse().ok()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_names_follow_the_mqtt_article() {
        let t = Topics::new("dev-1", None);
        assert_eq!(t.client_id(), "dev-1");
        assert_eq!(
            t.username("h.azure-devices.net", None),
            "h.azure-devices.net/dev-1/?api-version=2021-04-12"
        );
        assert_eq!(
            t.username("h", Some("dtmi:pantacor:pvbridge;1")),
            "h/dev-1/?api-version=2021-04-12&model-id=dtmi%3Apantacor%3Apvbridge%3B1"
        );
        let m = Topics::new("dev-1", Some("pvb"));
        assert_eq!(m.client_id(), "dev-1/pvb");
        assert_eq!(m.username("h", None), "h/dev-1/pvb/?api-version=2021-04-12");
        assert_eq!(m.d2c(&[]), "devices/dev-1/modules/pvb/messages/events/");
        assert_eq!(m.c2d_filter(), None);
    }

    #[test]
    fn d2c_property_bags_are_encoded() {
        let t = Topics::new("d", None);
        assert_eq!(
            t.d2c(&[
                ("$.ct", "application/json"),
                ("$.ce", "utf-8"),
                ("type", "pvlog")
            ]),
            "devices/d/messages/events/$.ct=application%2Fjson&$.ce=utf-8&type=pvlog"
        );
    }

    #[test]
    fn inbound_topics_are_classified() {
        let t = Topics::new("d", None);
        assert_eq!(
            t.classify("$iothub/twin/res/204/?$rid=7&$version=12"),
            Inbound::TwinResponse {
                status: 204,
                rid: "7".into(),
                version: Some(12)
            }
        );
        assert_eq!(
            t.classify("$iothub/twin/res/200/?$rid=1"),
            Inbound::TwinResponse {
                status: 200,
                rid: "1".into(),
                version: None
            }
        );
        assert_eq!(
            t.classify("$iothub/twin/PATCH/properties/desired/?$version=3"),
            Inbound::Desired { version: Some(3) }
        );
        assert_eq!(
            t.classify("$iothub/methods/POST/reboot/?$rid=abc%201"),
            Inbound::Method {
                name: "reboot".into(),
                rid: "abc 1".into()
            }
        );
        assert_eq!(
            t.classify("devices/d/messages/devicebound/%24.mid=m1&k&e="),
            Inbound::C2d {
                properties: vec![
                    ("$.mid".into(), "m1".into()),
                    ("k".into(), "".into()),
                    ("e".into(), "".into())
                ]
            }
        );
        for other in [
            "$iothub/twin/res/abc/?$rid=1",
            "$iothub/twin/res/200/",
            "$iothub/methods/POST//?$rid=1",
            "devices/e/messages/devicebound/",
            "random",
        ] {
            assert_eq!(t.classify(other), Inbound::Other, "{other}");
        }
    }

    #[test]
    fn dps_names() {
        assert_eq!(
            dps::username("0ne0001", "reg-1"),
            "0ne0001/registrations/reg-1/api-version=2019-03-31"
        );
        assert_eq!(
            dps::status(4, "4.abc"),
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=4&operationId=4.abc"
        );
        assert_eq!(
            dps::parse_response("$dps/registrations/res/202/?$rid=1&retry-after=3"),
            Some((202, "1".into(), Some(3)))
        );
        assert_eq!(dps::parse_response("$dps/registrations/res/x"), None);
    }
}
