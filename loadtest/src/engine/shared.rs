//! The state the main thread and every generator thread share: the run's phase, the current
//! step's closed-loop window, the publishers done with it, and per channel its sequence numbers
//! (next to publish, where the step and the round began), round deliveries and their highest
//! latency, and how many of its subscribers are live and still connected. Atomics, read and written without a lock, and per channel a `Notify` that
//! wakes its closed-loop round task.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};
use std::time::Instant;

use tokio::sync::Notify;

pub(super) const PH_CONNECT: u8 = 0;
pub(super) const PH_WARMUP: u8 = 1;
pub(super) const PH_RUN: u8 = 2;

/// Per-channel state shared between threads.
#[derive(Debug)]
pub(super) struct Chan {
    /// Next sequence number to publish (written by the channel's publisher only).
    pub(super) next_seq: AtomicU64,
    /// First sequence number of the current step (u64::MAX before the first step).
    pub(super) measure_start: AtomicU64,
    /// First sequence number of the current closed-loop round.
    pub(super) round_start: AtomicU64,
    /// Deliveries of the current round.
    pub(super) got: AtomicU64,
    /// The highest latency (ns) of the current round's deliveries so far: once every subscriber
    /// has the round, its last receiver's.
    pub(super) round_max_ns: AtomicU64,
    /// Measured subscribers that have received at least one message.
    pub(super) live: AtomicU64,
    /// Measured subscribers still connected.
    pub(super) subs: AtomicU64,
    /// Wakes the channel's round task.
    pub(super) notify: Notify,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) epoch: Instant,
    pub(super) phase: AtomicU8,
    /// Closed-loop window of the current step (0: not closed loop). Set by the main thread
    /// before any thread starts the step, so no receiver misses a round's first deliveries.
    pub(super) window: AtomicU64,
    /// The current step is closed loop (receivers count each round's deliveries).
    pub(super) closed_loop: AtomicBool,
    /// Publishers that have finished the current step's load on their own (broadcasts: after
    /// their count), so the main thread can end the step early.
    pub(super) finished: AtomicU64,
    pub(super) chans: Vec<Chan>,
}

impl Shared {
    pub(super) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}
