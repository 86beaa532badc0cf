//! The update journal: what the bridge has accepted, how far it got, and the final
//! statuses it reported. Written like a database (temporary file, fsync, rename,
//! fsync of the directory) so a power cut leaves the old or the new journal, never
//! a torn one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use pv_adapter_api::UpdateStatus;
use serde::{Deserialize, Serialize};

/// How many finished updates are remembered (for dedupe and re-reporting).
const KEEP_FINISHED: usize = 64;

pub use pv_adapter_api::durable::write_durable;

/// Reads a small JSON journal; a missing or unreadable one starts empty.
pub fn load_json<T: serde::de::DeserializeOwned + Default>(path: &Path) -> T {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Writes a small JSON journal durably; a failure is logged, naming `what`.
pub fn save_json<T: Serialize>(path: &Path, value: &T, what: &str) {
    match serde_json::to_vec_pretty(value) {
        Ok(data) => {
            if let Err(e) = write_durable(path, &data) {
                tracing::warn!(error = %e, "cannot write the {what}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode the {what}"),
    }
}

/// How far an accepted update got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Validated; objects are being fetched and uploaded.
    Accepted,
    /// The step is on the device; LOCAL_RUN may not have been sent.
    Staged,
    /// LOCAL_RUN was accepted; Pantavisor owns the outcome.
    Running,
}

/// The update in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    pub backend: String,
    pub id: String,
    pub rev: String,
    pub phase: Phase,
}

/// An update that reached a final status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub backend: String,
    pub id: String,
    pub rev: String,
    pub status: UpdateStatus,
    pub status_msg: String,
    /// Pantavisor's failure log lines, when it gave any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Doc {
    current: Option<Current>,
    finished: Vec<Finished>,
}

/// The journal file and its contents.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    doc: Doc,
}

impl Journal {
    /// Opens (or starts) the journal at `path`. A journal that does not parse is
    /// kept aside as `<path>.corrupt` and a fresh one started, so the bridge never
    /// refuses to start over it.
    pub fn open(path: &Path) -> io::Result<Journal> {
        let doc = match fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(doc) => doc,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "update journal unreadable; keeping it aside and starting afresh");
                    fs::rename(path, path.with_extension("corrupt"))?;
                    Doc::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Doc::default(),
            Err(e) => return Err(e),
        };
        Ok(Journal {
            path: path.to_owned(),
            doc,
        })
    }

    fn save(&self) -> io::Result<()> {
        let data = serde_json::to_vec_pretty(&self.doc).map_err(io::Error::other)?;
        write_durable(&self.path, &data)
    }

    pub fn current(&self) -> Option<&Current> {
        self.doc.current.as_ref()
    }

    /// Records the update in flight (or its new phase).
    pub fn set_current(&mut self, c: Current) -> io::Result<()> {
        self.doc.current = Some(c);
        self.save()
    }

    /// Forgets the update in flight without a final status (it will be offered
    /// again).
    pub fn clear_current(&mut self) -> io::Result<()> {
        self.doc.current = None;
        self.save()
    }

    /// Records a final status and clears the update in flight if it is this one.
    pub fn finish(&mut self, f: Finished) -> io::Result<()> {
        if self
            .doc
            .current
            .as_ref()
            .is_some_and(|c| c.backend == f.backend && c.id == f.id)
        {
            self.doc.current = None;
        }
        self.doc
            .finished
            .retain(|x| !(x.backend == f.backend && x.id == f.id));
        self.doc.finished.push(f);
        let excess = self.doc.finished.len().saturating_sub(KEEP_FINISHED);
        self.doc.finished.drain(..excess);
        self.save()
    }

    /// The final status of an update, if it has one.
    pub fn finished(&self, backend: &str, id: &str) -> Option<&Finished> {
        self.doc
            .finished
            .iter()
            .find(|f| f.backend == backend && f.id == id)
    }

    /// The latest finished update of each backend.
    pub fn latest_per_backend(&self) -> Vec<&Finished> {
        let mut out: Vec<&Finished> = Vec::new();
        for f in self.doc.finished.iter().rev() {
            if !out.iter().any(|o| o.backend == f.backend) {
                out.push(f);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fin(id: &str, status: UpdateStatus) -> Finished {
        Finished {
            backend: "usb".into(),
            id: id.into(),
            rev: format!("locals/{id}"),
            status,
            status_msg: String::new(),
            logs: None,
        }
    }

    #[test]
    fn survives_reopening_and_tracks_phases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal/updates.json");
        let mut j = Journal::open(&path).unwrap();
        assert!(j.current().is_none());
        let c = Current {
            backend: "usb".into(),
            id: "r1".into(),
            rev: "locals/r1".into(),
            phase: Phase::Accepted,
        };
        j.set_current(c.clone()).unwrap();
        j.set_current(Current {
            phase: Phase::Running,
            ..c.clone()
        })
        .unwrap();
        let j2 = Journal::open(&path).unwrap();
        assert_eq!(j2.current().unwrap().phase, Phase::Running);
        let mut j2 = j2;
        j2.finish(fin("r1", UpdateStatus::Done)).unwrap();
        let j3 = Journal::open(&path).unwrap();
        assert!(j3.current().is_none());
        assert_eq!(j3.finished("usb", "r1").unwrap().status, UpdateStatus::Done);
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn keeps_a_bounded_history_and_the_latest_per_backend() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("u.json")).unwrap();
        for i in 0..100 {
            j.finish(fin(&format!("r{i}"), UpdateStatus::Done)).unwrap();
        }
        assert!(j.finished("usb", "r0").is_none());
        assert!(j.finished("usb", "r99").is_some());
        assert_eq!(j.latest_per_backend().len(), 1);
        assert_eq!(j.latest_per_backend()[0].id, "r99");
    }

    #[test]
    fn a_corrupt_journal_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.json");
        std::fs::write(&path, b"{torn").unwrap();
        let j = Journal::open(&path).unwrap();
        assert!(j.current().is_none());
        assert_eq!(
            std::fs::read(path.with_extension("corrupt")).unwrap(),
            b"{torn"
        );
    }
}
