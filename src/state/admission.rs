//! Admission to the generation queue: how many generation requests may be
//! in flight at once, counted in one atomic so a burst cannot overshoot.
//! The `api::guard` middleware takes a [`Permit`] per request and holds it
//! in the response body.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// How many generation requests may be in flight: the `--parallel` ones
/// the engine runs plus `--max-queue` waiting. Counted here rather than read from the
/// engine's queue so that admission is one atomic step (requests that are
/// still tokenizing count too, and a burst cannot overshoot).
#[derive(Debug)]
pub struct Admission {
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    /// Requests the engine runs at once.
    running: usize,
}

/// A place in the queue, released when dropped.
#[derive(Debug)]
pub struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// Room for `max_queue` waiting requests besides `running` ones.
    pub fn new(max_queue: usize, running: usize) -> Self {
        Self {
            in_flight: Arc::default(),
            limit: max_queue.saturating_add(running.max(1)),
            running: running.max(1),
        }
    }

    pub fn try_admit(&self) -> Option<Permit> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(self.in_flight.clone()))
    }

    /// How many requests may wait besides the ones the engine runs.
    pub fn queue_room(&self) -> usize {
        self.limit - self.running
    }

    /// Generation requests admitted and not yet answered in full.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_holds_one_running_plus_the_queue() {
        let a = Admission::new(1, 1);
        let first = a.try_admit().unwrap();
        let second = a.try_admit().unwrap();
        assert!(a.try_admit().is_none());
        drop(first);
        let third = a.try_admit().unwrap();
        assert_eq!(a.in_flight(), 2);
        drop((second, third));
        assert_eq!(a.in_flight(), 0);
        let none_waiting = Admission::new(0, 1);
        let _only = none_waiting.try_admit().unwrap();
        assert!(none_waiting.try_admit().is_none());
        let four = Admission::new(2, 4);
        let held: Vec<Permit> = (0..6).map(|_| four.try_admit().unwrap()).collect();
        assert!(four.try_admit().is_none());
        drop(held);
    }
}
