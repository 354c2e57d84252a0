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

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::claim::Room;

/// The caps of one worker: a semaphore per capped kind it runs.
pub(crate) struct Caps {
    places: Vec<(String, Arc<Semaphore>)>,
}

impl Caps {
    /// Caps for the `caps` (kind → most running at once) whose kind is among `kinds`, the
    /// kinds this worker claims; a cap on any other kind could never bind.
    pub fn new(caps: &HashMap<String, usize>, kinds: &[String]) -> Self {
        for kind in caps.keys().filter(|kind| !kinds.contains(kind)) {
            tracing::warn!(kind, "a cap on a kind this worker does not run: ignored");
        }
        let mut places: Vec<_> = caps
            .iter()
            .filter(|(kind, _)| kinds.contains(kind))
            .map(|(kind, &n)| (kind.clone(), Arc::new(Semaphore::new(n))))
            .collect();
        places.sort_by(|a, b| a.0.cmp(&b.0));
        Self { places }
    }

    /// True when `kind` is capped here.
    pub fn caps(&self, kind: &str) -> bool {
        self.places.iter().any(|(capped, _)| capped == kind)
    }

    /// Reserves every free place of every capped kind for one claim. Places another claim loop
    /// holds are not free, so two loops never promise the same place.
    pub fn reserve(&self) -> Reserved {
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
        Reserved { rooms }
    }
}

/// The places one claim reserved; those no claimed job took go back when this is dropped.
pub(crate) struct Reserved {
    rooms: Vec<(String, OwnedSemaphorePermit)>,
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
        let caps = Caps::new(&caps, &["fast".to_owned(), "slow".to_owned()]);
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
}
