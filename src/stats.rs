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
    /// Messages published: every `send_*`, `broadcast` and permitted client `publish` that
    /// was accepted (one refused for overload is in `backlog_refused` instead), counted once
    /// however many clients it reaches, none included.
    pub published: u64,
    /// Frames handed to clients' connections (written, or queued to be written).
    pub delivered: u64,
    /// Frames that a client was meant to get and did not, though they had reached its shard:
    /// discarded by the slow-consumer policy (the queue of a client cut with 4000, or the
    /// oldest frames under [`DropOldest`](crate::SlowConsumerPolicy::DropOldest)), queued to
    /// a client that was already closing, or still queued when a client's connection ended.
    /// Calls refused for overload are not here: they reached no shard (see
    /// [`backlog_refused`](Self::backlog_refused)).
    pub dropped: u64,
    /// Clients closed with 4000 as slow consumers, for any of the three reasons below:
    /// the sum of `queue_bound_disconnects`, `stalled_disconnects` and `budget_disconnects`.
    pub slow_consumer_disconnects: u64,
    /// Clients closed with 4000 because a frame took their queue over
    /// [`outbound_queue_bytes`](crate::HubConfigBuilder::outbound_queue_bytes).
    pub queue_bound_disconnects: u64,
    /// Clients closed with 4000 because, while behind, they read less than
    /// [`min_read_rate`](crate::HubConfigBuilder::min_read_rate) over a write timeout (a
    /// client that reads nothing at all is one of these).
    pub stalled_disconnects: u64,
    /// Clients closed with 4000 to bring the memory of all queues back under
    /// [`queue_memory_budget`](crate::HubConfigBuilder::queue_memory_budget), largest queues
    /// first.
    pub budget_disconnects: u64,
    /// Bytes waiting in clients' outbound queues now, summed over the queues: a frame queued
    /// for a thousand clients counts a thousand times. See `queued_memory_bytes` for the
    /// memory they hold.
    pub queued_bytes: u64,
    /// Memory held now by the frames waiting in clients' outbound queues: each frame counted
    /// once however many queues hold it (a shard's own copy of a frame counts once per
    /// shard). This is what [`queue_memory_budget`](crate::HubConfigBuilder::queue_memory_budget)
    /// bounds. Updated as the shards notice frames leave the queues: at each batch while
    /// some client is behind, and at least every keep-alive tick (a quarter of the
    /// heartbeat), so it may stay above zero for that long after the queues have drained.
    pub queued_memory_bytes: u64,
    /// Connection tasks alive now: equal to `clients` when idle, and back to zero after
    /// shutdown.
    pub connection_tasks: usize,
    /// Channel histories ([`HubConfigBuilder::channel_history`](crate::HubConfigBuilder::channel_history)):
    /// how many channels have one, what they retain, and what was trimmed.
    pub history: HistoryFigures,
    /// Upgrades refused: 401, 403 and 503 answers.
    pub upgrades_refused: u64,
    /// Connections to `wshub::tls::serve` (cargo feature `tls`) closed before any HTTP:
    /// their TLS handshake failed (a plain-text client on the TLS port, a bad or unsupported
    /// ClientHello, an unknown certificate) or did not finish within the handshake timeout.
    /// Always 0 without the feature.
    pub tls_handshake_failures: u64,
    /// Calls refused with an error that [`is_overloaded`](crate::Error::is_overloaded)
    /// (one per call, however many shards it was for), plus client `publish` requests refused
    /// for the same reason (the client gets the per-client error `publish refused`) and
    /// messages from other nodes that could not be delivered here for it. Nothing of a
    /// refused call reached any client.
    pub backlog_refused: u64,
    /// Bytes of work waiting in each shard's inbox now (see
    /// [`shard_backlog_bytes`](crate::HubConfigBuilder::shard_backlog_bytes)), indexed by
    /// shard.
    pub shard_backlog_bytes: Vec<usize>,
    /// The longest a shard has held a worker thread without yielding since the hub started:
    /// handling one batch of commands, or writing to up to 256 clients of a flush.
    pub longest_shard_turn: std::time::Duration,
    /// Clients per shard, indexed by shard.
    pub shard_clients: Vec<usize>,
    /// Shards writing to their clients with io_uring now (cargo feature `io-uring`, Linux),
    /// the others with `send(2)`. 0 without the feature, where the kernel refuses io_uring,
    /// before the shards start and after shutdown; a shard whose ring fails goes back to
    /// `send(2)` for good and stops counting.
    pub io_uring_shards: usize,
    /// The broker's counters, when the hub has one (several nodes).
    pub broker: Option<BrokerStats>,
}

/// A broker's counters, in [`HubStats::broker`](crate::HubStats::broker).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Whether the broker is connected to its server now.
    pub connected: bool,
    /// Connections made after the first (each one after a loss).
    pub reconnects: u64,
    /// Messages sent to other nodes.
    pub sent: u64,
    /// Messages received from other nodes and delivered here (own messages not counted).
    pub received: u64,
    /// Messages that could not be sent: the server was away or the send queue was full.
    pub send_dropped: u64,
    /// Messages received that could not be read (not the bridge format) and were dropped.
    pub receive_dropped: u64,
    /// Channels this node listens to now.
    pub channels: usize,
}

impl BrokerStats {
    /// Counters for a broker that does nothing.
    pub fn new(connected: bool) -> Self {
        BrokerStats {
            connected,
            ..BrokerStats::default()
        }
    }
}

/// The hub's shared counters.
pub(crate) struct Counters {
    pub(crate) clients: AtomicUsize,
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) queue_bound_disconnects: AtomicU64,
    pub(crate) stalled_disconnects: AtomicU64,
    pub(crate) budget_disconnects: AtomicU64,
    pub(crate) queued_bytes: AtomicU64,
    /// Per shard: the memory its frames hold in queues (see `Shard::retained`).
    pub(crate) queued_memory: Box<[AtomicU64]>,
    pub(crate) longest_shard_turn_us: AtomicU64,
    pub(crate) connection_tasks: AtomicUsize,
    pub(crate) upgrades_refused: AtomicU64,
    pub(crate) tls_handshake_failures: AtomicU64,
    pub(crate) backlog_refused: AtomicU64,
    pub(crate) shard_clients: Box<[AtomicUsize]>,
    /// Shared with each shard's ring, which counts itself while it works (`conn/uring.rs`).
    pub(crate) io_uring_shards: Arc<AtomicUsize>,
    /// Cargo feature `metrics`: publish-to-write latency, one observation per shard batch
    /// that delivered a publish (see `Shard::end_flush`).
    #[cfg(feature = "metrics")]
    pub(crate) publish_to_write: LatencyHistogram,
}

impl Counters {
    pub(crate) fn new(shards: usize) -> Self {
        Counters {
            clients: AtomicUsize::new(0),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            queue_bound_disconnects: AtomicU64::new(0),
            stalled_disconnects: AtomicU64::new(0),
            budget_disconnects: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            queued_memory: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            longest_shard_turn_us: AtomicU64::new(0),
            connection_tasks: AtomicUsize::new(0),
            upgrades_refused: AtomicU64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
            backlog_refused: AtomicU64::new(0),
            shard_clients: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            io_uring_shards: Arc::new(AtomicUsize::new(0)),
            #[cfg(feature = "metrics")]
            publish_to_write: LatencyHistogram::default(),
        }
    }

    /// The memory all queues hold, over every shard.
    pub(crate) fn queued_memory_bytes(&self) -> u64 {
        self.queued_memory.iter().map(|m| m.load(Relaxed)).sum()
    }

    pub(crate) fn snapshot(&self, channels: usize) -> HubStats {
        HubStats {
            clients: self.clients.load(Relaxed),
            channels,
            published: self.published.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            slow_consumer_disconnects: self.queue_bound_disconnects.load(Relaxed)
                + self.stalled_disconnects.load(Relaxed)
                + self.budget_disconnects.load(Relaxed),
            queue_bound_disconnects: self.queue_bound_disconnects.load(Relaxed),
            stalled_disconnects: self.stalled_disconnects.load(Relaxed),
            budget_disconnects: self.budget_disconnects.load(Relaxed),
            queued_bytes: self.queued_bytes.load(Relaxed),
            queued_memory_bytes: self.queued_memory_bytes(),
            connection_tasks: self.connection_tasks.load(Relaxed),
            history: HistoryFigures::default(),
            upgrades_refused: self.upgrades_refused.load(Relaxed),
            tls_handshake_failures: self.tls_handshake_failures.load(Relaxed),
            backlog_refused: self.backlog_refused.load(Relaxed),
            shard_clients: self.shard_clients.iter().map(|c| c.load(Relaxed)).collect(),
            shard_backlog_bytes: Vec::new(),
            longest_shard_turn: std::time::Duration::from_micros(
                self.longest_shard_turn_us.load(Relaxed),
            ),
            io_uring_shards: self.io_uring_shards.load(Relaxed),
            broker: None,
        }
    }
}

/// What the channel histories hold, in [`HubStats::history`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryFigures {
    /// Channels with a history now (a counter and an epoch), whether or not it holds
    /// publications.
    pub channels: usize,
    /// Publications retained in all histories.
    pub publications: usize,
    /// What the retained publications count against
    /// [`history_memory_budget`](crate::HubConfigBuilder::history_memory_budget): their
    /// frames plus 80 bytes each.
    pub memory_bytes: usize,
    /// Bytes trimmed from histories but still held by replays in progress (they count
    /// against [`queue_memory_budget`](crate::HubConfigBuilder::queue_memory_budget), with
    /// `queued_memory_bytes`).
    pub detached_bytes: usize,
    /// Publications trimmed because their channel held its most.
    pub trimmed_by_count: u64,
    /// Publications trimmed because they were older than their channel's age limit.
    pub trimmed_by_age: u64,
    /// Publications trimmed because the histories together reached the memory budget.
    pub trimmed_by_cap: u64,
}

/// A latency histogram with fixed buckets that several threads observe into without a lock:
/// an observation is a short scan of [`LATENCY_BOUNDS_US`] and three relaxed atomic adds.
/// Read at scrape time, bucket by bucket, so a scrape under load may be off by what was
/// observed while it was read.
#[cfg(feature = "metrics")]
pub(crate) struct LatencyHistogram {
    /// Observations per bucket (not cumulative): `buckets[k]` counts those at most
    /// `LATENCY_BOUNDS_US[k]` and above the bound before; the last one, those above every
    /// bound (`+Inf`).
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

/// The upper bounds of [`LatencyHistogram`]'s buckets, in microseconds: 50 µs to 10 s.
#[cfg(feature = "metrics")]
pub(crate) const LATENCY_BOUNDS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

#[cfg(feature = "metrics")]
impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

#[cfg(feature = "metrics")]
impl LatencyHistogram {
    pub(crate) fn observe(&self, took: std::time::Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let us = ns / 1_000;
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|&bound| us < bound || (us == bound && ns % 1_000 == 0))
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// (sum in seconds, count, buckets as (upper bound in seconds, count)), the count of each
    /// bucket its own (not cumulative), as prometheus-client's encoder takes them; the last
    /// bucket is `+Inf`.
    pub(crate) fn read(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut count = 0;
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (k, in_bucket) in self.buckets.iter().enumerate() {
            let in_bucket = in_bucket.load(Relaxed);
            count += in_bucket;
            let bound = LATENCY_BOUNDS_US
                .get(k)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            buckets.push((bound, in_bucket));
        }
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_buckets_have_inclusive_upper_bounds() {
        let histogram = LatencyHistogram::default();
        histogram.observe(Duration::from_micros(50));
        histogram.observe(Duration::from_nanos(50_001));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(60));
        let (sum, count, buckets) = histogram.read();
        assert_eq!(count, 4);
        assert!((sum - (60.003 + 0.000_100_001)).abs() < 1e-6, "{sum}");
        assert_eq!(buckets[0], (50e-6, 1));
        assert_eq!(buckets[1], (100e-6, 1));
        assert_eq!(buckets[6], (5e-3, 1));
        assert_eq!(buckets[17], (f64::INFINITY, 1));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 4);
    }
}
