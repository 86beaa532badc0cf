//! Device credentials, stored as Pantavisor stores them (`KEY=value` lines in
//! `pantahub.config`), so that a device can move between Pantavisor's built-in
//! client and pv-bridge with the same identity.

use std::fmt;
use std::path::Path;

/// A device's identity on the hub. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Creds {
    /// 24 hex digits.
    pub id: String,
    /// `prn:::devices:/<id>`.
    pub prn: String,
    pub secret: String,
}

impl fmt::Debug for Creds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Creds")
            .field("id", &self.id)
            .field("prn", &self.prn)
            .field("secret", &"<hidden>")
            .finish()
    }
}

/// True for a hub device id: 24 hex digits (a Mongo ObjectID).
pub fn is_device_id(id: &str) -> bool {
    id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Creds {
    /// Parses `PH_CREDS_ID=…` lines (also the legacy `creds.id=…` names); other
    /// keys, comments and blank lines are ignored.
    pub fn parse(text: &str) -> Result<Creds, String> {
        let mut id = None;
        let mut prn = None;
        let mut secret = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"').to_owned();
            match k.trim() {
                "PH_CREDS_ID" | "creds.id" => id = Some(v),
                "PH_CREDS_PRN" | "creds.prn" => prn = Some(v),
                "PH_CREDS_SECRET" | "creds.secret" => secret = Some(v),
                _ => {}
            }
        }
        let id = id.filter(|s| !s.is_empty()).ok_or("no PH_CREDS_ID")?;
        if !is_device_id(&id) {
            return Err(format!("PH_CREDS_ID {id:?} is not 24 hex digits"));
        }
        let secret = secret
            .filter(|s| !s.is_empty())
            .ok_or("no PH_CREDS_SECRET")?;
        let prn = prn
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("prn:::devices:/{id}"));
        Ok(Creds { id, prn, secret })
    }

    /// Reads a credentials file; the error names the file, never the secret.
    pub fn load(path: &Path) -> Result<Creds, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read credentials {}: {e}", path.display()))?;
        Creds::parse(&text).map_err(|e| format!("credentials {}: {e}", path.display()))
    }

    /// Writes the credentials with mode 0600, durably (temp file, fsync, rename,
    /// fsync of the directory).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = format!(
            "PH_CREDS_ID={}\nPH_CREDS_PRN={}\nPH_CREDS_SECRET={}\n",
            self.id, self.prn, self.secret
        );
        pv_adapter_api::durable::write_durable_private(path, text.as_bytes())
            .map_err(|e| format!("cannot write credentials {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pantavisor_and_legacy_files_and_hides_the_secret() {
        let c = Creds::parse(
            "# saved by pantavisor\nPH_CREDS_HOST=api.pantahub.com\nPH_CREDS_ID=5f1e2d3c4b5a697887766554\nPH_CREDS_PRN=prn:::devices:/5f1e2d3c4b5a697887766554\nPH_CREDS_SECRET=abc123\n",
        )
        .unwrap();
        assert_eq!(c.id, "5f1e2d3c4b5a697887766554");
        assert_eq!(c.secret, "abc123");
        assert!(!format!("{c:?}").contains("abc123"));
        let legacy = Creds::parse("creds.id=5f1e2d3c4b5a697887766554\ncreds.secret=s\n").unwrap();
        assert_eq!(legacy.prn, "prn:::devices:/5f1e2d3c4b5a697887766554");
        assert_eq!(
            Creds::parse("PH_CREDS_ID=xyz\nPH_CREDS_SECRET=s").unwrap_err(),
            "PH_CREDS_ID \"xyz\" is not 24 hex digits"
        );
        assert_eq!(
            Creds::parse("PH_CREDS_ID=5f1e2d3c4b5a697887766554").unwrap_err(),
            "no PH_CREDS_SECRET"
        );
    }

    #[test]
    fn saves_with_mode_0600_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/pantahub.creds");
        let c = Creds {
            id: "5f1e2d3c4b5a697887766554".into(),
            prn: "prn:::devices:/5f1e2d3c4b5a697887766554".into(),
            secret: "s3cr3t".into(),
        };
        c.save(&p).unwrap();
        assert_eq!(Creds::load(&p).unwrap(), c);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}
