//! Encoding a message into a complete frame: the one serialization each publish pays.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wshub::bench_support::{encode, encode_at};
use wshub::Message;

fn encode_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in [16usize, 256, 4096, 65_536] {
        let message = Message::new("message")
            .with_channel("room:42")
            .with_data("x".repeat(size));
        let frame_len = encode(&message).len();
        group.throughput(Throughput::Bytes(frame_len as u64));
        group.bench_with_input(BenchmarkId::new("string_data", size), &message, |b, m| {
            b.iter(|| encode(m))
        });
    }
    // The same on a history channel: what offset and epoch add to the one serialization.
    for size in [16usize, 4096] {
        let message = Message::new("message")
            .with_channel("room:42")
            .with_data("x".repeat(size));
        let frame_len = encode_at(&message, 1_234_567, "a9f3c2").len();
        group.throughput(Throughput::Bytes(frame_len as u64));
        group.bench_with_input(BenchmarkId::new("with_position", size), &message, |b, m| {
            b.iter(|| encode_at(m, 1_234_567, "a9f3c2"))
        });
    }
    let object = Message::process_status("build-1", "exited", 0);
    group.throughput(Throughput::Bytes(encode(&object).len() as u64));
    group.bench_function("process_status", |b| b.iter(|| encode(&object)));
    group.finish();
}

criterion_group! {
    name = benches;
    // Short warm-up and measurement: every benchmark here is stable within them, and the
    // whole suite then runs in a few minutes.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = encode_frame
}
criterion_main!(benches);
