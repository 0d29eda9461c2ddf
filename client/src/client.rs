//! The client handle and the task that keeps it connected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{ClientConfig, DisconnectReason, Envelope, Error, Event, Events, Position};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type WsSink = SplitSink<Ws, WsMessage>;
type WsSource = SplitStream<Ws>;

/// How long the close handshake of [`Client::close`] may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The state of a [`Client`]'s connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No connection: waiting for the backoff to pass (or not started yet).
    Disconnected,
    /// A connection attempt is under way.
    Connecting,
    /// Connected: sends go out.
    Connected,
    /// Stopped for good ([`Client::close`], or it gave up).
    Closed,
}

impl State {
    fn from_u8(value: u8) -> State {
        match value {
            1 => State::Connecting,
            2 => State::Connected,
            3 => State::Closed,
            _ => State::Disconnected,
        }
    }
}

/// Counters of a [`Client`], since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Successful connections (the first one included).
    pub connections: u64,
    /// Successful connections after the first.
    pub reconnects: u64,
    /// Connection attempts that failed.
    pub failed_attempts: u64,
    /// [`Event::Message`]s handed to the application.
    pub messages: u64,
    /// Messages dropped because their offset was at or below the last one delivered on their
    /// channel in the same epoch (the hub should never send one; a resume race could).
    pub duplicates_dropped: u64,
    /// Server frames that were not protocol envelopes (skipped, reported as [`Event::Error`]).
    pub malformed: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    reconnects: AtomicU64,
    failed_attempts: AtomicU64,
    messages: AtomicU64,
    duplicates_dropped: AtomicU64,
    malformed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What the client knows of one channel it tracks.
#[derive(Default)]
struct ChannelState {
    /// Subscribed by the application: sent again on every connection.
    wanted: bool,
    /// Whether the hub keeps a history of it: `None` until the first acknowledgement.
    history: Option<bool>,
    /// The last position delivered to the application, or before any message, the
    /// acknowledgement's: what a resume asks `since`.
    position: Option<Position>,
    /// The connection (generation) the subscribe was last sent on.
    sent_on: u64,
}

/// The write half of the current connection, if there is one.
struct Writer {
    sink: Option<WsSink>,
    /// One more for every connection; 0 before the first.
    generation: u64,
}

struct Shared {
    config: ClientConfig,
    state: AtomicU8,
    stopped: AtomicBool,
    writer: tokio::sync::Mutex<Writer>,
    channels: Mutex<HashMap<String, ChannelState>>,
    counters: Counters,
    shutdown: watch::Sender<bool>,
    done: watch::Sender<bool>,
}

impl Shared {
    fn set_state(&self, state: State) {
        self.state.store(state as u8, Ordering::Release);
    }

    fn channels(&self) -> MutexGuard<'_, HashMap<String, ChannelState>> {
        // The map stays consistent whatever panicked while holding it: take it back.
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Stops the run task when the last [`Client`] clone goes.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

/// A reconnecting client of a wshub (or go-ws) hub. Cheap to clone; every clone drives the
/// same connection. The client stops when [`close`](Client::close) is called, when it gives
/// up ([`max_retries`](crate::ClientConfigBuilder::max_retries)), or when its last clone is
/// dropped.
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.handle.shared.config.url)
            .field("state", &self.state())
            .finish()
    }
}

impl Client {
    /// Starts a client: it connects at once, then keeps reconnecting until it is closed or
    /// gives up. Returns the handle and the client's [`Events`].
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (it spawns the task that runs the connection).
    pub fn start(config: ClientConfig) -> (Client, Events) {
        let (tx, rx) = mpsc::channel(config.event_capacity);
        let shared = Arc::new(Shared {
            config,
            state: AtomicU8::new(State::Disconnected as u8),
            stopped: AtomicBool::new(false),
            writer: tokio::sync::Mutex::new(Writer {
                sink: None,
                generation: 0,
            }),
            channels: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            shutdown: watch::Sender::new(false),
            done: watch::Sender::new(false),
        });
        tokio::spawn(run(Arc::clone(&shared), tx));
        (
            Client {
                handle: Arc::new(Handle { shared }),
            },
            Events { rx },
        )
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// The connection's state.
    pub fn state(&self) -> State {
        State::from_u8(self.shared().state.load(Ordering::Acquire))
    }

    /// The counters.
    pub fn stats(&self) -> ClientStats {
        let c = &self.shared().counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ClientStats {
            connections: get(&c.connections),
            reconnects: get(&c.reconnects),
            failed_attempts: get(&c.failed_attempts),
            messages: get(&c.messages),
            duplicates_dropped: get(&c.duplicates_dropped),
            malformed: get(&c.malformed),
        }
    }

    /// The position the client would resume `channel` from: the last message delivered on it,
    /// or before any, the position its acknowledgement gave. `None` for a channel without
    /// history or not subscribed.
    pub fn position(&self, channel: &str) -> Option<Position> {
        self.shared()
            .channels()
            .get(channel)
            .and_then(|c| c.position.clone())
    }

    /// Sends `envelope` on the current connection and waits until it is written.
    ///
    /// # Errors
    ///
    /// [`Error::NotConnected`] while there is no connection (nothing is queued for later),
    /// [`Error::Closed`] once the client has stopped, [`Error::Write`] if the write fails
    /// (the connection is then being replaced), [`Error::Encode`] if the data cannot be
    /// encoded.
    pub async fn send(&self, envelope: &Envelope) -> Result<(), Error> {
        let text = serde_json::to_string(envelope).map_err(|e| Error::Encode(e.to_string()))?;
        self.write(WsMessage::text(text)).await
    }

    /// Publishes `data` to `channel` (a `publish` request: the hub delivers it as `message`
    /// where its publish policy allows, and answers `publish refused` otherwise).
    ///
    /// # Errors
    ///
    /// As [`send`](Client::send).
    pub async fn publish(&self, channel: &str, data: impl Into<Value>) -> Result<(), Error> {
        self.send(
            &Envelope::new("publish")
                .with_channel(channel)
                .with_data(data),
        )
        .await
    }

    /// Sends a `ping`; the hub's answer arrives as [`Event::Pong`].
    ///
    /// # Errors
    ///
    /// As [`send`](Client::send).
    pub async fn ping(&self) -> Result<(), Error> {
        self.send(&Envelope::new("ping")).await
    }

    /// Subscribes to `channel`, now if connected and on every later connection: after a
    /// reconnection, a channel with history is resumed `since` the last position delivered,
    /// so nothing within the history is missed or delivered twice. Subscribing again to a
    /// channel already subscribed on this connection sends nothing.
    ///
    /// While disconnected it only registers the channel (it is sent when the connection is
    /// up) and returns `Ok`: a subscription is state the client keeps, not a message.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the client has stopped; [`Error::Write`] if writing the request
    /// fails (the channel stays registered and is subscribed on the next connection).
    pub async fn subscribe(&self, channel: &str) -> Result<(), Error> {
        self.shared()
            .channels()
            .entry(channel.to_owned())
            .or_default()
            .wanted = true;
        self.send_subscribe(channel, false).await
    }

    /// Subscribes to `channel` resuming after `since` (a position the application stored,
    /// e.g. with what it rendered): the hub replays what followed it, then the live stream.
    /// Sent even if the channel is already subscribed on this connection. Offsets already
    /// delivered are never delivered again: where the client is already past `since` in the
    /// same epoch, it resumes from its own position. Otherwise as
    /// [`subscribe`](Client::subscribe).
    ///
    /// # Errors
    ///
    /// As [`subscribe`](Client::subscribe).
    pub async fn subscribe_since(&self, channel: &str, since: Position) -> Result<(), Error> {
        {
            let mut channels = self.shared().channels();
            let state = channels.entry(channel.to_owned()).or_default();
            state.wanted = true;
            state.history = Some(true);
            // Never back over what was delivered: those offsets would be dropped anyway.
            let behind = matches!(
                &state.position,
                Some(last) if last.epoch.is_some() && last.epoch == since.epoch
                    && last.offset >= since.offset
            );
            if !behind {
                state.position = Some(since);
            }
        }
        self.send_subscribe(channel, true).await
    }

    /// Unsubscribes from `channel`: it is no longer subscribed on later connections, and an
    /// `unsubscribe` is sent now if connected (acknowledged by [`Event::Unsubscribed`]).
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the client has stopped; [`Error::Write`] if the write fails
    /// (the connection is then replaced, without the channel).
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), Error> {
        self.shared().channels().remove(channel);
        match self
            .write(WsMessage::text(
                json!({"type": "unsubscribe", "data": channel}).to_string(),
            ))
            .await
        {
            Err(Error::NotConnected) => Ok(()),
            other => other,
        }
    }

    /// Stops the client: a close frame with 1000 on the current connection (the close
    /// handshake gets 2 s), no reconnection, then [`Event::Closed`]. Returns when the client
    /// has stopped; closing a stopped client returns at once.
    pub async fn close(&self) {
        let shared = self.shared();
        shared.shutdown.send_replace(true);
        let mut done = shared.done.subscribe();
        let _ = done.wait_for(|done| *done).await;
    }

    async fn write(&self, message: WsMessage) -> Result<(), Error> {
        let shared = self.shared();
        if shared.stopped.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let mut writer = shared.writer.lock().await;
        let sink = writer.sink.as_mut().ok_or(Error::NotConnected)?;
        sink.send(message)
            .await
            .map_err(|e| Error::Write(e.to_string()))
    }

    /// Sends the subscribe for `channel` if connected and (unless `force`) not already sent
    /// on this connection.
    async fn send_subscribe(&self, channel: &str, force: bool) -> Result<(), Error> {
        let shared = self.shared();
        if shared.stopped.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let mut writer = shared.writer.lock().await;
        let generation = writer.generation;
        let Some(sink) = writer.sink.as_mut() else {
            return Ok(());
        };
        let request = {
            let mut channels = shared.channels();
            match channels.get_mut(channel) {
                Some(state) if state.wanted && (force || state.sent_on != generation) => {
                    state.sent_on = generation;
                    subscribe_request(channel, state)
                }
                _ => return Ok(()),
            }
        };
        sink.send(request)
            .await
            .map_err(|e| Error::Write(e.to_string()))
    }
}

/// `subscribe`, with `since` on a channel with history whose position is known.
fn subscribe_request(channel: &str, state: &ChannelState) -> WsMessage {
    let request = match (&state.position, state.history) {
        (Some(position), Some(true) | None) => {
            let mut since = json!({"offset": position.offset});
            if let Some(epoch) = &position.epoch {
                since["epoch"] = json!(epoch);
            }
            json!({"type": "subscribe", "data": channel, "since": since})
        }
        _ => json!({"type": "subscribe", "data": channel}),
    };
    WsMessage::text(request.to_string())
}

/// Hands `event` to the application; gives up on it if the client is shut down meanwhile.
async fn emit(events: &mpsc::Sender<Event>, shutdown: &mut watch::Receiver<bool>, event: Event) {
    tokio::select! {
        _ = events.send(event) => {}
        _ = stopped(shutdown) => {}
    }
}

/// Returns once the client is shut down (without holding the watch's guard).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Waits for `shutdown`; true if it came before `delay` passed.
async fn sleep_or_shutdown(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stopped(shutdown) => true,
    }
}

/// Connects, reads until the connection drops, waits the backoff, connects again; until the
/// client is closed or gives up.
async fn run(shared: Arc<Shared>, events: mpsc::Sender<Event>) {
    let mut shutdown = shared.shutdown.subscribe();
    let config = shared.config.clone();
    // Consecutive failed attempts (for max_retries) and consecutive waits (the backoff's
    // exponent): both start again after every successful connection.
    let mut failures: u32 = 0;
    let mut waits: u32 = 0;
    let mut connected_before = false;
    let mut delay: Option<Duration> = None;
    let outcome: Option<Error> = loop {
        if let Some(delay) = delay {
            let attempt = failures + 1;
            emit(
                &events,
                &mut shutdown,
                Event::Reconnecting { attempt, delay },
            )
            .await;
            if sleep_or_shutdown(delay, &mut shutdown).await {
                break None;
            }
        }
        if *shutdown.borrow() {
            break None;
        }
        let attempt = failures + 1;
        shared.set_state(State::Connecting);
        let connected = tokio::select! {
            result = connect(&shared) => result,
            _ = stopped(&mut shutdown) => break None,
        };
        let source = match connected {
            Ok(source) => source,
            Err(error) => {
                failures += 1;
                bump(&shared.counters.failed_attempts);
                shared.set_state(State::Disconnected);
                let last = error.to_string();
                emit(
                    &events,
                    &mut shutdown,
                    Event::ConnectFailed { attempt, error },
                )
                .await;
                if config.max_retries > 0 && failures >= config.max_retries {
                    break Some(Error::GaveUp {
                        attempts: failures,
                        last,
                    });
                }
                delay = Some(config.delay(waits));
                waits += 1;
                continue;
            }
        };
        shared.set_state(State::Connected);
        bump(&shared.counters.connections);
        failures = 0;
        waits = 0;
        emit(&events, &mut shutdown, Event::Connected).await;
        if connected_before {
            bump(&shared.counters.reconnects);
            emit(&events, &mut shutdown, Event::Reconnected { attempt }).await;
        }
        connected_before = true;

        let reason = read(&shared, source, &events, &mut shutdown).await;
        shared.writer.lock().await.sink = None;
        shared.set_state(State::Disconnected);
        let Some(reason) = reason else {
            break None;
        };
        emit(&events, &mut shutdown, Event::Disconnected { reason }).await;
        delay = Some(config.delay(waits));
        waits += 1;
    };
    shared.stopped.store(true, Ordering::Release);
    shared.writer.lock().await.sink = None;
    shared.set_state(State::Closed);
    let closed = Event::Closed { error: outcome };
    if *shutdown.borrow() {
        // Closed by the application, which may not be reading: never wait for it.
        let _ = events.try_send(closed);
    } else {
        emit(&events, &mut shutdown, closed).await;
    }
    shared.done.send_replace(true);
}

/// One connection attempt: the handshake (within the connect timeout), then every wanted
/// subscription sent on it (with `since` where the channel has history), then the write half
/// installed for [`Client::send`]. Returns the read half.
async fn connect(shared: &Shared) -> Result<WsSource, Error> {
    let config = &shared.config;
    let request = config.request()?;
    #[cfg(feature = "tls")]
    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        request,
        None,
        false,
        config.tls.clone().map(tokio_tungstenite::Connector::Rustls),
    );
    #[cfg(not(feature = "tls"))]
    let connecting = tokio_tungstenite::connect_async(request);
    let (ws, _response) = tokio::time::timeout(config.connect_timeout, connecting)
        .await
        .map_err(|_| {
            Error::Connect(format!(
                "no connection within the connect timeout ({:?})",
                config.connect_timeout
            ))
        })?
        .map_err(|e| Error::Connect(e.to_string()))?;
    match ws.get_ref() {
        MaybeTlsStream::Plain(stream) => {
            let _ = stream.set_nodelay(true);
        }
        #[cfg(feature = "tls")]
        MaybeTlsStream::Rustls(stream) => {
            let _ = stream.get_ref().0.set_nodelay(true);
        }
        _ => {}
    }
    let (mut sink, source) = ws.split();
    // Under the writer's lock, so that a concurrent `subscribe` either is in this snapshot
    // or sees the new connection and sends its own.
    let mut writer = shared.writer.lock().await;
    let generation = writer.generation + 1;
    let requests: Vec<WsMessage> = {
        let mut channels = shared.channels();
        let mut names: Vec<&String> = channels.keys().collect();
        names.sort();
        let names: Vec<String> = names.into_iter().cloned().collect();
        names
            .iter()
            .filter_map(|name| {
                let state = channels.get_mut(name)?;
                state.wanted.then(|| {
                    state.sent_on = generation;
                    subscribe_request(name, state)
                })
            })
            .collect()
    };
    for request in requests {
        sink.feed(request)
            .await
            .map_err(|e| Error::Write(e.to_string()))?;
    }
    sink.flush()
        .await
        .map_err(|e| Error::Write(e.to_string()))?;
    writer.sink = Some(sink);
    writer.generation = generation;
    Ok(source)
}

/// Reads the connection until it drops (`Some(reason)`) or the client is closed (`None`,
/// after the close handshake).
async fn read(
    shared: &Shared,
    mut source: WsSource,
    events: &mpsc::Sender<Event>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<DisconnectReason> {
    let mut closed_by_server: Option<DisconnectReason> = None;
    loop {
        let next = tokio::select! {
            biased;
            _ = stopped(shutdown) => {
                close_handshake(shared, source).await;
                return None;
            }
            next = next_frame(&mut source, shared.config.read_timeout) => next,
        };
        let frame = match next {
            None => return Some(DisconnectReason::Stalled),
            Some(None) => return Some(closed_by_server.unwrap_or(DisconnectReason::Ended)),
            Some(Some(Err(error))) => {
                return Some(
                    closed_by_server.unwrap_or_else(|| DisconnectReason::Error(error.to_string())),
                )
            }
            Some(Some(Ok(frame))) => frame,
        };
        let text = match frame {
            WsMessage::Text(text) => text.as_str().to_owned(),
            // Binary frames are read as JSON too, as the hub does.
            WsMessage::Binary(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            WsMessage::Close(frame) => {
                // tungstenite answers the close; the stream ends right after.
                closed_by_server = Some(match frame {
                    Some(frame) => DisconnectReason::ServerClosed {
                        code: frame.code.into(),
                        reason: frame.reason.as_str().to_owned(),
                    },
                    None => DisconnectReason::ServerClosed {
                        code: 1005,
                        reason: String::new(),
                    },
                });
                continue;
            }
            // Pings are answered by tungstenite itself.
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
        };
        for event in handle(shared, &text) {
            emit(events, shutdown, event).await;
        }
    }
}

/// The next frame: `None` if the read timeout passed first, `Some(None)` at the end.
async fn next_frame(
    source: &mut WsSource,
    timeout: Option<Duration>,
) -> Option<Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>> {
    match timeout {
        Some(timeout) => tokio::time::timeout(timeout, source.next()).await.ok(),
        None => Some(source.next().await),
    }
}

/// Sends close 1000 and reads until the hub's close arrives and the connection ends, within
/// [`CLOSE_TIMEOUT`].
async fn close_handshake(shared: &Shared, mut source: WsSource) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let sink = shared.writer.lock().await.sink.take();
        if let Some(mut sink) = sink {
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            if sink.send(WsMessage::Close(Some(frame))).await.is_err() {
                return;
            }
            while let Some(Ok(_)) = source.next().await {}
        }
    })
    .await;
}

/// What one server message means for the application: the events to emit, after the
/// channel's position and the duplicate check.
fn handle(shared: &Shared, text: &str) -> Vec<Event> {
    let envelope: Envelope = match serde_json::from_str(text) {
        Ok(envelope) => envelope,
        Err(error) => {
            bump(&shared.counters.malformed);
            let mut shown: String = text.chars().take(120).collect();
            if shown.len() < text.len() {
                shown.push('…');
            }
            return vec![Event::Error(Error::Malformed(format!("{error}: {shown}")))];
        }
    };
    match envelope.kind.as_str() {
        "subscribed" => vec![acknowledged(shared, envelope)],
        "unsubscribed" => vec![Event::Unsubscribed {
            channel: envelope.channel.unwrap_or_default(),
        }],
        "pong" => vec![Event::Pong],
        "error" => vec![Event::ServerError {
            channel: envelope.channel,
            message: match envelope.data {
                Some(Value::String(text)) => text,
                Some(other) => other.to_string(),
                None => String::new(),
            },
        }],
        _ => message(shared, envelope),
    }
}

/// A `subscribed` acknowledgement: the channel's position follows it.
fn acknowledged(shared: &Shared, envelope: Envelope) -> Event {
    let channel = envelope.channel.unwrap_or_default();
    let data = envelope.data.unwrap_or(Value::Null);
    let recovered = data.get("recovered").and_then(Value::as_bool);
    let acknowledged = match (
        data.get("offset").and_then(Value::as_u64),
        data.get("epoch").and_then(Value::as_str),
    ) {
        (Some(offset), Some(epoch)) => Some(Position::new(offset, epoch)),
        _ => None,
    };
    let mut channels = shared.channels();
    if let Some(state) = channels.get_mut(&channel) {
        match &acknowledged {
            None => {
                // No history (`{"recovered":false}` for a `since`, or no data at all).
                state.history = Some(false);
                state.position = None;
            }
            Some(ack) => {
                state.history = Some(true);
                state.position = Some(match state.position.take() {
                    // A plain subscribe: live messages follow the acknowledged offset.
                    None => ack.clone(),
                    // A resume in the same epoch (or in whatever epoch, with none given): the
                    // replay follows the position sent, unless it was beyond the latest.
                    Some(sent) if sent.epoch.is_none() || sent.epoch == ack.epoch => Position {
                        offset: sent.offset.min(ack.offset),
                        epoch: ack.epoch.clone(),
                    },
                    // A new epoch: it is replayed from the first offset its history holds.
                    Some(_) => Position {
                        offset: 0,
                        epoch: ack.epoch.clone(),
                    },
                });
            }
        }
    }
    Event::Subscribed {
        channel,
        recovered,
        position: acknowledged,
    }
}

/// Any other message: dropped if its offset was already delivered, preceded by
/// [`Event::EpochChanged`] if it starts a new epoch.
fn message(shared: &Shared, envelope: Envelope) -> Vec<Event> {
    let mut out = Vec::with_capacity(1);
    if let (Some(channel), Some(offset), Some(epoch)) =
        (&envelope.channel, envelope.offset, &envelope.epoch)
    {
        let mut channels = shared.channels();
        if let Some(state) = channels.get_mut(channel) {
            match &state.position {
                Some(last)
                    if (last.epoch.is_none() || last.epoch.as_ref() == Some(epoch))
                        && offset <= last.offset =>
                {
                    bump(&shared.counters.duplicates_dropped);
                    return out;
                }
                Some(last) if last.epoch.is_none() || last.epoch.as_ref() == Some(epoch) => {}
                Some(_) => out.push(Event::EpochChanged {
                    channel: channel.clone(),
                    epoch: epoch.clone(),
                }),
                None => {}
            }
            state.history = Some(true);
            state.position = Some(Position::new(offset, epoch.clone()));
        }
    }
    bump(&shared.counters.messages);
    out.push(Event::Message(envelope));
    out
}
