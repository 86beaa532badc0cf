//! Whose `locals/<id>` trail is it? `PUT /steps` overwrites any trail, even the
//! running one or the rollback point (reference §2.6), and offer ids are unique
//! only per backend, so the bridge labels every trail it stages with a commit
//! message naming the backend and the offer, and checks the device before it
//! stages: a trail that ever ran is never written again, and one staged by someone
//! else is left alone. The label lives on the device, so this holds when the
//! bridge's own journal is lost or has forgotten an old offer.

use pv_adapter_api::UpdateStatus;

use super::{Coordinator, Refusal, map_status};
use crate::pvctrl::{PvStatus, Step};

/// The commit message the bridge gives a trail it stages.
pub(super) fn label(backend: &str, id: &str) -> String {
    format!("pv-bridge: backend={backend} id={id}")
}

/// What staging `rev` for (`backend`, `id`) may do, given the device's trails.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Trail {
    /// No such trail, or one that never ran and is ours or unlabelled (left by an
    /// interrupted staging): write it.
    Free,
    /// This very offer already ran on the device (its journal entry was lost):
    /// report the device's final status, do not run it again.
    Finished {
        status: UpdateStatus,
        msg: String,
        logs: Option<String>,
    },
}

/// Decides from `GET /steps`. Pure.
pub(super) fn decide(steps: &[Step], backend: &str, id: &str, rev: &str) -> Result<Trail, Refusal> {
    let Some(step) = steps.iter().find(|s| s.name == rev) else {
        return Ok(Trail::Free);
    };
    let ours = step.commitmsg == label(backend, id);
    let owner = step
        .commitmsg
        .strip_prefix("pv-bridge: backend=")
        .and_then(|rest| rest.split_once(" id="))
        .map(|(b, _)| b);
    let ran = step.progress.as_ref().filter(|p| p.status != PvStatus::New);
    match (ran, ours) {
        (None, true) => Ok(Trail::Free),
        (None, false) if step.commitmsg.is_empty() => Ok(Trail::Free),
        (Some(p), true) if p.status.is_final() => Ok(Trail::Finished {
            status: map_status(&p.status),
            msg: p.status_msg.clone(),
            logs: p.logs.clone(),
        }),
        (Some(p), true) => Err(Refusal::wontgo(format!(
            "revision {rev} of this offer is already {} on the device; it is not staged again",
            p.status
        ))),
        (ran, false) => {
            let whose = match owner {
                Some(b) => format!("staged by backend {b}"),
                None if step.commitmsg.is_empty() => "not staged by pv-bridge".to_owned(),
                None => format!("staged by someone else ({:?})", step.commitmsg),
            };
            let state = match ran {
                Some(p) => format!(", and it ran ({})", p.status),
                None => String::new(),
            };
            Err(Refusal::wontgo(format!(
                "revision {rev} already exists on the device, {whose}{state}; offer the \
                 update under another id (ids name revisions across every backend)"
            )))
        }
    }
}

impl Coordinator {
    /// Checks the device's trail named `rev` before staging it.
    pub(super) async fn check_trail(
        &self,
        backend: &str,
        id: &str,
        rev: &str,
    ) -> Result<Trail, Refusal> {
        let steps = self
            .pv
            .steps()
            .await
            .map_err(|e| Refusal::wontgo(format!("cannot list the device's revisions: {e}")))?;
        decide(&steps, backend, id, rev)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pvctrl::Progress;

    fn step(name: &str, commitmsg: &str, status: Option<&str>) -> Step {
        Step {
            name: name.into(),
            date: String::new(),
            commitmsg: commitmsg.into(),
            progress: status.map(|s| {
                serde_json::from_value::<Progress>(serde_json::json!({
                    "status": s, "status-msg": format!("{s} message"), "progress": 100
                }))
                .unwrap()
            }),
        }
    }

    const REV: &str = "locals/r1";

    #[test]
    fn a_trail_that_never_ran_is_free_when_ours_or_unlabelled() {
        let ours = label("cloud", "r1");
        for steps in [
            vec![],
            vec![step("0", "", Some("DONE"))],
            vec![step(REV, &ours, Some("NEW"))],
            vec![step(REV, &ours, None)],
            vec![step(REV, "", Some("NEW"))],
        ] {
            assert_eq!(decide(&steps, "cloud", "r1", REV).unwrap(), Trail::Free);
        }
    }

    #[test]
    fn this_offer_having_run_is_reported_not_run_again() {
        let steps = [step(REV, &label("cloud", "r1"), Some("ERROR"))];
        assert_eq!(
            decide(&steps, "cloud", "r1", REV).unwrap(),
            Trail::Finished {
                status: UpdateStatus::Error,
                msg: "ERROR message".into(),
                logs: None
            }
        );
        let steps = [step(REV, &label("cloud", "r1"), Some("TESTING"))];
        let e = decide(&steps, "cloud", "r1", REV).unwrap_err();
        assert_eq!(e.status, UpdateStatus::Wontgo);
    }

    #[test]
    fn someone_elses_trail_is_never_overwritten() {
        let cases = [
            (
                step(REV, &label("plant", "r1"), Some("DONE")),
                "staged by backend plant, and it ran (DONE)",
            ),
            (
                step(REV, &label("plant", "r1"), Some("NEW")),
                "staged by backend plant;",
            ),
            (
                step(REV, "", Some("DONE")),
                "not staged by pv-bridge, and it ran (DONE)",
            ),
            (
                step(REV, "by hand", None),
                "staged by someone else (\"by hand\");",
            ),
        ];
        for (s, want) in cases {
            let e = decide(&[s], "cloud", "r1", REV).unwrap_err();
            assert_eq!(e.status, UpdateStatus::Wontgo);
            assert!(e.msg.contains(want), "{}", e.msg);
            assert!(
                e.msg
                    .starts_with("revision locals/r1 already exists on the device"),
                "{}",
                e.msg
            );
        }
    }
}
