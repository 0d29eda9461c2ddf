//! A channel's history: the publish path's append of a ~200-byte frame into a history held
//! at 10,000 publications (each append also trims the oldest and checks the memory budget),
//! and the subscribe path's pin of a 10,000-publication replay (and, for scale, walking it).
//!
//! On the 2-core development machine (`cargo bench --features test-support --bench history
//! -- --warm-up-time 1 --measurement-time 3`): append 65 ns, pin_after of 10,000 1.7 µs
//! (about 157 block `Arc`s and at most 63 tail frames cloned), pin and walk 262 µs (26 ns a
//! frame).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wshub::bench_support::HistoryBench;

const HISTORY: usize = 10_000;

fn full_history() -> (HistoryBench, Bytes) {
    let frame = Bytes::from(vec![b'x'; 200]);
    let history = HistoryBench::new(HISTORY);
    // Past the count bound, so every append trims one: the steady state.
    for _ in 0..HISTORY + 100 {
        history.append(frame.clone());
    }
    (history, frame)
}

fn history(c: &mut Criterion) {
    let mut group = c.benchmark_group("history");
    let (history, frame) = full_history();
    group.throughput(Throughput::Elements(1));
    group.bench_function("append_200B_steady_10k", |b| {
        b.iter(|| history.append(frame.clone()))
    });
    group.throughput(Throughput::Elements(HISTORY as u64));
    group.bench_function("pin_after_10k", |b| {
        b.iter(|| assert_eq!(history.pin_after(0), HISTORY))
    });
    group.bench_function("pin_and_walk_10k", |b| b.iter(|| history.replay_after(0)));
    group.finish();
}

criterion_group!(benches, history);
criterion_main!(benches);
