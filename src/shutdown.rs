//! Graceful shutdown in two steps, shared by everything that must react.
//!
//! `drain` (the first signal): the accept loop stops, idle connections
//! close, new generation requests are refused, and requests in flight carry
//! on. `abort` (the grace period is over): every stream still running ends
//! with its protocol's error event and every waiting non-streaming request
//! gets an error response, which drops their jobs and so cancels them in
//! the engine. A `tokio::sync::watch` carries the phase: any number of
//! streams can wait on it, and one that starts waiting late still sees a
//! phase that was set before.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Draining,
    Aborting,
}

/// A cheap, cloneable handle on the server's shutdown phase.
#[derive(Debug, Clone)]
pub struct Shutdown {
    phase: Arc<watch::Sender<Phase>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self {
            phase: Arc::new(watch::Sender::new(Phase::Running)),
        }
    }

    /// Stop taking work; let what is in flight finish.
    pub fn drain(&self) {
        self.advance(Phase::Draining);
    }

    /// End what is still in flight.
    pub fn abort(&self) {
        self.advance(Phase::Aborting);
    }

    pub fn is_draining(&self) -> bool {
        *self.phase.borrow() >= Phase::Draining
    }

    pub fn is_aborting(&self) -> bool {
        *self.phase.borrow() >= Phase::Aborting
    }

    /// Resolves once `drain` (or `abort`) was called.
    pub async fn draining(&self) {
        self.reached(Phase::Draining).await
    }

    /// Resolves once `abort` was called.
    pub async fn aborting(&self) {
        self.reached(Phase::Aborting).await
    }

    fn advance(&self, to: Phase) {
        self.phase.send_if_modified(|p| {
            let later = to > *p;
            if later {
                *p = to;
            }
            later
        });
    }

    async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.subscribe();
        // The sender lives in `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn phases_only_move_forward_and_late_waiters_see_them() {
        let s = Shutdown::new();
        assert!(!s.is_draining());
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.aborting().await }
        });
        s.abort();
        s.drain(); // does not go back
        assert!(s.is_draining() && s.is_aborting());
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        // Waiting after the fact resolves at once.
        tokio::time::timeout(Duration::from_secs(1), s.draining())
            .await
            .unwrap();
    }
}
