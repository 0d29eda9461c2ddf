//! In-process fan-out through the shards to N null clients (sockets that take every frame at
//! once), with 1, 2 and 4 shards: the hub's own cost per delivery, without the kernel's.
//!
//! Each iteration publishes a window of messages from the benchmark thread (as an
//! application would) and waits until every subscriber has been handed every one of them.
//! Throughput is in deliveries (messages x subscribers).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wshub::bench_support::{attach_null_client, delivered};
use wshub::{Hub, HubConfig, Message};

/// Messages published per iteration, like the window of `fanout.c`.
const WINDOW: u64 = 16;

fn wait_for(hub: &Hub, target: u64) {
    let give_up = Instant::now() + Duration::from_secs(60);
    while delivered(hub) < target {
        assert!(Instant::now() < give_up, "fan-out stalled");
        // Sleep rather than spin: on a 2-core machine a spinning benchmark thread would take
        // a core from the shards it is measuring.
        std::thread::sleep(Duration::from_micros(20));
    }
}

fn fanout(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("fanout");
    group.sample_size(20);
    for subscribers in [1_000u64, 10_000, 100_000] {
        for shards in [1usize, 2, 4] {
            let config = HubConfig::builder()
                .shards(shards)
                .strict_go_ws(true)
                .build()
                .unwrap();
            let hub = Hub::with_config(config);
            {
                let _guard = runtime.enter();
                for _ in 0..subscribers {
                    attach_null_client(&hub, "bench");
                }
            }
            let give_up = Instant::now() + Duration::from_secs(60);
            while hub.channel_subscriber_count("bench") < subscribers as usize {
                assert!(Instant::now() < give_up, "subscriptions did not complete");
                std::thread::sleep(Duration::from_millis(5));
            }
            let message = Message::new("message").with_data("x".repeat(100));
            group.throughput(Throughput::Elements(WINDOW * subscribers));
            group.bench_with_input(
                BenchmarkId::new(format!("shards_{shards}"), subscribers),
                &subscribers,
                |b, &n| {
                    b.iter(|| {
                        let target = delivered(&hub) + WINDOW * n;
                        for _ in 0..WINDOW {
                            hub.send_to_channel("bench", &message).unwrap();
                        }
                        wait_for(&hub, target);
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short warm-up and measurement: every benchmark here is stable within them, and the
    // whole suite then runs in a few minutes.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = fanout
}
criterion_main!(benches);
