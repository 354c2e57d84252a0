//! Per-kind caps: at most N jobs of a capped kind run at once in one worker, whatever its
//! `concurrency`, so a burst of long jobs (settlements, each wanting several connections)
//! cannot take every slot and connection while short jobs wait.
//!
//! A capped kind has a semaphore of N places of its own, beside the worker's slots. Before each
//! claim a claim loop reserves every free place, as it reserves free slots; a kind with no free
//! place is left out of the claim's kinds, and the others are passed with their free places to
//! the one claim statement ([`crate::claim`]), which takes at most that many of each. Each
//! claimed job of the kind takes one place into its task; the rest go back at once. The place
//! is held until the job's ending is written (a capped job skips the completion batcher), so
//! the database never shows more than N of the kind running under this worker. Uncapped kinds
//! never touch any of this: with no capped kind to pass, the claim is the uncapped statement.
//!
//! The capped statement costs more than the uncapped one (measured: a drain of short jobs at
//! 0.75x with a cap configured and no capped job queued), so capped kinds are passed only while
//! their jobs may be due: from the worker's start, after any NOTIFY on the jobs channel (an
//! insert, a release, a rescue), after a capped job ends (its kind may have more waiting), and
//! once per `recheck` (the poll interval: a retry coming due by its `run_at` sends no NOTIFY).
//! A claim that passed them and took none of them stops passing them until one of those. A
//! capped job due meanwhile waits at most `recheck` longer than it would have.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::claim::Room;

/// The caps of one worker: a semaphore per capped kind it runs.
pub(crate) struct Caps {
    places: Vec<(String, Arc<Semaphore>)>,
    /// Bumped by every hint that capped jobs may be due.
    hints: AtomicU64,
    /// The hint count, and the instant, when a claim last passed the capped kinds and took
    /// none of them: until a later hint or `recheck`, they are not passed.
    found_none: Mutex<Option<(u64, Instant)>>,
    recheck: Duration,
}

impl Caps {
    /// Caps for the `caps` (kind → most running at once) whose kind is among `kinds`, the
    /// kinds this worker claims; a cap on any other kind could never bind.
    pub fn new(caps: &HashMap<String, usize>, kinds: &[String], recheck: Duration) -> Self {
        for kind in caps.keys().filter(|kind| !kinds.contains(kind)) {
            tracing::warn!(kind, "a cap on a kind this worker does not run: ignored");
        }
        let mut places: Vec<_> = caps
            .iter()
            .filter(|(kind, _)| kinds.contains(kind))
            .map(|(kind, &n)| (kind.clone(), Arc::new(Semaphore::new(n))))
            .collect();
        places.sort_by(|a, b| a.0.cmp(&b.0));
        Self {
            places,
            hints: AtomicU64::new(0),
            found_none: Mutex::new(None),
            recheck,
        }
    }

    /// Capped jobs may be due (a NOTIFY came, a capped job ended): pass the capped kinds again.
    pub fn hint(&self) {
        self.hints.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a claim now should pass the capped kinds (see the module header).
    fn worth_asking(&self) -> bool {
        match *self.found_none.lock().expect("caps state") {
            None => true,
            Some((hints, at)) => {
                self.hints.load(Ordering::SeqCst) != hints || at.elapsed() >= self.recheck
            }
        }
    }

    /// True when `kind` is capped here.
    pub fn caps(&self, kind: &str) -> bool {
        self.places.iter().any(|(capped, _)| capped == kind)
    }

    /// Reserves every free place of every capped kind for one claim. Places another claim loop
    /// holds are not free, so two loops never promise the same place.
    pub fn reserve(&self) -> Reserved {
        let hints = self.hints.load(Ordering::SeqCst);
        if !self.worth_asking() {
            return Reserved {
                rooms: Vec::new(),
                hints,
            };
        }
        let rooms = self
            .places
            .iter()
            .filter_map(|(kind, places)| {
                let free = places.available_permits();
                if free == 0 {
                    return None;
                }
                let permits = places.clone().try_acquire_many_owned(free as u32).ok()?;
                Some((kind.clone(), permits))
            })
            .collect();
        Reserved { rooms, hints }
    }

    /// The claim made with `reserved` passed capped kinds and took none of their jobs: stop
    /// passing them until a hint newer than the reservation, or `recheck`.
    pub fn found_none(&self, reserved: &Reserved) {
        *self.found_none.lock().expect("caps state") = Some((reserved.hints, Instant::now()));
    }
}

/// The places one claim reserved; those no claimed job took go back when this is dropped.
pub(crate) struct Reserved {
    rooms: Vec<(String, OwnedSemaphorePermit)>,
    /// The hint count when the places were reserved.
    hints: u64,
}

impl Reserved {
    /// The capped kinds with room, and how much, for the claim statement.
    pub fn rooms(&self) -> Vec<Room> {
        self.rooms
            .iter()
            .map(|(kind, permits)| Room {
                kind: kind.clone(),
                places: permits.num_permits() as i64,
            })
            .collect()
    }

    /// The capped kinds with room, to claim besides the uncapped ones.
    pub fn kinds(&self) -> impl Iterator<Item = &String> {
        self.rooms.iter().map(|(kind, _)| kind)
    }

    /// One reserved place for a claimed job of `kind`: `None` for an uncapped kind. The claim
    /// statement took no more of a kind than its places, so a capped kind always has one.
    pub fn take(&mut self, kind: &str) -> Option<OwnedSemaphorePermit> {
        let (_, permits) = self.rooms.iter_mut().find(|(capped, _)| capped == kind)?;
        Some(
            permits
                .split(1)
                .expect("the claim took no more than the places reserved"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(kind: &str, places: i64) -> Room {
        Room {
            kind: kind.into(),
            places,
        }
    }

    #[test]
    fn a_claim_reserves_the_free_places_and_running_jobs_keep_theirs() {
        let caps = HashMap::from([("slow".to_owned(), 2), ("elsewhere".to_owned(), 5)]);
        let caps = Caps::new(
            &caps,
            &["fast".to_owned(), "slow".to_owned()],
            Duration::from_secs(3600),
        );
        assert!(caps.caps("slow") && !caps.caps("fast") && !caps.caps("elsewhere"));
        let mut claim = caps.reserve();
        assert_eq!(claim.rooms(), [room("slow", 2)]);
        // Meanwhile the other claim loop finds the kind full and leaves it out.
        assert!(caps.reserve().rooms().is_empty());
        let running = claim.take("slow").expect("a place for a claimed slow job");
        assert!(claim.take("fast").is_none());
        drop(claim);
        assert_eq!(caps.reserve().rooms(), [room("slow", 1)]);
        drop(running);
        assert_eq!(caps.reserve().rooms(), [room("slow", 2)]);
    }

    #[test]
    fn capped_kinds_found_without_jobs_are_passed_again_after_a_hint_or_the_recheck() {
        let caps = HashMap::from([("slow".to_owned(), 2)]);
        let caps = Caps::new(&caps, &["slow".to_owned()], Duration::from_millis(50));
        let claim = caps.reserve();
        assert_eq!(claim.rooms(), [room("slow", 2)]);
        caps.found_none(&claim);
        drop(claim);
        assert!(caps.reserve().rooms().is_empty());
        caps.hint();
        let claim = caps.reserve();
        assert_eq!(claim.rooms(), [room("slow", 2)]);
        // A hint that came while the claim ran is not forgotten by its finding none.
        caps.hint();
        caps.found_none(&claim);
        drop(claim);
        let claim = caps.reserve();
        assert_eq!(claim.rooms(), [room("slow", 2)]);
        caps.found_none(&claim);
        drop(claim);
        assert!(caps.reserve().rooms().is_empty());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(caps.reserve().rooms(), [room("slow", 2)]);
    }
}
