//! The store-wide accounting every channel history reports to: memory, detached memory,
//! retained publications, trims by cause, and the publish order the memory cap trims in.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::ring::ChannelLock;

/// Entries the publish-order queue may hold beyond twice the retained publications before it
/// is compacted: keeps a compaction's cost amortized over as many pushes as it removes.
const COMPACTION_SLACK: usize = 1024;

/// Why a publication left its history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrimCause {
    /// The channel held `max_publications` already.
    Count,
    /// Older than the channel's `max_age`.
    Age,
    /// The hub-wide memory cap: the oldest publication of all channels went.
    Cap,
}

/// One publication in the order of all channels' publications: its channel and offset.
pub(crate) type PublishOrder = (Arc<ChannelLock>, u64);

#[derive(Default)]
pub(crate) struct Ledger {
    /// Bytes retained publications count for (frame + `ENTRY_OVERHEAD` each).
    memory: AtomicUsize,
    /// Bytes of blocks trimmed from their rings that replays still hold.
    detached: AtomicUsize,
    retained: AtomicUsize,
    trimmed_by_count: AtomicU64,
    trimmed_by_age: AtomicU64,
    trimmed_by_cap: AtomicU64,
    /// Every retained publication of every channel, oldest first, with publications already
    /// trimmed by count or age mixed in until they reach the front or a compaction removes
    /// them (`is_stale`). Pushed under the channel's lock, so each channel's offsets are in
    /// order; popped without any channel lock held (see `HistoryStore::enforce_budget`).
    publish_order: Mutex<VecDeque<PublishOrder>>,
}

impl Ledger {
    /// A publication was appended: counts it and queues it for the memory cap. Called with
    /// `channel`'s lock held (which keeps its offsets in order here); takes the queue's lock
    /// after it (the lock order: channel, then queue).
    pub(crate) fn record_append(&self, channel: Arc<ChannelLock>, offset: u64, cost: usize) {
        self.memory.fetch_add(cost, Ordering::Relaxed);
        let retained = self.retained.fetch_add(1, Ordering::Relaxed) + 1;
        let mut order = self.order();
        order.push_back((channel, offset));
        if order.len() > 2 * retained + COMPACTION_SLACK {
            // Publications trimmed by count or age wait here until the front reaches them;
            // without this, a busy channel with a short history behind a slow one's old
            // publication would grow the queue forever. Reads only atomics: no channel lock.
            order.retain(|(channel, offset)| !channel.is_trimmed(*offset));
        }
    }

    /// A publication left its history.
    pub(crate) fn record_trim(&self, cost: usize, cause: TrimCause) {
        self.memory.fetch_sub(cost, Ordering::Relaxed);
        self.retained.fetch_sub(1, Ordering::Relaxed);
        let counter = match cause {
            TrimCause::Count => &self.trimmed_by_count,
            TrimCause::Age => &self.trimmed_by_age,
            TrimCause::Cap => &self.trimmed_by_cap,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The oldest publication still retained, taken off the queue (those already trimmed in
    /// front of it are dropped on the way). The queue's lock is released on return.
    pub(crate) fn pop_oldest(&self) -> Option<PublishOrder> {
        let mut order = self.order();
        while let Some((channel, offset)) = order.pop_front() {
            if !channel.is_trimmed(offset) {
                return Some((channel, offset));
            }
        }
        None
    }

    pub(crate) fn add_detached(&self, bytes: usize) {
        self.detached.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn remove_detached(&self, bytes: usize) {
        self.detached.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub(crate) fn memory(&self) -> usize {
        self.memory.load(Ordering::Relaxed)
    }

    pub(crate) fn detached(&self) -> usize {
        self.detached.load(Ordering::Relaxed)
    }

    pub(crate) fn retained(&self) -> usize {
        self.retained.load(Ordering::Relaxed)
    }

    pub(crate) fn trimmed(&self, cause: TrimCause) -> u64 {
        match cause {
            TrimCause::Count => &self.trimmed_by_count,
            TrimCause::Age => &self.trimmed_by_age,
            TrimCause::Cap => &self.trimmed_by_cap,
        }
        .load(Ordering::Relaxed)
    }

    /// Length of the publish-order queue, stale entries included (tests check its bound).
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn publish_order_len(&self) -> usize {
        self.order().len()
    }

    // A panic while holding the queue's lock leaves it whole (each change is one push, pop or
    // retain), so a poisoned lock is safe to keep using.
    fn order(&self) -> MutexGuard<'_, VecDeque<PublishOrder>> {
        self.publish_order
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
