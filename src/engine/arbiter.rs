//! Arbitration between offers (architecture.md §4): one update at a time.
//!
//! A new offer while an update is under way:
//! - from the same backend, it supersedes the running one if that has not reached
//!   the point of no return (LOCAL_RUN); the old one ends CANCELLED;
//! - from another backend, it is refused as busy, unless that backend has a higher
//!   priority and the running update has not reached the point of no return.
//!
//! The slot holds the running update and at most one offer waiting for it to stop.
//! The coordinator marks the point of no return under the same lock, just before
//! it sends LOCAL_RUN, so a cancel is either honoured or refused, never lost.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use pv_adapter_api::Offer;

/// The update being carried out.
#[derive(Debug)]
pub struct Active {
    pub backend: String,
    pub id: String,
    pub priority: i64,
    /// LOCAL_RUN was (about to be) sent: Pantavisor owns it now.
    pub committed: bool,
    /// Set when it must stop, with the reason reported as CANCELLED.
    pub cancelled: Option<String>,
    pub cancel: Arc<Notify>,
}

impl Active {
    /// An update Pantavisor already owns (found after a restart): nothing may
    /// supersede or cancel it.
    pub fn owned_by_pantavisor(backend: &str, id: &str) -> Self {
        Self {
            backend: backend.to_owned(),
            id: id.to_owned(),
            priority: i64::MAX,
            committed: true,
            cancelled: None,
            cancel: Arc::new(Notify::new()),
        }
    }
}

/// An offer waiting for the slot.
pub struct Pending {
    pub job: Job,
    pub priority: i64,
}

#[derive(Default)]
pub struct Slot {
    pub active: Option<Active>,
    pub next: Option<Pending>,
}

/// The slot, shared by the engine's event loop and the coordinator, and the bell
/// that wakes the coordinator when an offer is waiting.
#[derive(Clone, Default)]
pub struct Shared {
    slot: Arc<Mutex<Slot>>,
    pub wake: Arc<Notify>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What to do with a new offer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing runs: start it.
    Start,
    /// The same offer is already running or waiting.
    Duplicate,
    /// Cancel the running update (if any) and the waiting offer (if any), then run
    /// this one. Holds the ids that end CANCELLED.
    Supersede { cancelled: Vec<(String, String)> },
    /// Refused, with the reason.
    Busy(String),
}

/// Decides what a new offer from `backend` with `priority` does. Pure.
pub fn decide(slot: &Slot, backend: &str, id: &str, priority: i64) -> Decision {
    let same = |b: &str, i: &str| b == backend && i == id;
    if slot
        .active
        .as_ref()
        .is_some_and(|a| same(&a.backend, &a.id))
        || slot
            .next
            .as_ref()
            .is_some_and(|n| same(&n.job.backend, &n.job.offer.id))
    {
        return Decision::Duplicate;
    }
    let mut cancelled = Vec::new();
    if let Some(a) = &slot.active {
        if a.cancelled.is_none() {
            if a.committed {
                return Decision::Busy(format!(
                    "busy: update {} from backend {} is being installed",
                    a.id, a.backend
                ));
            }
            if a.backend != backend && priority <= a.priority {
                return Decision::Busy(format!(
                    "busy: update {} from backend {} is in progress",
                    a.id, a.backend
                ));
            }
            cancelled.push((a.backend.clone(), a.id.clone()));
        }
    }
    if let Some(n) = &slot.next {
        if n.job.backend != backend && priority <= n.priority {
            return Decision::Busy(format!(
                "busy: update {} from backend {} is waiting to run",
                n.job.offer.id, n.job.backend
            ));
        }
        cancelled.push((n.job.backend.clone(), n.job.offer.id.clone()));
    }
    if cancelled.is_empty() && slot.active.is_none() {
        Decision::Start
    } else {
        Decision::Supersede { cancelled }
    }
}

/// Cancels the update of `backend` (the one named `id`, if given) before the point
/// of no return. Returns the id cancelled and, when it had not started yet, its job
/// (for the caller to report CANCELLED); or why it could not be cancelled.
pub fn cancel(
    shared: &Shared,
    backend: &str,
    id: Option<&str>,
    reason: &str,
) -> Result<(String, Option<Job>), String> {
    let mut s = shared.lock();
    let matches = |b: &str, i: &str| b == backend && id.is_none_or(|want| want == i);
    if s.next
        .as_ref()
        .is_some_and(|n| matches(&n.job.backend, &n.job.offer.id))
    {
        let n = s.next.take().map(|n| n.job);
        let id = n.as_ref().map(|j| j.offer.id.clone()).unwrap_or_default();
        return Ok((id, n));
    }
    match s.active.as_mut() {
        Some(a) if matches(&a.backend, &a.id) && a.cancelled.is_none() => {
            if a.committed {
                return Err(format!(
                    "update {} is already being installed by Pantavisor",
                    a.id
                ));
            }
            a.cancelled = Some(reason.to_owned());
            a.cancel.notify_one();
            Ok((a.id.clone(), None))
        }
        _ => Err(format!("no update from backend {backend} to cancel")),
    }
}

/// The update the bridge is carrying out or about to, described for a refusal;
/// `None` when the slot is free.
pub fn in_progress(shared: &Shared) -> Option<String> {
    let s = shared.lock();
    if let Some(a) = s.active.as_ref().filter(|a| a.cancelled.is_none()) {
        let stage = if a.committed {
            "being installed by Pantavisor"
        } else {
            "being staged"
        };
        return Some(format!(
            "update {} from backend {} is {stage}",
            a.id, a.backend
        ));
    }
    s.next.as_ref().map(|n| {
        format!(
            "update {} from backend {} is about to be staged",
            n.job.offer.id, n.job.backend
        )
    })
}

/// One offer to carry out.
pub struct Job {
    pub backend: String,
    pub offer: Offer,
}

#[cfg(test)]
mod tests {
    use super::*;
    use pv_adapter_api::Offer;
    use std::collections::BTreeMap;

    fn active(backend: &str, id: &str, priority: i64, committed: bool) -> Option<Active> {
        Some(Active {
            backend: backend.into(),
            id: id.into(),
            priority,
            committed,
            cancelled: None,
            cancel: Arc::new(Notify::new()),
        })
    }

    fn pending(backend: &str, id: &str, priority: i64) -> Option<Pending> {
        Some(Pending {
            job: Job {
                backend: backend.into(),
                offer: Offer {
                    id: id.into(),
                    state: vec![],
                    state_url: None,
                    objects: BTreeMap::new(),
                    fetcher: None,
                },
            },
            priority,
        })
    }

    #[test]
    fn an_idle_slot_starts_the_offer() {
        assert_eq!(decide(&Slot::default(), "a", "r1", 0), Decision::Start);
    }

    #[test]
    fn the_owner_supersedes_before_the_point_of_no_return() {
        let s = Slot {
            active: active("a", "r1", 0, false),
            next: None,
        };
        assert_eq!(
            decide(&s, "a", "r2", 0),
            Decision::Supersede {
                cancelled: vec![("a".into(), "r1".into())]
            }
        );
        assert_eq!(decide(&s, "a", "r1", 0), Decision::Duplicate);
        let committed = Slot {
            active: active("a", "r1", 0, true),
            next: None,
        };
        assert_eq!(
            decide(&committed, "a", "r2", 0),
            Decision::Busy("busy: update r1 from backend a is being installed".into())
        );
    }

    #[test]
    fn other_backends_need_a_higher_priority() {
        let s = Slot {
            active: active("a", "r1", 5, false),
            next: None,
        };
        assert_eq!(
            decide(&s, "b", "x", 5),
            Decision::Busy("busy: update r1 from backend a is in progress".into())
        );
        assert_eq!(
            decide(&s, "b", "x", 6),
            Decision::Supersede {
                cancelled: vec![("a".into(), "r1".into())]
            }
        );
    }

    #[test]
    fn a_waiting_offer_is_replaced_or_defended_by_the_same_rules() {
        let s = Slot {
            active: None,
            next: pending("a", "r1", 0),
        };
        assert_eq!(
            decide(&s, "a", "r2", 0),
            Decision::Supersede {
                cancelled: vec![("a".into(), "r1".into())]
            }
        );
        assert!(matches!(decide(&s, "b", "x", 0), Decision::Busy(_)));
        // An update already cancelled is no obstacle; the waiting one is.
        let mut a = active("a", "r1", 0, false);
        if let Some(a) = a.as_mut() {
            a.cancelled = Some("superseded".into());
        }
        let s = Slot {
            active: a,
            next: pending("a", "r2", 0),
        };
        assert_eq!(
            decide(&s, "a", "r3", 0),
            Decision::Supersede {
                cancelled: vec![("a".into(), "r2".into())]
            }
        );
    }
}
