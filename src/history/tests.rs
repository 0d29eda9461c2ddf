//! The history layer's properties, one per test, with a hand-driven clock.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use bytes::Bytes;

use super::block::{BLOCK_LEN, ENTRY_OVERHEAD};
use super::*;

const MINUTE_MS: u64 = 60_000;

fn policy(max_publications: usize) -> HistoryPolicy {
    HistoryPolicy::new(max_publications, Duration::from_millis(MINUTE_MS)).unwrap()
}

fn store(max_publications: usize) -> HistoryStore {
    store_with_budget(max_publications, HISTORY_MEMORY_BUDGET)
}

fn store_with_budget(max_publications: usize, budget: usize) -> HistoryStore {
    let rules = HistoryRules::new().prefix("", policy(max_publications));
    HistoryStore::new(rules, budget)
}

fn frame(n: u64) -> Bytes {
    Bytes::from(format!("frame {n}"))
}

/// Appends `count` frames (`frame(offset)`) to `channel` at `now_ms`.
fn publish(store: &HistoryStore, channel: &str, count: u64, now_ms: u64) {
    for _ in 0..count {
        store.with_channel(channel, now_ms, |h| {
            let offset = h.next_offset();
            assert_eq!(h.append(frame(offset), now_ms), offset);
        });
    }
}

fn pin(store: &HistoryStore, channel: &str, since: u64, now_ms: u64) -> Replay {
    store
        .with_channel(channel, now_ms, |h| h.pin_after(since, now_ms))
        .unwrap()
}

fn offsets(replay: Replay) -> Vec<u64> {
    replay
        .map(|(offset, bytes)| {
            assert_eq!(bytes, frame(offset));
            offset
        })
        .collect()
}

fn cost(offset: u64) -> usize {
    frame(offset).len() + ENTRY_OVERHEAD
}

#[test]
fn offsets_start_at_one_without_gaps() {
    let store = store(1000);
    let lock = store.channel("news", 0).unwrap();
    assert_eq!(lock.lock().latest(), 0);
    assert_eq!(lock.lock().next_offset(), 1);
    publish(&store, "news", 200, 0);
    let history = lock.lock();
    assert_eq!(history.latest(), 200);
    assert_eq!(history.first_retained(), 1);
    assert_eq!(history.len(), 200);
    drop(history);
    assert_eq!(
        offsets(pin(&store, "news", 0, 0)),
        (1..=200).collect::<Vec<_>>()
    );
    let expected: usize = (1..=200).map(cost).sum();
    assert_eq!(store.memory(), expected);
    assert_eq!(store.stats().retained, 200);
}

#[test]
fn no_rule_no_history() {
    let rules = HistoryRules::new().channel("news", policy(10));
    let store = HistoryStore::new(rules, HISTORY_MEMORY_BUDGET);
    assert!(store.channel("other", 0).is_none());
    assert!(store.with_channel("other", 0, |h| h.latest()).is_none());
    assert!(store.channel("news", 0).is_some());
    assert_eq!(store.channel_count(), 1);
}

#[test]
fn epoch_is_stable_across_trims_and_new_after_expiry() {
    let store = store(5);
    publish(&store, "build", 100, 0);
    let epoch = Arc::clone(pin(&store, "build", 0, 0).epoch());
    // Count trims, age trims and cap trims keep it.
    publish(&store, "build", 1, 2 * MINUTE_MS);
    assert_eq!(pin(&store, "build", 0, 2 * MINUTE_MS).epoch(), &epoch);
    assert_eq!(
        store.sweep(2 * MINUTE_MS, |_| false),
        0,
        "published just now"
    );
    // Idle for max_age, nothing retained, no subscribers: the counter goes.
    assert_eq!(store.sweep(3 * MINUTE_MS, |_| false), 1);
    assert_eq!(store.channel_count(), 0);
    let replay = pin(&store, "build", 0, 3 * MINUTE_MS);
    assert_ne!(replay.epoch(), &epoch);
    assert_eq!(replay.latest(), 0, "a new history starts again");
}

#[test]
fn pin_after_cases() {
    let store = store(10);
    // Nothing published yet: since 0 is the latest.
    let replay = pin(&store, "c", 0, 0);
    assert!(replay.recovered());
    assert_eq!((replay.latest(), replay.remaining()), (0, 0));

    publish(&store, "c", 8, 0);
    // since = 0 with the whole history: everything, recovered.
    let replay = pin(&store, "c", 0, 0);
    assert!(replay.recovered());
    assert_eq!(offsets(replay), (1..=8).collect::<Vec<_>>());
    // since == latest: nothing to replay, recovered.
    let replay = pin(&store, "c", 8, 0);
    assert!(replay.recovered());
    assert_eq!(replay.remaining(), 0);
    // since beyond latest: nothing, not recovered.
    let replay = pin(&store, "c", 9, 0);
    assert!(!replay.recovered());
    assert_eq!((replay.latest(), replay.remaining()), (8, 0));

    // Trimmed by count: 1..=5 gone.
    publish(&store, "c", 7, 0);
    let replay = pin(&store, "c", 3, 0);
    assert!(!replay.recovered(), "4 and 5 were trimmed");
    assert_eq!(offsets(replay), (6..=15).collect::<Vec<_>>());
    let replay = pin(&store, "c", 5, 0);
    assert!(replay.recovered(), "6 is the first held");
    assert_eq!(offsets(replay), (6..=15).collect::<Vec<_>>());
    // since = 0 after a trim: what remains, not recovered.
    let replay = pin(&store, "c", 0, 0);
    assert!(!replay.recovered());
    assert_eq!(offsets(replay), (6..=15).collect::<Vec<_>>());

    // Expired by age.
    publish(&store, "c", 2, MINUTE_MS / 2);
    let replay = pin(&store, "c", 14, MINUTE_MS);
    assert!(!replay.recovered(), "15 expired at one minute");
    assert_eq!(offsets(replay), vec![16, 17]);
    assert_eq!(store.stats().trimmed_by_age, 8);
    assert_eq!(store.stats().trimmed_by_count, 7);
}

#[test]
fn pin_after_a_cap_trim() {
    // Room for 4 publications of "frame N" (7 bytes) and a little.
    let store = store_with_budget(100, 4 * cost(1) + 10);
    publish(&store, "c", 6, 0);
    assert_eq!(store.enforce_budget(), 2);
    assert_eq!(store.stats().trimmed_by_cap, 2);
    assert!(store.memory() <= 4 * cost(1) + 10);
    let replay = pin(&store, "c", 1, 0);
    assert!(!replay.recovered(), "2 was cut by the cap");
    assert_eq!(offsets(replay), vec![3, 4, 5, 6]);
    assert!(pin(&store, "c", 2, 0).recovered());
}

#[test]
fn a_pinned_replay_survives_trims_and_detached_memory_returns_to_zero() {
    let store = store(1000);
    let total = 3 * BLOCK_LEN + 10;
    publish(&store, "c", total, 0);
    let replay = pin(&store, "c", 0, 0);
    assert_eq!(store.detached_memory(), 0);

    // Everything expires: the three sealed blocks leave the ring but the replay holds them.
    assert_eq!(
        store.with_channel("c", MINUTE_MS, |h| h.trim_expired(MINUTE_MS)),
        Some(total as usize)
    );
    assert_eq!(store.memory(), 0);
    let sealed: usize = (1..=3 * BLOCK_LEN).map(cost).sum();
    assert_eq!(store.detached_memory(), sealed);

    assert!(replay.recovered());
    assert_eq!(offsets(replay), (1..=total).collect::<Vec<_>>());
    assert_eq!(store.detached_memory(), 0, "every block let go");
}

#[test]
fn a_replay_lets_go_of_blocks_as_it_passes_them() {
    let store = store(1000);
    publish(&store, "c", 2 * BLOCK_LEN, 0);
    let mut replay = pin(&store, "c", 0, 0);
    store.with_channel("c", MINUTE_MS, |h| h.trim_expired(MINUTE_MS));
    assert_eq!(
        store.detached_memory(),
        (1..=2 * BLOCK_LEN).map(cost).sum::<usize>()
    );
    for _ in 0..BLOCK_LEN {
        replay.next().unwrap();
    }
    let second: usize = (BLOCK_LEN + 1..=2 * BLOCK_LEN).map(cost).sum();
    assert_eq!(store.detached_memory(), second);
    drop(replay);
    assert_eq!(store.detached_memory(), 0);
}

#[test]
fn read_is_bounded_by_limit() {
    let store = store(10);
    publish(&store, "c", 30, 0);
    let lock = store.existing("c").unwrap();
    let page = lock.lock().read(22, 3, 0);
    assert!(page.recovered);
    assert_eq!(page.latest, 30);
    let got: Vec<u64> = page.publications.iter().map(|(o, _)| *o).collect();
    assert_eq!(got, vec![23, 24, 25]);
    assert_eq!(page.publications[0].1, frame(23));
    let page = lock.lock().read(0, 100, 0);
    assert!(!page.recovered);
    assert_eq!(page.publications.len(), 10);
    assert_eq!(page.publications[0].0, 21);
    let page = lock.lock().read(31, 100, 0);
    assert!(!page.recovered && page.publications.is_empty());
}

#[test]
fn rules_exact_beats_prefix_and_longest_prefix_wins() {
    let rules = HistoryRules::new()
        .prefix("a", policy(1))
        .prefix("a:b:", policy(3))
        .prefix("a:", policy(2))
        .channel("a:b:c", policy(4));
    let max = |c: &str| rules.policy_for(c).map(|p| p.max_publications());
    assert_eq!(max("a:b:c"), Some(4));
    assert_eq!(max("a:b:d"), Some(3));
    assert_eq!(max("a:x"), Some(2));
    assert_eq!(max("ab"), Some(1));
    assert_eq!(max("b"), None);
    // A rule added again replaces the first.
    let rules = rules.prefix("a:", policy(7));
    assert_eq!(rules.policy_for("a:x").unwrap().max_publications(), 7);
    assert!(HistoryRules::new().is_empty());
}

#[test]
fn policy_is_validated() {
    assert!(HistoryPolicy::new(0, Duration::from_secs(1))
        .unwrap_err()
        .is_config());
    assert!(HistoryPolicy::new(1, Duration::ZERO)
        .unwrap_err()
        .is_config());
    assert!(HistoryPolicy::new(1, Duration::from_micros(999))
        .unwrap_err()
        .is_config());
    assert_eq!(
        HistoryPolicy::new(0, Duration::ZERO)
            .unwrap_err()
            .to_string(),
        "invalid configuration: history max_publications must be at least 1"
    );
}

#[test]
fn sweep_removes_idle_expired_channels_and_keeps_subscribed_ones() {
    let store = store(100);
    publish(&store, "idle", 3, 0);
    publish(&store, "watched", 3, 0);
    publish(&store, "busy", 3, 0);
    publish(&store, "busy", 1, MINUTE_MS / 2);
    let watched = |c: &str| c == "watched";
    assert_eq!(store.sweep(MINUTE_MS - 1, watched), 0);
    assert_eq!(store.sweep(MINUTE_MS, watched), 1, "idle went");
    assert!(store.existing("idle").is_none());
    assert_eq!(
        store.existing("busy").unwrap().lock().len(),
        1,
        "its last is not expired"
    );
    assert_eq!(store.existing("watched").unwrap().lock().len(), 0);
    // Once its subscribers are gone, it goes max_age after the sweep that last saw them.
    assert_eq!(store.sweep(2 * MINUTE_MS - 1, |_| false), 1, "busy went");
    assert_eq!(store.sweep(2 * MINUTE_MS, |_| false), 1, "watched went");
    assert_eq!(store.stats().channels, 0);
    assert_eq!(store.memory(), 0);
    assert_eq!(store.stats().retained, 0);
}

#[test]
fn sweep_skips_a_channel_in_use() {
    let store = store(100);
    publish(&store, "c", 1, 0);
    let lock = store.existing("c").unwrap();
    let guard = lock.lock();
    assert_eq!(store.sweep(10 * MINUTE_MS, |_| false), 0);
    drop(guard);
    assert_eq!(store.sweep(10 * MINUTE_MS, |_| false), 1);
    assert!(lock.lock().is_removed());
}

#[test]
fn budget_trims_the_oldest_across_channels() {
    let store = store_with_budget(1000, 6 * cost(1));
    for (i, channel) in ["a", "b", "a", "c", "b", "a", "c", "c"]
        .into_iter()
        .enumerate()
    {
        publish(&store, channel, 1, i as u64);
        store.enforce_budget();
    }
    // 8 publications, room for 6: the first two (a:1, b:1) went.
    let first = |c: &str| store.existing(c).unwrap().lock().first_retained();
    assert_eq!((first("a"), first("b"), first("c")), (2, 2, 1));
    assert_eq!(store.stats().trimmed_by_cap, 2);
    assert_eq!(store.stats().retained, 6);
}

#[test]
fn budget_skips_publications_already_trimmed() {
    let store = store_with_budget(2, 3 * cost(10));
    publish(&store, "a", 10, 0); // a keeps 9 and 10; 1..=8 are stale in the queue
    publish(&store, "b", 2, 0);
    assert_eq!(store.enforce_budget(), 1, "only a:9 goes");
    assert_eq!(store.existing("a").unwrap().lock().first_retained(), 10);
    assert_eq!(store.stats().trimmed_by_count, 8);
}

#[test]
fn publish_order_queue_stays_bounded() {
    let store = store(2);
    publish(&store, "slow", 1, 0);
    publish(&store, "busy", 100_000, 0);
    assert!(
        store.publish_order_len() <= 2 * 3 + 1024 + 1,
        "{}",
        store.publish_order_len()
    );
    assert_eq!(store.stats().retained, 3);
}

#[test]
fn concurrent_publishers_get_consecutive_offsets() {
    const PER_THREAD: u64 = 2_000;
    let store = Arc::new(store(100_000));
    let start = Arc::new(Barrier::new(5));
    let publishers: Vec<_> = (0..4)
        .map(|_| {
            let (store, start) = (Arc::clone(&store), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                publish(&store, "c", PER_THREAD, 0);
                store.enforce_budget();
            })
        })
        .collect();
    let pinner = {
        let (store, start) = (Arc::clone(&store), Arc::clone(&start));
        std::thread::spawn(move || {
            start.wait();
            let mut last_latest = 0;
            for _ in 0..200 {
                let replay = pin(&store, "c", 0, 0);
                let latest = replay.latest();
                assert!(latest >= last_latest);
                last_latest = latest;
                assert!(replay.recovered());
                assert_eq!(offsets(replay), (1..=latest).collect::<Vec<_>>());
            }
        })
    };
    for thread in publishers {
        thread.join().unwrap();
    }
    pinner.join().unwrap();
    let replay = pin(&store, "c", 0, 0);
    assert_eq!(offsets(replay), (1..=4 * PER_THREAD).collect::<Vec<_>>());
}

/// The fuzz target `history`'s check (`model.rs`), driven by a seeded xorshift stream so that
/// it runs in `cargo test` too: 100 runs of 1,000 operations (a few seconds in a debug build).
#[test]
fn model_agrees_with_random_operations() {
    use super::model::{HistoryModelCheck, HistoryModelConfig, HistoryOp};

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn small(&mut self) -> u16 {
            self.next() as u16
        }
    }

    for run in 0..100u64 {
        let mut rng =
            XorShift(0x9E37_79B9_7F4A_7C15 ^ (run + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
        // Budgets from none to 64 KiB: the cap trims in most runs, and blocks fill in some.
        let config = HistoryModelConfig {
            max_publications: [rng.small(), rng.small()],
            max_age_ms: [rng.small(), rng.small()],
            budget: rng.small(),
        };
        let mut check = HistoryModelCheck::new(config);
        for _ in 0..1000 {
            let op = match rng.next() % 20 {
                0..=9 => HistoryOp::Append {
                    // "a" mostly, so that it fills blocks of 64.
                    channel: if rng.next().is_multiple_of(3) {
                        rng.next() as u8
                    } else {
                        0
                    },
                    // Short frames mostly, so that blocks of 64 fit under the budgets.
                    len: rng.small()
                        % if rng.next().is_multiple_of(4) {
                            300
                        } else {
                            24
                        },
                },
                10 => HistoryOp::EnforceBudget,
                11 => HistoryOp::Advance {
                    ms: rng.small() % 16,
                },
                12 | 13 => HistoryOp::Pin {
                    channel: if rng.next().is_multiple_of(3) {
                        rng.next() as u8
                    } else {
                        0
                    },
                    since: rng.small(),
                },
                14 => HistoryOp::Drain {
                    replay: rng.next() as u8,
                    count: rng.small() % 100,
                },
                15 => HistoryOp::DropReplay {
                    replay: rng.next() as u8,
                },
                16 => HistoryOp::Read {
                    channel: rng.next() as u8,
                    since: rng.small(),
                    limit: rng.next() as u8,
                },
                _ => HistoryOp::Sweep {
                    subscribed: rng.next() as u8,
                },
            };
            check.apply(op);
        }
    }
}
