//! Per-channel history: offsets, epochs, retained publications and the replay ranges pinned
//! from them (PROTOCOL.md, "History and recovery").
//!
//! A pure data layer: no IO, no runtime, no knowledge of shards or sockets; the caller passes
//! the clock (`now_ms`, milliseconds of any monotonic-enough clock), so it is tested without
//! waiting.
//!
//! # How the hub uses it
//!
//! - **Publish** (a channel with history): `store.with_channel(name, now_ms, |h| …)` (or
//!   `store.channel(..)` and `lock()`) makes the caller the channel's sequencer: under the
//!   lock it reads `next_offset()` and `epoch()`, encodes the frame with them, hands it to
//!   the shards and, only if they all took it, `append(frame, now_ms)`. Then, unlocked,
//!   `store.enforce_budget()`.
//! - **Subscribe** with or without `since`: under the lock, `pin_after(since, now_ms)` gives
//!   the acknowledgement's epoch, `latest` and `recovered`, and the [`Replay`](replay::Replay)
//!   to write before the channel's live frames.
//! - **Housekeeping**: `store.sweep(now_ms, has_subscribers)` every second or so trims
//!   expired publications and forgets idle channels' counters.
//!
//! # Memory
//!
//! A retained publication counts its frame's bytes plus [`block::ENTRY_OVERHEAD`] (80
//! bytes: its entry, 40; its place in the memory cap's publish-order queue, 16, up to twice
//! between compactions; its block's header spread over 64 entries, 2; the sizes are checked
//! by a test). With 200-byte frames the default cap of 256 MiB holds about 960,000
//! publications. Not counted: each channel's fixed part (its map entry, lock, epoch and
//! struct, about 250 bytes) and the open tail's spare `VecDeque` capacity.
//!
//! A pinned replay holds one `Arc` per 64 publications (8 bytes each) and up to 63 frame
//! clones (32 bytes each), about 3.3 KB for 10,000 publications; its frames cost nothing
//! more while the history retains them. Blocks the history trims while a replay holds them
//! are reported by `detached_memory` until the replay lets go of them.
//!
//! # Lock order
//!
//! Bucket of the store's map → channel lock → publish-order queue, and never the other way:
//!
//! - `append` takes the queue's lock under its channel's lock;
//! - `enforce_budget` pops from the queue (releasing it) before it locks the channel of what
//!   it popped, and holds one channel lock at a time: so it must be called with no channel
//!   lock held;
//! - `sweep` holds a bucket's write lock and only *tries* each channel's lock, skipping busy
//!   channels, so a caller that holds a channel lock while looking up another channel never
//!   waits on a sweep that waits on it.

mod block;
mod epoch;
mod ledger;
#[cfg(any(test, feature = "test-support"))]
#[cfg_attr(not(feature = "test-support"), allow(unreachable_pub))]
pub(crate) mod model;
mod policy;
mod replay;
mod ring;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub use policy::{HistoryPolicy, HistoryRules};
pub(crate) use replay::Replay;
pub(crate) use ring::{ChannelHistory, ChannelLock};

pub(crate) use epoch::EpochSource;
use ledger::{Ledger, TrimCause};

/// Where a publication is in its channel's history: what [`Hub::publish`] returns and a
/// client's `since` names.
///
/// [`Hub::publish`]: crate::Hub::publish
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamPosition {
    /// 1 for the channel's first publication, then one more for each, without gaps.
    pub offset: u64,
    /// The channel's epoch: offsets are comparable only within one epoch (PROTOCOL.md,
    /// "History and recovery").
    pub epoch: Arc<str>,
}

/// Publications read from a channel's history by [`Hub::history`].
///
/// [`Hub::history`]: crate::Hub::history
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// The channel's epoch.
    pub epoch: Arc<str>,
    /// The channel's latest offset (0 before its first publication).
    pub latest: u64,
    /// The history still holds every offset after the `since` asked for (it may hold more
    /// than the page's `limit` returned).
    pub recovered: bool,
    /// Oldest first.
    pub publications: Vec<Publication>,
}

/// One publication of a [`HistoryPage`].
#[derive(Debug, Clone)]
pub struct Publication {
    /// Its offset in the channel.
    pub offset: u64,
    /// The JSON text its subscribers received (with its `offset` and `epoch` fields).
    pub message: bytes::Bytes,
}

/// The default hub-wide cap on the memory all channel histories hold together: 256 MiB.
///
/// Each retained publication counts its frame's bytes plus 80 bytes of bookkeeping, so with
/// 200-byte frames this holds about 960,000 publications. When the histories reach the cap,
/// the oldest publications of all channels are trimmed first, whatever their own policies
/// allow.
pub const HISTORY_MEMORY_BUDGET: usize = 256 * 1024 * 1024;

/// 64 buckets, as the channel directory: publishers of different channels rarely meet on a
/// lock, at little memory.
const BUCKETS: usize = 64;

type Bucket = RwLock<HashMap<Box<str>, Arc<ChannelLock>, ahash::RandomState>>;

/// The histories of every channel that has one, the epochs they are given and the memory
/// they hold together.
pub(crate) struct HistoryStore {
    rules: HistoryRules,
    memory_budget: usize,
    epochs: EpochSource,
    ledger: Arc<Ledger>,
    hasher: ahash::RandomState,
    buckets: Box<[Bucket]>,
}

/// The store's figures, for `HubStats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HistoryStats {
    /// Channels with a history (counter and epoch), whether or not it holds publications.
    pub(crate) channels: usize,
    /// Publications retained in all histories.
    pub(crate) retained: usize,
    /// Bytes retained publications count for ([`HistoryStore::memory`]).
    pub(crate) memory: usize,
    /// Bytes trimmed but still held by replays ([`HistoryStore::detached_memory`]).
    pub(crate) detached_memory: usize,
    /// Publications trimmed because their channel held `max_publications`.
    pub(crate) trimmed_by_count: u64,
    /// Publications trimmed because they were older than their channel's `max_age`.
    pub(crate) trimmed_by_age: u64,
    /// Publications trimmed because the histories together reached the memory cap.
    pub(crate) trimmed_by_cap: u64,
}

impl HistoryStore {
    /// A store for the channels `rules` give a history, all of them together holding at most
    /// `memory_budget` bytes (normally [`HISTORY_MEMORY_BUDGET`]).
    pub(crate) fn new(rules: HistoryRules, memory_budget: usize) -> Self {
        HistoryStore {
            rules,
            memory_budget,
            epochs: EpochSource::new(),
            ledger: Arc::default(),
            hasher: ahash::RandomState::new(),
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
        }
    }

    /// No channel has a history: the hub can skip every lookup.
    pub(crate) fn is_disabled(&self) -> bool {
        self.rules.is_empty()
    }

    /// The policy the rules give `channel`, if any.
    pub(crate) fn policy_for(&self, channel: &str) -> Option<HistoryPolicy> {
        self.rules.policy_for(channel)
    }

    fn bucket(&self, channel: &str) -> &Bucket {
        &self.buckets[self.hasher.hash_one(channel) as usize % BUCKETS]
    }

    /// The history of `channel`, created (with a new epoch, idle since `now_ms`) if a rule
    /// gives it one and it has none yet; `None` when no rule does.
    ///
    /// After locking it, check [`ChannelHistory::is_removed`]: a sweep may have removed it
    /// in between (then look it up again); [`with_channel`](Self::with_channel) does this.
    pub(crate) fn channel(&self, channel: &str, now_ms: u64) -> Option<Arc<ChannelLock>> {
        if let Some(found) = self.existing(channel) {
            return Some(found);
        }
        let policy = self.rules.policy_for(channel)?;
        let mut bucket = write(self.bucket(channel));
        let lock = bucket.entry(channel.into()).or_insert_with(|| {
            ChannelLock::new(policy, self.epochs.next(), Arc::clone(&self.ledger), now_ms)
        });
        Some(Arc::clone(lock))
    }

    /// The history of `channel` if it has one now, without creating it.
    pub(crate) fn existing(&self, channel: &str) -> Option<Arc<ChannelLock>> {
        read(self.bucket(channel)).get(channel).cloned()
    }

    /// Runs `f` on `channel`'s history under its lock (creating the history as
    /// [`channel`](Self::channel) does); `None` when the channel has no history. Never runs it
    /// on a history a sweep removed.
    pub(crate) fn with_channel<R>(
        &self,
        channel: &str,
        now_ms: u64,
        f: impl FnOnce(&mut ChannelHistory) -> R,
    ) -> Option<R> {
        loop {
            let lock = self.channel(channel, now_ms)?;
            let mut history = lock.lock();
            if !history.is_removed() {
                return Some(f(&mut history));
            }
        }
    }

    /// Trims the oldest publications of all channels while the histories hold more than the
    /// memory budget; returns how many went. Call it after a publish, with no channel lock
    /// held (it takes channels' locks, one at a time).
    pub(crate) fn enforce_budget(&self) -> usize {
        let mut trimmed = 0;
        while self.ledger.memory() > self.memory_budget {
            let Some((channel, offset)) = self.ledger.pop_oldest() else {
                break;
            };
            trimmed += channel.lock().trim_through(offset, TrimCause::Cap);
        }
        trimmed
    }

    /// Trims every history's expired publications and removes the histories that are empty,
    /// idle for their `max_age` and without subscribers (`has_subscribers(channel)`); returns
    /// how many it removed. Their channels' next history starts at offset 1 in a new epoch.
    ///
    /// A channel whose lock is held at the time is skipped (it is in use). `has_subscribers`
    /// is called under the bucket's and the channel's locks: it must not touch this store.
    pub(crate) fn sweep(&self, now_ms: u64, has_subscribers: impl Fn(&str) -> bool) -> usize {
        let mut removed = 0;
        for bucket in self.buckets.iter() {
            write(bucket).retain(|name, lock| {
                let Some(mut history) = lock.try_lock() else {
                    return true;
                };
                let gone = history.sweep(now_ms, has_subscribers(name));
                removed += usize::from(gone);
                !gone
            });
        }
        removed
    }

    /// Bytes the histories hold: every retained publication's frame plus
    /// [`ENTRY_OVERHEAD`](block::ENTRY_OVERHEAD).
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn memory(&self) -> usize {
        self.ledger.memory()
    }

    /// Bytes of publications trimmed from their histories that replays still hold: the hub
    /// counts them against its queue-memory budget. 0 when no replay is alive.
    pub(crate) fn detached_memory(&self) -> usize {
        self.ledger.detached()
    }

    /// Channels with a history.
    pub(crate) fn channel_count(&self) -> usize {
        self.buckets.iter().map(|b| read(b).len()).sum()
    }

    pub(crate) fn stats(&self) -> HistoryStats {
        HistoryStats {
            channels: self.channel_count(),
            retained: self.ledger.retained(),
            memory: self.ledger.memory(),
            detached_memory: self.ledger.detached(),
            trimmed_by_count: self.ledger.trimmed(TrimCause::Count),
            trimmed_by_age: self.ledger.trimmed(TrimCause::Age),
            trimmed_by_cap: self.ledger.trimmed(TrimCause::Cap),
        }
    }

    /// Entries in the memory cap's publish-order queue, trimmed ones included.
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn publish_order_len(&self) -> usize {
        self.ledger.publish_order_len()
    }
}

// A panic while holding a bucket lock cannot leave a map half-updated (each update is one
// insert, or one retain whose closure only decides), so a poisoned lock is safe to keep using.
fn read(
    bucket: &Bucket,
) -> std::sync::RwLockReadGuard<'_, HashMap<Box<str>, Arc<ChannelLock>, ahash::RandomState>> {
    bucket
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write(
    bucket: &Bucket,
) -> std::sync::RwLockWriteGuard<'_, HashMap<Box<str>, Arc<ChannelLock>, ahash::RandomState>> {
    bucket
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
