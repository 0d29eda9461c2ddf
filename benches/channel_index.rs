//! The channel index of one shard, driven synchronously: subscribe and unsubscribe, and the
//! lookup a publish does, with 10 to 100,000 channels present; and a publish to a channel
//! with no subscribers, which must cost next to nothing.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use wshub::bench_support::{encode, ShardHarness};
use wshub::{Hub, HubConfig, Message};

fn harness_with_channels(channels: usize) -> (ShardHarness, wshub::ClientId) {
    let config = HubConfig::builder()
        .shards(1)
        .strict_go_ws(true)
        .max_subscriptions(channels + 1)
        .build()
        .unwrap();
    let mut harness = ShardHarness::new(config);
    let client = harness.connect();
    for i in 0..channels {
        harness.subscribe(client, &format!("channel:{i}"));
    }
    harness.flush();
    assert_eq!(harness.channel_count(), channels);
    (harness, client)
}

fn index(c: &mut Criterion) {
    let mut group = c.benchmark_group("channel_index");
    for channels in [10usize, 1_000, 100_000] {
        let (mut harness, _) = harness_with_channels(channels);
        let other = harness.connect();
        group.bench_with_input(
            BenchmarkId::new("subscribe_unsubscribe", channels),
            &channels,
            |b, _| {
                b.iter(|| {
                    harness.subscribe(other, "channel:7");
                    harness.unsubscribe(other, "channel:7");
                })
            },
        );
        let frame = encode(&Message::new("message").with_data("x"));
        group.bench_with_input(
            BenchmarkId::new("publish_lookup", channels),
            &channels,
            |b, _| {
                b.iter(|| {
                    harness.publish("channel:7", frame.clone());
                    harness.flush();
                })
            },
        );
    }
    group.finish();
}

fn publish_without_subscribers(c: &mut Criterion) {
    let hub = Hub::with_config(HubConfig::builder().shards(2).build().unwrap());
    let message = Message::new("message").with_data("nobody listens");
    c.bench_function("publish_no_subscribers", |b| {
        b.iter(|| hub.send_to_channel("nobody", &message).unwrap())
    });
}

criterion_group! {
    name = benches;
    // Short warm-up and measurement: every benchmark here is stable within them, and the
    // whole suite then runs in a few minutes.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = index, publish_without_subscribers
}
criterion_main!(benches);
