//! Checks a downloaded artifact against the strongest hash the server gave
//! (reference §4: sha256 > sha1 > md5). sha1 and md5 are taken only when
//! nothing stronger is given (goosebit sends only sha1), and the result says
//! so: the feedback and the log name the hash that was checked.

use std::path::Path;

use sha1::Digest as _;
use tokio::io::AsyncReadExt;

use crate::ddi::Hashes;

enum Hasher {
    Sha256(sha2::Sha256),
    Sha1(sha1::Sha1),
    Md5(md5::Md5),
}

impl Hasher {
    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => sha2::Digest::update(h, b),
            Hasher::Sha1(h) => h.update(b),
            Hasher::Md5(h) => md5::Digest::update(h, b),
        }
    }

    fn hex(self) -> String {
        match self {
            Hasher::Sha256(h) => pv_adapter_api::hex(&sha2::Digest::finalize(h)),
            Hasher::Sha1(h) => pv_adapter_api::hex(&h.finalize()),
            Hasher::Md5(h) => pv_adapter_api::hex(&md5::Digest::finalize(h)),
        }
    }
}

/// Hashes `file` with the strongest of `hashes` and compares. Returns how it
/// was verified, or why it does not match.
pub async fn check(file: &Path, hashes: &Hashes) -> Result<String, String> {
    let (name, want, mut h) = if let Some(w) = &hashes.sha256 {
        ("sha256", w, Hasher::Sha256(sha2::Sha256::default()))
    } else if let Some(w) = &hashes.sha1 {
        ("sha1", w, Hasher::Sha1(sha1::Sha1::default()))
    } else if let Some(w) = &hashes.md5 {
        ("md5", w, Hasher::Md5(md5::Md5::default()))
    } else {
        return Err("the server gave no hash to check it against".into());
    };
    let mut f = tokio::fs::File::open(file)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| format!("{}: {e}", file.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got = h.hex();
    if &got != want {
        return Err(format!("its {name} is {got}, the server announced {want}"));
    }
    Ok(match name {
        "sha256" => "sha256 verified".into(),
        other => format!("{other} verified (the server gave no sha256; {other} is a weak check)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_strongest_hash_decides() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a");
        std::fs::write(&f, b"abc").unwrap();
        let sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let sha1 = "a9993e364706816aba3e25717850c26c9cd0d89d";
        let md5 = "900150983cd24fb0d6963f7d28e17f72";
        let all = Hashes {
            sha256: Some(sha256.into()),
            sha1: Some("0".repeat(40)),
            md5: Some("0".repeat(32)),
        };
        assert_eq!(check(&f, &all).await.unwrap(), "sha256 verified");
        let only_sha1 = Hashes {
            sha1: Some(sha1.into()),
            ..Hashes::default()
        };
        assert!(
            check(&f, &only_sha1)
                .await
                .unwrap()
                .starts_with("sha1 verified")
        );
        let only_md5 = Hashes {
            md5: Some(md5.into()),
            ..Hashes::default()
        };
        assert!(check(&f, &only_md5).await.unwrap().contains("weak"));
        let wrong = Hashes {
            sha256: Some("0".repeat(64)),
            sha1: Some(sha1.into()),
            md5: None,
        };
        let e = check(&f, &wrong).await.unwrap_err();
        assert!(
            e.contains("its sha256 is ba78") && e.contains("announced 0000"),
            "{e}"
        );
        assert!(check(&f, &Hashes::default()).await.is_err());
    }
}
