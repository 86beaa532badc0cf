//! The deployment workflow (reference §7): what a desired `service` means given
//! what the device already did. Nothing is reported before these checks say
//! "process" (Microsoft's agent reports In progress first and flips Succeeded
//! back after each token renewal; this does not).

use pv_adapter_api::attempts::Spent;
use serde::{Deserialize, Serialize};

use super::wire::{Service, Workflow};

/// Where a workflow stands, kept durably by the adapter (it survives bridge
/// restarts and revision switches).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The workflow being or last processed.
    #[serde(default)]
    pub current: Option<Current>,
    /// The last workflow that ended in success.
    #[serde(default)]
    pub last_completed: Option<String>,
    /// `installedUpdateId` (its JSON string) of the last update installed.
    #[serde(default)]
    pub installed: Option<String>,
    /// The workflow part of the reported `agent` (shapes B to G), as decided:
    /// reported until the twin holds it, and kept across restarts so a final
    /// report is decided once.
    #[serde(default)]
    pub report: Option<serde_json::Value>,
    /// The revision (without `locals/`) that installed `installed`, when it is
    /// not the plain `installedCriteria` (a retry's revision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_revision: Option<String>,
    /// Revisions offered to the engine that ended without success (newest
    /// last). The engine's journal and Pantavisor's trail keep their final
    /// status, so the next attempt at the same update needs another name.
    #[serde(default, skip_serializing_if = "Spent::is_empty")]
    pub spent: Spent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    pub id: String,
    #[serde(default)]
    pub retry: Option<String>,
    pub phase: Phase,
    /// The revision offered to the engine (`Switching`), without `locals/`.
    #[serde(default)]
    pub revision: Option<String>,
    /// The `installedUpdateId` the deployment installs (`Switching`).
    #[serde(default)]
    pub update: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Taken; downloading, verifying, staging.
    Accepted,
    /// The revision switch was requested: the outcome comes from the device.
    Switching,
    Succeeded,
    Failed,
    Cancelled,
}

impl Record {
    /// The record kept at `path`; none yet is the empty record. A record that
    /// cannot be read is reported and replaced (it is written durably, so this
    /// takes a damaged disk).
    pub fn load(path: &std::path::Path) -> Result<Record, String> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes the record durably (old or new after a power cut, never torn).
    pub fn save(&self, path: &std::path::Path) -> Result<(), String> {
        let bytes = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        pv_adapter_api::durable::write_durable(path, &bytes)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The current workflow when it is `w` (same id and retry): `None` once
    /// another replaced it.
    pub fn current_of(&mut self, w: &Workflow) -> Option<&mut Current> {
        self.current
            .as_mut()
            .filter(|c| c.id == w.id && c.retry == w.retry_timestamp)
    }

    /// The running workflow, if any.
    pub fn running(&self) -> Option<&Current> {
        self.current.as_ref().filter(|c| c.phase.running())
    }

    /// The revision name for the next attempt at installing `revision`
    /// ([`Spent::next`]).
    pub fn attempt(&self, revision: &str) -> String {
        self.spent.next(revision)
    }

    /// Notes the end of an offered revision: a success installs it, anything
    /// else spends its name.
    pub fn ended(&mut self, revision: &str, success: bool) {
        if success {
            self.installed_revision = Some(revision.to_owned());
        }
        self.spent.ended(revision, success);
    }

    /// Whether `running` (a Pantavisor revision) is the revision that
    /// installed `update` (an `installedUpdateId`).
    pub fn installed_as(&self, update: &str, running: Option<&str>) -> bool {
        let Some(rev) = running.and_then(|r| r.strip_prefix("locals/")) else {
            return false;
        };
        self.installed.as_deref() == Some(update) && self.installed_revision.as_deref() == Some(rev)
    }
}

impl Phase {
    pub fn running(self) -> bool {
        matches!(self, Phase::Accepted | Phase::Switching)
    }
}

/// What to do with a desired `service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: a re-delivery, a completed workflow, a legacy action.
    Ignore,
    /// Cancel with nothing running: go idle without a report.
    Idle,
    /// Cancel the running workflow; report it cancelled once it stopped.
    Cancel,
    /// Process this workflow (after the installed check on its verified
    /// manifest). `replaces` names a running workflow dropped without a report;
    /// `retry` keeps already verified files.
    Process {
        workflow: Workflow,
        replaces: Option<String>,
        retry: bool,
    },
}

/// Decides, in the reference's order (§7.4).
pub fn decide(service: &Service, record: &Record) -> Decision {
    let running = record.current.as_ref().filter(|c| c.phase.running());
    match service {
        Service::Ignored { .. } => Decision::Ignore,
        Service::Cancel { .. } => {
            if running.is_some() {
                Decision::Cancel
            } else {
                Decision::Idle
            }
        }
        Service::Deploy { workflow, .. } => {
            if let Some(c) = &record.current {
                if c.id == workflow.id {
                    let retry =
                        workflow.retry_timestamp.is_some() && workflow.retry_timestamp != c.retry;
                    return if retry {
                        Decision::Process {
                            workflow: workflow.clone(),
                            replaces: None,
                            retry: true,
                        }
                    } else {
                        // The same deployment again (a reconnect's twin GET).
                        Decision::Ignore
                    };
                }
            }
            if record.last_completed.as_deref() == Some(workflow.id.as_str()) {
                return Decision::Ignore;
            }
            Decision::Process {
                workflow: workflow.clone(),
                replaces: running.map(|c| c.id.clone()),
                retry: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn deploy(id: &str, retry: Option<&str>) -> Service {
        Service::Deploy {
            workflow: Workflow {
                action: 3,
                id: id.into(),
                retry_timestamp: retry.map(str::to_owned),
            },
            manifest: String::new(),
            signature: String::new(),
            file_urls: BTreeMap::new(),
            root_key_package_url: None,
        }
    }

    fn cancel() -> Service {
        Service::Cancel {
            workflow: Workflow {
                action: 255,
                id: "nodeployment".into(),
                retry_timestamp: None,
            },
        }
    }

    fn at(id: &str, retry: Option<&str>, phase: Phase) -> Record {
        Record {
            current: Some(Current {
                id: id.into(),
                retry: retry.map(str::to_owned),
                phase,
                revision: None,
                update: None,
            }),
            last_completed: (phase == Phase::Succeeded).then(|| id.to_owned()),
            ..Record::default()
        }
    }

    fn process(d: Decision) -> (Option<String>, bool) {
        match d {
            Decision::Process {
                replaces, retry, ..
            } => (replaces, retry),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_redelivered_or_completed_workflow_is_never_reported_again() {
        // Every token renewal GETs the twin: the same service comes back.
        for phase in [
            Phase::Accepted,
            Phase::Switching,
            Phase::Succeeded,
            Phase::Failed,
        ] {
            assert_eq!(
                decide(&deploy("w1", None), &at("w1", None, phase)),
                Decision::Ignore
            );
        }
        let done = Record {
            current: None,
            last_completed: Some("w1".into()),
            ..Record::default()
        };
        assert_eq!(decide(&deploy("w1", None), &done), Decision::Ignore);
        assert_eq!(
            decide(&Service::Ignored { action: 1 }, &Record::default()),
            Decision::Ignore
        );
    }

    #[test]
    fn a_retry_is_the_same_workflow_with_a_new_timestamp() {
        let failed = at("w1", None, Phase::Failed);
        assert_eq!(
            process(decide(&deploy("w1", Some("t1")), &failed)),
            (None, true)
        );
        let retried = at("w1", Some("t1"), Phase::Failed);
        assert_eq!(
            decide(&deploy("w1", Some("t1")), &retried),
            Decision::Ignore
        );
        assert_eq!(
            process(decide(&deploy("w1", Some("t2")), &retried)),
            (None, true)
        );
    }

    #[test]
    fn a_new_workflow_replaces_a_running_one_and_cancel_depends_on_running() {
        let running = at("w1", None, Phase::Accepted);
        assert_eq!(
            process(decide(&deploy("w2", None), &running)),
            (Some("w1".into()), false)
        );
        assert_eq!(
            process(decide(&deploy("w2", None), &at("w1", None, Phase::Failed))),
            (None, false)
        );
        assert_eq!(decide(&cancel(), &running), Decision::Cancel);
        assert_eq!(
            decide(&cancel(), &at("w1", None, Phase::Failed)),
            Decision::Idle
        );
        assert_eq!(decide(&cancel(), &Record::default()), Decision::Idle);
    }

    #[test]
    fn an_attempt_after_a_failed_one_gets_a_new_revision_name() {
        let mut r = Record::default();
        assert_eq!(r.attempt("1.0.1"), "1.0.1");
        r.ended("1.0.1", false);
        assert_eq!(r.attempt("1.0.1"), "1.0.1-retry2");
        r.ended("1.0.1-retry2", true);
        assert_eq!(r.installed_revision.as_deref(), Some("1.0.1-retry2"));
        r.installed = Some("u1".into());
        assert!(r.installed_as("u1", Some("locals/1.0.1-retry2")));
        assert!(!r.installed_as("u2", Some("locals/1.0.1-retry2")));
        assert!(!r.installed_as("u1", Some("locals/1.0.1")));
        assert!(
            !r.installed_as("u1", Some("1.0.1-retry2")),
            "a hub revision is not it"
        );
        assert!(!r.installed_as("u1", None));
    }

    #[test]
    fn the_record_survives_a_restart_as_json() {
        let r = at("w1", Some("t"), Phase::Switching);
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"switching\""), "{text}");
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Record>("{}").unwrap(),
            Record::default()
        );
    }
}
