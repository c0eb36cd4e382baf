//! One request's hand-off between its submitter and the dispatcher.
//!
//! A state word decides, without a shared lock, who owns a waiting
//! request: the dispatcher *claims* it (to dispatch it or to answer it),
//! or its submitter *takes it back* (it gave up). Exactly one of the two
//! wins the compare-and-swap, so a request is never both sent and taken
//! back. The verdict travels back through a cell only these two touch.

use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use parking_lot::Mutex;

/// Waiting in the inbox or the ordered queue.
const QUEUED: u8 = 0;
/// Taken by the dispatcher: a verdict is coming (or the request goes back
/// into the queue, [`Slot::unclaim`]).
const CLAIMED: u8 = 1;
/// Its submitter is gone or took it back: never dispatched from now on.
const GONE: u8 = 2;
/// Claimed and answered: the verdict is in the cell.
const ANSWERED: u8 = 3;

/// The shared half of one request: its state word and its verdict.
#[derive(Debug)]
pub(super) struct Slot<V> {
    state: AtomicU8,
    /// The verdict, once answered. Locked once by each side, never by
    /// anyone else: a per-request cell, not a shared lock.
    verdict: Mutex<Option<V>>,
    waker: AtomicWaker,
}

/// What a submitter that left found ([`Slot::leave`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Left {
    /// The request was still queued: the submitter took it back.
    TookBack,
    /// The dispatcher had claimed it: a verdict is or was on its way.
    Claimed,
    /// It had already left.
    Gone,
}

impl<V> Slot<V> {
    pub(super) fn new() -> Self {
        Slot {
            state: AtomicU8::new(QUEUED),
            verdict: Mutex::new(None),
            waker: AtomicWaker::new(),
        }
    }

    /// Whether the request still waits for the dispatcher.
    pub(super) fn is_queued(&self) -> bool {
        self.state.load(Ordering::Acquire) == QUEUED
    }

    /// Whether its submitter is gone (it took the request back or left).
    pub(super) fn is_gone(&self) -> bool {
        self.state.load(Ordering::Acquire) == GONE
    }

    /// Dispatcher: takes the request (to dispatch or to answer it).
    /// Answers `false` when its submitter took it back first.
    pub(super) fn claim(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Dispatcher: puts a claimed request back in the queue (the service
    /// was not ready after all). Answers `false` when its submitter left
    /// meanwhile.
    pub(super) fn unclaim(&self) -> bool {
        self.state
            .compare_exchange(CLAIMED, QUEUED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Submitter: takes the request back while it is still queued (its
    /// deadline passed, the scheduler closed). Answers `false` when the
    /// dispatcher claimed it first: then a verdict is on its way.
    pub(super) fn take_back(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, GONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Submitter: goes away (its future was dropped), whatever the state.
    pub(super) fn leave(&self) -> Left {
        match self.state.swap(GONE, Ordering::AcqRel) {
            QUEUED => Left::TookBack,
            CLAIMED | ANSWERED => Left::Claimed,
            _ => Left::Gone,
        }
    }

    /// Dispatcher: answers a claimed request. A submitter that already
    /// left never reads it: the verdict is dropped at once.
    pub(super) fn answer(&self, verdict: V) {
        if self.is_gone() {
            return;
        }
        *self.verdict.lock() = Some(verdict);
        if self
            .state
            .compare_exchange(CLAIMED, ANSWERED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Its submitter left meanwhile: drop the verdict now rather
            // than with the slot.
            drop(self.verdict.lock().take());
            return;
        }
        self.waker.wake();
    }

    /// Submitter: the verdict, once answered. The state word says whether
    /// there is one, so waiting costs no lock.
    pub(super) fn poll_verdict(&self, cx: &mut Context<'_>) -> Poll<V> {
        if self.state.load(Ordering::Acquire) != ANSWERED {
            self.waker.register(cx.waker());
            if self.state.load(Ordering::Acquire) != ANSWERED {
                return Poll::Pending;
            }
        }
        match self.verdict.lock().take() {
            Some(verdict) => Poll::Ready(verdict),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn claim_and_take_back_exclude_each_other() {
        let slot = Slot::<u32>::new();
        assert!(slot.claim());
        assert!(!slot.take_back(), "claimed: the verdict is coming");
        assert!(slot.unclaim(), "put back in the queue");
        assert!(slot.take_back());
        assert!(!slot.claim(), "taken back: never dispatched");
        assert!(!slot.unclaim());
        assert_eq!(slot.leave(), Left::Gone);
    }

    #[test]
    fn a_verdict_for_a_submitter_that_left_is_dropped() {
        let slot = Slot::<Arc<()>>::new();
        assert!(slot.claim());
        assert_eq!(slot.leave(), Left::Claimed);
        let verdict = Arc::new(());
        slot.answer(verdict.clone());
        assert_eq!(Arc::strong_count(&verdict), 1, "not kept in the slot");
    }

    /// Many rounds of a dispatcher and a submitter racing for the same
    /// request: exactly one wins each time.
    #[test]
    fn exactly_one_side_wins_the_race() {
        let (claimed, taken) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        for _ in 0..2_000 {
            let slot = Arc::new(Slot::<u32>::new());
            let dispatcher = {
                let (slot, claimed) = (slot.clone(), claimed.clone());
                std::thread::spawn(move || {
                    if slot.claim() {
                        claimed.fetch_add(1, Ordering::Relaxed);
                        slot.answer(1);
                    }
                })
            };
            let won = slot.take_back();
            dispatcher.join().unwrap();
            if won {
                taken.fetch_add(1, Ordering::Relaxed);
                assert!(slot.verdict.lock().is_none(), "taken back yet answered");
            } else {
                assert_eq!(*slot.verdict.lock(), Some(1), "claimed yet unanswered");
            }
        }
        assert_eq!(
            claimed.load(Ordering::Relaxed) + taken.load(Ordering::Relaxed),
            2_000
        );
    }
}
