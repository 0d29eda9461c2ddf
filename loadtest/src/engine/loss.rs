//! Loss accounting. Sequence numbers count per channel, and each channel has exactly one
//! publisher (one of its subscribers, as in fanout.c), so every subscriber must see them in
//! order: a gap is a loss, a number seen again a duplicate. A step's messages are those numbered
//! from the step's first publish (`measure_start`) up to the channel's `next_seq` when it ends.
//! This file does that counting: each delivery as it is read, what subscribers are still owed
//! while a step drains, what never arrived once it is over, and how many deliveries the step's
//! publishes should have made.

use std::sync::atomic::Ordering::Relaxed;

use super::outcome::NodeOutcome;
use super::plan::Kind;
use super::shared::Chan;
use super::worker::Local;
use crate::stats::Counts;

/// Counts a delivery numbered `seq` to a subscriber (on `node`) that expects `next` next, in a
/// step whose first number is `ms`: a gap before it as lost, a number already passed as a
/// duplicate, otherwise the delivery and its `latency`. Returns whether it was a new delivery
/// of the step (neither from before the step nor a duplicate).
#[inline]
pub(super) fn delivery(
    counts: &mut Counts,
    node: usize,
    next: &mut u64,
    ms: u64,
    seq: u64,
    latency: u64,
) -> bool {
    if seq < ms {
        return false;
    }
    if *next < ms {
        *next = ms;
    }
    if seq >= *next {
        let gap = seq - *next;
        counts.lost += gap;
        *next = seq + 1;
        counts.delivered += 1;
        counts.hist.saturating_record(latency);
        if let Some(nc) = counts.nodes.get_mut(node) {
            nc.lost += gap;
            nc.delivered += 1;
            nc.hist.saturating_record(latency);
        }
        true
    } else {
        counts.duplicated += 1;
        if let Some(nc) = counts.nodes.get_mut(node) {
            nc.duplicated += 1;
        }
        false
    }
}

/// Messages of the current step that this thread's open subscribers have not received yet.
pub(super) fn pending(l: &Local, chans: &[Chan]) -> u64 {
    let mut n = 0;
    for c in l
        .conns
        .iter()
        .filter(|c| c.open && c.kind == Kind::Subscriber)
    {
        let ch = &chans[c.ch as usize];
        let (ms, end) = (ch.measure_start.load(Relaxed), ch.next_seq.load(Relaxed));
        if ms != u64::MAX {
            n += end.saturating_sub(c.next.max(ms));
        }
    }
    n
}

/// Once a step has drained: counts what each of this thread's subscribers never received as
/// lost, and moves each past the step's messages.
pub(super) fn count_missing(l: &mut Local, chans: &[Chan]) {
    for c in l.conns.iter_mut().filter(|c| c.kind == Kind::Subscriber) {
        let ch = &chans[c.ch as usize];
        let (ms, end) = (ch.measure_start.load(Relaxed), ch.next_seq.load(Relaxed));
        if ms != u64::MAX {
            let from = c.next.max(ms);
            l.counts.lost += end.saturating_sub(from);
            if let Some(n) = l.counts.nodes.get_mut(c.node as usize) {
                n.lost += end.saturating_sub(from);
            }
            c.next = from.max(end);
        }
    }
}

/// A step's publishes, and the deliveries they should have made (each channel's publishes x
/// its measured `subscribers`), in all and per node (with `counts`' per-node figures). `starts`
/// is each channel's next sequence number before the step: a channel whose step began before
/// it published nothing in this one.
pub(super) fn totals(
    chans: &[Chan],
    starts: &[u64],
    subscribers: &[u64],
    node_subscribers: &[Vec<u64>],
    counts: &Counts,
) -> (u64, u64, Vec<NodeOutcome>) {
    let mut published = 0;
    let mut expected = 0;
    let mut nodes: Vec<NodeOutcome> = (0..node_subscribers.first().map_or(0, Vec::len))
        .map(|n| NodeOutcome {
            subscribers: node_subscribers.iter().map(|v| v[n]).sum(),
            counts: counts.nodes.get(n).cloned().unwrap_or_default(),
            expected: 0,
        })
        .collect();
    for (i, c) in chans.iter().enumerate() {
        let ms = c.measure_start.load(Relaxed);
        let me = c.next_seq.load(Relaxed);
        let n = if ms == u64::MAX || ms < starts[i] {
            0
        } else {
            me - ms
        };
        published += n;
        expected += n * subscribers[i];
        for (node, subs) in nodes.iter_mut().zip(&node_subscribers[i]) {
            node.expected += n * subs;
        }
    }
    (published, expected, nodes)
}
