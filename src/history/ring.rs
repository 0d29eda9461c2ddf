//! One channel's history: its offset counter, epoch and ring of publications, behind the lock
//! that makes it the channel's sequencer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};

use bytes::Bytes;

use super::block::{Block, Entry, BLOCK_LEN};
use super::ledger::{Ledger, TrimCause};
use super::policy::HistoryPolicy;
use super::replay::{Page, Replay};

/// A channel's history behind its lock, shared by the store's map, its callers and the
/// publish-order queue of the memory cap.
///
/// Holding the lock makes the holder the channel's sequencer: a publisher reads
/// [`ChannelHistory::next_offset`] and [`ChannelHistory::epoch`], encodes the frame, hands it
/// to the shards and [`appends`](ChannelHistory::append) it, all under the lock, so that the
/// offsets reach every shard in order whatever the number of publishers.
pub(crate) struct ChannelLock {
    /// The first offset still retained (`latest + 1` when none is): the publish-order queue
    /// reads it to skip trimmed publications without taking the lock. Only grows.
    retained_from: AtomicU64,
    history: Mutex<ChannelHistory>,
}

impl ChannelLock {
    pub(crate) fn new(
        policy: HistoryPolicy,
        epoch: Arc<str>,
        ledger: Arc<Ledger>,
        now_ms: u64,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| ChannelLock {
            retained_from: AtomicU64::new(1),
            history: Mutex::new(ChannelHistory {
                this: Weak::clone(this),
                policy,
                epoch,
                latest: 0,
                first: 1,
                blocks: VecDeque::new(),
                tail: VecDeque::new(),
                last_active_ms: now_ms,
                removed: false,
                ledger,
            }),
        })
    }

    /// Locks the history. A panic under the lock leaves the ring whole (every change to it is
    /// one push, one pop or one counter step), so a poisoned lock is safe to keep using.
    pub(crate) fn lock(&self) -> MutexGuard<'_, ChannelHistory> {
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lock if nobody holds it: the sweep never waits for a channel (see
    /// `HistoryStore::sweep`).
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, ChannelHistory>> {
        match self.history.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The publication at `offset` was trimmed (or this history was removed and emptied).
    pub(crate) fn is_trimmed(&self, offset: u64) -> bool {
        offset < self.retained_from.load(Ordering::Acquire)
    }
}

/// The state of one channel's history (see [`ChannelLock`] for how it is used).
///
/// Retained publications are offsets `first_retained()..=latest()`: the oldest in sealed
/// [`Block`]s of [`BLOCK_LEN`], the newest in the open tail. Trimming goes from the front, by
/// count and age here and by the store-wide memory cap (`trim_through`); it never changes the
/// epoch or the offsets.
pub(crate) struct ChannelHistory {
    /// Its own lock, for the entries it puts in the publish-order queue.
    this: Weak<ChannelLock>,
    policy: HistoryPolicy,
    epoch: Arc<str>,
    latest: u64,
    /// The first retained offset; `latest + 1` when none is.
    first: u64,
    /// Sealed blocks, oldest first; only the first may hold trimmed entries before `first`.
    blocks: VecDeque<Arc<Block>>,
    /// The open block: retained publications after the last sealed block (all of them when
    /// there is none). Sealed when its last offset is a multiple of `BLOCK_LEN`.
    tail: VecDeque<Entry>,
    /// The last publication, pin or sweep that found subscribers: the history goes `max_age`
    /// after it when it is empty and has no subscribers.
    last_active_ms: u64,
    /// The store's sweep took it out of the map: the caller must look the channel up again.
    removed: bool,
    ledger: Arc<Ledger>,
}

impl ChannelHistory {
    /// The epoch every offset of this history belongs to.
    pub(crate) fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// The last offset published; 0 before the first publication.
    pub(crate) fn latest(&self) -> u64 {
        self.latest
    }

    /// The offset the next [`append`](Self::append) gives.
    pub(crate) fn next_offset(&self) -> u64 {
        self.latest + 1
    }

    /// The oldest offset still held; `latest() + 1` when none is.
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn first_retained(&self) -> u64 {
        self.first
    }

    /// Publications retained.
    pub(crate) fn len(&self) -> usize {
        (self.latest + 1 - self.first) as usize
    }

    /// The store's sweep removed this history after the caller looked it up: publishing to it
    /// would use an epoch nobody can find again. Look the channel up again
    /// (`HistoryStore::with_channel` does).
    pub(crate) fn is_removed(&self) -> bool {
        self.removed
    }

    /// Appends `frame` (already encoded with [`next_offset`](Self::next_offset) and the epoch)
    /// and returns its offset; then trims by count and age as of `now_ms`. Only after every
    /// shard took the frame: a refused publish must not consume an offset.
    ///
    /// The caller then calls `HistoryStore::enforce_budget`, after unlocking.
    pub(crate) fn append(&mut self, frame: Bytes, now_ms: u64) -> u64 {
        let offset = self.latest + 1;
        let entry = Entry {
            frame,
            published_ms: now_ms,
        };
        let cost = entry.cost();
        self.tail.push_back(entry);
        self.latest = offset;
        self.last_active_ms = self.last_active_ms.max(now_ms);
        let this = self
            .this
            .upgrade()
            .expect("a history is only reached through its lock, which is alive");
        self.ledger.record_append(Arc::clone(&this), offset, cost);
        while self.len() > self.policy.max_publications() {
            self.trim_front(TrimCause::Count);
        }
        self.trim_expired_inner(now_ms);
        // After the trims: a block sealed now holds no publication already gone.
        if offset.is_multiple_of(BLOCK_LEN) && !self.tail.is_empty() {
            let first = self.latest + 1 - self.tail.len() as u64;
            let entries: Box<[Entry]> = self.tail.drain(..).collect();
            self.blocks.push_back(Arc::new(Block::seal(
                first,
                entries,
                Arc::clone(&self.ledger),
            )));
        }
        this.retained_from.store(self.first, Ordering::Release);
        offset
    }

    /// Starts over at `epoch` with `latest` as the last offset, dropping what is retained:
    /// the next [`append`](Self::append) gives `latest + 1`. For a history whose offsets
    /// another store assigns (Redis): a new epoch there, or publications it no longer holds
    /// (then the epoch is the same and `latest` skips them). Replays already pinned keep what
    /// they hold.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    pub(crate) fn reset(&mut self, epoch: Arc<str>, latest: u64) {
        while self.first <= self.latest {
            self.trim_front(TrimCause::Count);
        }
        // Trimming every retained entry let go of every block and emptied the tail.
        debug_assert!(self.blocks.is_empty() && self.tail.is_empty());
        self.epoch = epoch;
        self.latest = latest;
        self.first = latest + 1;
        self.publish_retained_from();
    }

    /// Pins the publications after `since` for a subscriber, as they stand now (after trimming
    /// those older than `max_age` at `now_ms`): later trims do not cut the replay. Counts as
    /// activity, so the history outlives its subscribers by `max_age`.
    ///
    /// [`Replay::recovered`] says whether every offset in (`since`, `latest`] is in it:
    /// true when `since == latest`, false (and empty) when `since > latest`, false (with what
    /// is left) when `since + 1` was trimmed.
    pub(crate) fn pin_after(&mut self, since: u64, now_ms: u64) -> Replay {
        self.last_active_ms = self.last_active_ms.max(now_ms);
        self.trim_expired(now_ms);
        self.replay_after(since)
    }

    /// At most `limit` publications after `since` (after trimming expired ones at `now_ms`),
    /// for `Hub::history`. Not activity: reading does not keep the history alive.
    pub(crate) fn read(&mut self, since: u64, limit: usize, now_ms: u64) -> Page {
        self.trim_expired(now_ms);
        let replay = self.replay_after(since);
        Page {
            epoch: Arc::clone(&self.epoch),
            latest: self.latest,
            recovered: replay.recovered(),
            publications: replay.take(limit).collect(),
        }
    }

    /// The frame retained at `offset`, if it still is.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    pub(crate) fn frame_at(&self, offset: u64) -> Option<Bytes> {
        if offset < self.first || offset > self.latest {
            return None;
        }
        self.replay_after(offset - 1).next().map(|(_, frame)| frame)
    }

    fn replay_after(&self, since: u64) -> Replay {
        if since > self.latest {
            return Replay::nothing(Arc::clone(&self.epoch), self.latest);
        }
        let recovered = since + 1 >= self.first;
        let start = (since + 1).max(self.first);
        let blocks = self
            .blocks
            .iter()
            .filter(|block| block.last_offset() >= start)
            .cloned()
            .collect();
        let tail_first = self.latest + 1 - self.tail.len() as u64;
        let skip = start.saturating_sub(tail_first) as usize;
        let tail = self
            .tail
            .iter()
            .skip(skip)
            .map(|e| e.frame.clone())
            .collect();
        Replay::new(
            Arc::clone(&self.epoch),
            self.latest,
            recovered,
            start,
            blocks,
            tail,
        )
    }

    /// Trims the publications older than `max_age` at `now_ms`; returns how many.
    pub(crate) fn trim_expired(&mut self, now_ms: u64) -> usize {
        let trimmed = self.trim_expired_inner(now_ms);
        if trimmed > 0 {
            self.publish_retained_from();
        }
        trimmed
    }

    /// Trims every publication up to `offset` still retained, for the memory cap.
    pub(crate) fn trim_through(&mut self, offset: u64, cause: TrimCause) -> usize {
        let mut trimmed = 0;
        while self.first <= offset.min(self.latest) {
            self.trim_front(cause);
            trimmed += 1;
        }
        if trimmed > 0 {
            self.publish_retained_from();
        }
        trimmed
    }

    /// For the sweep: trims what expired; then whether the history may go (nothing retained,
    /// no subscribers, idle for `max_age`) and, if so, marks it removed.
    pub(crate) fn sweep(&mut self, now_ms: u64, has_subscribers: bool) -> bool {
        self.trim_expired(now_ms);
        if has_subscribers {
            self.last_active_ms = self.last_active_ms.max(now_ms);
            return false;
        }
        let idle = now_ms.saturating_sub(self.last_active_ms) >= self.policy.max_age_ms();
        self.removed = idle && self.first > self.latest;
        self.removed
    }

    fn trim_expired_inner(&mut self, now_ms: u64) -> usize {
        let max_age = self.policy.max_age_ms();
        let mut trimmed = 0;
        while self.first <= self.latest
            && now_ms.saturating_sub(self.oldest_published_ms()) >= max_age
        {
            self.trim_front(TrimCause::Age);
            trimmed += 1;
        }
        trimmed
    }

    fn oldest_published_ms(&self) -> u64 {
        match self.blocks.front() {
            Some(block) => block.entry(self.first).published_ms,
            None => self.tail.front().map_or(u64::MAX, |e| e.published_ms),
        }
    }

    /// Trims the oldest retained publication (there must be one). Publishes nothing to
    /// `retained_from`: callers do once they are done.
    fn trim_front(&mut self, cause: TrimCause) {
        let offset = self.first;
        debug_assert!(offset <= self.latest);
        let cost = match self.blocks.front_mut() {
            Some(head) => {
                let cost = head.entry(offset).cost();
                if offset == head.last_offset() {
                    let block = self.blocks.pop_front().expect("the head block");
                    Block::leave_ring(block);
                } else if let Some(head) = Arc::get_mut(head) {
                    // Nobody else holds it: free the frame now rather than when the whole
                    // block goes. (While a replay holds it, its frames stay until the block
                    // leaves the ring, uncounted: at most 63 per channel.)
                    head.free_through(offset);
                }
                cost
            }
            None => self.tail.pop_front().expect("a retained entry").cost(),
        };
        self.first += 1;
        self.ledger.record_trim(cost, cause);
    }

    fn publish_retained_from(&self) {
        if let Some(this) = self.this.upgrade() {
            this.retained_from.store(self.first, Ordering::Release);
        }
    }
}

impl Drop for ChannelHistory {
    /// A history removed by the sweep is empty; one dropped with publications (the store
    /// dropped, or a publisher that raced the sweep appended to it) gives their bytes back.
    fn drop(&mut self) {
        while self.first <= self.latest {
            self.trim_front(TrimCause::Age);
        }
    }
}
