//! The signature chain of an ADU update manifest (reference §5):
//!
//! ```text
//! updateManifestSignature = B64U(H).B64U(P).B64U(S)   H = {"alg":"RS256","sjwk":…}
//! sjwk                    = B64U(h).B64U(p).B64U(s)   h = {"alg":"RS256","kid":<root key>}
//! ```
//! `s` is the root key's signature over the signing key `p` (a JWK whose `n` is
//! *standard* base64), `S` the signing key's signature over `P =
//! {"sha256": <standard base64 of SHA-256(updateManifest)>}`. Nothing in a
//! manifest is trusted before all of it verifies.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::Value;
use sha2::Digest;

/// An RSA root key: modulus and exponent, big-endian, no leading zero byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootKey {
    pub kid: String,
    pub n: Vec<u8>,
    pub e: Vec<u8>,
}

/// Microsoft's production root keys (RSA-3072, e = 65537), base64url without the
/// leading zero byte, as the production root key package lists them.
const PRODUCTION: [(&str, &str); 2] = [
    (
        "ADU.200702.R",
        "1UIurxFUo1Blh6JNW7oa-6ky3-mZXwVFyK-9NR2J6CcnWKOo7sXFHk_3kqYSBn09fbAH9ix_3m0q9bxJvBXv8IHLP4hPJx2IcShgCLYZ0tI50AUfPHaGcbtZWLyxiHurVii_MXNEMhD9PdOWXP9OXLNr_4uEm4uAuEnQffrWQFh2TcByJ3XLmi-btJ8PJfEcxRsLWjB9L7jvpyZYU6_VHVUBUQ3pG6IPP9fpHSBBpuYUCq7-8hwq1uQEe_YUfuwPl4P6WPqBNiG5oyv62WELGpT3wb5_QBRKyfo1f-9mcACx_dvXYQ07WHRnlIl1dpZ8kYfSjhGX7nuHbJovRdhlP1JwmCrLyARj9clHz3D07WSndKUjj7bt9xzTsBxkVxJaqYGEH6DnUBmWtIKxrEjj4TKCy0AfrMRZvBA0UYL5KI2oHpv1eUV1styaEUMIvmHMmsTLdzb_g92ocU9Rjg57Tfp5mI2-_IJ-QEipEgGo2X7zpRvx-5B3PkCHGMmr2fd5",
    ),
    (
        "ADU.200703.R",
        "sqOydBb6uyD5UnbmJz6AQcb-zzD5yJb1WQqqgedRg4rE9Rc6LyrmV9Rxzoo975pVdj6Z4sKuTO4tuHj1ok4o8pxOOWW87OQN5eM4qFmrCKQbtPSgUqM4s0YhE8w8aAbe_gCmkm7eTEcQ1hycJPXNcOH1anxoEx3hxfaoTyGfhnxExYqZHMXTBptacZ0JHMNkMWrFF5UdXSrxVcdm1Oj12albjKJsYmAFN9cysHPL90s2JyQhjDgKuBj-9RVgNYs17x4PiKYTjXt977PnsMmmHHB7zPIpi4f3vZ22iG-sc_9y8u9IJ5ZyhgaiXON9zrCe5cLZTsTzf3gHS2WIRQwR5ZZWNIgtFg5ZQtL32e0d7ck3d0R-44Q2n1gT72_kw0TUdwaKz1vIgByimGULNdxzyGnQXuglQ5722KsFr1EpI1VAWBDquOLNXXnM7N-0W5jH-uPSbCbOLixW4M-N7v2TEi8ASY0cgjhWpl15REoa89wWELPBLScR_huYBeSjYDGZ",
    ),
];

/// The embedded production root keys.
pub fn production_root_keys() -> Vec<RootKey> {
    PRODUCTION
        .iter()
        .filter_map(|(kid, n)| {
            Some(RootKey {
                kid: (*kid).to_owned(),
                n: URL_SAFE_NO_PAD.decode(n).ok()?,
                e: vec![1, 0, 1],
            })
        })
        .collect()
}

/// Why a manifest is refused, with ADU's extended result code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a compact JWS with an RS256 header carrying `sjwk`.
    BadStructure(String),
    /// The root key is listed in the trusted package's `disabledRootKeys`.
    DisallowedRootKid(String),
    /// No root key with this kid.
    MissingRootKid(String),
    /// A signature does not verify (`which`: "sjwk" or "manifest").
    InvalidSignature(&'static str),
    /// The signing key (sjwk payload) is not an RS256 RSA key with e = AQAB.
    InvalidSjwkPayload(String),
    /// The signing key is listed in `disabledSigningKeys`.
    SigningKeyDisabled,
    /// The manifest's bytes do not hash to what was signed.
    ManifestHashMismatch { signed: String, actual: String },
}

impl Refusal {
    /// ADU's extended result code (reference §5.2, §8).
    pub fn erc(&self) -> u32 {
        match self {
            Self::BadStructure(_) => 0xA020_0002,
            Self::InvalidSignature(_) => 0xA020_0004,
            Self::DisallowedRootKid(_) => 0xA020_0005,
            Self::MissingRootKid(_) => 0xA020_0006,
            Self::InvalidSjwkPayload(_) => 0xA020_0009,
            Self::SigningKeyDisabled => 0xA000_0005,
            Self::ManifestHashMismatch { .. } => 0x8030_0001,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadStructure(w) => write!(f, "updateManifestSignature is not a valid JWS: {w}"),
            Self::DisallowedRootKid(k) => write!(f, "root key {k} is disabled"),
            Self::MissingRootKid(k) => write!(f, "no root key {k}"),
            Self::InvalidSignature(w) => write!(f, "the {w} signature does not verify"),
            Self::InvalidSjwkPayload(w) => write!(f, "the signing key is not usable: {w}"),
            Self::SigningKeyDisabled => write!(f, "the signing key is disabled"),
            Self::ManifestHashMismatch { signed, actual } => write!(
                f,
                "updateManifest hashes to {actual}, the signature covers {signed}"
            ),
        }
    }
}

/// What verification trusts: root keys and the disabled lists of a validated root
/// key package.
#[derive(Debug, Default, Clone)]
pub struct Trust {
    pub roots: Vec<RootKey>,
    pub disabled_roots: Vec<String>,
    /// SHA-256 of a disabled signing key's DER (PKCS#1 or SPKI).
    pub disabled_signing: Vec<[u8; 32]>,
}

/// The signing key that signed a verified manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKey {
    pub kid: String,
    pub root_kid: String,
    pub n: Vec<u8>,
    pub e: Vec<u8>,
}

/// Base64 in either alphabet, padded or not (the sjwk's `n` is standard base64).
pub fn b64_any(s: &str) -> Option<Vec<u8>> {
    let t: String = s
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(t)
        .ok()
}

fn segments(jws: &str) -> Result<[&str; 3], Refusal> {
    let parts: Vec<&str> = jws.split('.').collect();
    match parts.as_slice() {
        [h, p, s] if !h.is_empty() && !p.is_empty() && !s.is_empty() => Ok([h, p, s]),
        _ => Err(Refusal::BadStructure(format!(
            "{} segments, not 3",
            parts.len()
        ))),
    }
}

fn json_segment(seg: &str, what: &str) -> Result<Value, Refusal> {
    let bytes = URL_SAFE_NO_PAD
        .decode(seg)
        .map_err(|e| Refusal::BadStructure(format!("{what}: not base64url: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Refusal::BadStructure(format!("{what}: not JSON: {e}")))
}

/// RSASSA-PKCS1-v1_5 with SHA-256 over `signed`.
pub fn rs256(n: &[u8], e: &[u8], signed: &[u8], sig: &[u8]) -> bool {
    let n = strip_zeros(n);
    let key = ring::signature::RsaPublicKeyComponents { n, e };
    key.verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, signed, sig)
        .is_ok()
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[i..]
}

fn der_len(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend([0x81, n as u8]);
    } else {
        out.extend([0x82, (n >> 8) as u8, n as u8]);
    }
}

fn der_int(v: &[u8], out: &mut Vec<u8>) {
    let v = strip_zeros(v);
    let pad = v.first().is_none_or(|b| b & 0x80 != 0);
    out.push(0x02);
    der_len(v.len() + usize::from(pad), out);
    if pad {
        out.push(0);
    }
    out.extend_from_slice(v);
}

fn der_seq(content: &[u8]) -> Vec<u8> {
    let mut out = vec![0x30];
    der_len(content.len(), &mut out);
    out.extend_from_slice(content);
    out
}

/// DER of PKCS#1 `RSAPublicKey` and of `SubjectPublicKeyInfo` for (n, e).
pub fn der(n: &[u8], e: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut ints = Vec::new();
    der_int(n, &mut ints);
    der_int(e, &mut ints);
    let pkcs1 = der_seq(&ints);
    // AlgorithmIdentifier rsaEncryption (1.2.840.113549.1.1.1), NULL parameters.
    let alg = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0x03];
    der_len(pkcs1.len() + 1, &mut bits);
    bits.push(0);
    bits.extend_from_slice(&pkcs1);
    let mut spki = alg.to_vec();
    spki.extend(bits);
    (pkcs1.clone(), der_seq(&spki))
}

/// SHA-256 of the PKCS#1 and SPKI DER of a key: the disabled-signing-key rule
/// lists the first; a key is treated as disabled when either is listed.
pub fn key_hashes(n: &[u8], e: &[u8]) -> ([u8; 32], [u8; 32]) {
    let (pkcs1, spki) = der(n, e);
    (
        sha2::Sha256::digest(&pkcs1).into(),
        sha2::Sha256::digest(&spki).into(),
    )
}

/// Verifies `signature` (the desired `updateManifestSignature`) and that
/// `manifest` (the `updateManifest` string, its exact bytes) is what it signed.
pub fn verify(signature: &str, manifest: &str, trust: &Trust) -> Result<SigningKey, Refusal> {
    let [h64, p64, s64] = segments(signature)?;
    let header = json_segment(h64, "header")?;
    if header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err(Refusal::BadStructure("header alg is not RS256".into()));
    }
    let sjwk = header
        .get("sjwk")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::BadStructure("header has no sjwk".into()))?;
    let [sh64, sp64, ss64] = segments(sjwk)?;
    let sh = json_segment(sh64, "sjwk header")?;
    if sh.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err(Refusal::BadStructure("sjwk alg is not RS256".into()));
    }
    let kid = sh
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::BadStructure("sjwk header has no kid".into()))?
        .to_owned();
    if trust.disabled_roots.contains(&kid) {
        return Err(Refusal::DisallowedRootKid(kid));
    }
    let root = trust
        .roots
        .iter()
        .find(|r| r.kid == kid)
        .ok_or_else(|| Refusal::MissingRootKid(kid.clone()))?;
    let ssig = URL_SAFE_NO_PAD
        .decode(ss64)
        .map_err(|e| Refusal::BadStructure(format!("sjwk signature: {e}")))?;
    let signed = format!("{sh64}.{sp64}");
    if !rs256(&root.n, &root.e, signed.as_bytes(), &ssig) {
        return Err(Refusal::InvalidSignature("sjwk"));
    }
    let jwk = json_segment(sp64, "sjwk payload")?;
    let field = |k: &str| jwk.get(k).and_then(Value::as_str).unwrap_or_default();
    if field("kty") != "RSA" || field("e") != "AQAB" {
        return Err(Refusal::InvalidSjwkPayload(
            "kty must be RSA and e AQAB".into(),
        ));
    }
    let n = b64_any(field("n"))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Refusal::InvalidSjwkPayload("n is not base64".into()))?;
    let e = vec![1, 0, 1];
    let (pkcs1, spki) = key_hashes(&n, &e);
    if trust
        .disabled_signing
        .iter()
        .any(|h| *h == pkcs1 || *h == spki)
    {
        return Err(Refusal::SigningKeyDisabled);
    }
    let sig = URL_SAFE_NO_PAD
        .decode(s64)
        .map_err(|e| Refusal::BadStructure(format!("signature: {e}")))?;
    let signed = format!("{h64}.{p64}");
    if !rs256(&n, &e, signed.as_bytes(), &sig) {
        return Err(Refusal::InvalidSignature("manifest"));
    }
    let payload = json_segment(p64, "payload")?;
    let want = payload
        .get("sha256")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::BadStructure("payload has no sha256".into()))?;
    let actual = STANDARD.encode(sha2::Sha256::digest(manifest.as_bytes()));
    if actual != want {
        return Err(Refusal::ManifestHashMismatch {
            signed: want.to_owned(),
            actual,
        });
    }
    Ok(SigningKey {
        kid: field("kid").to_owned(),
        root_kid: kid,
        n,
        e,
    })
}

#[cfg(test)]
mod tests;
