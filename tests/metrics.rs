//! Prometheus exposition (cargo feature `metrics`): `Hub::metrics` is valid Prometheus text,
//! its counters move with traffic over a real connection, and two hubs in one process keep
//! their figures apart.

#![cfg(feature = "metrics")]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use support::*;
use wshub::prometheus_client::registry::Registry;
use wshub::{Hub, HubConfig, Message};

/// The samples of a Prometheus text exposition, by series (`name{labels}` as written), after
/// checking its syntax: every line is a `# HELP`, a `# TYPE` or a sample
/// `name{label="value",...} value` with a valid float; every sample belongs to a family
/// whose `# TYPE` came before it (a histogram's `_bucket`, `_sum` and `_count` to the
/// histogram's); no series twice.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let valid_name = |name: &str| {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let keyword = parts.next().unwrap();
            let name = parts
                .next()
                .unwrap_or_else(|| panic!("bad comment: {line}"));
            assert!(valid_name(name), "bad metric name in {line:?}");
            match keyword {
                "HELP" => {}
                "TYPE" => {
                    let kind = parts.next().unwrap_or_else(|| panic!("no type: {line}"));
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "bad type in {line:?}"
                    );
                    assert!(
                        types.insert(name.to_owned(), kind.to_owned()).is_none(),
                        "two TYPE lines for {name}"
                    );
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                for label in labels.split(',') {
                    let (key, value) = label
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(valid_name(key), "bad label name in {line:?}");
                    assert!(
                        value.len() >= 2 && value.starts_with('"') && value.ends_with('"'),
                        "unquoted label value in {line:?}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(valid_name(name), "bad sample name in {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| types.get(*base).is_some_and(|t| t == "histogram"))
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample {name} without a # TYPE before it"
        );
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "series {series} twice"
        );
    }
    samples
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

fn figure(hub: &Hub, series: &str) -> f64 {
    sample(&parse(&hub.metrics()), series)
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text_with_every_family() {
    let hub = Hub::with_config(HubConfig::builder().shards(3).build().unwrap());
    let text = hub.metrics();
    let samples = parse(&text);
    for series in [
        "wshub_clients",
        "wshub_connection_tasks",
        "wshub_channels",
        "wshub_published_total",
        "wshub_delivered_total",
        "wshub_dropped_total",
        "wshub_slow_consumer_disconnects_total{rule=\"queue_bound\"}",
        "wshub_slow_consumer_disconnects_total{rule=\"stalled\"}",
        "wshub_slow_consumer_disconnects_total{rule=\"budget\"}",
        "wshub_queued_bytes",
        "wshub_queued_memory_bytes",
        "wshub_shard_clients{shard=\"2\"}",
        "wshub_shard_backlog_bytes{shard=\"0\"}",
        "wshub_longest_shard_turn_seconds",
        "wshub_io_uring_shards",
        "wshub_backlog_refused_total",
        "wshub_upgrades_refused_total",
        "wshub_history_channels",
        "wshub_history_publications",
        "wshub_history_memory_bytes",
        "wshub_history_detached_bytes",
        "wshub_history_trimmed_total{cause=\"count\"}",
        "wshub_history_trimmed_total{cause=\"age\"}",
        "wshub_history_trimmed_total{cause=\"memory\"}",
        "wshub_publish_to_write_seconds_bucket{le=\"+Inf\"}",
        "wshub_publish_to_write_seconds_sum",
        "wshub_publish_to_write_seconds_count",
    ] {
        assert_eq!(sample(&samples, series), 0.0, "{series}");
    }
    // Bounded labels: one series per shard, none for a shard that does not exist.
    assert!(!samples.contains_key("wshub_shard_clients{shard=\"3\"}"));
    // No broker, no broker figures.
    assert!(!text.contains("wshub_broker_"), "{text}");
    assert!(text.contains("# TYPE wshub_publish_to_write_seconds histogram"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_with_traffic() {
    const N: usize = 25;
    let server = Server::default_hub().await;
    let hub = &server.hub;
    let mut ws = server.connect().await;
    subscribe(&mut ws, "news").await;
    // The acknowledgement of the subscribe is a delivery too, counted at the end of its
    // shard's flush, which may come just after the client read it.
    wait_until("the acknowledgement to be counted", || {
        figure(hub, "wshub_delivered_total") >= 1.0
    })
    .await;
    let before = parse(&hub.metrics());
    assert_eq!(sample(&before, "wshub_clients"), 1.0);
    assert_eq!(sample(&before, "wshub_channels"), 1.0);
    for i in 0..N {
        let message = Message::new("message")
            .with_channel("news")
            .with_data(i as u64);
        hub.send_to_channel("news", &message).unwrap();
    }
    for _ in 0..N {
        read_until_type(&mut ws, "message").await;
    }
    let published = sample(&before, "wshub_published_total");
    let delivered = sample(&before, "wshub_delivered_total");
    assert_eq!(
        figure(hub, "wshub_published_total"),
        published + N as f64,
        "published grew by N"
    );
    // A shard adds what it delivered at the end of its flush, which may come just after the
    // client read the last frame.
    wait_until("delivered to grow by N", || {
        figure(hub, "wshub_delivered_total") >= delivered + N as f64
    })
    .await;
    assert_eq!(
        figure(hub, "wshub_delivered_total"),
        delivered + N as f64,
        "delivered grew by N, no more"
    );
    let after = parse(&hub.metrics());
    let count = sample(&after, "wshub_publish_to_write_seconds_count");
    assert!(
        (1.0..=N as f64).contains(&count),
        "one observation per batch that delivered publishes: {count}"
    );
    assert_eq!(
        sample(&after, "wshub_publish_to_write_seconds_bucket{le=\"+Inf\"}"),
        count
    );
    assert!(sample(&after, "wshub_publish_to_write_seconds_sum") > 0.0);
    let prefix = "wshub_publish_to_write_seconds_bucket{le=\"";
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(series, &value)| {
            let le = series.strip_prefix(prefix)?.strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            Some((le, value))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 10, "{buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets are cumulative: {buckets:?}"
    );
    let per_shard: f64 = after
        .iter()
        .filter(|(series, _)| series.starts_with("wshub_shard_clients{"))
        .map(|(_, value)| value)
        .sum();
    assert_eq!(per_shard, 1.0, "the client is counted on one shard");
    close(&mut ws, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_in_one_process_keep_their_figures_apart() {
    const N: usize = 7;
    let busy = Server::default_hub().await;
    let idle = Server::default_hub().await;
    let mut ws = busy.connect().await;
    subscribe(&mut ws, "a").await;
    for _ in 0..N {
        busy.hub
            .send_to_channel("a", &Message::new("message").with_channel("a"))
            .unwrap();
    }
    for _ in 0..N {
        read_until_type(&mut ws, "message").await;
    }
    let hub = busy.hub.clone();
    wait_until("delivered to reach N", move || {
        figure(&hub, "wshub_delivered_total") >= N as f64
    })
    .await;
    assert_eq!(figure(&busy.hub, "wshub_published_total"), N as f64);
    assert_eq!(figure(&busy.hub, "wshub_clients"), 1.0);
    for series in [
        "wshub_published_total",
        "wshub_delivered_total",
        "wshub_clients",
        "wshub_channels",
        "wshub_publish_to_write_seconds_count",
    ] {
        assert_eq!(figure(&idle.hub, series), 0.0, "the idle hub's {series}");
    }

    // Both in one application registry, told apart by a label.
    let mut registry = Registry::default();
    busy.hub
        .register_metrics(registry.sub_registry_with_label(("node".into(), "busy".into())));
    idle.hub
        .register_metrics(registry.sub_registry_with_label(("node".into(), "idle".into())));
    let mut text = String::new();
    wshub::prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(&format!("wshub_published_total{{node=\"busy\"}} {N}")),
        "{text}"
    );
    assert!(
        text.contains("wshub_published_total{node=\"idle\"} 0"),
        "{text}"
    );
    close(&mut ws, 1000).await;
}

#[tokio::test]
async fn a_registry_does_not_keep_a_hub_alive() {
    let mut registry = Registry::default();
    let hub = Hub::new();
    hub.register_metrics(&mut registry);
    let encode = |registry: &Registry| {
        let mut text = String::new();
        wshub::prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    };
    assert!(encode(&registry).contains("wshub_clients"));
    drop(hub);
    let text = encode(&registry);
    let names: BTreeSet<&str> = text.lines().filter(|l| l.contains("wshub_")).collect();
    assert!(names.is_empty(), "{text}");
}

/// A broker that sends nothing and reports fixed counters.
struct FixedBroker;

impl wshub::Broker for FixedBroker {
    fn start(&self, _inbound: wshub::Inbound) {}
    fn publish(&self, _target: wshub::Target<'_>, _message: bytes::Bytes) {}
    fn channel_active(&self, _channel: &str) {}
    fn channel_inactive(&self, _channel: &str) {}
    fn stats(&self) -> wshub::BrokerStats {
        let mut stats = wshub::BrokerStats::new(true);
        stats.reconnects = 1;
        stats.sent = 5;
        stats.received = 4;
        stats.send_dropped = 3;
        stats.receive_dropped = 2;
        stats.channels = 6;
        stats
    }
    fn shutdown(&self) {}
}

#[tokio::test]
async fn a_hub_with_a_broker_exposes_the_broker_figures() {
    let hub = Hub::with_config(HubConfig::builder().broker(FixedBroker).build().unwrap());
    let samples = parse(&hub.metrics());
    for (series, value) in [
        ("wshub_broker_connected", 1.0),
        ("wshub_broker_reconnects_total", 1.0),
        ("wshub_broker_sent_total", 5.0),
        ("wshub_broker_received_total", 4.0),
        ("wshub_broker_dropped_total{direction=\"send\"}", 3.0),
        ("wshub_broker_dropped_total{direction=\"receive\"}", 2.0),
        ("wshub_broker_channels", 6.0),
    ] {
        assert_eq!(sample(&samples, series), value, "{series}");
    }
}
