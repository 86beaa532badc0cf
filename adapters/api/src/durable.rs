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
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let tmp = temporary(path);
    let mut f = File::create(&tmp)?;
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

    #[test]
    fn a_file_without_extension_keeps_its_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("challenge");
        write_durable(&p, b"x").unwrap();
        assert_eq!(temporary(&p), d.path().join("challenge.tmp"));
        assert_eq!(fs::read(&p).unwrap(), b"x");
    }
}
