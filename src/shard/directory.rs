//! The channel directory: for each channel with subscribers, which shards have them and how
//! many there are in all.
//!
//! A publish reads it to wake only the shards that have subscribers (a 64-bit mask), so a
//! message for a channel with three subscribers does not wake sixteen shards. It is split into
//! buckets, each behind its own `RwLock`, so publishes (readers) on different channels never
//! meet and no lock is global. Shards write to it only when their local subscriber count for a
//! channel goes from 0 to 1 or back; other subscribes only touch the entry's atomic counter.
//!
//! Ordering: a shard sets its bit before it acknowledges a subscribe, and a publish reads the
//! mask before it enqueues to the shard, so a publish that starts after the acknowledgement
//! reaches the new subscriber.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::client::ChannelSnapshot;

/// 64 buckets keep write contention between shards low without costing much memory.
const BUCKETS: usize = 64;

/// One channel that has subscribers somewhere.
#[derive(Debug)]
pub(crate) struct ChannelEntry {
    pub(crate) name: Box<str>,
    /// Bit k set: shard k has subscribers.
    shards: AtomicU64,
    subscribers: AtomicUsize,
}

impl ChannelEntry {
    pub(crate) fn shard_mask(&self) -> u64 {
        self.shards.load(Ordering::Acquire)
    }

    /// One more subscriber on a shard that already has some (its bit is set).
    pub(crate) fn add_subscriber(&self) {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
    }

    /// One fewer, on a shard that keeps at least one.
    pub(crate) fn remove_subscriber(&self) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Told when a channel gains its first subscriber on this node and loses its last. The hub
/// installs one that tells its broker; the directory knows nothing of brokers.
///
/// Called without any of the directory's locks held, so an implementation may read the
/// directory back (see `Broker::channel_active` for the ordering this gives).
pub(crate) trait ChannelActivity: Send + Sync {
    /// `channel` has its first subscriber on this node.
    fn active(&self, channel: &str);
    /// `channel`'s last subscriber on this node has gone.
    fn inactive(&self, channel: &str);
}

type Bucket = RwLock<HashMap<Box<str>, Arc<ChannelEntry>, ahash::RandomState>>;

pub(crate) struct ChannelDirectory {
    /// Told when a channel gains its first subscriber on this node and loses its last.
    activity: Option<Arc<dyn ChannelActivity>>,
    hasher: ahash::RandomState,
    buckets: Box<[Bucket]>,
    count: AtomicUsize,
}

impl ChannelDirectory {
    pub(crate) fn new(activity: Option<Arc<dyn ChannelActivity>>) -> Self {
        ChannelDirectory {
            activity,
            hasher: ahash::RandomState::new(),
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
            count: AtomicUsize::new(0),
        }
    }

    fn bucket(&self, channel: &str) -> &Bucket {
        &self.buckets[self.hasher.hash_one(channel) as usize % BUCKETS]
    }

    /// The entry of `channel`, if it has subscribers anywhere.
    pub(crate) fn get(&self, channel: &str) -> Option<Arc<ChannelEntry>> {
        read(self.bucket(channel)).get(channel).cloned()
    }

    /// Shard `shard` has its first subscriber to `channel`: sets its bit (creating the entry)
    /// and counts the subscriber. Returns the entry for the shard to keep.
    pub(crate) fn join(&self, channel: &str, shard: usize) -> Arc<ChannelEntry> {
        let mut created = false;
        let entry = {
            let mut bucket = write(self.bucket(channel));
            let entry = bucket.entry(channel.into()).or_insert_with(|| {
                created = true;
                self.count.fetch_add(1, Ordering::Relaxed);
                Arc::new(ChannelEntry {
                    name: channel.into(),
                    shards: AtomicU64::new(0),
                    subscribers: AtomicUsize::new(0),
                })
            });
            entry.shards.fetch_or(1 << shard, Ordering::Release);
            entry.subscribers.fetch_add(1, Ordering::Relaxed);
            Arc::clone(entry)
        };
        // After the bucket's lock is released: a broker may read the directory through
        // `Inbound`, which takes that lock. The broker reconciles with the directory, since
        // a `leave` that comes in between may tell it first (see `Broker::channel_active`).
        if created {
            if let Some(activity) = &self.activity {
                activity.active(channel);
            }
        }
        entry
    }

    /// Shard `shard` lost its last subscriber to `entry`'s channel: clears its bit, and removes
    /// the channel when no shard has subscribers left.
    pub(crate) fn leave(&self, entry: &ChannelEntry, shard: usize) {
        let removed = {
            let mut bucket = write(self.bucket(&entry.name));
            entry.subscribers.fetch_sub(1, Ordering::Relaxed);
            let left = entry.shards.fetch_and(!(1 << shard), Ordering::Release) & !(1 << shard);
            if left == 0 {
                bucket.remove(&entry.name);
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
            left == 0
        };
        // Outside the lock, as in `join`.
        if removed {
            if let Some(activity) = &self.activity {
                activity.inactive(&entry.name);
            }
        }
    }

    pub(crate) fn channel_count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub(crate) fn subscriber_count(&self, channel: &str) -> usize {
        self.get(channel)
            .map_or(0, |e| e.subscribers.load(Ordering::Relaxed))
    }

    pub(crate) fn snapshot(&self) -> Vec<ChannelSnapshot> {
        let mut channels = Vec::with_capacity(self.channel_count());
        for bucket in self.buckets.iter() {
            channels.extend(read(bucket).values().map(|e| ChannelSnapshot {
                name: e.name.to_string(),
                subscribers: e.subscribers.load(Ordering::Relaxed),
            }));
        }
        channels.sort_by(|a, b| a.name.cmp(&b.name));
        channels
    }
}

// A panic while holding a bucket lock cannot leave a map half-updated (each update is one
// insert or remove), so a poisoned lock is safe to keep using.
fn read(
    bucket: &Bucket,
) -> std::sync::RwLockReadGuard<'_, HashMap<Box<str>, Arc<ChannelEntry>, ahash::RandomState>> {
    bucket
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write(
    bucket: &Bucket,
) -> std::sync::RwLockWriteGuard<'_, HashMap<Box<str>, Arc<ChannelEntry>, ahash::RandomState>> {
    bucket
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_counts_follow_joins_and_leaves() {
        let dir = ChannelDirectory::new(None);
        assert!(dir.get("a").is_none());
        let e0 = dir.join("a", 0);
        e0.add_subscriber();
        let e3 = dir.join("a", 3);
        assert!(Arc::ptr_eq(&e0, &e3));
        assert_eq!(e0.shard_mask(), 0b1001);
        assert_eq!(dir.subscriber_count("a"), 3);
        assert_eq!(dir.channel_count(), 1);

        dir.leave(&e3, 3);
        assert_eq!(e0.shard_mask(), 0b0001);
        e0.remove_subscriber();
        dir.leave(&e0, 0);
        assert!(dir.get("a").is_none());
        assert_eq!(dir.channel_count(), 0);
        assert_eq!(dir.subscriber_count("a"), 0);
    }

    #[test]
    fn snapshot_lists_channels_by_name() {
        let dir = ChannelDirectory::new(None);
        for name in ["b", "a", "c"] {
            dir.join(name, 1);
        }
        let names: Vec<_> = dir.snapshot().into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
