//! The fake's own SAS checking, written from Microsoft's description (not shared
//! with the bridge, so the two cannot agree on a mistake): the signature is
//! HMAC-SHA256 over `{sr as sent}\n{se}`, keyed with the base64-decoded key.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The fields of a `SharedAccessSignature …` token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// `sr` exactly as sent (still encoded): what was signed.
    pub sr_raw: String,
    /// `sr` decoded: the resource.
    pub resource: String,
    pub sig: String,
    pub se: u64,
    pub skn: Option<String>,
}

pub fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else if b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses a token; `None` when it is not one.
pub fn parse(token: &str) -> Option<Token> {
    let rest = token.strip_prefix("SharedAccessSignature ")?;
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for part in rest.split('&') {
        let (k, v) = part.split_once('=')?;
        match k {
            "sr" => sr = Some(v.to_owned()),
            "sig" => sig = Some(decode(v)?),
            "se" => se = Some(v.parse().ok()?),
            "skn" => skn = Some(decode(v)?),
            _ => return None,
        }
    }
    let sr_raw = sr?;
    Some(Token {
        resource: decode(&sr_raw)?,
        sr_raw,
        sig: sig?,
        se: se?,
        skn,
    })
}

pub fn hmac_b64(key_b64: &str, msg: &[u8]) -> Option<String> {
    let key = B64.decode(key_b64).ok()?;
    let mut mac = HmacSha256::new_from_slice(&key).ok()?;
    mac.update(msg);
    Some(B64.encode(mac.finalize().into_bytes()))
}

/// Why a token does not grant `resource` now with `key`, if it does not.
pub fn check(t: &Token, key_b64: &str, resource: &str, now: u64) -> Result<(), String> {
    // Prefix match per path segment, case-insensitive host as the hub does.
    let r = t.resource.trim_end_matches('/');
    let ok_scope = r.eq_ignore_ascii_case(resource)
        || (resource.len() > r.len()
            && resource[..r.len()].eq_ignore_ascii_case(r)
            && resource.as_bytes()[r.len()] == b'/');
    if !ok_scope {
        return Err(format!("sr {:?} does not cover {resource:?}", t.resource));
    }
    if t.se <= now {
        return Err(format!("token expired at {} (now {now})", t.se));
    }
    let want = hmac_b64(key_b64, format!("{}\n{}", t.sr_raw, t.se).as_bytes())
        .ok_or("the registered key is not base64")?;
    if want != t.sig {
        return Err("signature mismatch".into());
    }
    Ok(())
}

/// The key DPS derives for a group enrollment.
pub fn derive(group_key_b64: &str, registration_id: &str) -> Option<String> {
    hmac_b64(group_key_b64, registration_id.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_published_token_and_nothing_else() {
        let tok = "SharedAccessSignature sr=pontifex.azure-devices.net%2Fdevices%2FFirstDevice&sig=CKYVArtLm72J2UNWLb4V3XqPc679Ig3LX83G3nPExUc%3D&se=1593353305";
        let t = parse(tok).unwrap();
        let key = "O+H9VTcdJP0TQkl7bh4nVG0OJNrEataMpuWB54D0VEc=";
        let res = "pontifex.azure-devices.net/devices/FirstDevice";
        assert_eq!(check(&t, key, res, 1_593_353_000), Ok(()));
        assert!(
            check(&t, key, res, 1_593_353_305)
                .unwrap_err()
                .contains("expired")
        );
        assert!(
            check(
                &t,
                key,
                "pontifex.azure-devices.net/devices/FirstDevice2",
                0
            )
            .is_err()
        );
        assert!(
            check(
                &t,
                key,
                "pontifex.azure-devices.net/devices/FirstDevice/modules/m",
                0
            )
            .is_ok()
        );
        assert!(check(&t, "AAAA", res, 0).unwrap_err().contains("signature"));
        assert_eq!(
            derive(
                "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
                "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"
            )
            .as_deref(),
            Some("Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=")
        );
        assert!(parse("SharedAccessSignature sr=a&sig=b").is_none());
    }
}
