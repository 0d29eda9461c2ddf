//! The history layer (offsets, epochs, trims by count, age and the memory cap, pinned
//! replays, sweeps) under arbitrary operations, checked after each against a simple model:
//! offsets, epochs, recovered flags, replay contents and every memory figure. The model and
//! the comparison live in the library (`wshub::bench_support::HistoryModelCheck`), so that
//! `cargo test` runs the same check on a seeded random stream.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wshub::bench_support::{HistoryModelCheck, HistoryModelConfig, HistoryOp};

/// Operations per run.
const MAX_OPS: usize = 2048;

#[derive(Arbitrary, Debug)]
struct Input {
    /// `max_publications` of the exact and the prefix rule (reduced to 1..=300, 1..=100).
    max_publications: [u16; 2],
    /// `max_age` in ms of both rules (reduced to 1..=1000).
    max_age_ms: [u16; 2],
    /// The hub-wide memory budget in bytes.
    budget: u16,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Append { channel: u8, len: u16 },
    EnforceBudget,
    Advance { ms: u8 },
    Pin { channel: u8, since: u16 },
    Drain { replay: u8, count: u8 },
    DropReplay { replay: u8 },
    Read { channel: u8, since: u16, limit: u8 },
    Sweep { subscribed: u8 },
}

fuzz_target!(|input: Input| {
    let mut check = HistoryModelCheck::new(HistoryModelConfig {
        max_publications: input.max_publications,
        max_age_ms: input.max_age_ms,
        budget: input.budget,
    });
    for op in input.ops.iter().take(MAX_OPS) {
        check.apply(match *op {
            Op::Append { channel, len } => HistoryOp::Append { channel, len },
            Op::EnforceBudget => HistoryOp::EnforceBudget,
            Op::Advance { ms } => HistoryOp::Advance { ms: u16::from(ms) },
            Op::Pin { channel, since } => HistoryOp::Pin { channel, since },
            Op::Drain { replay, count } => HistoryOp::Drain {
                replay,
                count: u16::from(count),
            },
            Op::DropReplay { replay } => HistoryOp::DropReplay { replay },
            Op::Read {
                channel,
                since,
                limit,
            } => HistoryOp::Read {
                channel,
                since,
                limit,
            },
            Op::Sweep { subscribed } => HistoryOp::Sweep { subscribed },
        });
    }
});
