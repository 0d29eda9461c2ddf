//! The shards' inboxes, and the bound on the work waiting in each.
//!
//! Each inbox's channel is unbounded so that what must never be refused or wait (a client's
//! register and remove, shutdown, stop: at most a few per connection) goes through it in
//! order with everything else; everything else is bounded by the inbox's backlog, in bytes of
//! [`Command::cost`]. Every command is charged its cost when it is sent and gives it back
//! where the shard takes it out of the inbox ([`Shard::run`](super::Shard::run)), whatever it
//! then does. The hub sends through [`Inboxes`]; each shard holds a clone to give back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

use crate::shard::Command;

/// One shard's inbox, and the bound on the work waiting in it.
struct ShardHandle {
    inbox: mpsc::UnboundedSender<Command>,
    /// Bytes of work in the inbox: the sum of its commands' [`Command::cost`].
    backlog: AtomicUsize,
    /// Someone waits in [`Inboxes::wait_for_room`]; the shard wakes them when it makes room.
    waiting: AtomicBool,
    room: Notify,
}

/// Every shard's inbox. Cheap to clone (the handles are shared); indexed by shard.
#[derive(Clone)]
pub(crate) struct Inboxes {
    shards: Arc<[ShardHandle]>,
    /// The most bytes of work waiting in one inbox (`shard_backlog_bytes`).
    bound: usize,
}

impl Inboxes {
    /// `count` inboxes bounded at `bound` bytes each, and their receiving ends, one per shard.
    pub(crate) fn new(count: usize, bound: usize) -> (Self, Vec<mpsc::UnboundedReceiver<Command>>) {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..count).map(|_| mpsc::unbounded_channel()).unzip();
        let shards = senders
            .into_iter()
            .map(|inbox| ShardHandle {
                inbox,
                backlog: AtomicUsize::new(0),
                waiting: AtomicBool::new(false),
                room: Notify::new(),
            })
            .collect();
        (Inboxes { shards, bound }, receivers)
    }

    /// How many shards there are.
    pub(crate) fn len(&self) -> usize {
        self.shards.len()
    }

    /// Sends `command` to shard `index` whatever its backlog: for what must never be refused
    /// (lifecycle commands, whose cost is zero) and for a client's requests, which its
    /// connection task only reads while the shard has room ([`has_room`](Self::has_room)).
    /// False if the shard has stopped.
    pub(crate) fn enqueue(&self, index: usize, command: Command) -> bool {
        let shard = &self.shards[index];
        let cost = command.cost();
        shard.backlog.fetch_add(cost, Ordering::Relaxed);
        if shard.inbox.send(command).is_err() {
            shard.backlog.fetch_sub(cost, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Sends `command` to shard `index` unless its backlog is over the bound; false (and
    /// nothing sent) if it is.
    pub(crate) fn try_enqueue(&self, index: usize, command: Command) -> bool {
        if !self.reserve(index, command.cost()) {
            return false;
        }
        self.send_reserved(index, command);
        true
    }

    /// Charges `cost` to shard `index`'s backlog, unless that takes it over the bound (an
    /// empty inbox takes anything, so a single large frame is never refused forever).
    pub(crate) fn reserve(&self, index: usize, cost: usize) -> bool {
        let backlog = &self.shards[index].backlog;
        let before = backlog.fetch_add(cost, Ordering::Relaxed);
        if before > 0 && before + cost > self.bound {
            self.give_back(index, cost);
            return false;
        }
        true
    }

    /// Sends a command whose cost was reserved; a shard that has stopped gives it back.
    pub(crate) fn send_reserved(&self, index: usize, command: Command) {
        let cost = command.cost();
        if self.shards[index].inbox.send(command).is_err() {
            self.give_back(index, cost);
        }
    }

    /// Returns `cost` bytes to shard `index`'s backlog: the shard took commands worth that
    /// out of its inbox (or a reservation was undone). Wakes whoever waits for room once
    /// there is some.
    pub(crate) fn give_back(&self, index: usize, cost: usize) {
        let shard = &self.shards[index];
        let after = shard
            .backlog
            .fetch_sub(cost, Ordering::SeqCst)
            .saturating_sub(cost);
        // SeqCst, with the waiter's store and load in `wait_for_room`: either the waiter sees
        // this room, or this sees the waiter.
        if after <= self.bound && shard.waiting.load(Ordering::SeqCst) {
            shard.waiting.store(false, Ordering::SeqCst);
            shard.room.notify_waiters();
        }
    }

    /// Whether shard `index` takes more work now.
    pub(crate) fn has_room(&self, index: usize) -> bool {
        self.shards[index].backlog.load(Ordering::SeqCst) <= self.bound
    }

    /// Waits until shard `index` has room for more work, or `stopped()` (the hub, which
    /// calls [`wake_waiters`](Self::wake_waiters) when it stops).
    pub(crate) async fn wait_for_room(&self, index: usize, stopped: impl Fn() -> bool) {
        let shard = &self.shards[index];
        loop {
            let notified = shard.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            shard.waiting.store(true, Ordering::SeqCst);
            if self.has_room(index) || stopped() {
                return;
            }
            notified.await;
        }
    }

    /// Wakes everyone waiting for room, so that they look again (the hub has stopped).
    pub(crate) fn wake_waiters(&self) {
        for shard in self.shards.iter() {
            shard.room.notify_waiters();
        }
    }

    /// Bytes of work in shard `index`'s inbox now.
    pub(crate) fn backlog(&self, index: usize) -> usize {
        self.shards[index].backlog.load(Ordering::Relaxed)
    }
}
