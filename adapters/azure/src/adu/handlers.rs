//! Which steps a Pantavisor device carries out, and how (reference §6.4, §10.4).
//! Nothing downloaded is ever executed: a pvr2adu package's install script is
//! verified and then ignored, and its export is installed natively.

use std::collections::BTreeMap;

use pv_adapter_api::valid_offer_id;
use serde_json::Value;

use super::manifest::{FileEntry, Step, erc};

/// Pantacor's pvr2adu packages: the script handler running
/// `pantavisor-installscript.sh --firmware-file pvadu.tgz`.
pub const SCRIPT_HANDLER: &str = "microsoft/script:1";
/// pv-bridge's own handler: one `pvr export` archive holding a whole revision.
pub const PVR_HANDLER: &str = "pantacor/pvrevision:1";
/// The install scripts whose packages are recognised (never run).
pub const KNOWN_SCRIPTS: &[&str] = &["pantavisor-installscript.sh"];

/// What to do with a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Overlay the export (file id) onto the running state (pvtx rules) and run
    /// it as `locals/<revision>`. The script (file id) is verified, not run.
    Overlay {
        export: String,
        script: String,
        revision: String,
    },
    /// Install the export (file id) as the whole revision `locals/<revision>`.
    Whole { export: String, revision: String },
    /// Refused, with the result code and why.
    Unsupported { erc: u32, reason: String },
}

fn unsupported(reason: String) -> Plan {
    Plan::Unsupported {
        erc: erc::UNSUPPORTED_HANDLER,
        reason,
    }
}

/// `installedCriteria` as a Pantavisor local revision name.
fn revision(props: &Value) -> Result<String, String> {
    let c = props
        .get("installedCriteria")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !valid_offer_id(c) || c == "." || c == ".." {
        return Err(format!(
            "installedCriteria {c:?} must be 1 to 64 of A-Z a-z 0-9 . _ - (it names the revision locals/<criteria>)"
        ));
    }
    Ok(c.to_owned())
}

/// The value after `--firmware-file` in a script's arguments.
fn firmware_file(arguments: &str) -> Option<&str> {
    let mut words = arguments.split_whitespace();
    while let Some(w) = words.next() {
        if w == "--firmware-file" {
            return words.next();
        }
        if let Some(v) = w.strip_prefix("--firmware-file=") {
            return Some(v);
        }
    }
    None
}

/// Decides how a step is carried out. A reference step is planned by the caller
/// after its child manifest is fetched and verified.
pub fn plan(step: &Step, files: &BTreeMap<String, FileEntry>) -> Plan {
    let Step::Inline {
        handler,
        files: ids,
        properties,
        ..
    } = step
    else {
        return unsupported("a reference step is planned through its child manifest".into());
    };
    let name_of = |id: &String| files.get(id).map(|f| f.name.as_str()).unwrap_or_default();
    match handler.as_str() {
        SCRIPT_HANDLER => {
            let script = properties
                .get("scriptFileName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !KNOWN_SCRIPTS.contains(&script) {
                return unsupported(format!(
                    "microsoft/script:1 with script {script:?}: pv-bridge never runs scripts; it installs Pantacor's pvr2adu packages (pantavisor-installscript.sh) natively"
                ));
            }
            let args = properties
                .get("arguments")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let Some(fw) = firmware_file(args) else {
                return unsupported(format!(
                    "the script's arguments {args:?} name no --firmware-file"
                ));
            };
            let (Some(export), Some(script_id)) = (
                ids.iter().find(|id| name_of(id) == fw),
                ids.iter().find(|id| name_of(id) == script),
            ) else {
                return unsupported(format!(
                    "the step's files do not include both {script:?} and {fw:?}"
                ));
            };
            match revision(properties) {
                Ok(revision) => Plan::Overlay {
                    export: export.clone(),
                    script: script_id.clone(),
                    revision,
                },
                Err(e) => unsupported(e),
            }
        }
        PVR_HANDLER => {
            let [export] = ids.as_slice() else {
                return unsupported(format!(
                    "{PVR_HANDLER} takes exactly one file (a pvr export), not {}",
                    ids.len()
                ));
            };
            match revision(properties) {
                Ok(revision) => Plan::Whole {
                    export: export.clone(),
                    revision,
                },
                Err(e) => unsupported(e),
            }
        }
        other => unsupported(format!(
            "handler {other} is not supported on a Pantavisor device (supported: {PVR_HANDLER}, and {SCRIPT_HANDLER} packages made by pvr2adu)"
        )),
    }
}

/// The installed check (reference §7.6, §10.4): a deployment is installed when
/// the device runs the revision of its last step (`locals/<installedCriteria>`,
/// from Pantavisor's `pantavisor.revision`). Unsupported steps are never installed.
pub fn installed(plans: &[Plan], running: Option<&str>) -> bool {
    let Some(last) = plans.last() else {
        return false;
    };
    let revision = match last {
        Plan::Overlay { revision, .. } | Plan::Whole { revision, .. } => revision,
        Plan::Unsupported { .. } => return false,
    };
    !plans.iter().any(|p| matches!(p, Plan::Unsupported { .. }))
        && running.and_then(|r| r.strip_prefix("locals/")) == Some(revision.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn installed_means_the_last_steps_revision_runs() {
        let p = Plan::Whole {
            export: "f".into(),
            revision: "1.0.3".into(),
        };
        assert!(installed(std::slice::from_ref(&p), Some("locals/1.0.3")));
        assert!(!installed(std::slice::from_ref(&p), Some("locals/1.0.2")));
        assert!(
            !installed(std::slice::from_ref(&p), Some("1.0.3")),
            "a hub revision is not it"
        );
        assert!(!installed(std::slice::from_ref(&p), None));
        assert!(!installed(&[], Some("locals/1.0.3")));
        let u = Plan::Unsupported {
            erc: erc::UNSUPPORTED_HANDLER,
            reason: String::new(),
        };
        assert!(!installed(&[u, p], Some("locals/1.0.3")));
    }

    fn files() -> BTreeMap<String, FileEntry> {
        [
            ("f1", "pvadu.tgz"),
            ("f2", "pantavisor-installscript.sh"),
            ("f3", "full.tgz"),
        ]
        .into_iter()
        .map(|(id, name)| {
            (
                id.to_owned(),
                FileEntry {
                    name: name.into(),
                    size: 1,
                    sha256: [0; 32],
                },
            )
        })
        .collect()
    }

    fn step(handler: &str, ids: &[&str], props: Value) -> Step {
        Step::Inline {
            handler: handler.into(),
            files: ids.iter().map(|s| (*s).to_owned()).collect(),
            installed_criteria: props
                .get("installedCriteria")
                .and_then(Value::as_str)
                .map(str::to_owned),
            properties: props,
        }
    }

    fn pvr2adu(criteria: &str) -> Value {
        json!({"scriptFileName": "pantavisor-installscript.sh",
               "arguments": "--log-level 0 --firmware-file pvadu.tgz",
               "installedCriteria": criteria})
    }

    #[test]
    fn pvr2adu_packages_are_recognised_as_pvr2adu_writes_them() {
        assert_eq!(
            plan(
                &step(SCRIPT_HANDLER, &["f2", "f1"], pvr2adu("1.0.3")),
                &files()
            ),
            Plan::Overlay {
                export: "f1".into(),
                script: "f2".into(),
                revision: "1.0.3".into()
            }
        );
        assert_eq!(
            plan(
                &step(PVR_HANDLER, &["f3"], json!({"installedCriteria": "r7"})),
                &files()
            ),
            Plan::Whole {
                export: "f3".into(),
                revision: "r7".into()
            }
        );
    }

    #[test]
    fn anything_else_is_refused_with_the_reason() {
        let refused = |s: Step| match plan(&s, &files()) {
            Plan::Unsupported { erc, reason } => {
                assert_eq!(erc, erc::UNSUPPORTED_HANDLER);
                reason
            }
            other => panic!("{other:?}"),
        };
        let mut other_script = pvr2adu("1");
        other_script["scriptFileName"] = json!("evil.sh");
        assert!(
            refused(step(SCRIPT_HANDLER, &["f2", "f1"], other_script))
                .contains("never runs scripts")
        );
        let mut no_fw = pvr2adu("1");
        no_fw["arguments"] = json!("--log-level 0");
        assert!(refused(step(SCRIPT_HANDLER, &["f2", "f1"], no_fw)).contains("no --firmware-file"));
        assert!(
            refused(step(SCRIPT_HANDLER, &["f1"], pvr2adu("1"))).contains("do not include both")
        );
        for bad in ["", "..", "a/b", &"x".repeat(65)] {
            assert!(
                refused(step(SCRIPT_HANDLER, &["f2", "f1"], pvr2adu(bad)))
                    .contains("installedCriteria"),
                "{bad:?}"
            );
        }
        assert!(refused(step("microsoft/apt:1", &[], json!({}))).contains("not supported"));
        assert!(
            refused(step(
                PVR_HANDLER,
                &["f1", "f3"],
                json!({"installedCriteria": "r"})
            ))
            .contains("exactly one file")
        );
        assert!(
            refused(Step::Reference {
                file_id: "f1".into()
            })
            .contains("child manifest")
        );
    }
}
