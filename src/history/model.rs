//! A model of the history store, simple enough to be obviously right, and a checker that
//! drives the store and the model with the same operations and compares them after each:
//! offsets, epochs, recovered flags, replay contents and every memory figure. The fuzz target
//! `history` feeds it arbitrary operations; `tests::model_agrees_with_random_operations` feeds
//! it a seeded random stream, so the check also runs in `cargo test`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use super::block::{BLOCK_LEN, ENTRY_OVERHEAD};
use super::{HistoryPolicy, HistoryRules, HistoryStore, Replay};

/// The channels of a run: one exact rule, two under a prefix rule, one without history.
const CHANNELS: [&str; 4] = ["a", "p:1", "p:2", "none"];
/// Replays alive at once, at most.
const MAX_REPLAYS: usize = 8;

/// One step of a run. Numbers are reduced to the run's ranges by the checker, so any value
/// is valid.
#[derive(Debug, Clone, Copy)]
pub enum HistoryOp {
    /// Publishes a frame of `len % 300` bytes.
    Append {
        /// Index into the run's channels.
        channel: u8,
        /// The frame's length.
        len: u16,
    },
    /// `HistoryStore::enforce_budget`.
    EnforceBudget,
    /// Moves the clock on.
    Advance {
        /// Milliseconds.
        ms: u16,
    },
    /// Pins a replay after `since % (latest + 3)` (so also beyond the latest).
    Pin {
        /// Index into the run's channels.
        channel: u8,
        /// The subscriber's last offset.
        since: u16,
    },
    /// Takes up to `count` publications from a live replay and checks them.
    Drain {
        /// Index into the live replays.
        replay: u8,
        /// How many.
        count: u16,
    },
    /// Drops a live replay, unread or partly read.
    DropReplay {
        /// Index into the live replays.
        replay: u8,
    },
    /// `ChannelHistory::read`.
    Read {
        /// Index into the run's channels.
        channel: u8,
        /// As for `Pin`.
        since: u16,
        /// The most to read.
        limit: u8,
    },
    /// `HistoryStore::sweep`, with the channels of the bits of `subscribed` having
    /// subscribers.
    Sweep {
        /// Bit i: channel i has subscribers.
        subscribed: u8,
    },
}

/// A run's settings, reduced to sensible ranges by [`HistoryModelCheck::new`].
#[derive(Debug, Clone, Copy)]
pub struct HistoryModelConfig {
    /// `max_publications` of channel "a" (1 to 300) and of the "p:" channels (1 to 100).
    pub max_publications: [u16; 2],
    /// `max_age` in ms of channel "a" and of the "p:" channels (1 to 1,000).
    pub max_age_ms: [u16; 2],
    /// The memory budget (up to 64 KiB).
    pub budget: u16,
}

#[derive(Debug, PartialEq, Eq)]
enum Held {
    /// Retained by its history.
    Retained,
    /// Trimmed, but its frame is still held: its block was pinned by a replay when trimmed.
    Pinned,
}

#[derive(Debug)]
struct ModelEntry {
    frame: Bytes,
    published_ms: u64,
    /// Global publish order, for the memory cap.
    seq: u64,
    held: Held,
}

impl ModelEntry {
    fn cost(&self) -> usize {
        self.frame.len() + ENTRY_OVERHEAD
    }
}

/// One channel history as the model sees it (a removed one stays while replays may hold
/// its blocks).
#[derive(Debug)]
struct ModelHistory {
    epoch: Option<String>,
    latest: u64,
    first: u64,
    last_active_ms: u64,
    max_publications: usize,
    max_age_ms: u64,
    /// Entries retained, and trimmed ones whose frames are still held.
    entries: BTreeMap<u64, ModelEntry>,
}

impl ModelHistory {
    fn len(&self) -> usize {
        (self.latest + 1 - self.first) as usize
    }
}

#[derive(Debug)]
struct ModelReplay {
    history: usize,
    replay: Replay,
    /// The blocks it pinned, by index (`(offset - 1) / BLOCK_LEN`); those before the one
    /// holding its next offset are let go.
    blocks: std::ops::Range<u64>,
    expected: VecDeque<(u64, Bytes)>,
}

impl ModelReplay {
    fn pins(&self, history: usize, block: u64) -> bool {
        let next_block = (self.replay.first_offset() - 1) / BLOCK_LEN;
        self.history == history && self.blocks.contains(&block) && block >= next_block
    }
}

/// Drives a `HistoryStore` and the model side by side; panics where they disagree.
pub struct HistoryModelCheck {
    store: HistoryStore,
    budget: usize,
    now_ms: u64,
    seq: u64,
    histories: Vec<ModelHistory>,
    /// The live history of each channel, by index into `histories`.
    current: HashMap<usize, usize>,
    replays: Vec<ModelReplay>,
    epochs_seen: Vec<String>,
    trimmed: [u64; 3],
}

const COUNT: usize = 0;
const AGE: usize = 1;
const CAP: usize = 2;

impl HistoryModelCheck {
    /// A store under `config`'s rules and budget, and an empty model.
    pub fn new(config: HistoryModelConfig) -> Self {
        let policy = |i: usize, max: u16| {
            HistoryPolicy::new(
                usize::from(config.max_publications[i] % max) + 1,
                Duration::from_millis(u64::from(config.max_age_ms[i] % 1000) + 1),
            )
            .expect("a valid policy")
        };
        let rules = HistoryRules::new()
            .channel("a", policy(0, 300))
            .prefix("p:", policy(1, 100));
        let budget = usize::from(config.budget);
        HistoryModelCheck {
            store: HistoryStore::new(rules, budget),
            budget,
            now_ms: 1_000,
            seq: 0,
            histories: Vec::new(),
            current: HashMap::new(),
            replays: Vec::new(),
            epochs_seen: Vec::new(),
            trimmed: [0; 3],
        }
    }

    /// Applies `op` to both and compares them.
    pub fn apply(&mut self, op: HistoryOp) {
        match op {
            HistoryOp::Append { channel, len } => self.append(channel, len),
            HistoryOp::EnforceBudget => self.enforce_budget(),
            HistoryOp::Advance { ms } => self.now_ms += u64::from(ms),
            HistoryOp::Pin { channel, since } => self.pin(channel, since),
            HistoryOp::Drain { replay, count } => self.drain(replay, count),
            HistoryOp::DropReplay { replay } => {
                if !self.replays.is_empty() {
                    let i = usize::from(replay) % self.replays.len();
                    self.replays.swap_remove(i);
                }
            }
            HistoryOp::Read {
                channel,
                since,
                limit,
            } => self.read(channel, since, limit),
            HistoryOp::Sweep { subscribed } => self.sweep(subscribed),
        }
        self.compare(op);
    }

    fn channel_index(channel: u8) -> usize {
        usize::from(channel) % CHANNELS.len()
    }

    /// The model's live history of `channel`, created as the store creates one.
    fn model_history(&mut self, channel: usize) -> Option<usize> {
        if let Some(&h) = self.current.get(&channel) {
            return Some(h);
        }
        let (max_publications, max_age_ms) = {
            let policy = self.store.rules.policy_for(CHANNELS[channel])?;
            (policy.max_publications(), policy.max_age_ms())
        };
        self.histories.push(ModelHistory {
            epoch: None,
            latest: 0,
            first: 1,
            last_active_ms: self.now_ms,
            max_publications,
            max_age_ms,
            entries: BTreeMap::new(),
        });
        let h = self.histories.len() - 1;
        self.current.insert(channel, h);
        Some(h)
    }

    /// The epoch the store reported for history `h`: the same for its whole life, and never
    /// one another history had.
    fn check_epoch(&mut self, h: usize, epoch: &str) {
        match &self.histories[h].epoch {
            Some(known) => assert_eq!(known, epoch, "epoch of a history changed"),
            None => {
                assert!(
                    !self.epochs_seen.iter().any(|e| e == epoch),
                    "epoch {epoch} reused"
                );
                self.epochs_seen.push(epoch.to_owned());
                self.histories[h].epoch = Some(epoch.to_owned());
            }
        }
    }

    fn append(&mut self, channel: u8, len: u16) {
        let channel = Self::channel_index(channel);
        let seq = self.seq;
        self.seq += 1;
        // The frame names its publication, so that a replay out of order shows.
        let frame: Bytes = seq
            .to_le_bytes()
            .iter()
            .copied()
            .cycle()
            .take(usize::from(len % 300))
            .collect::<Vec<u8>>()
            .into();
        let now_ms = self.now_ms;
        let got = self
            .store
            .with_channel(CHANNELS[channel], now_ms, |history| {
                let offset = history.next_offset();
                let epoch = history.epoch().to_string();
                assert_eq!(history.append(frame.clone(), now_ms), offset);
                (offset, epoch)
            });
        let Some(h) = self.model_history(channel) else {
            assert!(got.is_none(), "{} has no history", CHANNELS[channel]);
            return;
        };
        let (offset, epoch) = got.expect("a channel with history");
        self.check_epoch(h, &epoch);
        let history = &mut self.histories[h];
        history.latest += 1;
        history.last_active_ms = history.last_active_ms.max(now_ms);
        assert_eq!(offset, history.latest, "offset");
        history.entries.insert(
            offset,
            ModelEntry {
                frame,
                published_ms: now_ms,
                seq,
                held: Held::Retained,
            },
        );
        while self.histories[h].len() > self.histories[h].max_publications {
            self.trim_front(h, COUNT);
        }
        self.trim_expired(h);
    }

    fn trim_expired(&mut self, h: usize) {
        loop {
            let history = &self.histories[h];
            let Some(entry) = history.entries.get(&history.first) else {
                return;
            };
            if self.now_ms.saturating_sub(entry.published_ms) < history.max_age_ms {
                return;
            }
            self.trim_front(h, AGE);
        }
    }

    fn pinned(&self, h: usize, block: u64) -> bool {
        self.replays.iter().any(|r| r.pins(h, block))
    }

    fn trim_front(&mut self, h: usize, cause: usize) {
        let offset = self.histories[h].first;
        let block = (offset - 1) / BLOCK_LEN;
        let pinned = self.pinned(h, block);
        let history = &mut self.histories[h];
        history.first += 1;
        self.trimmed[cause] += 1;
        if pinned {
            history.entries.get_mut(&offset).expect("retained").held = Held::Pinned;
        } else {
            // Nobody holds the block: this frame and those of its block trimmed before it go.
            let gone: Vec<u64> = history
                .entries
                .range(block * BLOCK_LEN + 1..=offset)
                .map(|(&o, _)| o)
                .collect();
            for o in gone {
                history.entries.remove(&o);
            }
        }
    }

    fn enforce_budget(&mut self) {
        let trimmed = self.store.enforce_budget();
        let mut expected = 0;
        while self.memory() > self.budget {
            let oldest = self
                .current
                .values()
                .filter_map(|&h| {
                    let history = &self.histories[h];
                    history.entries.get(&history.first).map(|e| (e.seq, h))
                })
                .min();
            let Some((_, h)) = oldest else { break };
            self.trim_front(h, CAP);
            expected += 1;
        }
        assert_eq!(trimmed, expected, "trimmed by the cap");
    }

    /// The reduced `since`: up to two beyond the latest.
    fn since(&self, channel: usize, since: u16) -> u64 {
        let latest = self
            .current
            .get(&channel)
            .map_or(0, |&h| self.histories[h].latest);
        u64::from(since) % (latest + 3)
    }

    /// What a replay after `since` of history `h` holds, and whether it recovers.
    fn expected_after(&self, h: usize, since: u64) -> (bool, VecDeque<(u64, Bytes)>) {
        let history = &self.histories[h];
        if since > history.latest {
            return (false, VecDeque::new());
        }
        let start = (since + 1).max(history.first);
        let expected = (start..=history.latest)
            .map(|o| (o, history.entries[&o].frame.clone()))
            .collect();
        (since + 1 >= history.first, expected)
    }

    fn pin(&mut self, channel: u8, since: u16) {
        if self.replays.len() >= MAX_REPLAYS {
            self.replays.swap_remove(0);
        }
        let channel = Self::channel_index(channel);
        let since = self.since(channel, since);
        let now_ms = self.now_ms;
        let replay = self
            .store
            .with_channel(CHANNELS[channel], now_ms, |h| h.pin_after(since, now_ms));
        let Some(h) = self.model_history(channel) else {
            assert!(replay.is_none(), "{} has no history", CHANNELS[channel]);
            return;
        };
        let replay = replay.expect("a channel with history");
        self.check_epoch(h, replay.epoch());
        let history = &mut self.histories[h];
        history.last_active_ms = history.last_active_ms.max(now_ms);
        self.trim_expired(h);
        let (recovered, expected) = self.expected_after(h, since);
        let latest = self.histories[h].latest;
        assert_eq!(replay.latest(), latest, "latest at pin");
        assert_eq!(replay.recovered(), recovered, "recovered after {since}");
        assert_eq!(replay.remaining(), expected.len(), "replay length");
        // Sealed blocks from the one holding the first offset: those ending at or before
        // the latest.
        let blocks = match expected.front() {
            Some(&(start, _)) => (start - 1) / BLOCK_LEN..latest / BLOCK_LEN,
            None => 0..0,
        };
        self.replays.push(ModelReplay {
            history: h,
            replay,
            blocks,
            expected,
        });
    }

    fn drain(&mut self, replay: u8, count: u16) {
        if self.replays.is_empty() {
            return;
        }
        let i = usize::from(replay) % self.replays.len();
        let r = &mut self.replays[i];
        for _ in 0..count {
            let got = r.replay.next();
            let expected = r.expected.pop_front();
            assert_eq!(got, expected, "replay item");
            if got.is_none() {
                break;
            }
        }
        assert_eq!(r.replay.remaining(), r.expected.len());
    }

    fn read(&mut self, channel: u8, since: u16, limit: u8) {
        let channel = Self::channel_index(channel);
        let since = self.since(channel, since);
        let now_ms = self.now_ms;
        let page = self
            .store
            .existing(CHANNELS[channel])
            .map(|lock| lock.lock().read(since, usize::from(limit), now_ms));
        let Some(&h) = self.current.get(&channel) else {
            assert!(page.is_none(), "no history yet");
            return;
        };
        let page = page.expect("a history");
        self.check_epoch(h, &page.epoch);
        self.trim_expired(h);
        let (recovered, expected) = self.expected_after(h, since);
        assert_eq!(page.latest, self.histories[h].latest);
        assert_eq!(page.recovered, recovered);
        let expected: Vec<_> = expected.into_iter().take(usize::from(limit)).collect();
        assert_eq!(page.publications, expected, "read after {since}");
    }

    fn sweep(&mut self, subscribed: u8) {
        let now_ms = self.now_ms;
        let has_subscribers = |name: &str| {
            let i = CHANNELS
                .iter()
                .position(|c| *c == name)
                .expect("a known name");
            subscribed & (1 << i) != 0
        };
        let removed = self.store.sweep(now_ms, has_subscribers);
        let mut expected = 0;
        let mut live: Vec<(usize, usize)> = self.current.iter().map(|(&c, &h)| (c, h)).collect();
        live.sort_unstable();
        for (channel, h) in live {
            self.trim_expired(h);
            let history = &mut self.histories[h];
            if subscribed & (1 << channel) != 0 {
                history.last_active_ms = history.last_active_ms.max(now_ms);
            } else if history.first > history.latest
                && now_ms.saturating_sub(history.last_active_ms) >= history.max_age_ms
            {
                self.current.remove(&channel);
                expected += 1;
            }
        }
        assert_eq!(removed, expected, "channels removed by the sweep");
    }

    fn memory(&self) -> usize {
        self.current
            .values()
            .flat_map(|&h| self.histories[h].entries.values())
            .filter(|e| e.held == Held::Retained)
            .map(ModelEntry::cost)
            .sum()
    }

    /// Bytes of blocks out of their rings that a live replay holds.
    fn detached(&self) -> usize {
        let mut total = 0;
        for (h, history) in self.histories.iter().enumerate() {
            for (&offset, entry) in &history.entries {
                let block = (offset - 1) / BLOCK_LEN;
                let out_of_ring = history.first > (block + 1) * BLOCK_LEN;
                if entry.held == Held::Pinned && out_of_ring && self.pinned(h, block) {
                    total += entry.cost();
                }
            }
        }
        total
    }

    fn compare(&self, op: HistoryOp) {
        let stats = self.store.stats();
        let retained: usize = self
            .current
            .values()
            .map(|&h| self.histories[h].len())
            .sum();
        assert_eq!(stats.channels, self.current.len(), "channels after {op:?}");
        assert_eq!(stats.retained, retained, "retained after {op:?}");
        assert_eq!(stats.memory, self.memory(), "memory after {op:?}");
        assert_eq!(
            stats.detached_memory,
            self.detached(),
            "detached after {op:?}"
        );
        assert_eq!(
            [
                stats.trimmed_by_count,
                stats.trimmed_by_age,
                stats.trimmed_by_cap
            ],
            self.trimmed,
            "trims after {op:?}"
        );
        if self.replays.is_empty() {
            assert_eq!(stats.detached_memory, 0);
        }
        assert!(self.store.publish_order_len() <= 2 * retained + 1024 + 1);
        for (&channel, &h) in &self.current {
            let lock = self
                .store
                .existing(CHANNELS[channel])
                .expect("live in the store");
            let history = lock.lock();
            assert_eq!(
                history.latest(),
                self.histories[h].latest,
                "latest after {op:?}"
            );
            assert_eq!(
                history.first_retained(),
                self.histories[h].first,
                "first after {op:?}"
            );
        }
    }
}
