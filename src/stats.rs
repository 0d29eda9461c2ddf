//! Counters and snapshots.
//!
//! Shards count deliveries in plain locals and add them here once per batch, so the hot path
//! does not bounce a shared cache line between cores on every frame.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// A snapshot of a hub's counters, from [`Hub::stats`](crate::Hub::stats).
///
/// Counts since the hub was created; gauges (clients, channels, queued bytes, connection tasks)
/// as they are now. Counters are read one by one without a lock, so a snapshot taken under
/// load may be off by what happened while it was read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HubStats {
    /// Clients connected now.
    pub clients: usize,
    /// Channels with at least one subscriber now.
    pub channels: usize,
    /// Messages published: every `send_*`, `broadcast` and permitted client `publish`,
    /// counted once however many clients it reaches.
    pub published: u64,
    /// Frames handed to clients' connections (written, or queued to be written).
    pub delivered: u64,
    /// Frames that a client was meant to get and did not: discarded by the slow-consumer
    /// policy, queued to a client that was closing, or refused by a shard over its backlog.
    pub dropped: u64,
    /// Clients closed with 4000 as slow consumers.
    pub slow_consumer_disconnects: u64,
    /// Bytes waiting in clients' outbound queues now, for clients that are not keeping up.
    pub queued_bytes: u64,
    /// Connection tasks alive now: equal to `clients` when idle, and back to zero after
    /// shutdown.
    pub connection_tasks: usize,
    /// Upgrades refused: 401, 403 and 503 answers.
    pub upgrades_refused: u64,
    /// Publishes a shard refused because its inbox held more than
    /// [`SHARD_BACKLOG_BYTES`](crate::SHARD_BACKLOG_BYTES) of frames (counted once per shard).
    pub backlog_refused: u64,
    /// Clients per shard, indexed by shard.
    pub shard_clients: Vec<usize>,
    /// Shards writing to their clients with io_uring now (cargo feature `io-uring`, Linux),
    /// the others with `send(2)`. 0 without the feature, where the kernel refuses io_uring,
    /// before the shards start and after shutdown; a shard whose ring fails goes back to
    /// `send(2)` for good and stops counting.
    pub io_uring_shards: usize,
    /// The broker's counters, when the hub has one (several nodes).
    pub broker: Option<crate::BrokerStats>,
}

/// The hub's shared counters.
pub(crate) struct Counters {
    pub(crate) clients: AtomicUsize,
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) slow_consumer_disconnects: AtomicU64,
    pub(crate) queued_bytes: AtomicU64,
    pub(crate) connection_tasks: AtomicUsize,
    pub(crate) upgrades_refused: AtomicU64,
    pub(crate) backlog_refused: AtomicU64,
    pub(crate) shard_clients: Box<[AtomicUsize]>,
    /// Shared with each shard's ring, which counts itself while it works (`uring.rs`).
    pub(crate) io_uring_shards: Arc<AtomicUsize>,
}

impl Counters {
    pub(crate) fn new(shards: usize) -> Self {
        Counters {
            clients: AtomicUsize::new(0),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            slow_consumer_disconnects: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            connection_tasks: AtomicUsize::new(0),
            upgrades_refused: AtomicU64::new(0),
            backlog_refused: AtomicU64::new(0),
            shard_clients: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            io_uring_shards: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub(crate) fn snapshot(&self, channels: usize) -> HubStats {
        HubStats {
            clients: self.clients.load(Relaxed),
            channels,
            published: self.published.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            slow_consumer_disconnects: self.slow_consumer_disconnects.load(Relaxed),
            queued_bytes: self.queued_bytes.load(Relaxed),
            connection_tasks: self.connection_tasks.load(Relaxed),
            upgrades_refused: self.upgrades_refused.load(Relaxed),
            backlog_refused: self.backlog_refused.load(Relaxed),
            shard_clients: self.shard_clients.iter().map(|c| c.load(Relaxed)).collect(),
            io_uring_shards: self.io_uring_shards.load(Relaxed),
            broker: None,
        }
    }
}
