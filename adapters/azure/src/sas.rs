//! Shared access signatures: IoT Hub device tokens, DPS registration tokens and
//! the key derivation of DPS group enrollments.
//!
//! A token is `SharedAccessSignature sr={enc(resource)}&sig={enc(b64(hmac))}&se={expiry}[&skn={policy}]`
//! where the HMAC-SHA256, keyed with the base64-decoded key, covers
//! `{enc(resource)}\n{expiry}` and `expiry` is in Unix seconds.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Why a key could not be used. Never carries the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("the key is not base64")]
    NotBase64,
    #[error("the key is empty")]
    Empty,
}

/// Decodes a base64 key.
pub fn decode_key(key: &str) -> Result<Vec<u8>, SasError> {
    let bytes = B64.decode(key.trim()).map_err(|_| SasError::NotBase64)?;
    if bytes.is_empty() {
        return Err(SasError::Empty);
    }
    Ok(bytes)
}

/// Percent-encodes everything but RFC 3986's unreserved characters, as Azure's SDKs
/// do for `sr`, `sig` and property bags.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (and `+` as a space, as form encoding does).
pub fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hmac_b64(key: &[u8], msg: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts every key length"),
    };
    mac.update(msg);
    B64.encode(mac.finalize().into_bytes())
}

/// The resource a device (or module) token grants: `{host}/devices/{id}[/modules/{m}]`.
pub fn device_resource(host: &str, device_id: &str, module_id: Option<&str>) -> String {
    match module_id {
        Some(m) => format!("{host}/devices/{device_id}/modules/{m}"),
        None => format!("{host}/devices/{device_id}"),
    }
}

/// Builds a token for `resource` valid until `expiry` (Unix seconds).
pub fn token(
    key_b64: &str,
    resource: &str,
    expiry: u64,
    policy: Option<&str>,
) -> Result<String, SasError> {
    let key = decode_key(key_b64)?;
    let sr = encode(resource);
    let sig = hmac_b64(&key, format!("{sr}\n{expiry}").as_bytes());
    let mut t = format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
        encode(&sig)
    );
    if let Some(p) = policy {
        t.push_str("&skn=");
        t.push_str(&encode(p));
    }
    Ok(t)
}

/// The device key of a DPS group enrollment:
/// `base64(HMAC-SHA256(base64-decode(group key), registration id))`.
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, SasError> {
    let key = decode_key(group_key_b64)?;
    Ok(hmac_b64(&key, registration_id.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Published vector (damienpontifex/azure-iot-sdk-rs `src/token.rs`, re-computed
    /// with Python's hmac).
    #[test]
    fn device_token_matches_the_published_vector() {
        let t = token(
            "O+H9VTcdJP0TQkl7bh4nVG0OJNrEataMpuWB54D0VEc=",
            &device_resource("pontifex.azure-devices.net", "FirstDevice", None),
            1_593_353_305,
            None,
        )
        .unwrap();
        assert_eq!(
            t,
            "SharedAccessSignature sr=pontifex.azure-devices.net%2Fdevices%2FFirstDevice&sig=CKYVArtLm72J2UNWLb4V3XqPc679Ig3LX83G3nPExUc%3D&se=1593353305"
        );
    }

    /// The example of Microsoft's "symmetric key attestation" article.
    #[test]
    fn group_key_derivation_matches_microsofts_example() {
        assert_eq!(
            derive_device_key(
                "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
                "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"
            )
            .unwrap(),
            "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="
        );
    }

    #[test]
    fn policy_tokens_carry_skn_and_modules_their_path() {
        let t = token(
            "YWJj",
            "0ne00000000/registrations/dev-1",
            10,
            Some("registration"),
        )
        .unwrap();
        assert!(t.starts_with("SharedAccessSignature sr=0ne00000000%2Fregistrations%2Fdev-1&sig="));
        assert!(t.ends_with("&se=10&skn=registration"), "{t}");
        assert_eq!(
            device_resource("h", "d", Some("m")),
            "h/devices/d/modules/m"
        );
    }

    #[test]
    fn encoding_round_trips_and_bad_keys_are_named() {
        let s = "a b/c?d=e&f%g~h.i_j-k$";
        assert_eq!(encode(s), "a%20b%2Fc%3Fd%3De%26f%25g~h.i_j-k%24");
        assert_eq!(decode(&encode(s)).as_deref(), Some(s));
        assert_eq!(decode("%2"), None);
        assert_eq!(token("***", "r", 1, None).unwrap_err(), SasError::NotBase64);
        assert_eq!(token("", "r", 1, None).unwrap_err(), SasError::Empty);
    }
}
