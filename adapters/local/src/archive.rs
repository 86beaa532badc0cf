//! Unpacking `pvr export` archives (`.tar`, `.tgz`, `.tar.gz`) into a work directory.
//!
//! Only the export's `json` and `objects/<sha256>` entries are taken; anything else
//! is skipped, and no entry can write outside the destination. Memory stays flat:
//! entries are copied in 64 KiB pieces.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Component, Path};

use crate::MAX_STATE_BYTES;

/// What kind of archive a file name names, if any.
pub fn kind(name: &str) -> Option<Compression> {
    if name.ends_with(".tgz") || name.ends_with(".tar.gz") {
        Some(Compression::Gzip)
    } else if name.ends_with(".tar") {
        Some(Compression::None)
    } else {
        None
    }
}

/// The archive name without its extension.
pub fn stem(name: &str) -> &str {
    for ext in [".tar.gz", ".tgz", ".tar"] {
        if let Some(s) = name.strip_suffix(ext) {
            return s;
        }
    }
    name
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

/// Where an archive entry goes inside an export, if it belongs to one: `json`, or
/// `objects/<64 lower-case hex>`, optionally under one top directory and `./`.
fn export_path(path: &Path) -> Option<String> {
    let parts: Vec<String> = path
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .map(|c| match c {
            Component::Normal(s) => s.to_str().map(str::to_owned),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    if matches!(parts.as_slice(), [name] | [_, name] if name == "json") {
        return Some("json".into());
    }
    let sha = match parts.as_slice() {
        [dir, sha] if dir == "objects" => sha,
        [_, dir, sha] if dir == "objects" => sha,
        _ => return None,
    };
    pv_adapter_api::is_sha256_hex(sha).then(|| format!("objects/{sha}"))
}

/// Unpacks `archive` into `dest` (created; emptied first). Returns an error that
/// says what is wrong with the archive.
pub fn unpack(archive: &Path, compression: Compression, dest: &Path) -> Result<(), String> {
    let file = File::open(archive).map_err(|e| format!("cannot open: {e}"))?;
    unpack_from(file, compression, dest)
}

/// Unpacks the archive `source` reads (a file, or a member inside another
/// container such as a `.swu`) into `dest`, as [`unpack`].
pub fn unpack_from(source: impl Read, compression: Compression, dest: &Path) -> Result<(), String> {
    let _ = fs::remove_dir_all(dest);
    fs::create_dir_all(dest.join("objects"))
        .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let reader: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(BufReader::new(source)),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(BufReader::new(source))),
    };
    let mut tar = tar::Archive::new(reader);
    let mut saw_json = false;
    let entries = tar
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("corrupt archive: {e}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| format!("corrupt entry name: {e}"))?
            .into_owned();
        let Some(rel) = export_path(&path) else {
            continue;
        };
        if rel == "json" {
            if entry.size() > MAX_STATE_BYTES {
                return Err(format!(
                    "json is {} bytes; the limit is {MAX_STATE_BYTES}",
                    entry.size()
                ));
            }
            saw_json = true;
        }
        let out = dest.join(&rel);
        let mut f =
            File::create(&out).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        let n = io::copy(&mut entry, &mut f)
            .map_err(|e| format!("corrupt or truncated archive at {}: {e}", path.display()))?;
        if n != entry.size() {
            return Err(format!(
                "truncated archive: {} ends after {n} of {} bytes",
                path.display(),
                entry.size()
            ));
        }
    }
    if !saw_json {
        return Err("no `json` state file in the archive".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_paths_are_recognised_and_nothing_else() {
        let sha = "ab".repeat(32);
        assert_eq!(export_path(Path::new("json")).as_deref(), Some("json"));
        assert_eq!(export_path(Path::new("./json")).as_deref(), Some("json"));
        assert_eq!(
            export_path(Path::new("export/json")).as_deref(),
            Some("json")
        );
        assert_eq!(
            export_path(Path::new(&format!("objects/{sha}"))),
            Some(format!("objects/{sha}"))
        );
        assert_eq!(
            export_path(Path::new(&format!("./x/objects/{sha}"))),
            Some(format!("objects/{sha}"))
        );
        for bad in [
            "../json",
            "/json",
            "objects/short",
            "objects/../json",
            "a/b/json",
            "README",
        ] {
            assert_eq!(export_path(Path::new(bad)), None, "{bad}");
        }
        assert_eq!(
            export_path(Path::new(&format!("objects/{}", sha.to_uppercase()))),
            None
        );
    }

    #[test]
    fn names_and_stems() {
        assert_eq!(kind("a.tgz"), Some(Compression::Gzip));
        assert_eq!(kind("a.tar.gz"), Some(Compression::Gzip));
        assert_eq!(kind("a.tar"), Some(Compression::None));
        assert_eq!(kind("a.zip"), None);
        assert_eq!(stem("release-7.tar.gz"), "release-7");
        assert_eq!(stem("release-7.tgz"), "release-7");
    }

    fn build(dir: &Path, name: &str, gz: bool, entries: &[(&str, &[u8])]) -> std::path::PathBuf {
        let path = dir.join(name);
        let file = File::create(&path).unwrap();
        let w: Box<dyn io::Write> = if gz {
            Box::new(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::fast(),
            ))
        } else {
            Box::new(file)
        };
        let mut b = tar::Builder::new(w);
        for (p, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, p, *data).unwrap();
        }
        b.into_inner().unwrap().flush().unwrap();
        path
    }

    use std::io::Write;

    #[test]
    fn unpacks_tar_and_tgz_and_skips_strangers() {
        let dir = tempfile::tempdir().unwrap();
        let sha = "cd".repeat(32);
        for gz in [false, true] {
            let a = build(
                dir.path(),
                if gz { "e.tgz" } else { "e.tar" },
                gz,
                &[
                    ("json", b"{}"),
                    (&format!("objects/{sha}"), b"blob"),
                    ("notes.txt", b"skipped"),
                ],
            );
            let dest = dir.path().join(format!("out-{gz}"));
            unpack(
                &a,
                if gz {
                    Compression::Gzip
                } else {
                    Compression::None
                },
                &dest,
            )
            .unwrap();
            assert_eq!(fs::read(dest.join("json")).unwrap(), b"{}");
            assert_eq!(fs::read(dest.join("objects").join(&sha)).unwrap(), b"blob");
            assert!(!dest.join("notes.txt").exists());
        }
    }

    #[test]
    fn garbage_truncated_and_incomplete_archives_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("g.tgz");
        fs::write(&garbage, b"this is not gzip at all").unwrap();
        let e = unpack(&garbage, Compression::Gzip, &dir.path().join("o1")).unwrap_err();
        assert!(e.contains("corrupt") || e.contains("not a tar"), "{e}");
        let sha = "ef".repeat(32);
        let big = vec![7u8; 100_000];
        let full = build(
            dir.path(),
            "t.tar",
            false,
            &[("json", b"{}"), (&format!("objects/{sha}"), &big)],
        );
        let bytes = fs::read(&full).unwrap();
        let cut = dir.path().join("cut.tar");
        fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = unpack(&cut, Compression::None, &dir.path().join("o2")).unwrap_err();
        assert!(e.contains("truncated") || e.contains("corrupt"), "{e}");
        let nojson = build(
            dir.path(),
            "n.tar",
            false,
            &[(&format!("objects/{sha}"), b"x")],
        );
        let e = unpack(&nojson, Compression::None, &dir.path().join("o3")).unwrap_err();
        assert_eq!(e, "no `json` state file in the archive");
    }
}
