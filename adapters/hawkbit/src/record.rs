//! What the adapter must not forget across restarts and revision switches
//! (reference §5.3): the action in hand and how far it got, which feedback
//! milestones were sent, a final feedback until the server took it, the
//! actions finished, the revision names spent, and what is installed.
//! Written durably before anything it records is sent.

use std::path::{Path, PathBuf};

use pv_adapter_api::attempts::Spent;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How many finished actions are remembered.
const KEEP_FINISHED: usize = 32;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default)]
    pub action: Option<Action>,
    /// A final feedback written before it is posted, until the server
    /// answered it (200, or 410: the action was closed already).
    #[serde(default)]
    pub pending: Option<Pending>,
    #[serde(default)]
    pub finished: Vec<Finished>,
    #[serde(default, skip_serializing_if = "Spent::is_empty")]
    pub spent: Spent,
    #[serde(default)]
    pub installed: Option<Installed>,
}

/// The action being worked on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub id: String,
    /// The software module version installed (the revision's name).
    pub version: String,
    /// The revision offered to the engine, once offered.
    #[serde(default)]
    pub revision: Option<String>,
    /// Feedback milestones already sent (`accepted`, `download`,
    /// `downloaded`, `installing`, `testing`): none is sent twice.
    #[serde(default)]
    pub sent: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub action: String,
    /// On `cancelAction/{id}/feedback` rather than the deployment's.
    pub cancel: bool,
    pub body: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub id: String,
    pub success: bool,
    /// The version it installed (success) or tried.
    #[serde(default)]
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub version: String,
    pub revision: String,
}

/// The record and where it lives.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    pub record: Record,
}

impl Store {
    /// Loads `<dir>/hawkbit.json`; an unreadable record is reported and
    /// replaced (it is written durably, so this takes a damaged disk).
    pub fn load(dir: &Path) -> (Store, Option<String>) {
        let path = dir.join("hawkbit.json");
        let (record, problem) = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(r) => (r, None),
                Err(e) => (Record::default(), Some(format!("{}: {e}", path.display()))),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Record::default(), None),
            Err(e) => (Record::default(), Some(format!("{}: {e}", path.display()))),
        };
        (Store { path, record }, problem)
    }

    /// Writes the record durably (old or new after a power cut, never torn).
    pub fn save(&self) -> Result<(), String> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let bytes = serde_json::to_vec(&self.record).map_err(|e| e.to_string())?;
        pv_adapter_api::durable::write_durable(&self.path, &bytes)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

impl Record {
    /// The finished record of action `id`, if remembered.
    pub fn finished_of(&self, id: &str) -> Option<&Finished> {
        self.finished.iter().rev().find(|f| f.id == id)
    }

    /// Ends the current action `id`: remembered as finished, its revision
    /// installed (success) or its name spent.
    pub fn finish(&mut self, id: &str, success: bool) {
        let Some(a) = self.action.take_if(|a| a.id == id) else {
            return;
        };
        if let Some(rev) = &a.revision {
            self.spent.ended(rev, success);
            if success {
                self.installed = Some(Installed {
                    version: a.version.clone(),
                    revision: rev.clone(),
                });
            }
        }
        self.finished.retain(|f| f.id != id);
        self.finished.push(Finished {
            id: id.to_owned(),
            success,
            version: a.version,
        });
        let over = self.finished.len().saturating_sub(KEEP_FINISHED);
        self.finished.drain(..over);
    }

    /// The version to report as `sw_version`: what this adapter installed
    /// while it still runs, else the running revision's name.
    pub fn sw_version(&self, running: Option<&str>) -> Option<String> {
        let running = running?;
        match &self.installed {
            Some(i) if running.strip_prefix("locals/") == Some(i.revision.as_str()) => {
                Some(i.version.clone())
            }
            _ => Some(
                running
                    .strip_prefix("locals/")
                    .unwrap_or(running)
                    .to_owned(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(id: &str, rev: Option<&str>) -> Action {
        Action {
            id: id.into(),
            version: "1.2.3".into(),
            revision: rev.map(str::to_owned),
            sent: vec![],
        }
    }

    #[test]
    fn finishing_installs_or_spends_and_is_remembered() {
        let mut r = Record {
            action: Some(action("7", Some("1.2.3"))),
            ..Record::default()
        };
        r.finish("8", true);
        assert!(r.action.is_some(), "another action's end changes nothing");
        r.finish("7", false);
        assert!(r.action.is_none());
        assert!(r.spent.contains("1.2.3"));
        assert_eq!(r.spent.next("1.2.3"), "1.2.3-retry2");
        assert!(!r.finished_of("7").unwrap().success);
        r.action = Some(action("7", Some("1.2.3-retry2")));
        r.finish("7", true);
        assert_eq!(r.finished.len(), 1, "one entry per action");
        assert!(r.finished_of("7").unwrap().success);
        assert_eq!(
            r.installed,
            Some(Installed {
                version: "1.2.3".into(),
                revision: "1.2.3-retry2".into()
            })
        );
        assert_eq!(
            r.sw_version(Some("locals/1.2.3-retry2")).as_deref(),
            Some("1.2.3")
        );
        assert_eq!(r.sw_version(Some("0")).as_deref(), Some("0"));
        assert_eq!(r.sw_version(Some("locals/other")).as_deref(), Some("other"));
        assert_eq!(r.sw_version(None), None);
        for i in 0..100 {
            r.action = Some(action(&i.to_string(), None));
            r.finish(&i.to_string(), false);
        }
        assert_eq!(r.finished.len(), KEEP_FINISHED);
    }

    #[test]
    fn the_record_survives_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, problem) = Store::load(d.path());
        assert!(problem.is_none());
        s.record.action = Some(action("3", None));
        s.record.pending = Some(Pending {
            action: "2".into(),
            cancel: false,
            body: serde_json::json!({"status": {}}),
        });
        s.save().unwrap();
        let (again, _) = Store::load(d.path());
        assert_eq!(again.record, s.record);
        std::fs::write(d.path().join("hawkbit.json"), b"{torn").unwrap();
        let (fresh, problem) = Store::load(d.path());
        assert_eq!(fresh.record, Record::default());
        assert!(problem.unwrap().contains("hawkbit.json"));
    }
}
