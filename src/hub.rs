//! The [`Hub`] handle: the public API, and routing of every call to the shards.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::broker::{Broker, Inbound, LocalNode, Numbered, Target};
use crate::client::{ChannelSnapshot, ClientId, ClientSnapshot};
use crate::config::HubConfig;
use crate::conn::idle::Runner;
use crate::conn::{self, Clock};
use crate::error::{Error, Result};
use crate::history::{HistoryPage, HistoryStore, Publication, StreamPosition};
use crate::shard::directory::{ChannelActivity, ChannelDirectory, ChannelEntry};
use crate::shard::inbox::Inboxes;
use crate::shard::{self, Command, Shard, ShardConfig, Stamp};
use crate::stats::{Counters, HistoryFigures, HubStats};
use crate::wire::frame::is_valid_close_code;
use crate::wire::protocol::{
    self, Envelope, ErrorReason, Message, Position, TYPE_EVENT, TYPE_MESSAGE,
};

const RUNNING: u8 = 0;
const SHUTTING_DOWN: u8 = 1;
const STOPPED: u8 = 2;

/// How long, past the drain deadline, shutdown waits for connection tasks to finish their
/// close handshakes before it stops the shards anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// What the hub, its shards and its connection tasks share.
pub(crate) struct Shared {
    pub(crate) config: HubConfig,
    pub(crate) counters: Arc<Counters>,
    /// What connections' write paths get: their limits and the counters (a clone of
    /// `counters`).
    pub(crate) conn_env: conn::Env,
    pub(crate) channels: Arc<ChannelDirectory>,
    /// The channels' histories (`history/`): empty, and never looked at, unless the
    /// configuration gives some channel a history.
    pub(crate) history: Arc<HistoryStore>,
    /// The shards' inboxes and their backlog bounds (`shard/inbox.rs`).
    inboxes: Inboxes,
    /// What each shard reads of the configuration.
    shard_config: ShardConfig,
    pub(crate) clock: Clock,
    next_client: AtomicU64,
    state: AtomicU8,
    /// Flips to true when shutdown begins; accept loops and new upgrades watch it.
    pub(crate) shutting_down: watch::Sender<bool>,
    /// Notified when the last connection task ends.
    tasks_idle: Notify,
    /// The process ids that [`Hub::stream_process`] is running (`process.rs`): a second run of
    /// one of them is refused.
    pub(crate) running_processes: Mutex<HashSet<Box<str>>>,
    /// Where each shard's idle TCP connections wait, with no task of their own
    /// (`conn/idle.rs`).
    pub(crate) runners: Runners,
}

/// One [`Runner`] per shard; their tasks end with the hub.
pub(crate) struct Runners(Box<[Arc<Runner>]>);

impl Runners {
    fn new(shards: usize) -> Self {
        Runners((0..shards).map(|_| Arc::default()).collect())
    }

    /// The runner of shard `index`.
    pub(crate) fn get(&self, index: usize) -> &Arc<Runner> {
        &self.0[index]
    }
}

impl Drop for Runners {
    fn drop(&mut self) {
        for runner in self.0.iter() {
            runner.stop();
        }
    }
}

impl Shared {
    /// Milliseconds since the hub was created: the clock of keep-alive.
    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub(crate) fn is_running(&self) -> bool {
        self.state.load(Ordering::Acquire) == RUNNING
    }

    pub(crate) fn next_client_id(&self) -> ClientId {
        ClientId(self.next_client.fetch_add(1, Ordering::Relaxed))
    }

    /// The shard that owns `client`.
    pub(crate) fn shard_index(&self, client: ClientId) -> usize {
        (client.0 % self.inboxes.len() as u64) as usize
    }

    /// Sends `command` to shard `index` whatever its backlog (see [`Inboxes::enqueue`]).
    pub(crate) fn enqueue(&self, index: usize, command: Command) -> Result<()> {
        if self.inboxes.enqueue(index, command) {
            Ok(())
        } else {
            Err(Error::closed())
        }
    }

    /// Sends `command` to shard `index` unless its backlog is over the bound: the API calls
    /// that carry work to one client's shard.
    fn try_enqueue(&self, index: usize, command: Command) -> Result<()> {
        if !self.inboxes.try_enqueue(index, command) {
            self.counters
                .backlog_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(shard = index, "shard backlog over its bound: call refused");
            return Err(Error::overloaded(index));
        }
        Ok(())
    }

    /// Whether shard `index` takes more work now.
    pub(crate) fn has_room(&self, index: usize) -> bool {
        self.inboxes.has_room(index)
    }

    /// Waits until shard `index` has room for more work (or the hub stops).
    pub(crate) async fn wait_for_room(&self, index: usize) {
        self.inboxes
            .wait_for_room(index, || !self.is_running())
            .await;
    }

    /// Shard `index`, to run: what it reads of the configuration, the write path's limits
    /// and the counters, the clock, the channel directory and the inboxes, each its own
    /// handle (the shard never sees `Shared`).
    pub(crate) fn new_shard(&self, index: usize) -> Shard {
        Shard::new(
            index,
            shard::Context {
                config: self.shard_config,
                env: conn::Env {
                    limits: self.conn_env.limits,
                    counters: Arc::clone(&self.counters),
                },
                clock: self.clock,
                directory: Arc::clone(&self.channels),
                history: Arc::clone(&self.history),
                inboxes: self.inboxes.clone(),
            },
        )
    }

    /// Sends one command to each shard in `mask`, all or nothing: the cost is reserved on
    /// every shard first, and if one is over its bound none is sent and the call is refused.
    /// `make(index, last)` builds shard `index`'s command; `last` is true for the last one.
    fn fan_out(
        &self,
        mask: u64,
        cost: usize,
        mut make: impl FnMut(usize, bool) -> Command,
    ) -> Result<()> {
        let mut reserved = 0u64;
        let mut rest = mask;
        while rest != 0 {
            let index = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            if !self.inboxes.reserve(index, cost) {
                let mut undo = reserved;
                while undo != 0 {
                    self.inboxes.give_back(undo.trailing_zeros() as usize, cost);
                    undo &= undo - 1;
                }
                self.counters
                    .backlog_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    shard = index,
                    "shard backlog over its bound: publish refused"
                );
                return Err(Error::overloaded(index));
            }
            reserved |= 1 << index;
        }
        let mut rest = mask;
        while rest != 0 {
            let index = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            let command = make(index, rest == 0);
            debug_assert_eq!(command.cost(), cost, "reserved what the command costs");
            self.inboxes.send_reserved(index, command);
        }
        Ok(())
    }

    /// Every shard's bit.
    fn all_shards(&self) -> u64 {
        u64::MAX >> (64 - self.inboxes.len())
    }

    pub(crate) fn check_running(&self) -> Result<()> {
        if self.is_running() {
            Ok(())
        } else {
            Err(Error::closed())
        }
    }

    /// Publishes to `channel` the frame `encode` makes: to the local shards with subscribers,
    /// then to the broker. Without a broker, a publish to a channel nobody here listens to
    /// costs one map lookup and is never encoded.
    ///
    /// On a channel with history, the publication is numbered (see
    /// [`publish_numbered`](Self::publish_numbered)) and its position returned.
    pub(crate) fn publish_with(
        &self,
        channel: &str,
        encode: impl Fn(Option<Position<'_>>) -> Result<Bytes>,
    ) -> Result<Option<StreamPosition>> {
        self.check_running()?;
        if !self.history.is_disabled() {
            if let Some((broker, policy)) = self.numbering_broker(channel) {
                self.publish_through_broker(channel, &encode, broker, &policy, None)?;
                return Ok(None);
            }
            if let Some(position) = self.publish_numbered(channel, &encode)? {
                return Ok(Some(position));
            }
        }
        let entry = self.channels.get(channel);
        if self.broker().is_none() && entry.is_none() {
            self.counters.published.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let frame = encode(None)?;
        let payload = self.broker().map(|_| protocol::frame_payload(&frame));
        if let Some(entry) = entry {
            self.fan_out_to_entry(&entry, frame)?;
        }
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        if let (Some(broker), Some(payload)) = (self.broker(), payload) {
            broker.publish(Target::Channel(channel), payload);
        }
        Ok(None)
    }

    /// A publish to a channel with history; `Ok(None)` if `channel` has none.
    ///
    /// Under the channel's lock (its sequencer) the publication gets the next offset, is
    /// encoded with it, handed to every shard with subscribers (all or nothing: a refusal
    /// numbers nothing, so an overload never leaves a gap) and kept. Publishers to one
    /// channel take turns here, so every shard's inbox gets the channel's publications in
    /// offset order, and a shard that subscribes a client under the same lock knows exactly
    /// which offsets will still reach it (`shard/catch_up.rs`).
    ///
    /// Each shard gets its own copy of the frame: the history holds the encoded one, and a
    /// shard counts the memory its slow clients' queues hold by being the only other holder
    /// of its frames (`shard/retained.rs`).
    fn publish_numbered(
        &self,
        channel: &str,
        encode: &impl Fn(Option<Position<'_>>) -> Result<Bytes>,
    ) -> Result<Option<StreamPosition>> {
        let now_ms = self.now_ms();
        let Some(numbered) = self.history.with_channel(channel, now_ms, |history| {
            let offset = history.next_offset();
            let epoch = Arc::clone(history.epoch());
            // go-ws clients have never seen the fields: strict mode keeps them out.
            let position = Position {
                offset,
                epoch: &epoch,
            };
            let frame = encode((!self.config.strict_go_ws).then_some(position))?;
            if let Some(entry) = self.channels.get(channel) {
                let stamp = Stamp::now();
                self.fan_out(entry.shard_mask(), Command::frame_cost(&frame), |_, _| {
                    Command::Publish {
                        channel: Arc::clone(&entry),
                        frame: Bytes::copy_from_slice(&frame),
                        offset,
                        stamp,
                    }
                })?;
            }
            history.append(frame, now_ms);
            Ok::<_, Error>(StreamPosition { offset, epoch })
        }) else {
            return Ok(None);
        };
        let position = numbered?;
        self.history.enforce_budget();
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        // Other nodes get it without this node's position: until histories live in Redis,
        // each node numbers its own, and a position means nothing elsewhere.
        if let Some(broker) = self.broker() {
            let frame = encode(None)?;
            broker.publish(Target::Channel(channel), protocol::frame_payload(&frame));
        }
        Ok(Some(position))
    }

    /// The broker and `channel`'s history policy when the broker numbers `channel`'s
    /// publications (Redis history): then they are not numbered here.
    pub(crate) fn numbering_broker(
        &self,
        channel: &str,
    ) -> Option<(&Arc<dyn Broker>, crate::history::HistoryPolicy)> {
        let broker = self.broker().filter(|broker| broker.numbers_history())?;
        Some((broker, self.history.policy_for(channel)?))
    }

    /// `None` when a subscribe to `channel` can go to the shard now; otherwise a future that
    /// resolves once this node is in step with the broker's history for it (true) or the
    /// broker's bounded wait ran out (false). Only for channels whose history the broker
    /// keeps (Redis): everything else is `None` at the cost of the history rules' look-up.
    pub(crate) fn history_ready(
        &self,
        channel: &str,
        since: Option<&protocol::Since<'_>>,
    ) -> Option<crate::broker::HistoryReady> {
        if self.history.is_disabled() {
            return None;
        }
        let (broker, _) = self.numbering_broker(channel)?;
        // A client resuming from an offset this node has not delivered yet (it saw it on a
        // node that was ahead): read Redis first, or it would be told `recovered: false` and
        // then get those offsets live, twice.
        let behind = since.is_some_and(|since| {
            self.history.existing(channel).is_none_or(|lock| {
                let history = lock.lock();
                let same_epoch = since
                    .epoch
                    .as_deref()
                    .is_none_or(|e| e == &**history.epoch());
                same_epoch && since.offset > history.latest()
            })
        });
        broker.prepare_history(channel, behind)
    }

    /// A publish to a channel whose history the broker keeps: the broker numbers it, and
    /// every node, this one included, delivers it when it comes back numbered (one order
    /// everywhere). The position goes to `reply` once the broker has it.
    pub(crate) fn publish_through_broker(
        &self,
        channel: &str,
        encode: &impl Fn(Option<Position<'_>>) -> Result<Bytes>,
        broker: &Arc<dyn Broker>,
        policy: &crate::history::HistoryPolicy,
        reply: Option<crate::broker::PositionReply>,
    ) -> Result<()> {
        let frame = encode(None)?;
        broker.publish_numbered(channel, protocol::frame_payload(&frame), policy, reply)?;
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A publication the broker numbered, for the local subscribers of `channel` and its
    /// local history (see [`LocalNode::deliver_numbered`]).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    fn deliver_numbered(&self, channel: &str, json: &[u8]) -> Numbered {
        let Some((offset, epoch, frame)) =
            protocol::frame_numbered(channel, json, self.config.strict_go_ws)
        else {
            return Numbered::Invalid;
        };
        let now_ms = self.now_ms();
        let Some(outcome) = self.history.with_channel(channel, now_ms, |history| {
            if **history.epoch() != *epoch {
                return Numbered::OtherEpoch;
            }
            let latest = history.latest();
            if offset <= latest {
                // Another publication at an offset already delivered: Redis's counter went
                // back. (One no longer retained here cannot be told apart from a repeat.)
                return match history.frame_at(offset) {
                    Some(kept) if kept != frame => Numbered::Conflict,
                    _ => Numbered::Duplicate,
                };
            }
            if offset > latest + 1 {
                return Numbered::Gap { after: latest };
            }
            if let Some(entry) = self.channels.get(channel) {
                let stamp = Stamp::now();
                let sent = self.fan_out(entry.shard_mask(), Command::frame_cost(&frame), |_, _| {
                    Command::Publish {
                        channel: Arc::clone(&entry),
                        frame: Bytes::copy_from_slice(&frame),
                        offset,
                        stamp,
                    }
                });
                if sent.is_err() {
                    return Numbered::Refused;
                }
            }
            history.append(frame, now_ms);
            Numbered::Delivered
        }) else {
            return Numbered::Invalid;
        };
        if outcome == Numbered::Delivered {
            self.history.enforce_budget();
        }
        outcome
    }

    pub(crate) fn broker(&self) -> Option<&Arc<dyn Broker>> {
        self.config.broker.as_ref()
    }

    /// Hands `frame` to the local shards that have subscribers to `channel`.
    pub(crate) fn fan_out_to_channel(&self, channel: &str, frame: Bytes) -> Result<()> {
        match self.channels.get(channel) {
            Some(entry) => self.fan_out_to_entry(&entry, frame),
            None => Ok(()),
        }
    }

    /// Hands `frame` to the shards whose bits are set in `entry`'s mask, all or nothing.
    fn fan_out_to_entry(&self, entry: &Arc<ChannelEntry>, frame: Bytes) -> Result<()> {
        let stamp = Stamp::now();
        self.fan_out(
            entry.shard_mask(),
            Command::frame_cost(&frame),
            |_, last| Command::Publish {
                channel: Arc::clone(entry),
                frame: frame_for_shard(&frame, last),
                offset: 0,
                stamp,
            },
        )
    }

    fn broadcast_frame(&self, frame: Bytes) -> Result<()> {
        let payload = self.broker().map(|_| protocol::frame_payload(&frame));
        self.fan_out_to_all(frame)?;
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        if let (Some(broker), Some(payload)) = (self.broker(), payload) {
            broker.publish(Target::Broadcast, payload);
        }
        Ok(())
    }

    /// Hands `frame` to every local shard, for all its clients, all or nothing.
    pub(crate) fn fan_out_to_all(&self, frame: Bytes) -> Result<()> {
        let stamp = Stamp::now();
        self.fan_out(self.all_shards(), Command::frame_cost(&frame), |_, last| {
            Command::Broadcast(frame_for_shard(&frame, last), stamp)
        })
    }

    /// A client's `publish`, already allowed by the policy: its data is copied raw into the
    /// frame, never parsed into a tree.
    pub(crate) fn publish_from_client(&self, channel: &str, data: Option<&RawValue>) -> Result<()> {
        self.publish_with(channel, |position| {
            let envelope = Envelope {
                kind: TYPE_MESSAGE,
                channel: Some(channel),
                process_id: None,
                data,
            };
            protocol::encode_frame_at(&envelope, SystemTime::now(), position).map_err(Error::encode)
        })
        .map(drop)
    }

    /// The per-client error message for `reason`, or `None` in strict go-ws mode.
    pub(crate) fn error_frame(&self, reason: ErrorReason, channel: Option<&str>) -> Option<Bytes> {
        shard::error_frame(self.config.strict_go_ws, reason, channel)
    }

    /// The hub's counters ([`Hub::stats`]).
    pub(crate) fn stats(&self) -> HubStats {
        let shared = self;
        let mut stats = shared.counters.snapshot(shared.channels.channel_count());
        stats.shard_backlog_bytes = (0..shared.inboxes.len())
            .map(|index| shared.inboxes.backlog(index))
            .collect();
        stats.broker = shared.broker().map(|b| b.stats());
        let history = shared.history.stats();
        stats.history = HistoryFigures {
            channels: history.channels,
            publications: history.retained,
            memory_bytes: history.memory,
            detached_bytes: history.detached_memory,
            trimmed_by_count: history.trimmed_by_count,
            trimmed_by_age: history.trimmed_by_age,
            trimmed_by_cap: history.trimmed_by_cap,
        };
        stats.queued_memory_bytes += history.detached_memory as u64;
        stats
    }

    pub(crate) fn task_started(&self) {
        self.counters
            .connection_tasks
            .fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn task_ended(&self) {
        if self
            .counters
            .connection_tasks
            .fetch_sub(1, Ordering::AcqRel)
            == 1
        {
            self.tasks_idle.notify_waiters();
        }
    }
}

/// The part of `config` that connections' write paths apply.
fn conn_limits(config: &HubConfig) -> conn::Limits {
    conn::Limits {
        outbound_queue_bytes: config.outbound_queue_bytes,
        slow_consumer: config.slow_consumer,
        write_timeout: config.write_timeout,
        min_read_rate: config.min_read_rate,
    }
}

/// Says once, at start, how the shards write: an operator sizing a machine needs to know
/// whether io_uring runs (a container's seccomp profile may refuse it without a word).
fn log_write_path(shared: &Shared, shards: usize) {
    let io_uring = shared.counters.io_uring_shards.load(Ordering::Relaxed);
    let path = match io_uring {
        0 => "send(2)",
        n if n == shards => "io_uring",
        _ => "io_uring on some shards, send(2) on the others",
    };
    tracing::info!(
        shards,
        io_uring_shards = io_uring,
        "hub started; shards write with {path}"
    );
}

/// The part of `config` that each shard reads.
fn shard_config(config: &HubConfig) -> ShardConfig {
    ShardConfig {
        heartbeat: config.heartbeat,
        pong_timeout: config.pong_timeout,
        max_subscriptions: config.max_subscriptions,
        strict_go_ws: config.strict_go_ws,
        io_uring: config.io_uring,
        queue_memory_budget: config.queue_memory_budget,
        shards: config.shards,
    }
}

/// How often expired publications are trimmed from the histories and idle histories removed.
/// Reading a history trims what expired in it first, so this bounds only how long expired
/// memory stays held, and how soon an idle channel's history goes (then its epoch changes).
const HISTORY_SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// The histories' sweeper, until the hub stops: a channel's history goes when it has no
/// subscribers and its age limit has passed since its last publication.
async fn sweep_histories(shared: std::sync::Weak<Shared>) {
    let mut every = tokio::time::interval(HISTORY_SWEEP_PERIOD);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if !shared.is_running() {
            return;
        }
        let directory = &shared.channels;
        shared
            .history
            .sweep(shared.now_ms(), |channel| directory.get(channel).is_some());
    }
}

/// What the channel directory tells the broker: a channel's first subscriber on this node
/// and its last (the directory knows no broker, only this).
struct BrokerActivity(Arc<dyn Broker>);

impl ChannelActivity for BrokerActivity {
    fn active(&self, channel: &str) {
        self.0.channel_active(channel);
    }

    fn inactive(&self, channel: &str) {
        self.0.channel_inactive(channel);
    }
}

/// How a broker's [`Inbound`] reaches this hub.
impl LocalNode for Shared {
    fn fan_out_to_channel(&self, channel: &str, frame: Bytes) -> bool {
        Shared::fan_out_to_channel(self, channel, frame).is_ok()
    }

    fn fan_out_to_all(&self, frame: Bytes) -> bool {
        Shared::fan_out_to_all(self, frame).is_ok()
    }

    fn has_subscribers(&self, channel: &str) -> bool {
        self.channels.get(channel).is_some()
    }

    fn active_channels(&self) -> Vec<String> {
        self.channels
            .snapshot()
            .into_iter()
            .map(|c| c.name)
            .collect()
    }

    fn history_policy(&self, channel: &str) -> Option<crate::history::HistoryPolicy> {
        self.history.policy_for(channel)
    }

    fn history_position(&self, channel: &str) -> Option<(Arc<str>, u64)> {
        let lock = self.history.existing(channel)?;
        let history = lock.lock();
        (!history.is_removed()).then(|| (Arc::clone(history.epoch()), history.latest()))
    }

    fn reset_history(&self, channel: &str, epoch: &str, latest: u64) {
        self.history
            .with_channel(channel, self.now_ms(), |history| {
                if **history.epoch() == *epoch && history.latest() == latest {
                    return;
                }
                history.reset(epoch.into(), latest);
                // Under the channel's lock, so that the shards see it between the publications
                // before and after. Whatever the backlog: it is small and must not be lost.
                if let Some(entry) = self.channels.get(channel) {
                    let mut rest = entry.shard_mask();
                    while rest != 0 {
                        let index = rest.trailing_zeros() as usize;
                        rest &= rest - 1;
                        let _ = self.inboxes.enqueue(
                            index,
                            Command::HistoryReset {
                                channel: Arc::clone(&entry),
                                latest,
                            },
                        );
                    }
                }
            });
    }

    fn deliver_numbered(&self, channel: &str, json: &[u8]) -> Numbered {
        Shared::deliver_numbered(self, channel, json)
    }
}

impl Shared {
    /// A broker's way in to this hub, which it does not keep alive.
    pub(crate) fn inbound(self: &Arc<Self>) -> Inbound {
        let node: std::sync::Weak<Shared> = Arc::downgrade(self);
        Inbound::new(node)
    }
}

/// The frame one shard gets: the last shard takes the encoded frame itself, the others a copy.
///
/// The copy was made so that shards would not share a reference count, when every delivery
/// cloned the frame. Deliveries are staged indices now, and that no longer pays: the fanout
/// bench (2 shards, four alternating rounds on a loaded machine) gave medians of 68.4 Melem/s
/// with the copy against 68.9 without at 1,000 subscribers, and 103.2 against 98.4 at 10,000,
/// inside the rounds' spread (58 to 130). It is kept for another reason: a shard tells that
/// its slow clients' queues are done with a frame by holding the last reference to it
/// (`shard/retained.rs`), which works only if no other shard holds one.
fn frame_for_shard(frame: &Bytes, last: bool) -> Bytes {
    if last {
        frame.clone()
    } else {
        Bytes::copy_from_slice(frame)
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// The shards' inboxes until the shards are started.
    unstarted: Mutex<Option<Vec<mpsc::UnboundedReceiver<Command>>>>,
    shard_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    /// The last handle is gone: tell the shards to stop. Never blocks.
    fn drop(&mut self) {
        for index in 0..self.shared.inboxes.len() {
            let _ = self.shared.enqueue(index, Command::Stop);
        }
        if let Some(broker) = self.shared.broker() {
            broker.shutdown();
        }
    }
}

/// A handle to a running hub: cheap to clone, `Send + Sync`, every method callable from any
/// task or thread.
///
/// The publishing methods (`send_*`, [`broadcast`](Hub::broadcast)) are plain functions:
/// they encode the message once, enqueue it to the shards that have subscribers, and return.
/// They never wait for clients.
///
/// ```no_run
/// use wshub::{Hub, Message};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let hub = Hub::new();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// tokio::spawn(wshub::serve(listener, hub.clone(), async {
///     let _ = tokio::signal::ctrl_c().await;
/// }));
///
/// hub.send_process_output("build-1", "Compiling...")?;
/// hub.send_to_channel("room:42", &Message::new("chat").with_data("hello"))?;
/// # Ok(())
/// # }
/// ```
///
/// # Slow clients
///
/// Frames are written at once when a client keeps up, and queued only when its socket is
/// full. A client is behind while its queue holds frames; it is cut with 4000 `slow
/// consumer` (what it had queued is discarded) when:
///
/// - a frame takes its queue over
///   [`outbound_queue_bytes`](crate::HubConfigBuilder::outbound_queue_bytes) (16 MiB), or,
///   with [`SlowConsumerPolicy::DropOldest`](crate::SlowConsumerPolicy::DropOldest), its
///   oldest frames are dropped instead;
/// - over a [write timeout](crate::HubConfigBuilder::write_timeout) it took neither what was
///   queued when that period began nor
///   [`min_read_rate`](crate::HubConfigBuilder::min_read_rate) times the period: it is not
///   making progress;
/// - the queues of all slow clients hold more memory than
///   [`queue_memory_budget`](crate::HubConfigBuilder::queue_memory_budget) (each frame
///   counted once however many queues share it), and its queue is among the largest of a
///   shard over its share.
///
/// A client whose socket buffer is full sees the connection end rather than the close frame.
/// Each cut is counted ([`HubStats::queue_bound_disconnects`],
/// [`HubStats::stalled_disconnects`], [`HubStats::budget_disconnects`], and the frames in
/// [`HubStats::dropped`]); no other client and no publisher waits for a slow client.
///
/// # Overload
///
/// Each shard's inbox is bounded in bytes
/// ([`shard_backlog_bytes`](crate::HubConfigBuilder::shard_backlog_bytes)). A call that would
/// take a shard over it returns an error that [`is_overloaded`](Error::is_overloaded), and
/// nothing was sent to anyone (a publish is all or nothing across shards); the `*_async`
/// variants wait for room instead. Clients' own requests are never refused: the hub stops
/// reading a client's socket while its shard is full.
///
/// # Closing
///
/// When the `shutdown` future given to [`run`](Hub::run) (or [`serve`](crate::serve))
/// completes, new upgrades are answered 503, every client gets what was published before
/// shutdown began followed by a 1001 close frame (within the
/// [drain deadline](crate::HubConfigBuilder::shutdown_drain)), and `run` returns once every
/// connection task has ended and the shards have stopped. Publishing afterwards returns an
/// error that [`is_closed`](Error::is_closed). Dropping every `Hub` handle stops the shards
/// and drops the connections without a close handshake.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("shards", &self.inner.shared.inboxes.len())
            .field("clients", &self.client_count())
            .finish()
    }
}

impl Hub {
    /// A hub with the default [`HubConfig`].
    pub fn new() -> Hub {
        Hub::with_config(HubConfig::default())
    }

    /// A hub with `config`. Its shards start on the tokio runtime at the first
    /// [`run`](Hub::run), [`serve`](crate::serve) or upgrade; messages sent before then wait
    /// in the shards' inboxes.
    pub fn with_config(config: HubConfig) -> Hub {
        let (inboxes, receivers) = Inboxes::new(config.shards, config.shard_backlog_bytes);
        let activity = config
            .broker
            .clone()
            .map(|broker| Arc::new(BrokerActivity(broker)) as Arc<dyn ChannelActivity>);
        let counters = Arc::new(Counters::new(config.shards));
        let runners = Runners::new(config.shards);
        let shared = Arc::new(Shared {
            conn_env: conn::Env {
                limits: conn_limits(&config),
                counters: Arc::clone(&counters),
            },
            counters,
            shard_config: shard_config(&config),
            history: Arc::new(HistoryStore::new(
                config.history.clone(),
                config.history_memory_budget,
            )),
            config,
            channels: Arc::new(ChannelDirectory::new(activity)),
            inboxes,
            clock: Clock::start(),
            next_client: AtomicU64::new(1),
            state: AtomicU8::new(RUNNING),
            shutting_down: watch::channel(false).0,
            tasks_idle: Notify::new(),
            running_processes: Mutex::new(HashSet::new()),
            runners,
        });
        Hub {
            inner: Arc::new(Inner {
                shared,
                unstarted: Mutex::new(Some(receivers)),
                shard_tasks: Mutex::new(Vec::new()),
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The hub's configuration.
    pub fn config(&self) -> &HubConfig {
        &self.inner.shared.config
    }

    /// Starts the shard tasks on the current tokio runtime, once.
    pub(crate) fn ensure_started(&self) {
        let receivers = self
            .inner
            .unstarted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(receivers) = receivers {
            let tasks = receivers
                .into_iter()
                .enumerate()
                .map(|(index, inbox)| {
                    let shard = self.inner.shared.new_shard(index);
                    tokio::spawn(shard.run(inbox))
                })
                .collect::<Vec<_>>();
            log_write_path(&self.inner.shared, tasks.len());
            *self
                .inner
                .shard_tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = tasks;
            if let Some(broker) = self.inner.shared.broker() {
                broker.start(self.inner.shared.inbound());
            }
            if !self.inner.shared.history.is_disabled() {
                tokio::spawn(sweep_histories(Arc::downgrade(&self.inner.shared)));
            }
        }
    }

    /// Runs the hub until `shutdown` completes, then shuts it down gracefully (see
    /// [Closing](Hub#closing)) and returns when that is done.
    ///
    /// Applications with their own hyper server call this beside serving
    /// [`handler`](Hub::handler); [`serve`](crate::serve) calls it for you.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        self.ensure_started();
        let mut already = self.inner.shared.shutting_down.subscribe();
        tokio::select! {
            () = shutdown => {}
            _ = already.wait_for(|down| *down) => {}
        }
        self.shutdown_gracefully().await;
    }

    async fn shutdown_gracefully(&self) {
        let shared = &self.inner.shared;
        if shared
            .state
            .compare_exchange(RUNNING, SHUTTING_DOWN, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        shared.shutting_down.send_replace(true);
        let deadline = Instant::now() + shared.config.shutdown_drain;
        for index in 0..shared.inboxes.len() {
            let _ = shared.enqueue(index, Command::Shutdown { deadline });
        }
        let give_up = tokio::time::Instant::from_std(deadline + SHUTDOWN_GRACE);
        loop {
            let idle = shared.tasks_idle.notified();
            if shared.counters.connection_tasks.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(give_up, idle).await.is_err() {
                tracing::warn!(
                    tasks = shared.counters.connection_tasks.load(Ordering::Acquire),
                    "connection tasks still running after the drain deadline"
                );
                break;
            }
        }
        shared.state.store(STOPPED, Ordering::Release);
        for index in 0..shared.inboxes.len() {
            let _ = shared.enqueue(index, Command::Stop);
        }
        // Publishers waiting for room see the hub stopped.
        shared.inboxes.wake_waiters();
        let tasks = std::mem::take(
            &mut *self
                .inner
                .shard_tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for task in tasks {
            let _ = task.await;
        }
        if let Some(broker) = shared.broker() {
            broker.shutdown();
        }
    }

    /// Begins a graceful shutdown now, as if the future given to [`run`](Hub::run) had
    /// completed; `run` then returns once it is done.
    pub fn shutdown(&self) {
        self.inner.shared.shutting_down.send_replace(true);
    }

    /// Sends `message` to every connected client.
    ///
    /// # Errors
    ///
    /// The hub has shut down ([`Error::is_closed`]), or a shard is over its backlog
    /// ([`Error::is_overloaded`]); either way nothing was sent.
    pub fn broadcast(&self, message: &Message) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        let frame = protocol::encode_frame(&Envelope::of(message, None), SystemTime::now())
            .map_err(Error::encode)?;
        shared.broadcast_frame(frame)
    }

    /// Sends `message` to the subscribers of `channel`, with its `channel` field set to
    /// `channel` whatever it was. Nobody subscribed is not an error.
    ///
    /// # Errors
    ///
    /// The hub has shut down ([`Error::is_closed`]), or a shard with subscribers is over its
    /// backlog ([`Error::is_overloaded`]); either way nothing was sent, to anyone.
    pub fn send_to_channel(&self, channel: &str, message: &Message) -> Result<()> {
        self.publish(channel, message).map(drop)
    }

    /// As [`send_to_channel`](Hub::send_to_channel), and on a channel with history
    /// ([`HubConfigBuilder::channel_history`](crate::HubConfigBuilder::channel_history)) tells
    /// where the message went in it: its offset and the channel's epoch (`Ok(None)` on a
    /// channel without history). An application can store the position with what it
    /// rendered, and a client that loads the page subscribes `since` it, missing nothing.
    ///
    /// The offsets of one channel follow the order in which its subscribers receive the
    /// messages, whatever the number of publishers: publishers to a channel with history take
    /// turns while the message is numbered and handed to the shards.
    ///
    /// # With Redis history
    ///
    /// With a broker that numbers history channels' publications in Redis
    /// ([`RedisBroker`](crate::RedisBroker), cargo feature `redis`), the offset is given by
    /// Redis, later, and this method does not wait for it: it queues the message for Redis
    /// and returns `Ok(None)`. Call [`publish_async`](Hub::publish_async) to learn the
    /// position. The message reaches this node's subscribers too only once Redis has
    /// numbered it (one order on every node).
    ///
    /// # Errors
    ///
    /// As [`send_to_channel`](Hub::send_to_channel): a refused message got no offset, and
    /// the history has no gap. With Redis history, [`Error::is_unavailable`] when Redis is
    /// unreachable or the queue to it is full: nothing was published.
    pub fn publish(&self, channel: &str, message: &Message) -> Result<Option<StreamPosition>> {
        self.inner.shared.publish_with(channel, |position| {
            let envelope = Envelope::of(message, Some(channel));
            protocol::encode_frame_at(&envelope, SystemTime::now(), position).map_err(Error::encode)
        })
    }

    /// As [`publish`](Hub::publish), waiting for room as
    /// [`send_to_channel_async`](Hub::send_to_channel_async) does instead of returning the
    /// overload error.
    ///
    /// With Redis history (see [`publish`](Hub::publish), "With Redis history"), it resolves
    /// when Redis has numbered, stored and published the message, with its position.
    ///
    /// # Errors
    ///
    /// As [`send_to_channel_async`](Hub::send_to_channel_async). With Redis history,
    /// [`Error::is_unavailable`]: Redis was unreachable, the queue to it full, or the
    /// connection was lost before Redis answered (then the message may have been published).
    pub async fn publish_async(
        &self,
        channel: &str,
        message: &Message,
    ) -> Result<Option<StreamPosition>> {
        let shared = &self.inner.shared;
        if let Some((broker, policy)) = shared.numbering_broker(channel) {
            shared.check_running()?;
            // The broker's tasks run on the runtime the hub starts on.
            self.ensure_started();
            let (reply, answer) = oneshot::channel();
            shared.publish_through_broker(
                channel,
                &|position| {
                    let envelope = Envelope::of(message, Some(channel));
                    protocol::encode_frame_at(&envelope, SystemTime::now(), position)
                        .map_err(Error::encode)
                },
                broker,
                &policy,
                Some(reply),
            )?;
            return match answer.await {
                Ok(numbered) => numbered.map(Some),
                Err(_) => Err(Error::closed()),
            };
        }
        let mut position = None;
        self.when_room(|| {
            position = self.publish(channel, message)?;
            Ok(())
        })
        .await?;
        Ok(position)
    }

    /// Up to `limit` publications of `channel`'s history after offset `since`, oldest first,
    /// with the channel's epoch and latest offset; `None` when the channel has no history.
    /// Each publication is the JSON text its subscribers received. `recovered` says whether
    /// the history still holds every offset after `since` (as a subscribe `since` would).
    ///
    /// With Redis history (see [`publish`](Hub::publish)), this is this node's copy: what it
    /// has read from Redis and delivered, which lags Redis by the time a publication takes to
    /// come back, and holds nothing of a channel this node has never had a subscriber to.
    pub fn history(&self, channel: &str, since: u64, limit: usize) -> Option<HistoryPage> {
        let shared = &self.inner.shared;
        let now_ms = shared.now_ms();
        let page = shared.history.with_channel(channel, now_ms, |history| {
            history.read(since, limit, now_ms)
        })?;
        Some(HistoryPage {
            epoch: page.epoch,
            latest: page.latest,
            recovered: page.recovered,
            publications: page
                .publications
                .into_iter()
                .map(|(offset, frame)| Publication {
                    offset,
                    message: protocol::frame_payload(&frame),
                })
                .collect(),
        })
    }

    /// Streams one line of process `process_id`'s output to channel `process:ID`, as a
    /// `process_output` message.
    ///
    /// # Errors
    ///
    /// As [`send_to_channel`](Hub::send_to_channel).
    pub fn send_process_output(&self, process_id: &str, line: &str) -> Result<()> {
        let message = Message::process_output(process_id, line);
        self.send_to_channel(&protocol::process_channel(process_id), &message)
    }

    /// Sends process `process_id`'s status to channel `process:ID`, as a `process_status`
    /// message with data `{"status": status, "exitCode": exit_code}`.
    ///
    /// # Errors
    ///
    /// As [`send_to_channel`](Hub::send_to_channel).
    pub fn send_process_status(
        &self,
        process_id: &str,
        status: &str,
        exit_code: i32,
    ) -> Result<()> {
        // A struct rather than `Message::process_status`'s `json!` map, which serde_json
        // sorts (`exitCode` first): PROTOCOL.md has `{"status":…,"exitCode":…}` in that order.
        #[derive(Serialize)]
        struct Status<'a> {
            status: &'a str,
            #[serde(rename = "exitCode")]
            exit_code: i32,
        }
        let channel = protocol::process_channel(process_id);
        self.inner
            .shared
            .publish_with(&channel, |position| {
                let envelope = Envelope {
                    kind: protocol::TYPE_PROCESS_STATUS,
                    channel: Some(&channel),
                    process_id: Some(process_id),
                    data: Some(&Status { status, exit_code }),
                };
                protocol::encode_frame_at(&envelope, SystemTime::now(), position)
                    .map_err(Error::encode)
            })
            .map(drop)
    }

    /// Sends an `error` message with data `text` to every client.
    ///
    /// # Errors
    ///
    /// As [`broadcast`](Hub::broadcast).
    pub fn send_error(&self, text: &str) -> Result<()> {
        self.broadcast(&Message::error(text))
    }

    /// Sends an `event` message with data `{"event": name, "data": data}` to every client.
    ///
    /// # Errors
    ///
    /// As [`broadcast`](Hub::broadcast), or `data` could not be serialized
    /// ([`Error::is_encode`]).
    pub fn send_event(&self, name: &str, data: impl Serialize) -> Result<()> {
        #[derive(Serialize)]
        struct Event<'a, T> {
            event: &'a str,
            data: T,
        }
        let shared = &self.inner.shared;
        shared.check_running()?;
        let envelope = Envelope {
            kind: TYPE_EVENT,
            channel: None,
            process_id: None,
            data: Some(&Event { event: name, data }),
        };
        let frame = protocol::encode_frame(&envelope, SystemTime::now()).map_err(Error::encode)?;
        shared.broadcast_frame(frame)
    }

    /// Sends `message` to one client. A client that has already gone gets nothing, without an
    /// error: the disconnect may race with the call.
    ///
    /// # Errors
    ///
    /// The hub has shut down ([`Error::is_closed`]), or the client's shard is over its
    /// backlog ([`Error::is_overloaded`]); nothing was sent.
    pub fn send_to_client(&self, client: ClientId, message: &Message) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        let frame = protocol::encode_frame(&Envelope::of(message, None), SystemTime::now())
            .map_err(Error::encode)?;
        shared.try_enqueue(
            shared.shard_index(client),
            Command::SendToClient { client, frame },
        )?;
        shared.counters.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sends `message` to every connection of the user that authentication named `user_id`.
    ///
    /// # Errors
    ///
    /// As [`broadcast`](Hub::broadcast): every shard is asked, since a user's connections
    /// may be on any of them.
    pub fn send_to_user(&self, user_id: &str, message: &Message) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        let frame = protocol::encode_frame(&Envelope::of(message, None), SystemTime::now())
            .map_err(Error::encode)?;
        let user: Arc<str> = user_id.into();
        shared.fan_out(shared.all_shards(), Command::frame_cost(&frame), |_, _| {
            Command::SendToUser {
                user: Arc::clone(&user),
                frame: frame.clone(),
            }
        })?;
        shared.counters.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Subscribes `client` to `channel` from the server side; the client gets a `subscribed`
    /// acknowledgement (unless in strict go-ws mode). Idempotent. The subscription policy and
    /// limit, which guard clients' own requests, do not apply.
    ///
    /// # Errors
    ///
    /// The hub has shut down, the client's shard is over its backlog
    /// ([`Error::is_overloaded`]), or `channel` is empty ([`Error::is_invalid_argument`]).
    pub fn subscribe(&self, client: ClientId, channel: &str) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        if channel.is_empty() {
            return Err(Error::invalid_argument("empty channel name"));
        }
        shared.try_enqueue(
            shared.shard_index(client),
            Command::Subscribe {
                client,
                channel: channel.into(),
                from_client: false,
                since: None,
            },
        )
    }

    /// Unsubscribes `client` from `channel` from the server side; the client gets an
    /// `unsubscribed` acknowledgement (unless in strict go-ws mode). A no-op when it was not
    /// subscribed.
    ///
    /// # Errors
    ///
    /// The hub has shut down, or the client's shard is over its backlog
    /// ([`Error::is_overloaded`]).
    pub fn unsubscribe(&self, client: ClientId, channel: &str) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        shared.try_enqueue(
            shared.shard_index(client),
            Command::Unsubscribe {
                client,
                channel: channel.into(),
            },
        )
    }

    /// Closes `client`'s connection with `code` and `reason` (cut to fit a close frame), after
    /// what was already sent to it.
    ///
    /// # Errors
    ///
    /// The hub has shut down, the client's shard is over its backlog
    /// ([`Error::is_overloaded`]), or `code` is not one a server may send (1000 to 1003, 1007
    /// to 1014, 3000 to 4999).
    pub fn disconnect(&self, client: ClientId, code: u16, reason: &str) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        if !is_valid_close_code(code) {
            return Err(Error::invalid_argument(format!(
                "close code {code} may not be sent"
            )));
        }
        shared.try_enqueue(
            shared.shard_index(client),
            Command::Disconnect {
                client,
                code,
                reason: reason.into(),
            },
        )
    }

    /// As [`send_to_channel`](Hub::send_to_channel), but when a shard is over its backlog
    /// it waits for room and tries again instead of returning the overload error: for
    /// producers that can wait, such as a task reading a child process's pipes or a queue
    /// consumer. What is waited for is the shard, not the clients: a slow client still gets
    /// the [slow-consumer policy](Hub#slow-clients).
    ///
    /// # Errors
    ///
    /// The hub has shut down ([`Error::is_closed`]) or the message cannot be encoded.
    pub async fn send_to_channel_async(&self, channel: &str, message: &Message) -> Result<()> {
        self.when_room(|| self.send_to_channel(channel, message))
            .await
    }

    /// [`send_process_output`](Hub::send_process_output), waiting for room as
    /// [`send_to_channel_async`](Hub::send_to_channel_async) does.
    ///
    /// ```no_run
    /// # use tokio::io::AsyncBufRead;
    /// // `lines`: a child process's stdout, say, through `BufReader::lines`.
    /// # async fn stream(hub: wshub::Hub, mut lines: tokio::io::Lines<impl AsyncBufRead + Unpin>) -> Result<(), Box<dyn std::error::Error>> {
    /// while let Some(line) = lines.next_line().await? {
    ///     // Waits while the hub is overloaded, so the child's pipe backs up instead.
    ///     hub.send_process_output_async("build-1", &line).await?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`send_to_channel_async`](Hub::send_to_channel_async).
    pub async fn send_process_output_async(&self, process_id: &str, line: &str) -> Result<()> {
        self.when_room(|| self.send_process_output(process_id, line))
            .await
    }

    /// [`send_process_status`](Hub::send_process_status), waiting for room as
    /// [`send_to_channel_async`](Hub::send_to_channel_async) does.
    ///
    /// # Errors
    ///
    /// As [`send_to_channel_async`](Hub::send_to_channel_async).
    pub async fn send_process_status_async(
        &self,
        process_id: &str,
        status: &str,
        exit_code: i32,
    ) -> Result<()> {
        self.when_room(|| self.send_process_status(process_id, status, exit_code))
            .await
    }

    /// [`broadcast`](Hub::broadcast), waiting for room as
    /// [`send_to_channel_async`](Hub::send_to_channel_async) does.
    ///
    /// # Errors
    ///
    /// As [`send_to_channel_async`](Hub::send_to_channel_async).
    pub async fn broadcast_async(&self, message: &Message) -> Result<()> {
        self.when_room(|| self.broadcast(message)).await
    }

    /// [`send_event`](Hub::send_event), waiting for room as
    /// [`send_to_channel_async`](Hub::send_to_channel_async) does.
    ///
    /// # Errors
    ///
    /// As [`send_event`](Hub::send_event), but never overloaded.
    pub async fn send_event_async(&self, name: &str, data: impl Serialize) -> Result<()> {
        self.when_room(|| self.send_event(name, &data)).await
    }

    /// [`send_to_client`](Hub::send_to_client), waiting for room as
    /// [`send_to_channel_async`](Hub::send_to_channel_async) does.
    ///
    /// # Errors
    ///
    /// As [`send_to_channel_async`](Hub::send_to_channel_async).
    pub async fn send_to_client_async(&self, client: ClientId, message: &Message) -> Result<()> {
        self.when_room(|| self.send_to_client(client, message))
            .await
    }

    /// [`send_to_user`](Hub::send_to_user), waiting for room as
    /// [`send_to_channel_async`](Hub::send_to_channel_async) does.
    ///
    /// # Errors
    ///
    /// As [`send_to_channel_async`](Hub::send_to_channel_async).
    pub async fn send_to_user_async(&self, user_id: &str, message: &Message) -> Result<()> {
        self.when_room(|| self.send_to_user(user_id, message)).await
    }

    /// Calls `attempt` until a shard's backlog no longer refuses it, waiting between tries
    /// for the shard that refused. A refused attempt sent nothing, so trying again does not
    /// duplicate anything.
    async fn when_room(&self, mut attempt: impl FnMut() -> Result<()>) -> Result<()> {
        // Shards that were never started would never make room.
        self.ensure_started();
        loop {
            match attempt() {
                Err(err) => match err.refusing_shard() {
                    Some(shard) => self.inner.shared.wait_for_room(shard).await,
                    None => return Err(err),
                },
                done => return done,
            }
        }
    }

    /// Clients connected now.
    pub fn client_count(&self) -> usize {
        self.inner.shared.counters.clients.load(Ordering::Relaxed)
    }

    /// Channels with at least one subscriber now.
    pub fn channel_count(&self) -> usize {
        self.inner.shared.channels.channel_count()
    }

    /// Subscribers of `channel` now, over every shard.
    pub fn channel_subscriber_count(&self, channel: &str) -> usize {
        self.inner.shared.channels.subscriber_count(channel)
    }

    /// The hub's counters.
    pub fn stats(&self) -> HubStats {
        self.inner.shared.stats()
    }

    /// Every channel with subscribers and their count, sorted by name.
    pub fn channels(&self) -> Vec<ChannelSnapshot> {
        self.inner.shared.channels.snapshot()
    }

    /// Every connected client with its subscriptions, asked of each shard in turn. Empty
    /// once the hub has stopped.
    pub async fn clients(&self) -> Vec<ClientSnapshot> {
        let mut clients = Vec::new();
        for shard in 0..self.inner.shared.inboxes.len() {
            clients.extend(self.snapshot_of(shard).await);
        }
        clients.sort_by_key(|c| c.info.id);
        clients
    }

    /// One client's snapshot, if it is connected: asked of its own shard only.
    pub async fn client(&self, id: ClientId) -> Option<ClientSnapshot> {
        let shard = self.inner.shared.shard_index(id);
        self.snapshot_of(shard)
            .await
            .into_iter()
            .find(|c| c.info.id == id)
    }

    /// The clients of one shard; none once the hub has stopped.
    async fn snapshot_of(&self, shard: usize) -> Vec<ClientSnapshot> {
        // Shards that were never started would never answer.
        self.ensure_started();
        let (reply, answer) = oneshot::channel();
        if self
            .inner
            .shared
            .enqueue(shard, Command::Snapshot(reply))
            .is_err()
        {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::broker::BrokerStats;

    // From `shard/directory.rs`, which no longer knows brokers: the hub's `BrokerActivity`
    // is what tells the broker, so this is where the whole path is tested.
    /// A broker that reads the hub back through `Inbound` whenever it is told of a channel,
    /// as the Redis broker does (from its own task) to reconcile.
    #[derive(Default)]
    struct CallingBack {
        inbound: std::sync::OnceLock<Inbound>,
        active: AtomicUsize,
        inactive: AtomicUsize,
    }

    impl CallingBack {
        fn call_back(&self, channel: &str) {
            let inbound = self.inbound.get().expect("the test sets it first");
            let _ = inbound.has_subscribers(channel);
            let _ = inbound.active_channels();
            inbound.deliver(Target::Channel(channel), br#"{"type":"event"}"#);
        }
    }

    impl Broker for Arc<CallingBack> {
        fn start(&self, _: Inbound) {}
        fn publish(&self, _: Target<'_>, _: Bytes) {}
        fn channel_active(&self, channel: &str) {
            self.call_back(channel);
            self.active.fetch_add(1, Ordering::Relaxed);
        }
        fn channel_inactive(&self, channel: &str) {
            self.call_back(channel);
            self.inactive.fetch_add(1, Ordering::Relaxed);
        }
        fn stats(&self) -> BrokerStats {
            BrokerStats::new(true)
        }
        fn shutdown(&self) {}
    }

    /// The directory tells the broker outside its locks: a broker that calls back into
    /// `Inbound` from `channel_active` and `channel_inactive` does not deadlock, while shards
    /// (here, threads) join and leave the same channels.
    #[test]
    fn a_broker_may_call_back_into_the_hub() {
        let broker = Arc::new(CallingBack::default());
        let config = HubConfig::builder()
            .shards(4)
            .broker(Arc::clone(&broker))
            .build()
            .unwrap();
        let hub = Hub::with_config(config);
        let shared = Arc::clone(hub.shared());
        let _ = broker.inbound.set(shared.inbound());
        let (done, finished) = std::sync::mpsc::channel();
        for shard in 0..4 {
            let shared = Arc::clone(&shared);
            let done = done.clone();
            std::thread::spawn(move || {
                for round in 0..500 {
                    let channel = ["a", "b", "c"][round % 3];
                    let entry = shared.channels.join(channel, shard);
                    shared.channels.leave(&entry, shard);
                }
                let _ = done.send(());
            });
        }
        for _ in 0..4 {
            finished
                .recv_timeout(std::time::Duration::from_secs(20))
                .expect("joins and leaves finish (a broker calling back must not deadlock)");
        }
        assert_eq!(shared.channels.channel_count(), 0);
        let active = broker.active.load(Ordering::Relaxed);
        assert!(active > 0);
        assert_eq!(active, broker.inactive.load(Ordering::Relaxed));
    }
}
