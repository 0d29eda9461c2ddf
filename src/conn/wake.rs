//! How a shard tells a connection's session that its outbound side needs it (the socket
//! filled up, or the connection began closing): a flag and a waker, 32 bytes in the `Conn`.
//! The waker is the parked session itself while the client is idle (`idle.rs`), or the task
//! that serves a busy one.
//!
//! `tokio::sync::Notify` does the same job, but waiting on it takes a 64-byte `Notified`
//! future, and a parked session has no future to keep one in. The session's step polls this
//! and the socket's read readiness
//! ([`TcpStream::poll_read_ready`](tokio::net::TcpStream::poll_read_ready), whose waker lives
//! in tokio's own per-socket state) with its own waker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

/// A one-shot wake-up that is remembered until taken: a `wake` with no task waiting makes
/// the next `poll_woken` ready at once, like a `Notify` permit.
#[derive(Default)]
pub(crate) struct Wake {
    woken: AtomicBool,
    waker: AtomicWaker,
}

impl Wake {
    /// Wakes the task waiting in [`poll_woken`](Self::poll_woken), or the next one to call it.
    pub(crate) fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready, once per [`wake`](Self::wake), once woken; registers the task's waker otherwise.
    pub(crate) fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Register first, then look: a `wake` between the two is seen by the look, and one
        // after it wakes the registered waker.
        self.waker.register(cx.waker());
        if self.woken.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits for a wake-up.
    pub(crate) async fn woken(&self) {
        std::future::poll_fn(|cx| self.poll_woken(cx)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_wake_before_the_wait_is_kept() {
        let wake = Wake::default();
        wake.wake();
        tokio::time::timeout(Duration::from_secs(1), wake.woken())
            .await
            .expect("the earlier wake is seen");
        // Taken: the next wait blocks.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), wake.woken())
                .await
                .is_err()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wake_from_another_thread_wakes_the_waiting_task() {
        let wake = Arc::new(Wake::default());
        for _ in 0..1_000 {
            let waiter = tokio::spawn({
                let wake = Arc::clone(&wake);
                async move { wake.woken().await }
            });
            tokio::task::yield_now().await;
            let waker = Arc::clone(&wake);
            std::thread::spawn(move || waker.wake());
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("no wake-up is lost")
                .unwrap();
        }
    }
}
