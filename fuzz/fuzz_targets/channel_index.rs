//! The channel index (one shard's tables and the hub's channel directory) under arbitrary
//! sequences of connect, subscribe, unsubscribe, disconnect and publish, checked after every
//! step against a simple model: who is subscribed to what, how many channels have
//! subscribers, and how many frames each client has been given (publishes, acknowledgements
//! and refusals).

#![no_main]

use std::collections::BTreeSet;

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wshub::bench_support::ShardHarness;
use wshub::{ClientId, HubConfig};

/// A few names, so that operations meet on the same channels; one is not ASCII.
const CHANNELS: [&str; 6] = ["a", "b", "news", "news.eu", "ünï", "x:y"];
/// The per-client subscription limit in these runs, small so that the fuzzer reaches it.
const MAX_SUBSCRIPTIONS: usize = 3;
/// Operations per run.
const MAX_OPS: usize = 512;

#[derive(Arbitrary, Debug)]
struct Input {
    /// go-ws strict mode: no acknowledgements, no error replies.
    strict: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Connect,
    Subscribe { client: u8, channel: u8 },
    Unsubscribe { client: u8, channel: u8 },
    Disconnect { client: u8 },
    Publish { channel: u8 },
    Flush,
}

/// What the hub should hold.
#[derive(Default)]
struct Model {
    /// Every client ever connected, in order; `None` once disconnected.
    subscriptions: Vec<Option<BTreeSet<&'static str>>>,
    /// Frames each client has been given (written at a flush).
    written: Vec<u64>,
    /// Frames staged for each client, written at the next flush (dropped if it goes first).
    staged: Vec<u64>,
}

impl Model {
    fn subscribers(&self, channel: &str) -> usize {
        self.subscriptions
            .iter()
            .flatten()
            .filter(|s| s.contains(channel))
            .count()
    }

    fn channels(&self) -> usize {
        CHANNELS.iter().filter(|c| self.subscribers(c) > 0).count()
    }

    fn flush(&mut self) {
        for (written, staged) in self.written.iter_mut().zip(&mut self.staged) {
            *written += std::mem::take(staged);
        }
    }
}

fuzz_target!(|input: Input| {
    let config = HubConfig::builder()
        .shards(1)
        .max_subscriptions(MAX_SUBSCRIPTIONS)
        .strict_go_ws(input.strict)
        .build()
        .expect("a valid configuration");
    let replies = u64::from(!input.strict);
    let mut harness = ShardHarness::new(config);
    let mut model = Model::default();
    let mut ids: Vec<ClientId> = Vec::new();
    let frame = Bytes::from_static(b"\x81\x02{}");

    for op in input.ops.iter().take(MAX_OPS) {
        // A client index picks among every client ever connected, the gone ones included
        // (operations on them must be harmless).
        let client = |i: u8| (!ids.is_empty()).then(|| usize::from(i) % ids.len());
        let channel = |i: u8| CHANNELS[usize::from(i) % CHANNELS.len()];
        match *op {
            Op::Connect => {
                ids.push(harness.connect());
                model.subscriptions.push(Some(BTreeSet::new()));
                model.written.push(0);
                model.staged.push(0);
            }
            Op::Subscribe {
                client: c,
                channel: ch,
            } => {
                let Some(c) = client(c) else { continue };
                let ch = channel(ch);
                harness.subscribe(ids[c], ch);
                if let Some(subs) = &mut model.subscriptions[c] {
                    if subs.contains(ch) || subs.len() < MAX_SUBSCRIPTIONS {
                        subs.insert(ch);
                    }
                    // Acknowledged, or refused with an error: one reply either way.
                    model.staged[c] += replies;
                }
            }
            Op::Unsubscribe {
                client: c,
                channel: ch,
            } => {
                let Some(c) = client(c) else { continue };
                let ch = channel(ch);
                harness.unsubscribe(ids[c], ch);
                if let Some(subs) = &mut model.subscriptions[c] {
                    subs.remove(ch);
                    model.staged[c] += replies;
                }
            }
            Op::Disconnect { client: c } => {
                let Some(c) = client(c) else { continue };
                harness.disconnect(ids[c]);
                // Frames staged for it and not yet written never will be.
                model.subscriptions[c] = None;
                model.staged[c] = 0;
            }
            Op::Publish { channel: ch } => {
                let ch = channel(ch);
                let delivered = harness.publish(ch, frame.clone());
                assert_eq!(delivered, model.subscribers(ch) > 0, "publish to {ch:?}");
                for (c, subs) in model.subscriptions.iter().enumerate() {
                    if subs.as_ref().is_some_and(|s| s.contains(ch)) {
                        model.staged[c] += 1;
                    }
                }
            }
            Op::Flush => {
                harness.flush();
                model.flush();
            }
        }
        assert_eq!(
            harness.client_count(),
            model.subscriptions.iter().flatten().count(),
            "clients after {op:?}"
        );
        assert_eq!(
            harness.channel_count(),
            model.channels(),
            "channels after {op:?}"
        );
        for ch in CHANNELS {
            assert_eq!(
                harness.subscriber_count(ch),
                model.subscribers(ch),
                "subscribers of {ch:?} after {op:?}"
            );
        }
        for (c, &id) in ids.iter().enumerate() {
            assert_eq!(
                harness.frames_received(id),
                model.written[c],
                "frames of client {c} after {op:?}"
            );
        }
    }
    harness.flush();
    model.flush();
    for (c, &id) in ids.iter().enumerate() {
        assert_eq!(
            harness.frames_received(id),
            model.written[c],
            "frames of client {c}"
        );
    }
});
