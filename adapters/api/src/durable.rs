//! Durable file writes for everything the bridge and its adapters persist.
//!
//! A power cut at any moment leaves either the old or the new content, never a torn
//! or empty file: the data goes to `<name>.tmp`, is synced, renamed over the file,
//! and the directory is synced so the rename itself survives.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The temporary file `write_durable` writes beside `path`.
fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `data` to `path` durably (creating its directory).
pub fn write_durable(path: &Path, data: &[u8]) -> io::Result<()> {
    write(path, data, None)
}

/// [`write_durable`] for secrets: the file is readable by its owner only (0600)
/// from the moment it exists.
pub fn write_durable_private(path: &Path, data: &[u8]) -> io::Result<()> {
    write(path, data, Some(0o600))
}

fn write(path: &Path, data: &[u8], mode: Option<u32>) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let tmp = temporary(path);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if let Some(mode) = mode {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replaces_the_whole_file_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/state.json");
        write_durable(&p, b"first, longer content").unwrap();
        write_durable(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[cfg(unix)]
    #[test]
    fn a_private_file_is_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("creds");
        write_durable_private(&p, b"secret").unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_file_without_extension_keeps_its_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("challenge");
        write_durable(&p, b"x").unwrap();
        assert_eq!(temporary(&p), d.path().join("challenge.tmp"));
        assert_eq!(fs::read(&p).unwrap(), b"x");
    }
}
