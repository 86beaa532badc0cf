//! The root key package (reference §5.7): Microsoft's signed list of root keys,
//! disabled root keys and disabled signing keys. A package is trusted only when
//! every embedded root key signed it, at the index of that key in `rootKeys`
//! (document order), over the compact serialisation of `protected` in document
//! order.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use super::jws::{RootKey, Trust, rs256};

/// A parsed root key package; trusted only after [`Package::validate`].
#[derive(Debug, Clone)]
pub struct Package {
    pub is_test: bool,
    pub published: u64,
    pub disabled_roots: Vec<String>,
    pub disabled_signing: Vec<[u8; 32]>,
    /// In document order: `signatures[i]` belongs to `root_keys[i]`.
    pub root_keys: Vec<RootKey>,
    /// The bytes the signatures cover.
    pub signed: Vec<u8>,
    pub signatures: Vec<(String, Vec<u8>)>,
}

/// Why a package is not trusted, with ADU's extended result code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageError {
    Malformed(String),
    /// A test package on a production device.
    TestPackage,
    /// An embedded root key did not sign it.
    Signature(String),
}

impl PackageError {
    pub fn erc(&self) -> u32 {
        match self {
            Self::Malformed(_) => 0x8060_0001,
            Self::TestPackage => 0xA000_0007,
            Self::Signature(_) => 0x8060_0004,
        }
    }
}

impl fmt::Display for PackageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(w) => write!(f, "root key package: {w}"),
            Self::TestPackage => write!(f, "root key package is a test package"),
            Self::Signature(k) => write!(f, "root key package is not signed by root key {k}"),
        }
    }
}

/// JSON text without the whitespace between tokens: the compact serialisation in
/// document order (strings kept byte for byte).
pub fn minify(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let (mut in_str, mut escaped) = (false, false);
    for c in raw.chars() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// A JSON object's members in document order.
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow)]
    protected: &'a RawValue,
    signatures: Vec<RawSig>,
}

#[derive(Deserialize)]
struct RawSig {
    alg: String,
    sig: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Protected {
    #[serde(default)]
    is_test: bool,
    #[serde(default)]
    published: u64,
    #[serde(default)]
    disabled_root_keys: Vec<String>,
    #[serde(default)]
    disabled_signing_keys: Vec<Value>,
    root_keys: Ordered,
}

/// A key's modulus from base64url (padding tolerated).
pub(crate) fn modulus(v: &Value) -> Option<Vec<u8>> {
    v.as_str()
        .and_then(|n| URL_SAFE_NO_PAD.decode(n.trim_end_matches('=')).ok())
}

/// A key's exponent, a JSON number or a numeric string, as big-endian bytes.
pub(crate) fn exponent(v: &Value) -> Option<Vec<u8>> {
    let n = match v {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    let b = n.to_be_bytes();
    let i = b.iter().position(|x| *x != 0)?;
    Some(b[i..].to_vec())
}

impl Package {
    /// Parses a package (not yet trusted).
    pub fn parse(bytes: &[u8]) -> Result<Package, PackageError> {
        let bad = |w: String| PackageError::Malformed(w);
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let signed = minify(raw.protected.get()).into_bytes();
        let p: Protected = serde_json::from_str(raw.protected.get())
            .map_err(|e| bad(format!("protected: {e}")))?;
        let mut root_keys = Vec::new();
        for (kid, k) in p.root_keys.0 {
            if k.get("keyType").and_then(Value::as_str) != Some("RSA") {
                return Err(bad(format!("root key {kid}: keyType must be RSA")));
            }
            let n = k
                .get("n")
                .and_then(modulus)
                .ok_or_else(|| bad(format!("root key {kid}: n is not base64url")))?;
            let e = k
                .get("e")
                .and_then(exponent)
                .ok_or_else(|| bad(format!("root key {kid}: e is not a number")))?;
            root_keys.push(RootKey { kid, n, e });
        }
        let mut disabled_signing = Vec::new();
        for d in &p.disabled_signing_keys {
            if d.get("alg").and_then(Value::as_str) != Some("SHA256") {
                continue;
            }
            let h = d
                .get("hash")
                .and_then(Value::as_str)
                .and_then(|h| URL_SAFE_NO_PAD.decode(h.trim_end_matches('=')).ok())
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
                .ok_or_else(|| {
                    bad("disabledSigningKeys: a hash is not 32 bytes of base64url".into())
                })?;
            disabled_signing.push(h);
        }
        let signatures = raw
            .signatures
            .into_iter()
            .map(|s| {
                let sig = URL_SAFE_NO_PAD
                    .decode(s.sig.trim_end_matches('='))
                    .unwrap_or_default();
                (s.alg, sig)
            })
            .collect();
        Ok(Package {
            is_test: p.is_test,
            published: p.published,
            disabled_roots: p.disabled_root_keys,
            disabled_signing,
            root_keys,
            signed,
            signatures,
        })
    }

    /// Trusted when every embedded key signed it at its aligned index; a test
    /// package only when test keys are in use (`production` false).
    pub fn validate(&self, embedded: &[RootKey], production: bool) -> Result<(), PackageError> {
        if self.is_test && production {
            return Err(PackageError::TestPackage);
        }
        for key in embedded {
            let ok = self
                .root_keys
                .iter()
                .position(|k| k.kid == key.kid)
                .and_then(|i| self.signatures.get(i))
                .is_some_and(|(alg, sig)| {
                    alg == "RS256" && rs256(&key.n, &key.e, &self.signed, sig)
                });
            if !ok {
                return Err(PackageError::Signature(key.kid.clone()));
            }
        }
        Ok(())
    }

    /// What a validated package adds to the embedded keys: its own keys and its
    /// disabled lists.
    pub fn trust(&self, embedded: &[RootKey]) -> Trust {
        let mut roots = embedded.to_vec();
        for k in &self.root_keys {
            if !roots.iter().any(|r| r.kid == k.kid) {
                roots.push(k.clone());
            }
        }
        Trust {
            roots,
            disabled_roots: self.disabled_roots.clone(),
            disabled_signing: self.disabled_signing.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
