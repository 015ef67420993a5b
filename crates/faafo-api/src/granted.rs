//! The leases this process granted, remembered so that an upload under one of them is
//! checked without a read of the store.
//!
//! Before it reads an upload's body, the API must know that the lease is still held and
//! what size the image should be. The store's `leased` read answers both, at the cost of
//! a statement per task. For a lease granted here, memory answers too: the spec came with
//! the grant, and nothing but its term or a deletion can end a lease before its holder
//! does. So a lease is *known held* while
//! - its token is the one granted (or renewed) here,
//! - its term has not come: measured from before the store was asked, so it comes no
//!   later than the store's own, and
//! - the store's deletion count ([`Deletions`]) has not moved since the store was asked:
//!   no deletion heard, here or, within milliseconds, in another process.
//!
//! Anything else asks the store, as before. Memory only spares a read: the completion is
//! fenced by the store whatever memory said, and an image written for a fractal deleted
//! too recently to have been heard is removed again by the upload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faafo_core::{FractalSpec, LeaseToken};
use faafo_store::{Deletions, Lease};
use uuid::Uuid;

/// Leases remembered at most; past it, new grants are checked through the store.
const MAX_REMEMBERED: usize = 65_536;

#[derive(Debug)]
pub(crate) struct GrantedLeases {
    /// `None` for a store that cannot hear every deletion: nothing is remembered.
    deletions: Option<Arc<Deletions>>,
    held: Mutex<HashMap<Uuid, Granted>>,
}

#[derive(Debug, Clone, Copy)]
struct Granted {
    token: LeaseToken,
    spec: FractalSpec,
    /// Before the store's own term.
    term: Instant,
    /// The deletion count read before the store granted or renewed the lease.
    deletions: u64,
}

/// What was true just before the store was asked for a lease or a renewal.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asking {
    at: Instant,
    deletions: Option<u64>,
}

impl GrantedLeases {
    pub fn new(deletions: Option<Arc<Deletions>>) -> Self {
        GrantedLeases {
            deletions,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// To be called just before the store is asked to grant or renew a lease.
    pub fn asking(&self) -> Asking {
        Asking {
            at: Instant::now(),
            deletions: self.deletion_count(),
        }
    }

    /// Remembers `lease`, which the store granted for `duration` when asked at `asking`.
    pub fn granted(&self, asking: Asking, lease: &Lease, duration: Duration) {
        let Some(deletions) = asking.deletions else {
            return;
        };
        let mut held = self.lock();
        if held.len() < MAX_REMEMBERED {
            held.insert(
                lease.fractal.uuid,
                Granted {
                    token: lease.token,
                    spec: lease.fractal.spec,
                    term: asking.at + duration,
                    deletions,
                },
            );
        }
    }

    /// The store renewed the lease `token` of `uuid` for `duration` when asked at
    /// `asking`: a lease remembered here lasts that much longer.
    pub fn renewed(&self, asking: Asking, uuid: Uuid, token: LeaseToken, duration: Duration) {
        let mut held = self.lock();
        match (held.get_mut(&uuid), asking.deletions) {
            (Some(granted), Some(deletions)) if granted.token == token => {
                granted.term = granted.term.max(asking.at + duration);
                // The renewal found the fractal there after this count was read.
                granted.deletions = deletions;
            }
            _ => {}
        }
    }

    /// The spec of the fractal `uuid` if its lease `token` is known held at `now`; `None`
    /// when the store must be asked.
    pub fn held_spec(&self, uuid: Uuid, token: LeaseToken, now: Instant) -> Option<FractalSpec> {
        let deletions = self.deletion_count()?;
        let held = self.lock();
        let granted = held.get(&uuid)?;
        (granted.token == token && now < granted.term && granted.deletions == deletions)
            .then_some(granted.spec)
    }

    /// The lease of `uuid` ended, or its end is being decided: the store answers next time.
    pub fn forget(&self, uuid: Uuid) {
        self.lock().remove(&uuid);
    }

    /// Drops the leases whose term has come by `now` (their holders went silent).
    pub fn forget_ended(&self, now: Instant) {
        self.lock().retain(|_, granted| now < granted.term);
    }

    fn deletion_count(&self) -> Option<u64> {
        self.deletions.as_ref()?.current()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Granted>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use faafo_core::{Fractal, FractalState};

    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    fn lease(uuid: Uuid) -> Lease {
        let spec = faafo_core::FractalSpec::parse(
            &faafo_core::wire::CreateFractal {
                uuid: None,
                width: 40,
                height: 30,
                iterations: 64,
                xa: -2.0,
                xb: 2.0,
                ya: -1.5,
                yb: 1.5,
                cx: Some(0.0),
                cy: Some(0.0),
            },
            &faafo_core::Limits::default(),
            1,
        )
        .unwrap();
        Lease {
            fractal: Fractal {
                uuid,
                spec,
                state: FractalState::Running,
                attempts: 1,
                max_attempts: 5,
                result: None,
                error: None,
                created_at_ms: 0,
                finished_at_ms: None,
            },
            token: LeaseToken::generate(),
        }
    }

    fn remembered() -> (GrantedLeases, Arc<Deletions>, Lease, Instant) {
        let deletions = Arc::new(Deletions::new(true));
        let granted = GrantedLeases::new(Some(Arc::clone(&deletions)));
        let lease = lease(Uuid::new_v4());
        let asking = granted.asking();
        granted.granted(asking, &lease, LEASE);
        (granted, deletions, lease, asking.at)
    }

    #[test]
    fn a_lease_granted_here_is_known_held_until_its_term() {
        let (granted, _deletions, lease, asked) = remembered();
        let uuid = lease.fractal.uuid;
        assert_eq!(
            granted.held_spec(uuid, lease.token, asked),
            Some(lease.fractal.spec)
        );
        let just_before = asked + LEASE - Duration::from_millis(1);
        assert!(granted.held_spec(uuid, lease.token, just_before).is_some());
        assert_eq!(granted.held_spec(uuid, lease.token, asked + LEASE), None);
        // Another token, or another fractal, is for the store to judge.
        assert_eq!(granted.held_spec(uuid, LeaseToken::generate(), asked), None);
        assert_eq!(granted.held_spec(Uuid::new_v4(), lease.token, asked), None);
    }

    #[test]
    fn any_deletion_heard_sends_the_check_to_the_store() {
        let (granted, deletions, lease, asked) = remembered();
        deletions.heard();
        assert_eq!(
            granted.held_spec(lease.fractal.uuid, lease.token, asked),
            None
        );

        // Nor is anything known while deletions elsewhere could go unheard.
        let (granted, deletions, lease, asked) = remembered();
        deletions.set_listening(false);
        assert_eq!(
            granted.held_spec(lease.fractal.uuid, lease.token, asked),
            None
        );
        let deaf = GrantedLeases::new(None);
        deaf.granted(deaf.asking(), &lease, LEASE);
        assert_eq!(deaf.held_spec(lease.fractal.uuid, lease.token, asked), None);
    }

    #[test]
    fn a_renewal_moves_the_term_and_a_forgotten_lease_is_gone() {
        let (granted, deletions, lease, asked) = remembered();
        let uuid = lease.fractal.uuid;
        // A renewal of another token changes nothing.
        granted.renewed(granted.asking(), uuid, LeaseToken::generate(), LEASE * 3);
        assert_eq!(granted.held_spec(uuid, lease.token, asked + LEASE), None);

        // A renewal confirms the lease after a deletion of something else.
        deletions.heard();
        let renewal = Asking {
            at: asked + LEASE / 2,
            deletions: deletions.current(),
        };
        granted.renewed(renewal, uuid, lease.token, LEASE);
        let later = asked + LEASE + LEASE / 4;
        assert!(granted.held_spec(uuid, lease.token, later).is_some());

        granted.forget_ended(later);
        assert!(granted.held_spec(uuid, lease.token, later).is_some());
        granted.forget_ended(renewal.at + LEASE);
        assert_eq!(granted.held_spec(uuid, lease.token, later), None);

        let (granted, _, lease, asked) = remembered();
        granted.forget(lease.fractal.uuid);
        assert_eq!(
            granted.held_spec(lease.fractal.uuid, lease.token, asked),
            None
        );
    }
}
