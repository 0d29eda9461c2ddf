//! Where idle connections wait: with no task of their own.
//!
//! A tokio task costs a connection more than anything else it holds: the task's memory is
//! aligned to 128 bytes and sized for its largest state, over 500 bytes with the allocator's
//! share, for a connection that mostly waits for nothing. So a TCP connection with nothing to
//! do is *parked* here instead: one [`Runner`] per shard keeps the parked connections of that
//! shard, and a single task per runner runs a connection's step whenever its waker fires (its
//! socket has bytes to read, or its outbound side needs it). The waker is the parked
//! connection itself ([`Parked`] is reached through an `Arc`), registered with tokio's
//! per-socket state and with the connection's [`Wake`](super::wake::Wake) by the step.
//!
//! A step that finds more than reading to do (the client is throttled, behind, closing, or
//! waits for Redis) hands the connection to a task of its own, which parks it again once it
//! is idle. The session logic is a layer up (`http/session.rs`); this is only the runner.
//!
//! # Teardown
//!
//! A parked connection and its socket refer to each other (the socket's readiness keeps the
//! waker, the parked connection keeps the socket's `Conn`). The cycle ends with the
//! connection's session, which takes itself out of its runner
//! ([`Runner::remove`]). If the runner's task is dropped first (its runtime shut down), every
//! connection still registered is [abandoned](Parked::abandon), which ends the cycle too.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;

/// Steps per turn of a runner's task before it yields, so one runner cannot hold a worker
/// thread while other tasks (the shards among them) wait.
const STEPS_PER_TURN: usize = 256;

/// And at most this long: a turn ends after the step that crosses it (a step reads at most
/// `READS_PER_WAKE` times, and runs the application's policies for what it read).
const TURN_TIME: Duration = Duration::from_millis(1);

/// A connection as its runner sees it.
pub(crate) trait Parked: Send + Sync {
    /// Runs the connection's step: read what it has, and register its waker again (or hand
    /// it to a task). Called by the runner's task only, once per [`Runner::schedule`]. Must
    /// not panic: a panic would end the runner's task, and abandon every connection of the
    /// shard.
    fn step(self: Arc<Self>);

    /// The runner's task is gone (with its runtime): let go of the session's state, so that
    /// the connection and its socket are freed, and forget that a step was queued.
    fn abandon(&self);
}

/// The parked connections of one shard, and the queue of those whose waker fired.
#[derive(Default)]
pub(crate) struct Runner {
    /// Scheduled, in the order their wakers fired.
    ready: Mutex<Vec<Arc<dyn Parked>>>,
    /// Every connection registered, parked or in a task of its own: what is abandoned if the
    /// runner's task is dropped.
    registered: Mutex<Registry>,
    /// The runner's task.
    waker: AtomicWaker,
    /// Its task is alive (spawned and not dropped).
    running: AtomicBool,
    /// The hub is gone: the task ends once nothing is scheduled.
    stopped: AtomicBool,
}

/// A slab of registered connections: a slot per connection, reused. It keeps the size of
/// the largest crowd it held (16 bytes a slot): giving it back when the last connection left
/// made every wave of clients grow it again, and the reallocations fragmented the heap
/// (`tests/churn.rs`'s untrimmed RSS growth went over 4 MiB in 4 of 12 runs with them, 1 of
/// 8 without).
#[derive(Default)]
struct Registry {
    slots: Vec<Option<Arc<dyn Parked>>>,
    free: Vec<u32>,
}

impl Runner {
    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        // Each list is consistent between statements: keep serving after a panic elsewhere.
        mutex
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a connection for the life of its session; its slot, for [`remove`].
    /// Starts the runner's task on the current runtime if it is not running.
    ///
    /// [`remove`]: Self::remove
    pub(crate) fn register(self: &Arc<Self>, parked: Arc<dyn Parked>) -> u32 {
        let slot = {
            let mut registry = Self::lock(&self.registered);
            match registry.free.pop() {
                Some(slot) => {
                    registry.slots[slot as usize] = Some(parked);
                    slot
                }
                None => {
                    registry.slots.push(Some(parked));
                    (registry.slots.len() - 1) as u32
                }
            }
        };
        self.ensure_running();
        slot
    }

    /// Spawns the runner's task on the current runtime unless it runs. The guard that
    /// abandons the registered connections is made outside the task's future, so that it
    /// runs even if the task is dropped before its first poll (a runtime shutting down).
    /// Outside any runtime, nothing could run the steps: the connections are abandoned.
    fn ensure_running(self: &Arc<Self>) {
        if self.running.load(Ordering::Acquire) || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let abandon = AbandonOnDrop(Arc::clone(self));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(tokio::task::unconstrained(async move {
                Arc::clone(&abandon.0).run().await;
                drop(abandon);
            }));
        }
    }

    /// The session of `parked`, registered in `slot`, ended. (Once abandoned, its slot may
    /// hold another connection: then nothing is removed.)
    pub(crate) fn remove(&self, slot: u32, parked: &dyn Parked) {
        let mut registry = Self::lock(&self.registered);
        if let Some(entry) = registry.slots.get_mut(slot as usize) {
            let same = |held: &Arc<dyn Parked>| std::ptr::addr_eq(Arc::as_ptr(held), parked);
            if entry.as_ref().is_some_and(same) {
                *entry = None;
                registry.free.push(slot);
            }
        }
    }

    /// Queues a step of `parked` (its waker fired). The caller makes sure a connection is
    /// queued once until its step runs. Restarts the runner's task if it was dropped.
    pub(crate) fn schedule(self: &Arc<Self>, parked: Arc<dyn Parked>) {
        Self::lock(&self.ready).push(parked);
        self.waker.wake();
        self.ensure_running();
    }

    /// The hub is gone: the task ends.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// The runner's task: the steps of scheduled connections, in turns of at most
    /// [`STEPS_PER_TURN`] and about [`TURN_TIME`]. Runs `unconstrained`: a turn's steps poll
    /// many sockets, and tokio's per-task budget would otherwise make the later ones look not
    /// ready.
    async fn run(self: Arc<Self>) {
        let mut batch: Vec<Arc<dyn Parked>> = Vec::new();
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            if batch.is_empty() {
                std::mem::swap(&mut batch, &mut *Self::lock(&self.ready));
                // Oldest first: the batch is drained from its end.
                batch.reverse();
            }
            if batch.is_empty() {
                if self.stopped.load(Ordering::Acquire) {
                    return Poll::Ready(());
                }
                return Poll::Pending;
            }
            let began = Instant::now();
            for _ in 0..STEPS_PER_TURN {
                let Some(parked) = batch.pop() else { break };
                parked.step();
                if began.elapsed() >= TURN_TIME {
                    break;
                }
            }
            // Yield between turns, whether or not more is queued: the next poll picks it up.
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;
    }
}

/// Drops with the runner's task: by its end (the hub is gone) or with its runtime.
struct AbandonOnDrop(Arc<Runner>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        let runner = &self.0;
        let registered = std::mem::take(&mut *Runner::lock(&runner.registered));
        Runner::lock(&runner.ready).clear();
        for parked in registered.slots.into_iter().flatten() {
            parked.abandon();
        }
        runner.running.store(false, Ordering::Release);
    }
}
