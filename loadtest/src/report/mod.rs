//! The report: one [`StepReport`] per measured step, printed as a table and written as JSON.
//!
//! This file holds what a report says (the types, serialized as the JSON report) and how a
//! step's outcome becomes one; `text` prints it as the table, `format` writes its numbers.

mod format;
mod text;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::engine::{ChurnCounts, Load, NodeOutcome, SlowSeen, Step, StepOutcome};
use crate::stats::{nearest_rank, Counts, HistogramJson, Latency};

pub(crate) use format::{bytes, count, dur, rate};

/// The hub's counters, as the report shows them.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct HubSnapshot {
    /// Clients connected.
    pub(crate) clients: u64,
    /// Channels with a subscriber.
    pub(crate) channels: u64,
    /// Messages published (counter).
    pub(crate) published: u64,
    /// Frames handed to connections (counter).
    pub(crate) delivered: u64,
    /// Frames a client was meant to get and did not (counter).
    pub(crate) dropped: u64,
    /// Clients closed as slow consumers (counter).
    pub(crate) slow_consumer_disconnects: u64,
    /// Bytes queued for clients now.
    pub(crate) queued_bytes: u64,
    /// Clients per shard now.
    pub(crate) shard_clients: Vec<u64>,
    /// The hub's broker, when it has one (several nodes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) broker: Option<BrokerSnapshot>,
}

/// A broker's counters (several embedded nodes joined by Redis).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct BrokerSnapshot {
    /// Connected to Redis now.
    pub(crate) connected: bool,
    /// Reconnections (counter).
    pub(crate) reconnects: u64,
    /// Messages sent to the other nodes (counter).
    pub(crate) sent: u64,
    /// Messages received from the other nodes and delivered here (counter).
    pub(crate) received: u64,
    /// Messages that could not be sent: Redis away or the send queue full (counter).
    pub(crate) send_dropped: u64,
    /// Messages received that could not be read (counter).
    pub(crate) receive_dropped: u64,
    /// Redis channels the node listens to now.
    pub(crate) channels: u64,
}

impl BrokerSnapshot {
    fn since(&self, before: &BrokerSnapshot) -> BrokerSnapshot {
        BrokerSnapshot {
            reconnects: self.reconnects.saturating_sub(before.reconnects),
            sent: self.sent.saturating_sub(before.sent),
            received: self.received.saturating_sub(before.received),
            send_dropped: self.send_dropped.saturating_sub(before.send_dropped),
            receive_dropped: self.receive_dropped.saturating_sub(before.receive_dropped),
            ..self.clone()
        }
    }
}

impl HubSnapshot {
    /// The counters of several hubs added up (their brokers' left out: see each node's).
    pub(crate) fn sum(hubs: &[HubSnapshot]) -> HubSnapshot {
        let mut t = HubSnapshot::default();
        for h in hubs {
            t.clients += h.clients;
            t.channels = t.channels.max(h.channels);
            t.published += h.published;
            t.delivered += h.delivered;
            t.dropped += h.dropped;
            t.slow_consumer_disconnects += h.slow_consumer_disconnects;
            t.queued_bytes += h.queued_bytes;
            t.shard_clients.extend(&h.shard_clients);
        }
        t
    }

    /// Counters as differences from `before`; gauges as now.
    pub(crate) fn since(&self, before: &HubSnapshot) -> HubSnapshot {
        HubSnapshot {
            broker: match (&self.broker, &before.broker) {
                (Some(a), Some(b)) => Some(a.since(b)),
                (a, _) => a.clone(),
            },
            published: self.published.saturating_sub(before.published),
            delivered: self.delivered.saturating_sub(before.delivered),
            dropped: self.dropped.saturating_sub(before.dropped),
            slow_consumer_disconnects: self
                .slow_consumer_disconnects
                .saturating_sub(before.slow_consumer_disconnects),
            ..self.clone()
        }
    }
}

/// How a step published, in JSON.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LoadJson {
    /// `closed`, `open` or `idle`.
    pub(crate) mode: &'static str,
    /// Closed loop: messages in flight per channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) window: Option<u32>,
    /// Open loop: publishes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rate: Option<f64>,
    /// Broadcasts: publishes per channel, one at a time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) broadcasts: Option<u32>,
}

impl From<Load> for LoadJson {
    fn from(l: Load) -> Self {
        match l {
            Load::Closed { window } => LoadJson {
                mode: "closed",
                window: Some(window),
                rate: None,
                broadcasts: None,
            },
            Load::Open { rate } => LoadJson {
                mode: "open",
                window: None,
                rate: Some(rate),
                broadcasts: None,
            },
            Load::Broadcasts { count } => LoadJson {
                mode: "broadcasts",
                window: None,
                rate: None,
                broadcasts: Some(count),
            },
            Load::Idle => LoadJson {
                mode: "idle",
                window: None,
                rate: None,
                broadcasts: None,
            },
        }
    }
}

/// One reporting interval.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IntervalReport {
    /// Seconds since the step began, at the interval's end.
    pub(crate) t: f64,
    /// Measured deliveries in the interval.
    pub(crate) delivered: u64,
    /// Of them per second.
    pub(crate) delivered_per_s: f64,
    /// Messages found lost in the interval.
    pub(crate) lost: u64,
    /// Duplicates in the interval.
    pub(crate) duplicated: u64,
    /// Latency of the interval's deliveries.
    pub(crate) latency: Latency,
    /// Errors in the interval.
    pub(crate) errors: BTreeMap<String, u64>,
}

/// Broadcasts one at a time: how long each took to reach its last receiver.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BroadcastReport {
    /// Broadcasts asked for (per channel).
    pub(crate) asked: u64,
    /// Of them, received by every subscriber.
    pub(crate) received_by_all: u64,
    /// For each of those, from its publish to its last receiver's read, in microseconds,
    /// fastest first.
    pub(crate) last_receiver_us: Vec<f64>,
    /// Their median, 99th percentile and largest (nearest rank, exact: of 20, the p99 is the
    /// largest).
    pub(crate) p50_us: Option<f64>,
    /// See `p50_us`.
    pub(crate) p99_us: Option<f64>,
    /// See `p50_us`.
    pub(crate) max_us: Option<f64>,
}

impl BroadcastReport {
    fn of(asked: u64, last_receiver_ns: &[u64]) -> BroadcastReport {
        let us = |ns: u64| ns as f64 / 1000.0;
        let mut sorted = last_receiver_ns.to_vec();
        sorted.sort_unstable();
        BroadcastReport {
            asked,
            received_by_all: sorted.len() as u64,
            last_receiver_us: sorted.iter().copied().map(us).collect(),
            p50_us: nearest_rank(&sorted, 0.5).map(us),
            p99_us: nearest_rank(&sorted, 0.99).map(us),
            max_us: sorted.last().copied().map(us),
        }
    }
}

/// What the hub did to the slow clients.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SlowReport {
    /// What the slow clients saw.
    #[serde(flatten)]
    pub(crate) seen: SlowSeen,
    /// Messages the slow clients were sent in the step but did not get (publishes x slow
    /// clients, less what they had received).
    pub(crate) lost: u64,
}

/// What the subscribers on one node measured (several nodes).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct NodeReport {
    /// 0 for node A (where the publishers are), 1 for node B.
    pub(crate) node: usize,
    /// `local` (node A: the publishers' own node) or `cross-node` (reached through Redis).
    pub(crate) role: &'static str,
    /// The node's URL.
    pub(crate) url: String,
    /// Measured subscribers on the node.
    pub(crate) subscribers: u64,
    /// Their deliveries.
    pub(crate) delivered: u64,
    /// Of them per second.
    pub(crate) delivered_per_s: f64,
    /// Their deliveries if nothing were lost.
    pub(crate) expected_deliveries: u64,
    /// Messages they never received.
    pub(crate) lost: u64,
    /// Messages they received again (or out of order).
    pub(crate) duplicated: u64,
    /// Their publish-to-receive latency.
    pub(crate) latency: Latency,
    /// The node's hub counters over the step, its broker's included (embedded only).
    pub(crate) hub: Option<HubSnapshot>,
}

/// Everything measured in one step.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StepReport {
    /// The step's name.
    pub(crate) label: String,
    /// How it published.
    pub(crate) load: LoadJson,
    /// Measured seconds.
    pub(crate) seconds: f64,
    /// Measured subscribers (the slow ones not included).
    pub(crate) subscribers: u64,
    /// Connections open at the end (measured ones; slow and churning ones not included).
    pub(crate) connections_held: u64,
    /// Publishes.
    pub(crate) published: u64,
    /// Publishes per second.
    pub(crate) published_per_s: f64,
    /// Deliveries to measured subscribers.
    pub(crate) delivered: u64,
    /// Deliveries per second.
    pub(crate) delivered_per_s: f64,
    /// Deliveries if nothing were lost: publishes x subscribers of each channel.
    pub(crate) expected_deliveries: u64,
    /// Messages never received.
    pub(crate) lost: u64,
    /// Messages received more than once (or out of order).
    pub(crate) duplicated: u64,
    /// `message` frames this run did not publish in this step.
    pub(crate) other_messages: u64,
    /// Open loop: publishes the generator could not send on schedule.
    pub(crate) behind_schedule: u64,
    /// Closed loop: rounds completed (broadcasts: broadcasts sent and waited for).
    pub(crate) rounds: u64,
    /// Broadcasts: the time each took to reach its last receiver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) broadcasts: Option<BroadcastReport>,
    /// Publish-to-receive latency.
    pub(crate) latency: Latency,
    /// Errors by kind.
    pub(crate) errors: BTreeMap<String, u64>,
    /// CPU seconds of the load generator (its threads and the main thread).
    pub(crate) generator_cpu_seconds: f64,
    /// The same as a share of one core (100 = one core busy).
    pub(crate) generator_cpu_percent: f64,
    /// CPU seconds of the hub (embedded: the process less the generator; --target: with --pid).
    pub(crate) hub_cpu_seconds: Option<f64>,
    /// The same as a share of one core.
    pub(crate) hub_cpu_percent: Option<f64>,
    /// Resident memory at the end (embedded: the whole process, generator included).
    pub(crate) rss_bytes: Option<u64>,
    /// Resident memory of the load generator (--target only; embedded, it is in `rss_bytes`).
    pub(crate) generator_rss_bytes: Option<u64>,
    /// The hub's counters over the step (embedded only; with several nodes, added up over
    /// them).
    pub(crate) hub: Option<HubSnapshot>,
    /// CPU seconds of the redis-server this run started (several embedded nodes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis_cpu_seconds: Option<f64>,
    /// Several nodes: the subscribers of each node apart (node A local, node B cross-node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) nodes: Option<Vec<NodeReport>>,
    /// What the slow clients got (slow scenario, disturbed step).
    pub(crate) slow: Option<SlowReport>,
    /// What churn did (churn scenario, disturbed step).
    pub(crate) churn: Option<ChurnCounts>,
    /// Per interval.
    pub(crate) intervals: Vec<IntervalReport>,
    /// The whole latency histogram.
    pub(crate) histogram: HistogramJson,
}

/// What the server side measured around a step.
#[derive(Debug, Default)]
pub(crate) struct ServerSide {
    /// The hub's CPU time over the step, when known.
    pub(crate) cpu: Option<Duration>,
    /// Resident memory at the end.
    pub(crate) rss: Option<u64>,
    /// The generator's resident memory, when it is a process of its own.
    pub(crate) generator_rss: Option<u64>,
    /// Counter differences.
    pub(crate) hub: Option<HubSnapshot>,
    /// Counter differences per node (several embedded nodes).
    pub(crate) hubs: Vec<HubSnapshot>,
    /// The URL of each node (several nodes).
    pub(crate) urls: Vec<String>,
    /// CPU time of the redis-server this run started, over the step.
    pub(crate) redis_cpu: Option<Duration>,
}

impl StepReport {
    /// Builds the report of `step` from what the engine measured.
    pub(crate) fn build(
        step: &Step,
        o: StepOutcome,
        subscribers: u64,
        slow_clients: u64,
        server: ServerSide,
    ) -> StepReport {
        let secs = o.seconds.max(1e-9);
        let intervals = IntervalReport::series(&o.intervals);
        let gen = o.generator_cpu.as_secs_f64();
        let hub_cpu = server.cpu.map(|d| d.as_secs_f64());
        let slow = (step.disturb && slow_clients > 0).then(|| SlowReport {
            lost: (o.published * slow_clients).saturating_sub(o.slow.received),
            seen: o.slow.clone(),
        });
        let churn = (step.disturb
            && (o.churn.connects + o.churn.connect_failures + o.churn.subscribes) > 0)
            .then(|| o.churn.clone());
        let nodes = (!o.nodes.is_empty()).then(|| {
            o.nodes
                .iter()
                .enumerate()
                .map(|(i, n)| NodeReport::of(i, n, secs, &server))
                .collect()
        });
        StepReport {
            label: step.label.clone(),
            load: step.load.into(),
            seconds: o.seconds,
            subscribers,
            connections_held: o.connections,
            published: o.published,
            published_per_s: o.published as f64 / secs,
            delivered: o.counts.delivered,
            delivered_per_s: o.counts.delivered as f64 / secs,
            expected_deliveries: o.expected,
            lost: o.counts.lost,
            duplicated: o.counts.duplicated,
            other_messages: o.counts.other,
            behind_schedule: o.counts.behind,
            rounds: o.counts.rounds,
            broadcasts: match step.load {
                Load::Broadcasts { count } => Some(BroadcastReport::of(
                    u64::from(count),
                    &o.counts.last_receiver_ns,
                )),
                _ => None,
            },
            latency: Latency::of(&o.counts.hist),
            errors: o.counts.errors.clone(),
            generator_cpu_seconds: gen,
            generator_cpu_percent: gen / secs * 100.0,
            hub_cpu_seconds: hub_cpu,
            hub_cpu_percent: hub_cpu.map(|c| c / secs * 100.0),
            rss_bytes: server.rss,
            generator_rss_bytes: server.generator_rss,
            hub: server.hub,
            redis_cpu_seconds: server.redis_cpu.map(|d| d.as_secs_f64()),
            nodes,
            slow,
            churn,
            intervals,
            histogram: HistogramJson::of(&o.counts.hist),
        }
    }
}

impl IntervalReport {
    /// The report of each interval, from (seconds since the step began, its counts).
    fn series(intervals: &[(f64, Counts)]) -> Vec<IntervalReport> {
        intervals
            .iter()
            .scan(0.0, |prev, (t, c): &(f64, Counts)| {
                let dt = (t - *prev).max(1e-9);
                *prev = *t;
                Some(IntervalReport {
                    t: *t,
                    delivered: c.delivered,
                    delivered_per_s: c.delivered as f64 / dt,
                    lost: c.lost,
                    duplicated: c.duplicated,
                    latency: Latency::of(&c.hist),
                    errors: c.errors.clone(),
                })
            })
            .collect()
    }
}

impl NodeReport {
    /// The report of node `i`, from what its subscribers measured over `secs` seconds.
    fn of(i: usize, n: &NodeOutcome, secs: f64, server: &ServerSide) -> NodeReport {
        NodeReport {
            node: i,
            role: if i == 0 { "local" } else { "cross-node" },
            url: server.urls.get(i).cloned().unwrap_or_default(),
            subscribers: n.subscribers,
            delivered: n.counts.delivered,
            delivered_per_s: n.counts.delivered as f64 / secs,
            expected_deliveries: n.expected,
            lost: n.counts.lost,
            duplicated: n.counts.duplicated,
            latency: Latency::of(&n.counts.hist),
            hub: server.hubs.get(i).cloned(),
        }
    }
}
