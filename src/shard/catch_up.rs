//! History channels in a shard: a subscriber between the moment its subscription takes effect
//! and the moment it is one of the channel's live members.
//!
//! A subscription to a history channel takes effect under the channel's sequencer lock
//! (`history/`), which publishers hold while they number a publication and hand it to the
//! shards: so at that moment the shard knows the channel's latest offset `X`, every publication
//! after `X` will reach this shard's inbox, and none up to `X` that is not there yet ever will.
//! What may still be in the inbox, behind the subscribe, is publications up to `X` (numbered
//! before the subscription took effect, while this shard already had members): the new
//! subscriber must not get those live, since its acknowledgement says "live from `X + 1`" and
//! its replay, if it asked for one, holds them.
//!
//! So a new subscriber is not put among the channel's `members` (the array the hot path walks)
//! until it can take the live stream as it comes. Until then it is [`CatchingUp`]: its replay
//! (a range of the history pinned at `X`) is written as fast as its socket takes it, outside
//! its outbound bound; live publications after `X` are held behind the replay (and count
//! against the bound); publications up to `X` are skipped. When the replay is written, the held
//! publications follow, and the subscriber joins `members`. A subscriber that asked for no
//! replay and has nothing in flight before it joins `members` at once: the common case costs
//! nothing on the hot path.
//!
//! Inside one shard, a channel's publications arrive in offset order (publishers enqueue them
//! under the sequencer lock); one whose offset is not above the last one the shard staged is a
//! leftover from before the shard's last subscriber left and a new one came, and is dropped.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::{entry_key, remove_member, Command, Shard, Subscription, CATCHING_UP};
use crate::conn::{Replayed, Sent, Slow, REPLAY_CHUNK};
use crate::history::{ChannelLock, Replay};
use crate::shard::directory::ChannelEntry;
use crate::wire::protocol::{Ack, Position, Since, TYPE_SUBSCRIBED};

/// The most bytes of one replay written in one turn of the shard before it lets the other
/// clients' commands run (it asks itself, through its inbox, for the rest).
const REPLAY_TURN_BYTES: usize = 256 * 1024;

/// The most bytes of a replay handed to the socket in one write.
const REPLAY_CHUNK_BYTES: usize = 64 * 1024;

/// A channel with history, as one shard sees it.
pub(crate) struct LocalHistory {
    /// The offset of the last publication given to the members: every member has everything
    /// up to it. A publication at or below it is a leftover (see the module docs).
    last_offset: u64,
    catching_up: Vec<CatchingUp>,
}

/// A subscriber that is not among the channel's members yet.
struct CatchingUp {
    slot: u32,
    /// Live publications up to this offset are skipped: the replay holds them, or they were
    /// published before the subscription took effect.
    skip_through: u64,
    /// What is left of the replay; `None` once it is written (or when there was none).
    replay: Option<Replay>,
    /// While replaying: the offset of the last replayed publication handed to the client's
    /// connection (sent or queued there).
    sent_through: u64,
    /// Live publications that came during the replay, in order, and their bytes: they count
    /// against the client's outbound bound.
    held: VecDeque<Bytes>,
    held_bytes: usize,
}

impl CatchingUp {
    /// The last offset sent or queued to the client: what a repeated plain subscribe's
    /// acknowledgement says (what follows it is the rest of the replay, then live). Without
    /// a replay, publications up to `skip_through` are the ones the client was told it has.
    fn last_offset(&self) -> u64 {
        if self.replay.is_some() {
            self.sent_through
        } else {
            self.skip_through
        }
    }
}

impl LocalHistory {
    /// A channel this shard has just joined when its latest offset was `latest`: nothing up
    /// to it can still reach this shard's inbox (this shard's bit was not set when it was
    /// numbered), so it counts as given.
    fn new(latest: u64) -> Self {
        LocalHistory {
            last_offset: latest,
            catching_up: Vec::new(),
        }
    }

    /// Whether the publication at `offset` is to be delivered, and if so records it as the
    /// last given. A message from another node (offset 0) is delivered as it comes.
    pub(super) fn take_offset(&mut self, offset: u64) -> bool {
        if offset == 0 {
            return true;
        }
        if offset <= self.last_offset {
            return false;
        }
        self.last_offset = offset;
        true
    }

    pub(super) fn has_catching_up(&self) -> bool {
        !self.catching_up.is_empty()
    }

    /// No subscriber is catching up.
    pub(super) fn is_idle(&self) -> bool {
        self.catching_up.is_empty()
    }

    /// Forgets `slot`'s catching up (it unsubscribed or left): its replay stops here.
    pub(super) fn forget(&mut self, slot: u32) {
        self.catching_up.retain(|c| c.slot != slot);
    }

    fn find(&mut self, slot: u32) -> Option<&mut CatchingUp> {
        self.catching_up.iter_mut().find(|c| c.slot == slot)
    }
}

impl Shard {
    /// A subscribe (with or without `since`) to a channel with history. `already` is the
    /// client's subscription if it has one.
    ///
    /// Under the channel's lock, so that no publication is numbered meanwhile: the shard
    /// joins the directory, reads the latest offset and pins the replay. Then the client is
    /// acknowledged with the position, and is a member at once if it needs nothing more;
    /// otherwise it catches up (module docs).
    pub(super) fn subscribe_with_history(
        &mut self,
        slot: u32,
        channel: &str,
        lock: &Arc<ChannelLock>,
        already: Option<Subscription>,
        since: Option<&Since<'static>>,
    ) {
        let now_ms = self.clock.now_ms();
        let mut lock = Arc::clone(lock);
        let mut history = lock.lock();
        // A sweep may have removed the history between the look-up and the lock (only a
        // channel without subscribers is removed: after the directory join below, it is not).
        while history.is_removed() {
            drop(history);
            let Some(again) = self.history.channel(channel, now_ms) else {
                return;
            };
            lock = again;
            history = lock.lock();
        }
        let local = match already {
            Some(subscription) => subscription.channel,
            None => self.local_channel_for(channel),
        };
        let latest = history.latest();
        let epoch = Arc::clone(history.epoch());
        let replay = since.map(|since| {
            let same_epoch = since.epoch.as_deref().is_none_or(|e| e == &*epoch);
            // Another epoch: the client must reset, and gets the whole current history.
            let after = if same_epoch { since.offset } else { 0 };
            (history.pin_after(after, now_ms), same_epoch)
        });
        drop(history);

        let Some(local_channel) = self.channels[local as usize].as_mut() else {
            return;
        };
        let local_history = local_channel
            .history
            .get_or_insert_with(|| Box::new(LocalHistory::new(latest)));

        let (ack_offset, recovered) = match (already, replay) {
            // A repeated plain subscribe: nothing changes; the position is the last offset
            // sent or queued to the client.
            (Some(subscription), None) => {
                let last = if subscription.position == CATCHING_UP {
                    local_history.find(slot).map_or(latest, |c| c.last_offset())
                } else {
                    local_history.last_offset
                };
                (last, None)
            }
            (already, replay) => {
                let recovered = replay.as_ref().map(|(r, same)| r.recovered() && *same);
                let replay = replay
                    .map(|(replay, _)| replay)
                    .filter(|replay| replay.remaining() > 0);
                let catching_up = CatchingUp {
                    slot,
                    skip_through: latest,
                    sent_through: replay.as_ref().map_or(latest, |r| r.first_offset() - 1),
                    replay,
                    held: VecDeque::new(),
                    held_bytes: 0,
                };
                let live_now = catching_up.replay.is_none() && local_history.last_offset >= latest;
                match already {
                    Some(subscription) if subscription.position == CATCHING_UP => {
                        // Starts again from the new position: what it held is in the replay.
                        local_history.forget(slot);
                        if live_now {
                            self.promote(local, slot);
                        } else {
                            self.catch_up(local, catching_up);
                        }
                    }
                    Some(subscription) => {
                        if !live_now {
                            remove_member(&mut self.clients, local_channel, subscription);
                            self.set_position(slot, local, CATCHING_UP);
                            self.catch_up(local, catching_up);
                        }
                    }
                    None => {
                        if let Some(client) = self.clients[slot as usize].as_mut() {
                            client.subscriptions.push(Subscription {
                                channel: local,
                                position: CATCHING_UP,
                            });
                        }
                        if live_now {
                            self.promote(local, slot);
                        } else {
                            self.catch_up(local, catching_up);
                        }
                    }
                }
                (latest, recovered)
            }
        };
        if let Some(client) = self.clients[slot as usize].as_ref() {
            client.conn.mark_history();
        }
        let ack = Ack {
            recovered,
            position: Some(Position {
                offset: ack_offset,
                epoch: &epoch,
            }),
        };
        self.acknowledge(slot, TYPE_SUBSCRIBED, channel, ack);
    }

    /// The channel's offsets start over after `latest` (`Command::HistoryReset`): the next
    /// publication is `latest + 1`. Subscribers still catching up stop their replay (of
    /// offsets the channel has left behind), get what was held behind it, and take the live
    /// stream: its next publication tells them of the new epoch.
    pub(super) fn reset_history(&mut self, entry: &Arc<ChannelEntry>, latest: u64) {
        let Some(&local) = self.channel_by_entry.get(&entry_key(entry)) else {
            return;
        };
        let Some(history) = self.channels[local as usize]
            .as_mut()
            .and_then(|c| c.history.as_mut())
        else {
            return;
        };
        history.last_offset = latest;
        let catching_up = std::mem::take(&mut history.catching_up);
        let mut over_bound = Vec::new();
        for c in catching_up {
            if !c.held.is_empty() {
                if let Some(conn) = self.clients[c.slot as usize]
                    .as_ref()
                    .map(|client| Arc::clone(&client.conn))
                {
                    let held: Vec<Bytes> = c.held.into_iter().collect();
                    let order: Vec<u32> = (0..held.len() as u32).collect();
                    if let Sent::SlowConsumer = conn.send(&held, &order, &self.env) {
                        over_bound.push(c.slot);
                        continue;
                    }
                }
            }
            self.promote(local, c.slot);
        }
        self.remove_cut(over_bound);
    }

    /// Adds a catching-up subscriber to local channel `local`, and has its replay written
    /// after this batch's flush (which sends its acknowledgement first).
    fn catch_up(&mut self, local: u32, catching_up: CatchingUp) {
        let slot = catching_up.slot;
        let has_replay = catching_up.replay.is_some();
        if let Some(history) = self.channels[local as usize]
            .as_mut()
            .and_then(|c| c.history.as_mut())
        {
            history.catching_up.push(catching_up);
            if has_replay {
                self.feeding.push((slot, local));
            }
        }
    }

    /// Makes `slot` a member of local channel `local` (it was catching up, or just
    /// subscribed with nothing to catch up on).
    fn promote(&mut self, local: u32, slot: u32) {
        let Some(channel) = self.channels[local as usize].as_mut() else {
            return;
        };
        if let Some(history) = channel.history.as_mut() {
            history.forget(slot);
        }
        let position = channel.members.len() as u32;
        channel.members.push(slot);
        self.set_position(slot, local, position);
    }

    /// Sets the position of `slot`'s subscription to local channel `local`.
    fn set_position(&mut self, slot: u32, local: u32, position: u32) {
        if let Some(client) = self.clients[slot as usize].as_mut() {
            for s in client.subscriptions.iter_mut() {
                if s.channel == local {
                    s.position = position;
                }
            }
        }
    }

    /// A publication of local channel `local` (frame `index` of the batch, at `offset`) for
    /// its catching-up subscribers: skipped by those whose replay holds it (or who
    /// subscribed after it), held behind a replay still being written, and otherwise staged,
    /// which makes the subscriber a member.
    pub(super) fn publish_to_catching_up(&mut self, local: u32, index: u32, offset: u64) {
        let bound = self.env.limits.outbound_queue_bytes;
        let Some(history) = self.channels[local as usize]
            .as_mut()
            .and_then(|c| c.history.as_mut())
        else {
            return;
        };
        let frame = self.batch.frames[index as usize].clone();
        let mut promoted = Vec::new();
        let mut over_bound = Vec::new();
        for c in history.catching_up.iter_mut() {
            if offset != 0 && offset <= c.skip_through {
                continue;
            }
            if c.replay.is_some() {
                c.held.push_back(frame.clone());
                c.held_bytes += frame.len();
                let queued = self.clients[c.slot as usize]
                    .as_ref()
                    .map_or(0, |client| client.conn.queued_bytes());
                if c.held_bytes + queued > bound {
                    over_bound.push(c.slot);
                }
            } else {
                self.batch.stage(&mut self.clients, c.slot, index);
                if offset != 0 {
                    promoted.push(c.slot);
                }
            }
        }
        for slot in promoted {
            self.promote(local, slot);
        }
        self.cut_over_bound(over_bound);
    }

    /// Cuts clients whose publications held behind a replay outgrew their outbound bound:
    /// they read slower than the channel publishes (they can recover again).
    fn cut_over_bound(&mut self, slots: Vec<u32>) {
        for slot in slots {
            if let Some(client) = self.clients[slot as usize].as_ref() {
                client.conn.close_slow(Slow::QueueBound, &self.env);
            }
            self.remove_client(slot);
        }
    }

    /// Client `slot`'s queue drained while its replays waited: write more of each.
    pub(super) fn want_feed(&mut self, slot: u32) {
        let Some(client) = self.clients[slot as usize].as_ref() else {
            return;
        };
        for s in &client.subscriptions {
            if s.position == CATCHING_UP {
                self.feeding.push((slot, s.channel));
            }
        }
    }

    /// Writes the replays waiting to be written, each as far as its socket takes it now and
    /// at most [`REPLAY_TURN_BYTES`] per turn (then the shard asks itself for the rest
    /// through its inbox, behind other work). A replay written to its end is followed by the
    /// publications held behind it, and its subscriber becomes a member.
    pub(super) fn feed_replays(&mut self) {
        let mut over_bound = Vec::new();
        let mut chunk: Vec<Bytes> = Vec::with_capacity(REPLAY_CHUNK);
        for (slot, local) in std::mem::take(&mut self.feeding) {
            let Some(conn) = self.clients[slot as usize]
                .as_ref()
                .map(|client| Arc::clone(&client.conn))
            else {
                continue;
            };
            let Some(history) = self.channels[local as usize]
                .as_mut()
                .and_then(|c| c.history.as_mut())
            else {
                continue;
            };
            let last_offset = history.last_offset;
            let Some(catching_up) = history.find(slot) else {
                continue;
            };
            let Some(replay) = catching_up.replay.as_mut() else {
                continue;
            };
            let mut written = 0;
            let mut replayed = 0u64;
            let mut last = catching_up.sent_through;
            let done = loop {
                chunk.clear();
                let mut bytes = 0;
                while chunk.len() < REPLAY_CHUNK && bytes < REPLAY_CHUNK_BYTES {
                    let Some((offset, frame)) = replay.next() else {
                        break;
                    };
                    bytes += frame.len();
                    chunk.push(frame);
                    last = offset;
                }
                if chunk.is_empty() {
                    break true;
                }
                replayed += chunk.len() as u64;
                let handed = conn.send_replay(&chunk, &self.env);
                catching_up.sent_through = last;
                match handed {
                    Replayed::Taken => {
                        written += bytes;
                        if written >= REPLAY_TURN_BYTES {
                            if replay.remaining() == 0 {
                                break true;
                            }
                            let client = conn.info.id;
                            self.inboxes
                                .enqueue(self.index, Command::FeedReplay { client });
                            break false;
                        }
                    }
                    // The connection task asks for more when the queue has drained.
                    Replayed::Later => break replay.remaining() == 0,
                    Replayed::Closed => break false,
                }
            };
            chunk.clear();
            self.env
                .counters
                .delivered
                .fetch_add(replayed, Ordering::Relaxed);
            if !done {
                continue;
            }
            // Written to its end: the publications held behind it follow (and count against
            // the bound), and the subscriber takes the live stream from here.
            catching_up.replay = None;
            let held: Vec<Bytes> = catching_up.held.drain(..).collect();
            catching_up.held_bytes = 0;
            let caught_up = !held.is_empty() || last_offset >= catching_up.skip_through;
            if !held.is_empty() {
                let order: Vec<u32> = (0..held.len() as u32).collect();
                match conn.send(&held, &order, &self.env) {
                    Sent::SlowConsumer => {
                        over_bound.push(slot);
                        continue;
                    }
                    Sent::Ok | Sent::Queued => {
                        self.env
                            .counters
                            .delivered
                            .fetch_add(held.len() as u64, Ordering::Relaxed);
                    }
                    Sent::Closed => {}
                }
            }
            if caught_up {
                self.promote(local, slot);
            }
        }
        self.remove_cut(over_bound);
    }

    /// Removes clients their send already cut as slow consumers.
    fn remove_cut(&mut self, slots: Vec<u32>) {
        for slot in slots {
            self.remove_client(slot);
        }
    }
}
