//! A wake-up signal for the one dispatcher task: cheaper than
//! `tokio::sync::Notify` when there is a single waiter.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

/// Set by anyone, awaited by one task. A signal sent while nobody waits is
/// kept until the next wait, so none is lost.
///
/// A signal already pending is not sent again: with many senders, most
/// find the flag set and only read it (no write to a shared cache line).
/// That is sound because both sides fence: a sender's changes before its
/// fence, and the waiter's reads after its wait returns, are ordered
/// around the flag, so a sender that sees the flag still set knows the
/// waiter has yet to consume it and will see the changes.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    /// Wakes the waiter (or the next wait).
    pub(crate) fn notify(&self) {
        fence(Ordering::SeqCst);
        self.notify_fenced();
    }

    /// [`notify`](Self::notify) for a caller that just issued
    /// `fence(SeqCst)` after its changes.
    pub(crate) fn notify_fenced(&self) {
        if self.set.load(Ordering::Relaxed) {
            return;
        }
        if !self.set.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.consume() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.consume() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Takes a pending signal; the fence orders the flag's reset before
    /// whatever the waiter reads next.
    fn consume(&self) -> bool {
        if self.set.swap(false, Ordering::AcqRel) {
            fence(Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Waits for a signal sent since the last wait returned.
    pub(crate) async fn wait(&self) {
        poll_fn(|cx| self.poll_wait(cx)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_signal_sent_before_the_wait_is_kept() {
        let signal = Signal::default();
        signal.notify();
        signal.notify();
        tokio::time::timeout(Duration::from_secs(1), signal.wait())
            .await
            .expect("kept");
        assert!(
            tokio::time::timeout(Duration::from_secs(1), signal.wait())
                .await
                .is_err(),
            "consumed by the first wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_a_waiting_task() {
        let signal = Arc::new(Signal::default());
        let waiter = tokio::spawn({
            let signal = signal.clone();
            async move { signal.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        signal.notify();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
