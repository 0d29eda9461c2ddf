//! The [`Hub`] handle: the public API, and routing of every call to the shards.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::broker::{Broker, Inbound, Target};
use crate::channels::{ChannelDirectory, ChannelEntry};
use crate::client::{ChannelSnapshot, ClientId, ClientSnapshot};
use crate::config::HubConfig;
use crate::error::{Error, Result};
use crate::frame::is_valid_close_code;
use crate::protocol::{self, Envelope, ErrorReason, Message, TYPE_ERROR, TYPE_EVENT, TYPE_MESSAGE};
use crate::shard::{Command, Shard};
use crate::stats::{Counters, HubStats};

/// The most bytes of published frames waiting in one shard's inbox. Past it, publishes to
/// that shard are refused and counted in [`HubStats::backlog_refused`], so a publisher that
/// outruns the shards never grows memory without bound and is never made to wait.
pub const SHARD_BACKLOG_BYTES: usize = 64 * 1024 * 1024;

const RUNNING: u8 = 0;
const SHUTTING_DOWN: u8 = 1;
const STOPPED: u8 = 2;

/// How long, past the drain deadline, shutdown waits for connection tasks to finish their
/// close handshakes before it stops the shards anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

struct ShardHandle {
    inbox: mpsc::UnboundedSender<Command>,
    /// Bytes of published frames in the inbox.
    backlog: AtomicUsize,
}

/// What the hub, its shards and its connection tasks share.
pub(crate) struct Shared {
    pub(crate) config: HubConfig,
    pub(crate) counters: Counters,
    pub(crate) channels: ChannelDirectory,
    shards: Box<[ShardHandle]>,
    epoch: Instant,
    next_client: AtomicU64,
    state: AtomicU8,
    /// Flips to true when shutdown begins; accept loops and new upgrades watch it.
    pub(crate) shutting_down: watch::Sender<bool>,
    /// Notified when the last connection task ends.
    tasks_idle: Notify,
}

impl Shared {
    /// Milliseconds since the hub was created: the clock of keep-alive.
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn is_running(&self) -> bool {
        self.state.load(Ordering::Acquire) == RUNNING
    }

    pub(crate) fn next_client_id(&self) -> ClientId {
        ClientId(self.next_client.fetch_add(1, Ordering::Relaxed))
    }

    fn shard_of(&self, client: ClientId) -> &ShardHandle {
        &self.shards[(client.0 % self.shards.len() as u64) as usize]
    }

    /// Sends a command to the shard that owns `client`.
    pub(crate) fn to_client_shard(&self, client: ClientId, command: Command) -> Result<()> {
        self.shard_of(client)
            .inbox
            .send(command)
            .map_err(|_| Error::closed())
    }

    /// Sends a frame-carrying command to shard `index`, unless its backlog is full.
    fn publish_to_shard(&self, index: usize, len: usize, command: Command) {
        let shard = &self.shards[index];
        if shard.backlog.load(Ordering::Relaxed) > SHARD_BACKLOG_BYTES {
            self.counters
                .backlog_refused
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        shard.backlog.fetch_add(len, Ordering::Relaxed);
        if shard.inbox.send(command).is_err() {
            shard.backlog.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// A frame of `len` bytes went into shard `index`'s inbox by another way than
    /// `publish_to_shard` (the benchmark harness).
    pub(crate) fn shard_backlog_added(&self, index: usize, len: usize) {
        self.shards[index].backlog.fetch_add(len, Ordering::Relaxed);
    }

    /// A shard took a frame of `len` bytes out of its inbox.
    pub(crate) fn shard_done_with(&self, index: usize, len: usize) {
        self.shards[index].backlog.fetch_sub(len, Ordering::Relaxed);
    }

    fn check_running(&self) -> Result<()> {
        if self.is_running() {
            Ok(())
        } else {
            Err(Error::closed())
        }
    }

    /// Publishes to `channel` the frame `encode` makes: to the local shards with subscribers,
    /// then to the broker. Without a broker, a publish to a channel nobody here listens to
    /// costs one map lookup and is never encoded.
    pub(crate) fn publish_with(
        &self,
        channel: &str,
        encode: impl FnOnce() -> Result<Bytes>,
    ) -> Result<()> {
        self.check_running()?;
        let entry = self.channels.get(channel);
        if self.broker().is_none() && entry.is_none() {
            self.counters.published.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let frame = encode()?;
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        let payload = self.broker().map(|_| protocol::frame_payload(&frame));
        if let Some(entry) = entry {
            self.fan_out_to_entry(&entry, frame);
        }
        if let (Some(broker), Some(payload)) = (self.broker(), payload) {
            broker.publish(Target::Channel(channel), payload);
        }
        Ok(())
    }

    pub(crate) fn broker(&self) -> Option<&Arc<dyn Broker>> {
        self.config.broker.as_ref()
    }

    /// Hands `frame` to the local shards that have subscribers to `channel`.
    pub(crate) fn fan_out_to_channel(&self, channel: &str, frame: Bytes) {
        if let Some(entry) = self.channels.get(channel) {
            self.fan_out_to_entry(&entry, frame);
        }
    }

    /// Hands `frame` to the shards whose bits are set in `entry`'s mask.
    fn fan_out_to_entry(&self, entry: &Arc<ChannelEntry>, frame: Bytes) {
        let mut mask = entry.shard_mask();
        while mask != 0 {
            let index = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let command = Command::Publish {
                channel: Arc::clone(entry),
                frame: frame_for_shard(&frame, mask == 0),
            };
            self.publish_to_shard(index, frame.len(), command);
        }
    }

    fn broadcast_frame(&self, frame: Bytes) {
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        let payload = self.broker().map(|_| protocol::frame_payload(&frame));
        self.fan_out_to_all(frame);
        if let (Some(broker), Some(payload)) = (self.broker(), payload) {
            broker.publish(Target::Broadcast, payload);
        }
    }

    /// Hands `frame` to every local shard, for all its clients.
    pub(crate) fn fan_out_to_all(&self, frame: Bytes) {
        let last = self.shards.len() - 1;
        for index in 0..self.shards.len() {
            let command = Command::Broadcast(frame_for_shard(&frame, index == last));
            self.publish_to_shard(index, frame.len(), command);
        }
    }

    /// A client's `publish`, already allowed by the policy: its data is copied raw into the
    /// frame, never parsed into a tree.
    pub(crate) fn publish_from_client(&self, channel: &str, data: Option<&RawValue>) -> Result<()> {
        self.publish_with(channel, || {
            let envelope = Envelope {
                kind: TYPE_MESSAGE,
                channel: Some(channel),
                process_id: None,
                data,
            };
            protocol::encode_frame(&envelope, SystemTime::now()).map_err(Error::encode)
        })
    }

    /// The per-client error message for `reason`, or `None` in strict go-ws mode.
    pub(crate) fn error_frame(&self, reason: ErrorReason, channel: Option<&str>) -> Option<Bytes> {
        if self.config.strict_go_ws {
            return None;
        }
        let envelope = Envelope {
            kind: TYPE_ERROR,
            channel,
            process_id: None,
            data: Some(reason.as_str()),
        };
        protocol::encode_frame(&envelope, SystemTime::now()).ok()
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

/// The frame one shard gets: the last shard takes the encoded frame itself, the others a copy.
///
/// Every subscriber's clone of a `Bytes` increments one reference count. Were all shards to
/// share one `Bytes`, their cores would fight over that count's cache line on every
/// delivery; one copy per shard (one small memcpy per publish, not per subscriber) keeps each
/// count on its shard's core.
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
        for shard in self.shared.shards.iter() {
            let _ = shard.inbox.send(Command::Stop);
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
/// Each client has an outbound queue bounded in bytes
/// ([`outbound_queue_bytes`](crate::HubConfigBuilder::outbound_queue_bytes)). Frames are
/// written at once when the client keeps up, and queued only when its socket is full. A
/// client whose queue goes over the bound, or whose writes do not move for the
/// [write timeout](crate::HubConfigBuilder::write_timeout), gets the
/// [slow-consumer policy](crate::SlowConsumerPolicy): by default it is closed at once with
/// code 4000 `slow consumer` and what it had queued is discarded; or its oldest frames are
/// dropped. Either way it is counted ([`HubStats::slow_consumer_disconnects`],
/// [`HubStats::dropped`]), and no other client waits for it.
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
            .field("shards", &self.inner.shared.shards.len())
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
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..config.shards)
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        let shards = senders
            .into_iter()
            .map(|inbox| ShardHandle {
                inbox,
                backlog: AtomicUsize::new(0),
            })
            .collect();
        let broker = config.broker.clone();
        let shared = Arc::new(Shared {
            counters: Counters::new(config.shards),
            config,
            channels: ChannelDirectory::new(broker),
            shards,
            epoch: Instant::now(),
            next_client: AtomicU64::new(1),
            state: AtomicU8::new(RUNNING),
            shutting_down: watch::channel(false).0,
            tasks_idle: Notify::new(),
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
                    let shard = Shard::new(index, Arc::clone(&self.inner.shared));
                    tokio::spawn(shard.run(inbox))
                })
                .collect();
            *self
                .inner
                .shard_tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = tasks;
            if let Some(broker) = self.inner.shared.broker() {
                broker.start(Inbound::new(&self.inner.shared));
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
        for shard in shared.shards.iter() {
            let _ = shard.inbox.send(Command::Shutdown { deadline });
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
        for shard in shared.shards.iter() {
            let _ = shard.inbox.send(Command::Stop);
        }
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
    /// The hub has shut down ([`Error::is_closed`]); nothing was sent.
    pub fn broadcast(&self, message: &Message) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        let frame = protocol::encode_frame(&Envelope::of(message, None), SystemTime::now())
            .map_err(Error::encode)?;
        shared.broadcast_frame(frame);
        Ok(())
    }

    /// Sends `message` to the subscribers of `channel`, with its `channel` field set to
    /// `channel` whatever it was. Nobody subscribed is not an error.
    ///
    /// # Errors
    ///
    /// The hub has shut down ([`Error::is_closed`]); nothing was sent.
    pub fn send_to_channel(&self, channel: &str, message: &Message) -> Result<()> {
        self.inner.shared.publish_with(channel, || {
            protocol::encode_frame(&Envelope::of(message, Some(channel)), SystemTime::now())
                .map_err(Error::encode)
        })
    }

    /// Streams one line of process `process_id`'s output to channel `process:ID`, as a
    /// `process_output` message.
    ///
    /// # Errors
    ///
    /// The hub has shut down ([`Error::is_closed`]).
    pub fn send_process_output(&self, process_id: &str, line: &str) -> Result<()> {
        let message = Message::process_output(process_id, line);
        self.send_to_channel(&protocol::process_channel(process_id), &message)
    }

    /// Sends process `process_id`'s status to channel `process:ID`, as a `process_status`
    /// message with data `{"status": status, "exitCode": exit_code}`.
    ///
    /// # Errors
    ///
    /// The hub has shut down ([`Error::is_closed`]).
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
        self.inner.shared.publish_with(&channel, || {
            let envelope = Envelope {
                kind: protocol::TYPE_PROCESS_STATUS,
                channel: Some(&channel),
                process_id: Some(process_id),
                data: Some(&Status { status, exit_code }),
            };
            protocol::encode_frame(&envelope, SystemTime::now()).map_err(Error::encode)
        })
    }

    /// Sends an `error` message with data `text` to every client.
    ///
    /// # Errors
    ///
    /// The hub has shut down ([`Error::is_closed`]).
    pub fn send_error(&self, text: &str) -> Result<()> {
        self.broadcast(&Message::error(text))
    }

    /// Sends an `event` message with data `{"event": name, "data": data}` to every client.
    ///
    /// # Errors
    ///
    /// The hub has shut down ([`Error::is_closed`]), or `data` could not be serialized
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
        shared.broadcast_frame(frame);
        Ok(())
    }

    /// Sends `message` to one client. A client that has already gone gets nothing, without an
    /// error: the disconnect may race with the call.
    ///
    /// # Errors
    ///
    /// The hub has shut down ([`Error::is_closed`]).
    pub fn send_to_client(&self, client: ClientId, message: &Message) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        let frame = protocol::encode_frame(&Envelope::of(message, None), SystemTime::now())
            .map_err(Error::encode)?;
        shared.counters.published.fetch_add(1, Ordering::Relaxed);
        shared.to_client_shard(client, Command::SendToClient { client, frame })
    }

    /// Sends `message` to every connection of the user that authentication named `user_id`.
    ///
    /// # Errors
    ///
    /// The hub has shut down ([`Error::is_closed`]).
    pub fn send_to_user(&self, user_id: &str, message: &Message) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        let frame = protocol::encode_frame(&Envelope::of(message, None), SystemTime::now())
            .map_err(Error::encode)?;
        shared.counters.published.fetch_add(1, Ordering::Relaxed);
        let user: Arc<str> = user_id.into();
        for index in 0..shared.shards.len() {
            let command = Command::SendToUser {
                user: Arc::clone(&user),
                frame: frame.clone(),
            };
            shared.publish_to_shard(index, frame.len(), command);
        }
        Ok(())
    }

    /// Subscribes `client` to `channel` from the server side; the client gets a `subscribed`
    /// acknowledgement (unless in strict go-ws mode). Idempotent. The subscription policy and
    /// limit, which guard clients' own requests, do not apply.
    ///
    /// # Errors
    ///
    /// The hub has shut down, or `channel` is empty ([`Error::is_invalid_argument`]).
    pub fn subscribe(&self, client: ClientId, channel: &str) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        if channel.is_empty() {
            return Err(Error::invalid_argument("empty channel name"));
        }
        shared.to_client_shard(
            client,
            Command::Subscribe {
                client,
                channel: channel.into(),
                from_client: false,
            },
        )
    }

    /// Unsubscribes `client` from `channel` from the server side; the client gets an
    /// `unsubscribed` acknowledgement (unless in strict go-ws mode). A no-op when it was not
    /// subscribed.
    ///
    /// # Errors
    ///
    /// The hub has shut down.
    pub fn unsubscribe(&self, client: ClientId, channel: &str) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        shared.to_client_shard(
            client,
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
    /// The hub has shut down, or `code` is not one a server may send (1000 to 1003, 1007 to
    /// 1014, 3000 to 4999).
    pub fn disconnect(&self, client: ClientId, code: u16, reason: &str) -> Result<()> {
        let shared = &self.inner.shared;
        shared.check_running()?;
        if !is_valid_close_code(code) {
            return Err(Error::invalid_argument(format!(
                "close code {code} may not be sent"
            )));
        }
        shared.to_client_shard(
            client,
            Command::Disconnect {
                client,
                code,
                reason: reason.into(),
            },
        )
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
        let shared = &self.inner.shared;
        let mut stats = shared.counters.snapshot(shared.channels.channel_count());
        stats.broker = shared.broker().map(|b| b.stats());
        stats
    }

    /// Every channel with subscribers and their count, sorted by name.
    pub fn channels(&self) -> Vec<ChannelSnapshot> {
        self.inner.shared.channels.snapshot()
    }

    /// Every connected client with its subscriptions, asked of each shard in turn. Empty
    /// once the hub has stopped.
    pub async fn clients(&self) -> Vec<ClientSnapshot> {
        let mut clients = Vec::new();
        for shard in self.inner.shared.shards.iter() {
            clients.extend(self.snapshot_of(shard).await);
        }
        clients.sort_by_key(|c| c.info.id);
        clients
    }

    /// One client's snapshot, if it is connected: asked of its own shard only.
    pub async fn client(&self, id: ClientId) -> Option<ClientSnapshot> {
        let shard = self.inner.shared.shard_of(id);
        self.snapshot_of(shard)
            .await
            .into_iter()
            .find(|c| c.info.id == id)
    }

    /// The clients of one shard; none once the hub has stopped.
    async fn snapshot_of(&self, shard: &ShardHandle) -> Vec<ClientSnapshot> {
        // Shards that were never started would never answer.
        self.ensure_started();
        let (reply, answer) = oneshot::channel();
        if shard.inbox.send(Command::Snapshot(reply)).is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }
}
