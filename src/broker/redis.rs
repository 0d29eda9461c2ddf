//! The Redis broker: hubs on several nodes share channels through Redis pub/sub, in go-ws's
//! bridge format.
//!
//! Two tasks, spawned when the hub starts, each own one connection:
//!
//! - the **subscriber** holds a pub/sub connection. It is always subscribed to
//!   `PREFIX:broadcast`, subscribes `PREFIX:channel:NAME` when the node gains its first local
//!   subscriber to `NAME` (changes are collected in a map and sent as one SUBSCRIBE for many
//!   channels), and unsubscribes a moment after the last one leaves, if the channel is still
//!   without subscribers then. The hub's calls for one channel may arrive out of order (see
//!   [`Broker::channel_active`]), so either change is checked against
//!   [`Inbound::has_subscribers`] when it is applied. Messages it receives are handed to
//!   [`Inbound::deliver`]; its own (by `sourceId`) are dropped.
//! - the **publisher** takes messages from a bounded queue and sends them in pipelines (many
//!   PUBLISH in one round trip), one pipeline at a time, so messages from this node keep their
//!   order. While Redis is away, publishing counts the messages as dropped instead of queueing
//!   them.
//!
//! Both reconnect with a doubling backoff; the subscriber subscribes again from the node's own
//! set of channels ([`Inbound::active_channels`]).

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use redis::aio::{MultiplexedConnection, PubSubSink};
use redis::{AsyncConnectionConfig, RedisWrite, ToRedisArgs};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::{timeout, Instant};

use super::redis_history::{self, HistoryKeys, PUBLISH_SCRIPT};
use super::{Broker, BrokerStats, HistoryReady, Inbound, Numbered, PositionReply, Target};
use crate::error::{Error, Result};
use crate::history::{EpochSource, HistoryPolicy, StreamPosition};

/// Most messages sent in one pipeline.
const MAX_PIPELINE: usize = 1024;
/// Most channels named in one SUBSCRIBE or UNSUBSCRIBE command.
const MAX_CHANNELS_PER_COMMAND: usize = 1024;
/// Most messages received in one go before the subscriber looks at channel changes again.
const RECEIVE_BURST: usize = 256;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long Redis may take to answer a pipeline or a (un)subscribe command before the
/// connection is taken for lost.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the publishing connection may stay idle before the publisher pings it.
const IDLE_PING: Duration = Duration::from_secs(1);
/// How often the subscriber pings an idle pub/sub connection (to notice one that died
/// silently).
const PING_EVERY: Duration = Duration::from_secs(15);

/// Settings of a [`RedisBroker`].
///
/// ```
/// use std::time::Duration;
/// let config = wshub::RedisConfig::new("redis://127.0.0.1:6379/")
///     .prefix("chat")
///     .queue_capacity(10_000)
///     .unsubscribe_delay(Duration::from_millis(500));
/// let broker = wshub::RedisBroker::new(config)?;
/// assert_eq!(broker.node_id().len(), 32);
/// # Ok::<(), wshub::Error>(())
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    url: String,
    prefix: String,
    node_id: String,
    queue_capacity: usize,
    queue_bytes: usize,
    unsubscribe_delay: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    history_wait: Duration,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: show only where it points.
        let url = match self.url.rsplit_once('@') {
            Some((scheme_and_credentials, host)) => {
                let scheme = scheme_and_credentials
                    .split_once("://")
                    .map_or("", |(scheme, _)| scheme);
                format!("{scheme}://…@{host}")
            }
            None => self.url.clone(),
        };
        f.debug_struct("RedisConfig")
            .field("url", &url)
            .field("prefix", &self.prefix)
            .field("node_id", &self.node_id)
            .field("queue_capacity", &self.queue_capacity)
            .field("queue_bytes", &self.queue_bytes)
            .field("unsubscribe_delay", &self.unsubscribe_delay)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("history_wait", &self.history_wait)
            .finish()
    }
}

impl RedisConfig {
    /// Settings for the Redis server at `url` (`redis://[:PASSWORD@]HOST[:PORT][/DB]`), with
    /// the defaults: prefix `ws`, a random node id, a send queue of 65,536 messages or 64 MiB,
    /// unsubscribing 1 s after a channel's last local subscriber leaves, reconnecting after
    /// 100 ms doubling up to 1 s.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "ws".to_owned(),
            node_id: random_node_id(),
            queue_capacity: 65_536,
            queue_bytes: 64 * 1024 * 1024,
            unsubscribe_delay: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            history_wait: Duration::from_secs(5),
        }
    }

    /// How long a client's subscribe to a channel whose history lives in Redis may wait for
    /// this node to read that history (it needs Redis for it): past it, a subscribe with
    /// `since` is answered with the error `history unavailable` and no subscription, and a
    /// plain one is made from what this node holds. Default 5 s.
    pub fn history_wait(mut self, wait: Duration) -> Self {
        self.history_wait = wait;
        self
    }

    /// The prefix of the Redis channels: `PREFIX:broadcast` and `PREFIX:channel:NAME`.
    /// Default `ws`, as go-ws. Every node of a cluster must use the same.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// This node's id, the `sourceId` of what it publishes; a node drops messages carrying
    /// its own id. Default: 16 random bytes in hex. Every node of a cluster needs its own.
    pub fn node_id(mut self, node_id: impl Into<String>) -> Self {
        self.node_id = node_id.into();
        self
    }

    /// Most messages waiting to be sent to Redis; more are dropped (and counted in
    /// [`BrokerStats::send_dropped`]). Default 65,536.
    pub fn queue_capacity(mut self, messages: usize) -> Self {
        self.queue_capacity = messages;
        self
    }

    /// Most bytes of messages waiting to be sent to Redis; more are dropped (and counted).
    /// Default 64 MiB.
    pub fn queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes;
        self
    }

    /// How long after a channel's last local subscriber leaves the node unsubscribes from
    /// it, if nobody subscribed again meanwhile (so that churn does not flap). Default 1 s.
    pub fn unsubscribe_delay(mut self, delay: Duration) -> Self {
        self.unsubscribe_delay = delay;
        self
    }

    /// The wait before reconnecting after a connection is lost or refused: `min`, doubled on
    /// each failure up to `max`. Default 100 ms to 1 s, so that delivery resumes within about
    /// a second of Redis being back.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }
}

/// 16 random bytes in hex, without a crate for randomness: std's `RandomState` is seeded from
/// the operating system's random source once per thread, and each instance has its own keys.
fn random_node_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut id = String::with_capacity(32);
    for part in 0..2u8 {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(nanos);
        hasher.write_u32(std::process::id());
        hasher.write_u8(part);
        let _ = write!(id, "{:016x}", hasher.finish());
    }
    id
}

/// The Redis broker (cargo feature `redis`): hubs on several nodes share channels through
/// Redis pub/sub, speaking go-ws's bridge format so Go and Rust nodes can serve one cluster.
///
/// Channels `PREFIX:broadcast` and `PREFIX:channel:NAME`; payload
/// `{"sourceId":NODE_ID,"message":MESSAGE}`. Delivery across nodes is at most once, and in
/// order for the messages of one publishing node; local delivery never waits for Redis. See
/// the [module docs](crate::Broker) for what the hub does with a broker.
///
/// # History channels
///
/// On channels the hub gives a history, Redis numbers the publications: one Lua script
/// stores each in a Redis stream (`PREFIX:history:NAME`, trimmed to the channel's count,
/// expiring with its age) and publishes it with its `offset` and `epoch`, atomically. Every
/// node delivers them from Redis in offset order, the publishing node too (local delivery
/// waits for Redis there: one order everywhere), reads what it missed from the stream after
/// a gap or a reconnect, and answers a subscribe with `since` once it has read the channel's
/// history (within [`RedisConfig::history_wait`], else `history unavailable`). While Redis is
/// away, a publish to a history channel fails ([`Error::is_unavailable`]); it is never
/// delivered without an offset. go-ws nodes' messages on such a channel are delivered live,
/// without an offset, and not kept.
///
/// ```no_run
/// # fn main() -> wshub::Result<()> {
/// let broker = wshub::RedisBroker::new(wshub::RedisConfig::new("redis://127.0.0.1:6379/"))?;
/// let config = wshub::HubConfig::builder().broker(broker).build()?;
/// let hub = wshub::Hub::with_config(config);
/// # Ok(()) }
/// ```
pub struct RedisBroker {
    state: Arc<State>,
    queue: mpsc::Sender<Outgoing>,
    /// The queue's receiving end, until the hub starts the broker.
    unstarted: Mutex<Option<mpsc::Receiver<Outgoing>>>,
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("node_id", &self.state.node_id)
            .field("prefix", &self.state.prefix)
            .finish_non_exhaustive()
    }
}

/// A message waiting to be published.
struct Outgoing {
    /// The channel's name; `None` for a broadcast.
    channel: Option<Box<str>>,
    message: Bytes,
    /// Set for a publication to a history channel, which Redis numbers
    /// (`redis_history.rs`).
    numbered: Option<Box<ToNumber>>,
}

/// What the publish script needs beside the message, and who waits for its answer.
struct ToNumber {
    max_publications: usize,
    max_age_ms: u64,
    reply: Option<PositionReply>,
}

impl Outgoing {
    /// Tells whoever waits for this message's position that it got none.
    fn fail(self, why: &str) {
        if let Some(reply) = self.numbered.and_then(|n| n.reply) {
            let _ = reply.send(Err(Error::unavailable(why)));
        }
    }
}

/// The publishing connection's state, as `publish` sees it.
const PUB_CONNECTING: u8 = 0;
const PUB_UP: u8 = 1;
const PUB_DOWN: u8 = 2;

struct State {
    client: redis::Client,
    node_id: String,
    prefix: String,
    /// `PREFIX:broadcast`
    broadcast_key: String,
    /// `PREFIX:channel:`
    channel_key_prefix: String,
    /// `{"sourceId":"ID","message":` — a payload is this, the message, and `}`.
    payload_head: Vec<u8>,
    /// `redis_history::PUBLISH_SCRIPT`, loaded on every publishing connection.
    publish_script: redis::Script,
    /// Epochs for channels that have none in Redis yet (the script keeps the first one set).
    epochs: EpochSource,
    queue_bytes_limit: usize,
    unsubscribe_delay: Duration,
    backoff_min: Duration,
    backoff_max: Duration,

    history_wait: Duration,
    /// History channels this node is in step with Redis for: subscribed on the current
    /// pub/sub connection and caught up since. A subscribe to one goes straight to its shard.
    synced: Mutex<HashSet<Box<str>, ahash::RandomState>>,
    /// History channels that subscribes wait for (`Broker::prepare_history`), and their
    /// waiters: the subscriber subscribes and catches them up.
    preparing: Mutex<HashMap<Box<str>, Vec<oneshot::Sender<()>>, ahash::RandomState>>,
    /// Channel changes not yet seen by the subscriber: name → active now.
    pending: Mutex<HashMap<Box<str>, bool, ahash::RandomState>>,
    changed: Notify,
    stop: watch::Sender<bool>,
    /// Set with `stop`, for the hot path to read without a lock.
    stopping: AtomicBool,

    publisher: AtomicU8,
    subscriber_up: AtomicBool,
    queued_bytes: AtomicUsize,
    reconnects: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    send_dropped: AtomicU64,
    receive_dropped: AtomicU64,
    channels: AtomicUsize,
}

impl State {
    fn synced(&self) -> MutexGuard<'_, HashSet<Box<str>, ahash::RandomState>> {
        self.synced.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[allow(clippy::type_complexity)]
    fn preparing(
        &self,
    ) -> MutexGuard<'_, HashMap<Box<str>, Vec<oneshot::Sender<()>>, ahash::RandomState>> {
        self.preparing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<Box<str>, bool, ahash::RandomState>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dropped(&self, messages: u64) {
        self.send_dropped.fetch_add(messages, Ordering::Relaxed);
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            next: self.backoff_min,
            min: self.backoff_min,
            max: self.backoff_max,
        }
    }

    fn channel_key<'a>(&'a self, channel: &'a str) -> ChannelKey<'a> {
        ChannelKey {
            prefix: &self.channel_key_prefix,
            name: channel,
        }
    }

    /// Resolves once the broker is shut down.
    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stop = self.stop.subscribe();
        async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.send_replace(true);
    }
}

impl RedisBroker {
    /// A broker with `config`; it connects when the hub starts.
    ///
    /// # Errors
    ///
    /// The URL is not a Redis URL, or the prefix or node id is empty
    /// ([`Error::is_config`](crate::Error::is_config)).
    pub fn new(config: RedisConfig) -> Result<RedisBroker> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| Error::config(format!("redis url: {e}")))?;
        if config.prefix.is_empty() {
            return Err(Error::config("redis prefix must not be empty"));
        }
        if config.node_id.is_empty() {
            return Err(Error::config("redis node id must not be empty"));
        }
        if config.queue_capacity == 0 {
            return Err(Error::config("redis queue capacity must be at least 1"));
        }
        let mut payload_head = b"{\"sourceId\":".to_vec();
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut payload_head, &config.node_id);
        payload_head.extend_from_slice(b",\"message\":");
        let (queue, receiver) = mpsc::channel(config.queue_capacity);
        let state = State {
            client,
            broadcast_key: format!("{}:broadcast", config.prefix),
            channel_key_prefix: format!("{}:channel:", config.prefix),
            payload_head,
            publish_script: redis::Script::new(PUBLISH_SCRIPT),
            epochs: EpochSource::new(),
            node_id: config.node_id,
            prefix: config.prefix,
            queue_bytes_limit: config.queue_bytes,
            unsubscribe_delay: config.unsubscribe_delay,
            backoff_min: config.backoff_min,
            backoff_max: config.backoff_max,
            history_wait: config.history_wait,
            synced: Mutex::default(),
            preparing: Mutex::default(),
            pending: Mutex::default(),
            changed: Notify::new(),
            stop: watch::channel(false).0,
            stopping: AtomicBool::new(false),
            publisher: AtomicU8::new(PUB_CONNECTING),
            subscriber_up: AtomicBool::new(false),
            queued_bytes: AtomicUsize::new(0),
            reconnects: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            send_dropped: AtomicU64::new(0),
            receive_dropped: AtomicU64::new(0),
            channels: AtomicUsize::new(0),
        };
        Ok(RedisBroker {
            state: Arc::new(state),
            queue,
            unstarted: Mutex::new(Some(receiver)),
        })
    }

    /// This node's id: the `sourceId` of what it publishes.
    pub fn node_id(&self) -> &str {
        &self.state.node_id
    }

    /// The prefix of its Redis channels.
    pub fn prefix(&self) -> &str {
        &self.state.prefix
    }
}

impl Broker for RedisBroker {
    fn start(&self, inbound: Inbound) {
        let Some(receiver) = self
            .unstarted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("the redis broker was started outside a tokio runtime");
            return;
        };
        runtime.spawn(run_publisher(Arc::clone(&self.state), receiver));
        runtime.spawn(run_subscriber(Arc::clone(&self.state), inbound));
    }

    fn publish(&self, target: Target<'_>, message: Bytes) {
        let state = &self.state;
        if state.publisher.load(Ordering::Acquire) == PUB_DOWN || state.is_stopped() {
            state.dropped(1);
            return;
        }
        let len = message.len();
        if state.queued_bytes.fetch_add(len, Ordering::AcqRel) + len > state.queue_bytes_limit {
            state.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            state.dropped(1);
            return;
        }
        let channel = match target {
            Target::Channel(channel) => Some(channel.into()),
            Target::Broadcast => None,
        };
        if self
            .queue
            .try_send(Outgoing {
                channel,
                message,
                numbered: None,
            })
            .is_err()
        {
            state.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            state.dropped(1);
        }
    }

    fn numbers_history(&self) -> bool {
        true
    }

    fn publish_numbered(
        &self,
        channel: &str,
        message: Bytes,
        policy: &HistoryPolicy,
        reply: Option<PositionReply>,
    ) -> Result<()> {
        let state = &self.state;
        if state.publisher.load(Ordering::Acquire) == PUB_DOWN || state.is_stopped() {
            state.dropped(1);
            return Err(Error::unavailable("redis is unreachable"));
        }
        if !message.ends_with(b"}") {
            return Err(Error::invalid_argument("a message is a JSON object"));
        }
        let len = message.len();
        if state.queued_bytes.fetch_add(len, Ordering::AcqRel) + len > state.queue_bytes_limit {
            state.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            state.dropped(1);
            return Err(Error::unavailable("the queue to redis is full"));
        }
        let out = Outgoing {
            channel: Some(channel.into()),
            message,
            numbered: Some(Box::new(ToNumber {
                max_publications: policy.max_publications(),
                max_age_ms: (policy.max_age().as_millis() as u64).max(1),
                reply,
            })),
        };
        if let Err(err) = self.queue.try_send(out) {
            let out = match err {
                mpsc::error::TrySendError::Full(out) | mpsc::error::TrySendError::Closed(out) => {
                    out
                }
            };
            state.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            state.dropped(1);
            // The caller gets the error itself: no reply is waited for.
            drop(out);
            return Err(Error::unavailable("the queue to redis is full"));
        }
        Ok(())
    }

    fn prepare_history(&self, channel: &str, behind: bool) -> Option<HistoryReady> {
        let state = &self.state;
        if !behind && state.synced().contains(channel) {
            return None;
        }
        let (ready, answer) = oneshot::channel();
        {
            let mut preparing = state.preparing();
            let waiters = preparing.entry(channel.into()).or_default();
            // Waiters that gave up (Redis away longer than the wait) leave no trace.
            waiters.retain(|waiter| !waiter.is_closed());
            waiters.push(ready);
        }
        state.changed.notify_one();
        let wait = state.history_wait;
        Some(Box::pin(async move {
            matches!(timeout(wait, answer).await, Ok(Ok(())))
        }))
    }

    fn channel_active(&self, channel: &str) {
        self.state.pending().insert(channel.into(), true);
        self.state.changed.notify_one();
    }

    fn channel_inactive(&self, channel: &str) {
        self.state.pending().insert(channel.into(), false);
        self.state.changed.notify_one();
    }

    fn stats(&self) -> BrokerStats {
        let state = &self.state;
        BrokerStats {
            connected: state.publisher.load(Ordering::Acquire) == PUB_UP
                && state.subscriber_up.load(Ordering::Acquire),
            reconnects: state.reconnects.load(Ordering::Relaxed),
            sent: state.sent.load(Ordering::Relaxed),
            received: state.received.load(Ordering::Relaxed),
            send_dropped: state.send_dropped.load(Ordering::Relaxed),
            receive_dropped: state.receive_dropped.load(Ordering::Relaxed),
            channels: state.channels.load(Ordering::Relaxed),
        }
    }

    fn shutdown(&self) {
        self.state.stop();
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.state.stop();
    }
}

/// A doubling wait between connection attempts.
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Sleeps `wait`; false if the broker was stopped meanwhile.
async fn pause(state: &State, wait: Duration) -> bool {
    tokio::select! {
        () = state.stopped() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

// ---------------------------------------------------------------------------------------------
// Publishing
// ---------------------------------------------------------------------------------------------

/// `PREFIX:channel:NAME`, written into the command without a buffer of its own.
struct ChannelKey<'a> {
    prefix: &'a str,
    name: &'a str,
}

impl ToRedisArgs for ChannelKey<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        let mut arg = out.writer_for_next_arg();
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(self.name.as_bytes());
    }
}

/// `{"sourceId":"ID","message":MESSAGE}`, concatenated into the command: the message's JSON
/// is never parsed or encoded again.
struct Payload<'a> {
    head: &'a [u8],
    message: &'a [u8],
}

impl ToRedisArgs for Payload<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        let mut arg = out.writer_for_next_arg();
        let _ = arg.write_all(self.head);
        let _ = arg.write_all(self.message);
        let _ = arg.write_all(b"}");
    }
}

async fn connect_publisher(state: &State) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    state
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Counts everything queued as dropped (Redis is away).
fn drain_dropped(state: &State, queue: &mut mpsc::Receiver<Outgoing>) {
    while let Ok(out) = queue.try_recv() {
        state
            .queued_bytes
            .fetch_sub(out.message.len(), Ordering::AcqRel);
        state.dropped(1);
        out.fail("redis is unreachable");
    }
}

/// The publishing connection failed: publish counts as dropped from now on, and so does
/// everything queued; waits before reconnecting. False if the broker stopped meanwhile.
async fn lost(
    state: &State,
    queue: &mut mpsc::Receiver<Outgoing>,
    backoff: &mut Backoff,
    err: &redis::RedisError,
) -> bool {
    state.publisher.store(PUB_DOWN, Ordering::Release);
    tracing::warn!(error = %err, "redis broker: publishing connection lost, reconnecting");
    drain_dropped(state, queue);
    pause(state, backoff.next()).await
}

/// The publisher task: connects, sends the queue in pipelines, reconnects.
async fn run_publisher(state: Arc<State>, mut queue: mpsc::Receiver<Outgoing>) {
    let mut backoff = state.backoff();
    let mut ever_connected = false;
    let mut batch = Vec::with_capacity(MAX_PIPELINE);
    // Polled until it completes, never after: every branch taking it leaves the loop.
    let stopped = state.stopped();
    tokio::pin!(stopped);
    'connect: loop {
        let connected = tokio::select! {
            () = &mut stopped => break 'connect,
            connected = connect_publisher(&state) => connected,
        };
        let mut connection = match connected {
            Ok(connection) => connection,
            Err(err) => {
                if state.publisher.swap(PUB_DOWN, Ordering::AcqRel) != PUB_DOWN {
                    tracing::warn!(error = %err, "redis broker: cannot connect to publish");
                }
                drain_dropped(&state, &mut queue);
                if pause(&state, backoff.next()).await {
                    continue 'connect;
                }
                break 'connect;
            }
        };
        // The publish script of history channels, by its hash from now on (a restarted
        // Redis has forgotten it; every new connection loads it again).
        let invocation = state.publish_script.prepare_invoke();
        let loaded = tokio::select! {
            () = &mut stopped => break 'connect,
            loaded = invocation.load_async(&mut connection) => loaded,
        };
        if let Err(err) = loaded {
            if lost(&state, &mut queue, &mut backoff, &err).await {
                continue 'connect;
            }
            break 'connect;
        }
        if ever_connected {
            state.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!("redis broker: publishing connection restored");
        }
        ever_connected = true;
        backoff.reset();
        // From now on `publish` queues again (what it queued before the first connection is
        // sent now; what it queued while the connection was down was counted as dropped).
        state.publisher.store(PUB_UP, Ordering::Release);
        loop {
            batch.clear();
            let received = tokio::select! {
                () = &mut stopped => break 'connect,
                received = queue.recv_many(&mut batch, MAX_PIPELINE) => received,
                () = tokio::time::sleep(IDLE_PING) => {
                    // Idle: make sure the connection is still there, so that `connected` tells
                    // the truth and the next message does not find it dead.
                    let ping = redis::cmd("PING");
                    let ping = tokio::select! {
                        () = &mut stopped => break 'connect,
                        ping = ping.exec_async(&mut connection) => ping,
                    };
                    match ping {
                        Ok(()) => continue,
                        Err(err) => {
                            if lost(&state, &mut queue, &mut backoff, &err).await {
                                continue 'connect;
                            }
                            break 'connect;
                        }
                    }
                }
            };
            if received == 0 {
                // The broker is gone.
                break 'connect;
            }
            let mut pipeline = redis::Pipeline::with_capacity(batch.len());
            // A script that fails (Redis out of memory, say) fails its own publication only.
            pipeline.ignore_errors();
            let mut bytes = 0;
            let now_ms = redis_history::now_unix_ms();
            for out in &batch {
                bytes += out.message.len();
                match (&out.numbered, &out.channel) {
                    (Some(numbered), Some(channel)) => {
                        let keys = HistoryKeys::new(&state.prefix, channel);
                        pipeline
                            .cmd("EVALSHA")
                            .arg(state.publish_script.get_hash())
                            .arg(3)
                            .arg(keys.meta)
                            .arg(keys.stream)
                            .arg(state.channel_key(channel))
                            .arg(out.message.as_ref())
                            .arg(state.payload_head.as_slice())
                            .arg(numbered.max_publications)
                            .arg(numbered.max_age_ms)
                            .arg(&*state.epochs.next())
                            .arg(now_ms);
                    }
                    _ => {
                        let command = pipeline.cmd("PUBLISH");
                        match &out.channel {
                            Some(channel) => command.arg(state.channel_key(channel)),
                            None => command.arg(state.broadcast_key.as_str()),
                        };
                        command
                            .arg(Payload {
                                head: &state.payload_head,
                                message: &out.message,
                            })
                            .ignore();
                    }
                }
            }
            state.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            let result = tokio::select! {
                () = &mut stopped => {
                    state.dropped(batch.len() as u64);
                    for out in batch.drain(..) {
                        out.fail("the hub shut down before redis answered");
                    }
                    break 'connect;
                }
                result = pipeline
                    .query_async::<Vec<redis::RedisResult<(u64, String)>>>(&mut connection) => result,
            };
            match result {
                Ok(answers) => {
                    state.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    let mut answers = answers.into_iter();
                    for out in batch.drain(..) {
                        let Some(numbered) = out.numbered else {
                            continue;
                        };
                        let answer = answers.next();
                        let position = match answer {
                            Some(Ok((offset, epoch))) => Ok(StreamPosition {
                                offset,
                                epoch: epoch.into(),
                            }),
                            Some(Err(err)) => {
                                tracing::warn!(error = %err, "redis broker: a history publish failed");
                                Err(Error::unavailable(format!(
                                    "redis refused the publish: {err}"
                                )))
                            }
                            None => Err(Error::unavailable("redis gave no answer")),
                        };
                        if let Some(reply) = numbered.reply {
                            let _ = reply.send(position);
                        }
                    }
                }
                Err(err) => {
                    // Some may have reached Redis; at most once: count them all as dropped.
                    state.dropped(batch.len() as u64);
                    for out in batch.drain(..) {
                        out.fail("the connection to redis was lost before it answered (the message may have been published)");
                    }
                    if lost(&state, &mut queue, &mut backoff, &err).await {
                        continue 'connect;
                    }
                    break 'connect;
                }
            }
        }
    }
    state.publisher.store(PUB_DOWN, Ordering::Release);
    queue.close();
    drain_dropped(&state, &mut queue);
}

// ---------------------------------------------------------------------------------------------
// Subscribing and receiving
// ---------------------------------------------------------------------------------------------

/// The wire payload, as go-ws writes it.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "sourceId", borrow, default)]
    source_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    message: &'a RawValue,
}

/// The epoch of a numbered message.
#[derive(Deserialize)]
struct EpochOnly<'a> {
    #[serde(borrow)]
    epoch: Cow<'a, str>,
}

/// Why a pub/sub session ended.
enum Ended {
    Stopped,
    Lost(String),
}

/// The subscriber's view of one connection's subscriptions.
struct Subscriptions {
    /// Channels (local names) subscribed, or being subscribed, on this connection.
    subscribed: HashSet<Box<str>, ahash::RandomState>,
    /// Channels whose last local subscriber left, and when: unsubscribed once the delay has
    /// passed if they are still without subscribers.
    leaving: HashMap<Box<str>, Instant, ahash::RandomState>,
}

/// The subscriber task: connects, subscribes, receives, reconnects.
async fn run_subscriber(state: Arc<State>, inbound: Inbound) {
    let mut backoff = state.backoff();
    let mut ever_connected = false;
    let mut was_up = false;
    loop {
        let connected = tokio::select! {
            () = state.stopped() => break,
            connected = timeout(CONNECT_TIMEOUT, state.client.get_async_pubsub()) => connected,
        };
        let error = match connected {
            Ok(Ok(pubsub)) => {
                let (sink, stream) = pubsub.split();
                match session(&state, &inbound, sink, stream, &mut ever_connected).await {
                    Ended::Stopped => break,
                    Ended::Lost(why) => {
                        state.synced().clear();
                        if state.subscriber_up.swap(false, Ordering::AcqRel) {
                            backoff.reset();
                            was_up = true;
                        }
                        state.channels.store(0, Ordering::Relaxed);
                        why
                    }
                }
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => "connection timed out".to_owned(),
        };
        if was_up {
            tracing::warn!(error = %error, "redis broker: subscription connection lost, reconnecting");
            was_up = false;
        } else {
            tracing::debug!(error = %error, "redis broker: cannot connect to subscribe");
        }
        if !pause(&state, backoff.next()).await {
            break;
        }
    }
    state.subscriber_up.store(false, Ordering::Release);
    state.channels.store(0, Ordering::Relaxed);
}

/// SUBSCRIBE (or UNSUBSCRIBE) `keys`, many in each command.
async fn change_subscriptions(
    sink: &mut PubSubSink,
    subscribe: bool,
    keys: &[Vec<u8>],
) -> std::result::Result<(), String> {
    for chunk in keys.chunks(MAX_CHANNELS_PER_COMMAND) {
        let command = async {
            if subscribe {
                sink.subscribe(chunk).await
            } else {
                sink.unsubscribe(chunk).await
            }
        };
        match timeout(RESPONSE_TIMEOUT, command).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(err.to_string()),
            Err(_) => return Err("no answer to a (un)subscribe command".to_owned()),
        }
    }
    Ok(())
}

/// One connection's life: subscribe this node's channels, then receive messages and apply
/// channel changes until the connection is lost or the broker stops.
async fn session(
    state: &State,
    inbound: &Inbound,
    mut sink: PubSubSink,
    mut stream: redis::aio::PubSubStream,
    ever_connected: &mut bool,
) -> Ended {
    // Changes noted before now are in the snapshot; later ones are applied on top of it.
    state.pending().clear();
    state.synced().clear();
    let mut subs = Subscriptions {
        subscribed: inbound
            .active_channels()
            .into_iter()
            .map(String::into_boxed_str)
            .collect(),
        leaving: HashMap::default(),
    };
    let mut keys = Vec::with_capacity(subs.subscribed.len() + 1);
    keys.push(state.broadcast_key.as_bytes().to_vec());
    keys.extend(subs.subscribed.iter().map(|c| key_bytes(state, c)));
    let subscribing = tokio::select! {
        () = state.stopped() => return Ended::Stopped,
        result = change_subscriptions(&mut sink, true, &keys) => result,
    };
    if let Err(why) = subscribing {
        return Ended::Lost(why);
    }
    drop(keys);
    if *ever_connected {
        state.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            channels = subs.subscribed.len(),
            "redis broker: subscription connection restored"
        );
    }
    // Reads history channels' streams (catching up), connected when first needed: after
    // the subscription, so that nothing published from then on is missed.
    let mut reader = None;
    for channel in &subs.subscribed {
        if let Err(why) = catch_up(state, inbound, &mut reader, channel).await {
            return Ended::Lost(why);
        }
    }
    state.synced().extend(subs.subscribed.iter().cloned());
    // Subscribes that waited while the connection was down.
    if let Err(why) = prepare_waiting(state, inbound, &mut sink, &mut subs, &mut reader).await {
        return Ended::Lost(why);
    }
    *ever_connected = true;
    state.subscriber_up.store(true, Ordering::Release);
    state
        .channels
        .store(subs.subscribed.len(), Ordering::Relaxed);

    let sweep_every = (state.unsubscribe_delay / 4).max(Duration::from_millis(10));
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = state.stopped();
    tokio::pin!(stopped);
    loop {
        // Channel changes and timers first: a flood of messages must not hold them back.
        tokio::select! {
            biased;
            () = &mut stopped => return Ended::Stopped,
            () = state.changed.notified() => {
                match apply_changes(state, inbound, &mut sink, &mut subs).await {
                    Ok(new) => {
                        for channel in &new {
                            if let Err(why) = catch_up(state, inbound, &mut reader, channel).await {
                                return Ended::Lost(why);
                            }
                            state.synced().insert(channel.clone());
                        }
                    }
                    Err(why) => return Ended::Lost(why),
                }
                if let Err(why) =
                    prepare_waiting(state, inbound, &mut sink, &mut subs, &mut reader).await
                {
                    return Ended::Lost(why);
                }
            }
            _ = sweep.tick(), if !subs.leaving.is_empty() => {
                if let Err(why) = sweep_leaving(state, inbound, &mut sink, &mut subs).await {
                    return Ended::Lost(why);
                }
            }
            _ = ping.tick() => {
                match timeout(RESPONSE_TIMEOUT, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return Ended::Lost(err.to_string()),
                    Err(_) => return Ended::Lost("no answer to a ping".to_owned()),
                }
            }
            message = stream.next() => {
                let Some(message) = message else {
                    return Ended::Lost("the connection was closed".to_owned());
                };
                if let Err(why) = receive(state, inbound, &mut reader, &message).await {
                    return Ended::Lost(why);
                }
                // And what else has arrived, without going round the loop for each.
                for _ in 0..RECEIVE_BURST {
                    match stream.next().now_or_never() {
                        Some(Some(message)) => {
                            if let Err(why) = receive(state, inbound, &mut reader, &message).await {
                                return Ended::Lost(why);
                            }
                        }
                        Some(None) => return Ended::Lost("the connection was closed".to_owned()),
                        None => break,
                    }
                }
                ping.reset();
            }
        }
    }
}

fn key_bytes(state: &State, channel: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(state.channel_key_prefix.len() + channel.len());
    key.extend_from_slice(state.channel_key_prefix.as_bytes());
    key.extend_from_slice(channel.as_bytes());
    key
}

/// Applies the channel changes noted since the last time: subscribes new channels at once
/// (one command for many), and marks the ones left to be unsubscribed after the delay.
///
/// The hub's calls may arrive out of order, so the last one noted for a channel is only a
/// hint; the node's directory decides. An "active" for a channel that has no subscribers
/// (its last one left and that "inactive" came first) is taken as "inactive": a later
/// subscriber makes the hub call `channel_active` again, after its entry is visible here.
/// An "inactive" for a channel that has subscribers again is caught by [`sweep_leaving`],
/// which checks again when the delay has passed.
async fn apply_changes(
    state: &State,
    inbound: &Inbound,
    sink: &mut PubSubSink,
    subs: &mut Subscriptions,
) -> std::result::Result<Vec<Box<str>>, String> {
    let changes = std::mem::take(&mut *state.pending());
    let now = Instant::now();
    let mut new = Vec::new();
    let mut added = Vec::new();
    for (channel, active) in changes {
        if active && inbound.has_subscribers(&channel) {
            subs.leaving.remove(&channel);
            if !subs.subscribed.contains(&channel) {
                new.push(key_bytes(state, &channel));
                added.push(channel.clone());
                subs.subscribed.insert(channel);
            }
        } else if subs.subscribed.contains(&channel) {
            subs.leaving.insert(channel, now + state.unsubscribe_delay);
        }
    }
    if !new.is_empty() {
        change_subscriptions(sink, true, &new).await?;
        state
            .channels
            .store(subs.subscribed.len(), Ordering::Relaxed);
    }
    Ok(added)
}

/// Unsubscribes the channels whose delay has passed and that still have no local subscriber.
async fn sweep_leaving(
    state: &State,
    inbound: &Inbound,
    sink: &mut PubSubSink,
    subs: &mut Subscriptions,
) -> std::result::Result<(), String> {
    let now = Instant::now();
    let mut gone = Vec::new();
    subs.leaving.retain(|channel, deadline| {
        if *deadline > now {
            return true;
        }
        if !inbound.has_subscribers(channel) {
            gone.push(channel.clone());
        }
        false
    });
    if gone.is_empty() {
        return Ok(());
    }
    let keys: Vec<Vec<u8>> = gone.iter().map(|c| key_bytes(state, c)).collect();
    {
        let mut synced = state.synced();
        for channel in &gone {
            subs.subscribed.remove(channel);
            synced.remove(channel);
        }
    }
    state
        .channels
        .store(subs.subscribed.len(), Ordering::Relaxed);
    change_subscriptions(sink, false, &keys).await
}

/// Subscribes (if need be) and catches up the history channels that subscribes wait for,
/// then lets them go on. A channel prepared for a subscribe that never reaches its shard is
/// left after the unsubscribe delay, like one whose last subscriber left.
async fn prepare_waiting(
    state: &State,
    inbound: &Inbound,
    sink: &mut PubSubSink,
    subs: &mut Subscriptions,
    reader: &mut Option<MultiplexedConnection>,
) -> std::result::Result<(), String> {
    let waiting = std::mem::take(&mut *state.preparing());
    if waiting.is_empty() {
        return Ok(());
    }
    let leave_at = Instant::now() + state.unsubscribe_delay;
    let mut keys = Vec::new();
    for channel in waiting.keys() {
        if !subs.subscribed.contains(channel) {
            keys.push(key_bytes(state, channel));
            subs.subscribed.insert(channel.clone());
            subs.leaving.insert(channel.clone(), leave_at);
        }
    }
    let result = async {
        if !keys.is_empty() {
            change_subscriptions(sink, true, &keys).await?;
            state
                .channels
                .store(subs.subscribed.len(), Ordering::Relaxed);
        }
        Ok::<_, String>(())
    }
    .await;
    if let Err(why) = result {
        // Still waiting: the next connection prepares them.
        state.preparing().extend(waiting);
        return Err(why);
    }
    let mut waiting = waiting.into_iter();
    while let Some((channel, waiters)) = waiting.next() {
        if let Err(why) = catch_up(state, inbound, reader, &channel).await {
            let mut preparing = state.preparing();
            preparing.entry(channel).or_default().extend(waiters);
            for (channel, waiters) in waiting {
                preparing.entry(channel).or_default().extend(waiters);
            }
            return Err(why);
        }
        state.synced().insert(channel);
        for waiter in waiters {
            let _ = waiter.send(());
        }
    }
    Ok(())
}

/// A connection for reading history streams (the pub/sub connection cannot send other
/// commands).
async fn connect_reader(state: &State) -> std::result::Result<MultiplexedConnection, String> {
    tokio::select! {
        () = state.stopped() => Err("stopped".to_owned()),
        connected = connect_publisher(state) => connected.map_err(|err| err.to_string()),
    }
}

/// Brings `channel`'s local history up to Redis's if it is a history channel
/// (`redis_history::catch_up`), connecting the reader if need be.
async fn catch_up(
    state: &State,
    inbound: &Inbound,
    reader: &mut Option<MultiplexedConnection>,
    channel: &str,
) -> std::result::Result<(), String> {
    if inbound.history_policy(channel).is_none() {
        return Ok(());
    }
    let connection = match reader {
        Some(connection) => connection,
        None => reader.insert(connect_reader(state).await?),
    };
    let caught = tokio::select! {
        () = state.stopped() => return Err("stopped".to_owned()),
        caught = redis_history::catch_up(connection, &state.prefix, &state.epochs, inbound, channel) => caught,
    };
    match caught {
        Ok(delivered) => {
            state.received.fetch_add(delivered, Ordering::Relaxed);
            Ok(())
        }
        Err(err) => Err(format!("reading the history of {channel}: {err}")),
    }
}

/// Hands one message from Redis to the local subscribers, unless it is this node's own.
///
/// On a history channel, a numbered publication (this node's own too) is delivered in offset
/// order: one after a gap, or of another epoch, waits while the node catches up from the
/// stream. A message without a position there (from a go-ws node) is delivered live, not
/// kept.
async fn receive(
    state: &State,
    inbound: &Inbound,
    reader: &mut Option<MultiplexedConnection>,
    message: &redis::Msg,
) -> std::result::Result<(), String> {
    let name = message.get_channel_name();
    let target = if name == state.broadcast_key {
        Target::Broadcast
    } else if let Some(channel) = name.strip_prefix(state.channel_key_prefix.as_str()) {
        Target::Channel(channel)
    } else {
        state.receive_dropped.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    };
    let Ok(wire) = serde_json::from_slice::<Wire<'_>>(message.get_payload_bytes()) else {
        state.receive_dropped.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    };
    if let Target::Channel(channel) = target {
        if inbound.history_policy(channel).is_some() {
            let json = wire.message.get().as_bytes();
            let mut outcome = redis_history::deliver(inbound, channel, json).await;
            if matches!(outcome, Numbered::Gap { .. } | Numbered::OtherEpoch) {
                catch_up(state, inbound, reader, channel).await?;
                outcome = redis_history::deliver(inbound, channel, json).await;
            }
            match outcome {
                Numbered::Delivered => {
                    state.received.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Numbered::Duplicate => return Ok(()),
                Numbered::Conflict => {
                    // Redis came back older: make the next publish start a new epoch.
                    state.receive_dropped.fetch_add(1, Ordering::Relaxed);
                    let epoch = serde_json::from_str::<EpochOnly<'_>>(wire.message.get())
                        .map(|m| m.epoch.into_owned())
                        .unwrap_or_default();
                    let connection = match reader {
                        Some(connection) => connection,
                        None => reader.insert(connect_reader(state).await?),
                    };
                    tracing::warn!(
                        channel,
                        "redis history: the counter went back; starting a new epoch"
                    );
                    return redis_history::forget(connection, &state.prefix, channel, &epoch)
                        .await
                        .map_err(|err| err.to_string());
                }
                // Not numbered: a go-ws node's message, delivered live below.
                Numbered::Invalid => {}
                Numbered::Gap { .. } | Numbered::OtherEpoch | Numbered::Refused => {
                    // Still out of order after catching up (Redis moved on meanwhile), or
                    // the shards are full: the next arrival catches up again.
                    state.receive_dropped.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            }
        }
    }
    if wire.source_id.as_deref() == Some(state.node_id.as_str()) {
        return Ok(());
    }
    if inbound.deliver(target, wire.message.get().as_bytes()) {
        state.received.fetch_add(1, Ordering::Relaxed);
    } else {
        state.receive_dropped.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_32_hex_digits_and_differ() {
        let a = random_node_id();
        let b = random_node_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn payload_is_the_head_the_message_and_a_brace() {
        let broker = RedisBroker::new(RedisConfig::new("redis://127.0.0.1/").node_id("ab\"c"))
            .expect("a valid config");
        let message = br#"{"type":"event","data":1}"#;
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(Payload {
            head: &broker.state.payload_head,
            message,
        });
        let packed = cmd.get_packed_command();
        let expected = r#"{"sourceId":"ab\"c","message":{"type":"event","data":1}}"#;
        let text = String::from_utf8(packed).unwrap();
        assert!(text.ends_with(&format!("${}\r\n{expected}\r\n", expected.len())));
        let wire: Wire<'_> = serde_json::from_str(expected).unwrap();
        assert_eq!(wire.source_id.as_deref(), Some("ab\"c"));
        assert_eq!(wire.message.get(), r#"{"type":"event","data":1}"#);
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(RedisBroker::new(RedisConfig::new("http://nope"))
            .unwrap_err()
            .is_config());
        assert!(
            RedisBroker::new(RedisConfig::new("redis://127.0.0.1/").prefix(""))
                .unwrap_err()
                .is_config()
        );
        assert!(
            RedisBroker::new(RedisConfig::new("redis://127.0.0.1/").queue_capacity(0))
                .unwrap_err()
                .is_config()
        );
    }

    #[test]
    fn the_debug_form_hides_the_password() {
        let config = RedisConfig::new("redis://:secret@example.com:6379/0");
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("example.com:6379/0"), "{shown}");
    }

    #[test]
    fn publish_before_start_queues_and_counts_when_full() {
        let broker =
            RedisBroker::new(RedisConfig::new("redis://127.0.0.1/").queue_capacity(2)).unwrap();
        for _ in 0..3 {
            broker.publish(Target::Channel("a"), Bytes::from_static(b"{}"));
        }
        let stats = broker.stats();
        assert_eq!(stats.send_dropped, 1);
        assert!(!stats.connected);
        broker.shutdown();
        broker.publish(Target::Broadcast, Bytes::from_static(b"{}"));
        assert_eq!(broker.stats().send_dropped, 2);
    }
}
