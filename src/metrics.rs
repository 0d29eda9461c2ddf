//! Prometheus exposition (cargo feature `metrics`): [`Hub::metrics`] and
//! [`Hub::register_metrics`].
//!
//! Nothing here runs on the hot path: every figure but one is read from [`Hub::stats`] when
//! the metrics are scraped, by a [`Collector`] that holds the hub weakly (a registry does not
//! keep a hub alive). The exception is the publish-to-write latency histogram, which the
//! shards observe once per batch (see `Shard::end_flush`) into lock-free atomic buckets
//! (`stats::LatencyHistogram`) that the collector reads.
//!
//! Each hub has its own collector and figures; there is no global registry, so two hubs in
//! one process (as `loadtest --nodes 2` runs them) never mix their figures. No metric has a
//! per-channel or per-client label: the labels are `shard` (bounded by the shard count),
//! `rule` (3 values), `cause` (3 values) and `direction` (2 values).

use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::hub::{Hub, Shared};
use crate::stats::HubStats;

/// The HTTP `Content-Type` of [`Hub::metrics`]'s text: the Prometheus text format 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Hub {
    /// This hub's metrics in the Prometheus text format (version 0.0.4, serve it with
    /// [`METRICS_CONTENT_TYPE`]), computed now from [`Hub::stats`] and the publish-to-write
    /// latency histogram. Cargo feature `metrics`.
    ///
    /// Names are prefixed `wshub_`; counters end in `_total`. The README's "Metrics" section
    /// lists them all.
    ///
    /// The README's "Metrics" example (a test checks the two match):
    ///
    /// ```
    /// use wshub::prometheus_client::registry::Registry;
    /// use wshub::Hub;
    ///
    /// let hub = Hub::new();
    /// // This hub alone, in the Prometheus text format (serve it as wshub::METRICS_CONTENT_TYPE):
    /// let text = hub.metrics();
    /// assert!(text.contains("# TYPE wshub_published_total counter"));
    ///
    /// // Or beside an application's own metrics, with a label per hub:
    /// let mut registry = Registry::default();
    /// hub.register_metrics(registry.sub_registry_with_label(("node".into(), "a".into())));
    /// let mut text = String::new();
    /// wshub::prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    /// assert!(text.contains("wshub_clients{node=\"a\"} 0"));
    /// ```
    pub fn metrics(&self) -> String {
        let mut registry = Registry::default();
        self.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("writing to a String does not fail");
        text
    }

    /// Adds this hub's metrics to `registry`, an application's own, beside its other
    /// metrics. The registry holds the hub weakly: once every `Hub` handle is dropped, it
    /// encodes nothing for it. To tell several hubs apart in one registry, give each its
    /// own label, e.g. `hub.register_metrics(registry.sub_registry_with_label(("node".into(),
    /// "a".into())))`. Cargo feature `metrics`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(HubCollector {
            shared: Arc::downgrade(self.shared()),
        }));
    }
}

/// Encodes a hub's figures at each scrape.
struct HubCollector {
    shared: Weak<Shared>,
}

impl std::fmt::Debug for HubCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubCollector")
            .field("alive", &(self.shared.strong_count() > 0))
            .finish()
    }
}

type Label = (&'static str, &'static str);

impl Collector for HubCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        let stats = shared.stats();
        let mut out = Out(&mut encoder);
        encode_stats(&mut out, &stats)?;
        let (sum, count, buckets) = shared.counters.publish_to_write.read();
        let mut metric = out.0.encode_descriptor(
            "wshub_publish_to_write_seconds",
            "Time from a publish being handed to the shards to the end of the flush that wrote \
             it to its subscribers' sockets (or queued it behind what they had not read): one \
             observation per shard batch that delivered publishes, of the batch's oldest one",
            None,
            MetricType::Histogram,
        )?;
        metric.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// Shorthands over a descriptor encoder.
struct Out<'a, 'b>(&'a mut DescriptorEncoder<'b>);

impl Out<'_, '_> {
    fn gauge(&mut self, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
        self.0
            .encode_descriptor(name, help, None, MetricType::Gauge)?
            .encode_gauge(&value)
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
        self.0
            .encode_descriptor(name, help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)
    }

    /// A counter with one label, one series per `(label value, count)`.
    fn counters(
        &mut self,
        name: &str,
        help: &str,
        series: &[(Label, u64)],
    ) -> Result<(), std::fmt::Error> {
        let mut metric = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (label, value) in series {
            metric
                .encode_family(&[*label])?
                .encode_counter::<NoLabelSet, _, u64>(value, None)?;
        }
        Ok(())
    }

    /// A gauge per shard, labelled `shard`.
    fn per_shard<T: Copy + Into<u64>>(
        &mut self,
        name: &str,
        help: &str,
        values: impl IntoIterator<Item = T>,
    ) -> Result<(), std::fmt::Error> {
        let mut metric = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (shard, value) in values.into_iter().enumerate() {
            metric
                .encode_family(&[("shard", shard)])?
                .encode_gauge(&value.into())?;
        }
        Ok(())
    }
}

fn encode_stats(out: &mut Out<'_, '_>, s: &HubStats) -> Result<(), std::fmt::Error> {
    out.gauge("wshub_clients", "Clients connected now", s.clients as u64)?;
    out.gauge(
        "wshub_connection_tasks",
        "Connection tasks alive now",
        s.connection_tasks as u64,
    )?;
    out.gauge(
        "wshub_channels",
        "Channels with at least one subscriber now",
        s.channels as u64,
    )?;
    out.counter(
        "wshub_published",
        "Messages published and accepted, each counted once however many clients it reaches",
        s.published,
    )?;
    out.counter(
        "wshub_delivered",
        "Frames handed to clients' connections (written, or queued to be written)",
        s.delivered,
    )?;
    out.counter(
        "wshub_dropped",
        "Frames that reached a client's shard but not the client (slow-consumer policy, \
         closing or closed client)",
        s.dropped,
    )?;
    out.counters(
        "wshub_slow_consumer_disconnects",
        "Clients closed with 4000 as slow consumers, by the rule that cut them",
        &[
            (("rule", "queue_bound"), s.queue_bound_disconnects),
            (("rule", "stalled"), s.stalled_disconnects),
            (("rule", "budget"), s.budget_disconnects),
        ],
    )?;
    out.gauge(
        "wshub_queued_bytes",
        "Bytes waiting in clients' outbound queues now, summed over the queues",
        s.queued_bytes,
    )?;
    out.gauge(
        "wshub_queued_memory_bytes",
        "Memory held now by the frames in clients' queues, each frame once (what the queue \
         memory budget bounds)",
        s.queued_memory_bytes,
    )?;
    out.per_shard(
        "wshub_shard_clients",
        "Clients per shard now",
        s.shard_clients.iter().map(|&n| n as u64),
    )?;
    out.per_shard(
        "wshub_shard_backlog_bytes",
        "Bytes of work waiting in each shard's inbox now",
        s.shard_backlog_bytes.iter().map(|&n| n as u64),
    )?;
    out.0
        .encode_descriptor(
            "wshub_longest_shard_turn_seconds",
            "The longest a shard has held a worker thread without yielding since the hub started",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&s.longest_shard_turn.as_secs_f64())?;
    out.gauge(
        "wshub_io_uring_shards",
        "Shards writing with io_uring now",
        s.io_uring_shards as u64,
    )?;
    out.counter(
        "wshub_backlog_refused",
        "Calls and client publishes refused because a shard's backlog was over its bound",
        s.backlog_refused,
    )?;
    out.counter(
        "wshub_upgrades_refused",
        "WebSocket upgrades refused with 401, 403 or 503",
        s.upgrades_refused,
    )?;
    out.counter(
        "wshub_tls_handshake_failures",
        "TLS connections closed because their handshake failed or timed out (feature tls)",
        s.tls_handshake_failures,
    )?;
    let h = &s.history;
    out.gauge(
        "wshub_history_channels",
        "Channels with a history now",
        h.channels as u64,
    )?;
    out.gauge(
        "wshub_history_publications",
        "Publications retained in all histories now",
        h.publications as u64,
    )?;
    out.gauge(
        "wshub_history_memory_bytes",
        "What the retained publications count against the history memory budget",
        h.memory_bytes as u64,
    )?;
    out.gauge(
        "wshub_history_detached_bytes",
        "Bytes trimmed from histories but still held by replays in progress",
        h.detached_bytes as u64,
    )?;
    out.counters(
        "wshub_history_trimmed",
        "Publications trimmed from histories, by cause",
        &[
            (("cause", "count"), h.trimmed_by_count),
            (("cause", "age"), h.trimmed_by_age),
            (("cause", "memory"), h.trimmed_by_cap),
        ],
    )?;
    if let Some(b) = &s.broker {
        out.gauge(
            "wshub_broker_connected",
            "1 if the broker is connected to its server now, else 0",
            u64::from(b.connected),
        )?;
        out.counter(
            "wshub_broker_reconnects",
            "Broker connections made after the first",
            b.reconnects,
        )?;
        out.counter("wshub_broker_sent", "Messages sent to other nodes", b.sent)?;
        out.counter(
            "wshub_broker_received",
            "Messages received from other nodes and delivered here",
            b.received,
        )?;
        out.counters(
            "wshub_broker_dropped",
            "Broker messages dropped: not sent (server away, queue full) or not readable",
            &[
                (("direction", "send"), b.send_dropped),
                (("direction", "receive"), b.receive_dropped),
            ],
        )?;
        out.gauge(
            "wshub_broker_channels",
            "Channels this node listens to on the broker now",
            b.channels as u64,
        )?;
    }
    Ok(())
}
