//! A TCP client's session: from the upgrade to the close.
//!
//! It reads and decodes the client's frames and answers them; it finishes writes that the
//! shard could not complete at once (the socket was full), under the write timeout; and it
//! runs the close handshake. While a client is idle its session holds no buffer and no task:
//! it is *parked* with its shard's runner (`conn/idle.rs`), about a hundred bytes that are
//! the waker of its socket and of its outbound side. When either fires, the runner runs the
//! session's step ([`Idle::step`]): it reads into a per-thread scratch buffer, answers, and
//! parks again; only the tail of a frame still arriving is copied into a buffer of the
//! connection's own, freed once the frame is whole. A client with more than reading to do
//! (throttled by its shard's backlog, behind on its writes, waiting for Redis, or closing)
//! gets a task of its own ([`serve_busy`]) until it is idle again. A client that is simply
//! gone (its peer closed or reset the connection), or that closed and whose answer the socket
//! took at once, needs none: it leaves its shard and ends on the runner ([`Session::leave`]).
//!
//! Memory per idle subscribed connection, `shared/bench/compare.sh` (10,000 connections):
//! 1,445 bytes with a task per connection, 982 parked (median of five runs).
//!
//! It lives above the hub (not in `conn/`) because it is the hub's client: it enqueues the
//! client's requests to its shard, publishes, waits for room and counts itself in the hub's
//! connection tasks. `conn/` keeps what the shard and the session share: the [`Conn`].

use std::cell::{Cell, RefCell};
use std::io;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::config::RateLimit;
use crate::conn::idle::{Parked, Runner};
use crate::conn::{CloseMode, Conn, WriteState};
use crate::hub::Shared;
use crate::shard::{Command, Removed};
use crate::wire::frame::{
    self, close_code, Decoder, Event, Violation, OPCODE_BINARY, OPCODE_PONG, OPCODE_TEXT,
};
use crate::wire::protocol::{self, ClientRequest, Envelope, ErrorReason, TYPE_PONG};

/// The per-thread read buffer. 64 KiB takes a burst of small frames in one `read`.
const SCRATCH_LEN: usize = 64 * 1024;

/// Reads per readiness wake-up before the task yields, so one flooding client cannot hold a
/// worker thread.
const READS_PER_WAKE: usize = 16;

/// After sending a close frame, how long to wait for the client's before dropping the socket.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(2);

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_LEN]);
}

/// Counts a connection task from the moment its upgrade is accepted (so the connection limit
/// sees it) to its end, and wakes a waiting shutdown when the last one ends.
pub(crate) struct TaskGuard(Arc<Shared>);

impl TaskGuard {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        shared.task_started();
        TaskGuard(Arc::clone(shared))
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.task_ended();
    }
}

/// Where a connection task is: the same states for the TCP task here and the generic one
/// (`stream.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    Open,
    /// The client's shard has no room for more of its requests: read and decode nothing
    /// more until it has (see [`serve_client`]). Kept here rather than in a field of its own
    /// so that it costs the idle connection's task nothing.
    Throttled,
    /// A close frame is queued (by either side); finish the handshake.
    Closing {
        peer_closed: bool,
    },
    /// The peer is gone or the socket failed: nothing more can be written.
    Gone,
}

/// Decoder state and the tail of a frame still arriving.
pub(crate) struct Reader {
    decoder: Decoder,
    pending: Vec<u8>,
}

impl Reader {
    pub(crate) fn new(max_message: usize) -> Self {
        Reader {
            decoder: Decoder::new(max_message),
            pending: Vec::new(),
        }
    }

    /// Bytes held of a frame still arriving (for `bench_support`).
    #[cfg(feature = "test-support")]
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Decodes `input` (after any pending tail) and keeps what is left of an incomplete frame.
    pub(crate) fn feed(
        &mut self,
        input: &mut [u8],
        on_event: impl FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<(), Violation> {
        if self.pending.is_empty() {
            let consumed = self.decoder.decode(input, on_event)?;
            self.pending.extend_from_slice(&input[consumed..]);
        } else {
            self.pending.extend_from_slice(input);
            let consumed = self.decoder.decode(&mut self.pending, on_event)?;
            self.pending.drain(..consumed);
            if self.pending.is_empty() {
                // Free the tail's buffer: an idle connection holds none.
                self.pending = Vec::new();
            }
        }
        Ok(())
    }

    /// Reads what `read` has (a socket's `try_read`; a stream's `poll_read` in
    /// `stream.rs`), up to `READS_PER_WAKE` times, into the per-thread buffer, and hands it
    /// to `on_bytes`. Returns `Ok(Continue)` when `read` has nothing more for now
    /// (`WouldBlock`), `Ok(Break)` when `on_bytes` stopped, and `Err` on end of stream or
    /// error.
    pub(crate) fn read_available(
        &mut self,
        mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
        mut on_bytes: impl FnMut(&mut Reader, &mut [u8]) -> ControlFlow<()>,
    ) -> io::Result<ControlFlow<()>> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            for _ in 0..READS_PER_WAKE {
                let n = match read(&mut scratch) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => n,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(ControlFlow::Continue(()))
                    }
                    Err(err) => return Err(err),
                };
                if on_bytes(self, &mut scratch[..n]).is_break() {
                    return Ok(ControlFlow::Break(()));
                }
                if n < scratch.len() {
                    break;
                }
            }
            Ok(ControlFlow::Continue(()))
        })
    }
}

/// Answers the client's frames (for both connection tasks).
pub(crate) struct Responder<'a> {
    shared: &'a Arc<Shared>,
    conn: &'a Arc<Conn>,
    /// The client's message budget, when a rate limit is configured.
    budget: Cell<Option<TokenBucket>>,
    /// A subscribe waiting for this node to be in step with Redis's history of its channel
    /// (see [`Deferred`]). Boxed: an idle connection pays one pointer for it.
    deferred: Cell<Option<Box<Deferred>>>,
}

/// A new client's message budget: full, when a rate limit is configured.
fn full_budget(shared: &Shared) -> Option<TokenBucket> {
    shared.config.rate_limit.map(|l| TokenBucket::full(l.burst))
}

/// A subscribe to a channel whose history lives in Redis, held in the connection task until
/// this node is in step with Redis for that channel (its local history then answers it), or
/// the broker's bounded wait runs out. Meanwhile the connection decodes nothing more
/// ([`Flow::Throttled`]), so the client's acknowledgements keep the order of its requests.
pub(crate) struct Deferred {
    subscribe: Command,
    channel: Box<str>,
    /// The subscribe has `since`: without Redis it gets `history unavailable` and no
    /// subscription. A plain one is made all the same (live delivery resumes with Redis).
    since: bool,
    ready: crate::broker::HistoryReady,
}

/// A token bucket: `burst` messages at once, refilled at `per_second`.
#[derive(Clone, Copy, Debug)]
struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn full(burst: u32) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            refilled: Instant::now(),
        }
    }

    /// Takes one token; false when there is none.
    fn take(&mut self, limit: RateLimit) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * f64::from(limit.per_second);
        self.tokens = (self.tokens + earned).min(f64::from(limit.burst));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl<'a> Responder<'a> {
    pub(crate) fn new(shared: &'a Arc<Shared>, conn: &'a Arc<Conn>) -> Self {
        Self::resume(shared, conn, full_budget(shared), None)
    }

    /// A responder that goes on where an earlier one stopped: with the client's message
    /// budget and the subscribe that waits for Redis, if any (see [`into_parts`]).
    ///
    /// [`into_parts`]: Self::into_parts
    fn resume(
        shared: &'a Arc<Shared>,
        conn: &'a Arc<Conn>,
        budget: Option<TokenBucket>,
        deferred: Option<Box<Deferred>>,
    ) -> Self {
        Responder {
            shared,
            conn,
            budget: Cell::new(budget),
            deferred: Cell::new(deferred),
        }
    }

    /// What a later responder for the same client goes on with: its budget and what waits.
    fn into_parts(self) -> (Option<TokenBucket>, Option<Box<Deferred>>) {
        (self.budget.into_inner(), self.deferred.into_inner())
    }

    /// Whether a subscribe waits for Redis (see [`Deferred`]).
    fn has_deferred(&self) -> bool {
        let deferred = self.deferred.take();
        let has = deferred.is_some();
        self.deferred.set(deferred);
        has
    }

    /// Waits for the deferred subscribe's channel to be ready, then sends it to the shard
    /// (or, with `since` and Redis unreachable, answers `history unavailable`). `None` when
    /// nothing waits; `Some(false)` when the connection's outbound side woke it first (the
    /// subscribe still waits: look at the write state, then call again); `Some(true)` when
    /// it is done and decoding may go on.
    pub(crate) async fn wait_deferred(&mut self) -> Option<bool> {
        let mut deferred = self.deferred.get_mut().take()?;
        let ready = tokio::select! {
            ready = &mut deferred.ready => Some(ready),
            () = self.conn.wake.woken() => None,
        };
        let Some(ready) = ready else {
            self.deferred.set(Some(deferred));
            return Some(false);
        };
        if ready || !deferred.since {
            self.to_shard(deferred.subscribe);
        } else {
            self.reply_error(ErrorReason::HistoryUnavailable, Some(&deferred.channel));
        }
        Some(true)
    }

    /// Feeds freshly read bytes; the flow after them.
    pub(crate) fn on_bytes(&self, reader: &mut Reader, input: &mut [u8]) -> Flow {
        self.conn.touch(self.shared.now_ms());
        let mut flow = Flow::Open;
        let result = reader.feed(input, |event| self.on_event(event, &mut flow));
        if let Err(violation) = result {
            self.conn.close(
                violation.code,
                violation.reason,
                CloseMode::Now,
                &self.shared.conn_env,
            );
            return Flow::Closing { peer_closed: false };
        }
        flow
    }

    fn on_event(&self, event: Event<'_>, flow: &mut Flow) -> ControlFlow<()> {
        match event {
            Event::Message { text, payload } => {
                if !self.within_rate_limit() {
                    self.conn.close(
                        close_code::POLICY_VIOLATION,
                        "message rate limit exceeded",
                        CloseMode::Now,
                        &self.shared.conn_env,
                    );
                    *flow = Flow::Closing { peer_closed: false };
                    return ControlFlow::Break(());
                }
                if self.shared.config.echo {
                    self.echo(text, payload);
                } else {
                    self.handle_request(payload);
                    if self.has_deferred() || !self.shared.has_room(self.shard()) {
                        // The rest of what was read waits, undecoded, in the reader.
                        *flow = Flow::Throttled;
                        return ControlFlow::Break(());
                    }
                }
            }
            Event::Ping(payload) => self.conn.send_control(
                frame::control_frame(OPCODE_PONG, payload),
                &self.shared.conn_env,
            ),
            Event::Pong => {}
            Event::Close(code) => {
                let code = code.unwrap_or(close_code::NORMAL);
                self.conn
                    .close(code, "", CloseMode::Now, &self.shared.conn_env);
                *flow = Flow::Closing { peer_closed: true };
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// Whether the client may send one more message now.
    fn within_rate_limit(&self) -> bool {
        let (Some(limit), Some(mut budget)) = (self.shared.config.rate_limit, self.budget.get())
        else {
            return true;
        };
        let allowed = budget.take(limit);
        self.budget.set(Some(budget));
        allowed
    }

    /// Sends the message back as it came: the conformance-test endpoint's whole behaviour.
    fn echo(&self, text: bool, payload: &[u8]) {
        let opcode = if text { OPCODE_TEXT } else { OPCODE_BINARY };
        let (header, header_len) = frame::server_header(opcode, payload.len());
        let mut frame = Vec::with_capacity(header_len + payload.len());
        frame.extend_from_slice(&header[..header_len]);
        frame.extend_from_slice(payload);
        self.conn
            .send_one(Bytes::from(frame), &self.shared.conn_env);
    }

    fn handle_request(&self, payload: &[u8]) {
        let config = &self.shared.config;
        let client = &self.conn.info;
        match protocol::decode_request(payload, config.strict_go_ws) {
            Ok(ClientRequest::Subscribe { channel, since }) => {
                if channel.len() > config.max_channel_len {
                    return self.reply_error(ErrorReason::InvalidChannel, Some(&channel));
                }
                if let Some(allow) = &config.subscribe_policy {
                    if !allow(client, &channel) {
                        return self.reply_error(ErrorReason::SubscriptionRefused, Some(&channel));
                    }
                }
                let has_since = since.is_some();
                let ready = self.shared.history_ready(&channel, since.as_ref());
                let subscribe = Command::Subscribe {
                    client: client.id,
                    channel: channel.as_ref().into(),
                    from_client: true,
                    since: since.map(|since| Box::new(since.into_owned())),
                };
                match ready {
                    Some(ready) => self.deferred.set(Some(Box::new(Deferred {
                        subscribe,
                        channel: channel.into(),
                        since: has_since,
                        ready,
                    }))),
                    None => self.to_shard(subscribe),
                }
            }
            Ok(ClientRequest::Unsubscribe(channel)) => {
                if channel.len() > config.max_channel_len {
                    return self.reply_error(ErrorReason::InvalidChannel, Some(&channel));
                }
                self.to_shard(Command::Unsubscribe {
                    client: client.id,
                    channel: channel.into(),
                });
            }
            Ok(ClientRequest::Ping) => {
                let pong = Envelope::bare(TYPE_PONG, None);
                if let Ok(frame) = protocol::encode_frame(&pong, std::time::SystemTime::now()) {
                    self.to_shard(Command::Reply {
                        client: client.id,
                        frame,
                    });
                }
            }
            Ok(ClientRequest::Publish { channel, data }) => {
                if channel.len() > config.max_channel_len {
                    return self.reply_error(ErrorReason::InvalidChannel, Some(&channel));
                }
                if !config.publish_policy.allows(client, &channel) {
                    return self.reply_error(ErrorReason::PublishRefused, Some(&channel));
                }
                // Refused for overload: the client is told (nothing was delivered, and the
                // refusal is counted in `backlog_refused`). Refused because the channel's
                // history lives in Redis and Redis is away: told too (nothing was delivered
                // or numbered; it may publish again once Redis is back). Otherwise it fails
                // only when the hub is shutting down, and the client is about to get 1001.
                if let Err(err) = self.shared.publish_from_client(&channel, data) {
                    if err.is_overloaded() {
                        self.reply_error(ErrorReason::PublishRefused, Some(&channel));
                    } else if err.is_unavailable() {
                        self.reply_error(ErrorReason::HistoryUnavailable, Some(&channel));
                    }
                }
            }
            Err(err) => self.reply_error(err.reason, err.channel.as_deref()),
        }
    }

    /// Replies go through the client's shard, so they reach the client in the order of its
    /// requests, acknowledgements included.
    fn reply_error(&self, reason: ErrorReason, channel: Option<&str>) {
        if let Some(frame) = self.shared.error_frame(reason, channel) {
            self.to_shard(Command::Reply {
                client: self.conn.info.id,
                frame,
            });
        }
    }

    /// The client's shard, where its requests go.
    pub(crate) fn shard(&self) -> usize {
        self.shared.shard_index(self.conn.info.id)
    }

    /// Sends one of the client's requests to its shard. Never refused: the connection task
    /// reads requests only while the shard has room, and stops after a request that finds it
    /// over its bound, so a client can overshoot it by one request at most.
    fn to_shard(&self, command: Command) {
        // Fails only once the shards have stopped, when this connection is being dropped.
        let _ = self.shared.enqueue(self.shard(), command);
    }
}

/// Starts serving a TCP client: registers it with its shard, answers what it sent right behind
/// the upgrade request (`early`, bytes the HTTP layer read past it), then parks it with its
/// shard's runner (or, if that left it busy, gives it a task).
pub(crate) fn start(shared: Arc<Shared>, conn: Arc<Conn>, early: Bytes, guard: TaskGuard) {
    if !register(&shared, &conn) {
        ended(&shared, &conn, guard);
        return;
    }
    // `early` is a slice of hyper's read buffer (kilobytes): decoded here, so that no idle
    // connection keeps the buffer alive.
    let mut early = early.to_vec();
    let mut idle = Idle {
        reader: Reader::new(shared.config.max_message_size),
        budget: full_budget(&shared),
        conn,
        guard,
    };
    let mut flow = Flow::Open;
    let mut deferred = None;
    if !early.is_empty() {
        let responder = Responder::resume(&shared, &idle.conn, idle.budget, None);
        flow = responder.on_bytes(&mut idle.reader, &mut early);
        (idle.budget, deferred) = responder.into_parts();
    }
    let runner = shared.runners.get(shared.shard_index(idle.conn.info.id));
    let session = Arc::new(Session {
        scheduled: AtomicBool::new(false),
        leaving: AtomicU8::new(LIVE),
        slot: AtomicU32::new(0),
        runner: Arc::clone(runner),
        idle: Mutex::new(None),
    });
    let slot = runner.register(Arc::clone(&session) as Arc<dyn Parked>);
    session.slot.store(slot, Ordering::Relaxed);
    session.carry_on(idle, flow, deferred);
}

/// A TCP client's session, as its shard's runner keeps it (`conn/idle.rs`): while the client
/// is idle this, with the [`Idle`] inside, is all the memory of its session; no task exists.
/// It is the connection's waker too: tokio's per-socket state and the connection's
/// [`Wake`](crate::conn::wake::Wake) keep it, and their wake-ups queue its step.
pub(crate) struct Session {
    /// Its step is queued: a wake-up meanwhile queues nothing more.
    scheduled: AtomicBool,
    /// Where a client that is gone is in leaving its shard: [`LIVE`], [`LEAVING`] or [`LEFT`]
    /// (see [`Session::leave`]).
    leaving: AtomicU8,
    /// Its slot in the runner's registry.
    slot: AtomicU32,
    runner: Arc<Runner>,
    /// The session's state while it is parked; `None` while a task serves it (the task holds
    /// it), and once it ended.
    idle: Mutex<Option<Idle>>,
}

/// [`Session::leaving`]: the client is served.
const LIVE: u8 = 0;
/// The client is gone and its shard was asked to remove it: its steps wait for that.
const LEAVING: u8 = 1;
/// Its shard has let go of it: the next step ends the session.
const LEFT: u8 = 2;

/// What a TCP client's session keeps between reads.
pub(crate) struct Idle {
    conn: Arc<Conn>,
    reader: Reader,
    /// The client's message budget, when a rate limit is configured.
    budget: Option<TokenBucket>,
    /// Counts the session as a connection task (the connection limit, the shutdown's drain).
    guard: TaskGuard,
}

impl Session {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Parks the session if the client is idle after `flow` (its next step, queued now,
    /// registers its waker), or gives it a task until it is.
    fn carry_on(self: Arc<Self>, idle: Idle, flow: Flow, deferred: Option<Box<Deferred>>) {
        if flow == Flow::Open && deferred.is_none() && idle.conn.write_state() == WriteState::Open {
            *self.lock() = Some(idle);
            self.wake_by_ref();
        } else {
            tokio::spawn(serve_busy(self, idle, flow, deferred));
        }
    }

    /// The session ended: its runner lets go of it.
    fn remove(&self) {
        self.runner.remove(self.slot.load(Ordering::Relaxed), self);
    }

    /// The client is gone (its peer closed or reset the connection, or its socket failed), or
    /// its close handshake is done: ends the session without a task of its own. Its shard is
    /// asked to remove it, and wakes the session once it has let go of it (a disconnect storm
    /// is a burst of steps on the runner, not a task per client); that step runs [`ended`].
    /// Meanwhile the session stays registered with its runner, so that a runtime shutting
    /// down still frees it.
    fn leave(self: Arc<Self>, idle: Idle) {
        let shared = Arc::clone(idle.shared());
        let conn = Arc::clone(&idle.conn);
        conn.abort(&shared.conn_env);
        *self.lock() = Some(idle);
        self.leaving.store(LEAVING, Ordering::Release);
        let session = Arc::clone(&self);
        let then = Removed::new(move || {
            session.leaving.store(LEFT, Ordering::Release);
            session.wake_by_ref();
        });
        // Refused (the hub has stopped): `then` ran already, and the step it queued ends the
        // session.
        let _ = remove_from_shard(&shared, &conn, then);
    }

    /// The step of a session that is leaving: once its shard has let go of the client, the
    /// session ends; until then it waits (a wake-up from its socket changes nothing).
    fn step_leaving(&self) {
        if self.leaving.load(Ordering::Acquire) != LEFT {
            return;
        }
        if let Some(idle) = self.lock().take() {
            self.remove();
            let shared = Arc::clone(idle.shared());
            ended(&shared, &idle.conn, idle.guard);
        }
    }
}

impl Wake for Session {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            self.runner.schedule(Arc::clone(self) as Arc<dyn Parked>);
        }
    }
}

impl Parked for Session {
    fn step(self: Arc<Self>) {
        // Cleared first: a wake-up from here on queues the next step.
        self.scheduled.store(false, Ordering::Release);
        if self.leaving.load(Ordering::Acquire) != LIVE {
            return self.step_leaving();
        }
        // `None`: a task serves the client (this was a wake-up from before it took over).
        let Some(mut idle) = self.lock().take() else {
            return;
        };
        let waker = Waker::from(Arc::clone(&self));
        // A panic (in an application's policy, say) ends this client alone, as it ended its
        // task when it had one: the runner goes on with the others.
        let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| {
            idle.step(&mut Context::from_waker(&waker))
        }));
        match stepped {
            Ok(None) => *self.lock() = Some(idle),
            // Nothing more can be written: no close handshake to finish, only the shard to
            // leave (a panic ends the client the same way).
            Ok(Some((Flow::Gone, _))) | Err(_) => self.leave(idle),
            Ok(Some(_)) if idle.conn.write_state() == WriteState::Closed => self.leave(idle),
            // The client closed and its close frame's answer went out whole: nothing more to
            // write or wait for (the usual end of a browser's connection).
            Ok(Some((Flow::Closing { peer_closed: true }, _))) if idle.answered_close() => {
                self.leave(idle)
            }
            Ok(Some((flow, deferred))) => {
                tokio::spawn(serve_busy(self, idle, flow, deferred));
            }
        }
    }

    fn abandon(&self) {
        drop(self.lock().take());
        self.scheduled.store(false, Ordering::Release);
    }
}

impl Idle {
    fn shared(&self) -> &Arc<Shared> {
        &self.guard.0
    }

    /// Writes the answer to the client's close frame (and what is queued before it) if the
    /// socket takes it all now; whether it did. Otherwise a task waits until it does
    /// ([`finish_close`]).
    fn answered_close(&self) -> bool {
        self.conn.flush_queued(&self.shared().conn_env) == WriteState::Closed
    }

    /// A parked client's step: reads what it has and registers `cx`'s waker for more.
    /// `Some` when the client needs a task of its own (see [`serve_busy`]), with the flow and
    /// the subscribe that waits for Redis, if any.
    #[allow(clippy::type_complexity)]
    fn step(&mut self, cx: &mut Context<'_>) -> Option<(Flow, Option<Box<Deferred>>)> {
        // Only TCP sessions are parked; anything else ends.
        let Some(tcp) = self.conn.socket.tcp() else {
            return Some((Flow::Gone, None));
        };
        let responder = Responder::resume(&self.guard.0, &self.conn, self.budget, None);
        let mut flow = Flow::Open;
        let mut reads = 0;
        let busy = loop {
            if flow != Flow::Open || self.conn.write_state() != WriteState::Open {
                break true;
            }
            if responder.has_deferred() {
                break true;
            }
            // Both wakers are registered before the step parks: a wake-up after either is
            // seen by the next step.
            if self.conn.wake.poll_woken(cx).is_ready() {
                continue;
            }
            match tcp.poll_read_ready(cx) {
                Poll::Pending => break false,
                // Two reads at most (each up to `READS_PER_WAKE` of the socket): a client
                // that still has bytes is queued again behind the others, as a task would
                // yield.
                Poll::Ready(Ok(())) if reads == 2 => {
                    cx.waker().wake_by_ref();
                    break false;
                }
                Poll::Ready(Ok(())) => {
                    reads += 1;
                    flow = read_requests(&responder, &mut self.reader, tcp);
                }
                Poll::Ready(Err(_)) => flow = Flow::Gone,
            }
        };
        let deferred;
        (self.budget, deferred) = responder.into_parts();
        busy.then_some((flow, deferred))
    }
}

/// A session's place in its runner, given up when dropped (see [`serve_busy`]).
struct Registered(Option<Arc<Session>>);

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(session) = self.0.take() {
            session.remove();
        }
    }
}

/// Serves a client that has more than reading to do: it is throttled (its shard is full, or
/// a subscribe waits for Redis), behind (a write the shard could not finish), or closing.
/// Parks it again once it is idle; otherwise runs it to its end.
async fn serve_busy(
    session: Arc<Session>,
    mut idle: Idle,
    flow: Flow,
    deferred: Option<Box<Deferred>>,
) {
    // Out of its runner when this task ends, however it ends, unless it parks the session.
    let mut registered = Registered(Some(Arc::clone(&session)));
    let shared = Arc::clone(idle.shared());
    let conn = Arc::clone(&idle.conn);
    let tcp = conn.socket.tcp();
    let mut flow = flow;
    match tcp {
        Some(tcp) => {
            let responder = Responder::resume(&shared, &conn, idle.budget, deferred);
            let served = serve_client(&shared, &conn, tcp, responder, &mut idle.reader, flow);
            let (responder, next) = served.await;
            flow = next;
            let deferred;
            (idle.budget, deferred) = responder.into_parts();
            if flow == Flow::Open {
                registered.0 = None;
                session.carry_on(idle, flow, deferred);
                return;
            }
        }
        // Only TCP sessions are parked.
        None => flow = Flow::Gone,
    }
    drop(registered);
    match (flow, tcp) {
        (Flow::Closing { peer_closed }, Some(tcp)) => {
            // Boxed, as the other waits below: each busy client gets a task, and a task's
            // memory is the size of its largest state.
            Box::pin(finish_close(
                &shared,
                &conn,
                tcp,
                &mut idle.reader,
                peer_closed,
            ))
            .await
        }
        _ => conn.abort(&shared.conn_env),
    }
    deregister(&shared, &conn).await;
    let Idle { guard, .. } = idle;
    ended(&shared, &conn, guard);
}

/// Hands the client to its shard; false if the hub has stopped (then the connection ends at
/// once). The first step of both kinds of session (this TCP one and `stream.rs`'s).
pub(crate) fn register(shared: &Shared, conn: &Arc<Conn>) -> bool {
    // The connection's life is told by events rather than a span kept with the session: a
    // `Span` is 32 bytes of every idle connection, whatever the filter. What happens while
    // its requests are read is in the `client` span (`read_requests`).
    tracing::debug!(
        client = %conn.info.id,
        peer = ?conn.info.remote_addr,
        user = conn.info.user_id.as_deref(),
        "client connected"
    );
    // The shard is worked out again each time rather than kept: 8 bytes more in every idle
    // connection's session otherwise.
    let shard = shared.shard_index(conn.info.id);
    shared
        .enqueue(shard, Command::Register(Arc::clone(conn)))
        .is_ok()
}

/// Removes the client from its shard and waits until the shard has let go of it.
pub(crate) async fn deregister(shared: &Shared, conn: &Conn) {
    let (done, removed) = oneshot::channel();
    let then = Removed::new(move || {
        let _ = done.send(());
    });
    if remove_from_shard(shared, conn, then) {
        let _ = removed.await;
    }
}

/// Asks the client's shard to remove it and to run `then` once it has let go of it; false
/// (and `then` has run) when the hub has stopped.
fn remove_from_shard(shared: &Shared, conn: &Conn, then: Removed) -> bool {
    let id = conn.info.id;
    let remove = Command::Remove {
        client: id,
        done: Some(then),
    };
    shared.enqueue(shared.shard_index(id), remove).is_ok()
}

/// The last step of every session (a TCP one's, on its runner or in its task, and
/// `stream.rs`'s): the application's `on_disconnect`, then the session stops counting.
pub(crate) fn ended(shared: &Shared, conn: &Conn, guard: TaskGuard) {
    tracing::debug!(
        client = %conn.info.id,
        after = ?conn.info.connected_at.elapsed().unwrap_or_default(),
        "client disconnected"
    );
    if let Some(on_disconnect) = &shared.config.on_disconnect {
        on_disconnect(&conn.info);
    }
    drop(guard);
}

/// The busy states of a client, until it is idle again (`Flow::Open`, the responder handed
/// back to be parked) or its connection ends (closing or gone).
async fn serve_client<'a>(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    tcp: &TcpStream,
    mut responder: Responder<'a>,
    reader: &mut Reader,
    mut flow: Flow,
) -> (Responder<'a>, Flow) {
    while matches!(flow, Flow::Open | Flow::Throttled) {
        match conn.write_state() {
            WriteState::Open if flow == Flow::Throttled => {
                if responder.has_deferred() {
                    if Box::pin(responder.wait_deferred()).await == Some(true) {
                        flow = responder.on_bytes(reader, &mut []);
                    }
                    continue;
                }
                let shard = responder.shard();
                if Box::pin(wait_for_room(shared, conn, shard)).await {
                    // Decode what was read before the client was throttled.
                    flow = responder.on_bytes(reader, &mut []);
                }
            }
            WriteState::Open if !responder.has_deferred() => {
                // Idle again, and parked by the caller; first, what the client sent while it
                // was behind (no syscall unless tokio saw the socket readable). A replay, paced
                // by the writes, keeps a client behind most of the time: its unsubscribe is
                // read here, between two chunks.
                flow = read_requests(&responder, reader, tcp);
                if flow == Flow::Open && !responder.has_deferred() {
                    break;
                }
            }
            WriteState::Open => {
                // A subscribe waits for Redis, and the client was not throttled for it (it
                // came in early bytes): wait as a throttled client does.
                flow = Flow::Throttled;
            }
            WriteState::Blocked { since } => {
                let next = Box::pin(write_blocked(shared, conn, tcp, since)).await;
                // A client throttled before it fell behind stays throttled.
                if !(next == Flow::Open && flow == Flow::Throttled) {
                    flow = next;
                }
            }
            WriteState::Closing { .. } => flow = Flow::Closing { peer_closed: false },
            WriteState::Closed => flow = Flow::Gone,
        }
    }
    (responder, flow)
}

/// The client's shard is full: reads nothing more from the client until it has room (true),
/// so that a flood backs up into the client's own TCP socket and nothing ever blocks the
/// shard. Returns false early if the outbound side changed (the caller looks at it first).
pub(crate) async fn wait_for_room(shared: &Shared, conn: &Conn, shard: usize) -> bool {
    tokio::select! {
        () = shared.wait_for_room(shard) => true,
        () = conn.wake.woken() => false,
    }
}

/// The client is behind: finishes the shard's write as the socket allows, and at the end of
/// each progress period (a write timeout) checks that the client read enough to stay (see
/// [`Conn::check_progress`]). Its requests wait meanwhile (back-pressure).
async fn write_blocked(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    tcp: &TcpStream,
    since: Instant,
) -> Flow {
    let deadline = since + shared.config.write_timeout;
    tokio::select! {
        biased;
        () = conn.wake.woken() => Flow::Open,
        ready = tcp.writable() => match ready {
            Ok(()) => {
                let state = conn.flush_queued(&shared.conn_env);
                if matches!(state, WriteState::Open) && conn.take_feed_wanted() {
                    // A replay waited for the queue to drain: its shard writes the next chunk.
                    let id = conn.info.id;
                    let _ = shared.enqueue(shared.shard_index(id), Command::FeedReplay { client: id });
                }
                Flow::Open
            }
            Err(_) => Flow::Gone,
        },
        () = tokio::time::sleep_until(deadline.into()) => {
            // A cut is logged by `Conn` with the rule (`stalled`).
            conn.check_progress(&shared.conn_env);
            Flow::Open
        }
    }
}

fn read_requests(responder: &Responder<'_>, reader: &mut Reader, tcp: &TcpStream) -> Flow {
    // Entered only while this read is handled, so the task keeps no span between reads;
    // with DEBUG off this is a check of the callsite's interest, nothing is made.
    let _span = tracing::debug_span!("client", id = %responder.conn.info.id).entered();
    let mut flow = Flow::Open;
    let read = reader.read_available(
        |buf| tcp.try_read(buf),
        |reader, input| {
            flow = responder.on_bytes(reader, input);
            if flow == Flow::Open {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        },
    );
    match read {
        Ok(_) => flow,
        Err(_) => Flow::Gone,
    }
}

/// Writes what is left through the close frame (by the close deadline), then, unless the
/// client closed first, waits briefly for its close frame so that the server drops the TCP
/// connection after the handshake, as RFC 6455 asks.
async fn finish_close(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    tcp: &TcpStream,
    reader: &mut Reader,
    peer_closed: bool,
) {
    let deadline = match conn.write_state() {
        WriteState::Closing { deadline } => deadline,
        _ => Instant::now(),
    };
    let flushed = tokio::time::timeout_at(deadline.into(), async {
        loop {
            match conn.flush_queued(&shared.conn_env) {
                WriteState::Closed => return true,
                WriteState::Closing { .. } => {}
                WriteState::Open | WriteState::Blocked { .. } => return false,
            }
            if tcp.writable().await.is_err() {
                return false;
            }
        }
    })
    .await;
    if flushed != Ok(true) {
        conn.abort(&shared.conn_env);
        return;
    }
    if peer_closed {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        loop {
            if tcp.readable().await.is_err() {
                return;
            }
            let mut seen_close = false;
            let read = reader.read_available(
                |buf| tcp.try_read(buf),
                |reader, input| look_for_close(reader, input, &mut seen_close),
            );
            if seen_close || !matches!(read, Ok(ControlFlow::Continue(()))) {
                return;
            }
        }
    })
    .await;
}

/// Feeds bytes read while waiting for the client's close frame (after the server's): notes
/// the close frame, and stops there or at a protocol error. Other frames are ignored.
pub(crate) fn look_for_close(
    reader: &mut Reader,
    input: &mut [u8],
    seen_close: &mut bool,
) -> ControlFlow<()> {
    let result = reader.feed(input, |event| match event {
        Event::Close(_) => {
            *seen_close = true;
            ControlFlow::Break(())
        }
        _ => ControlFlow::Continue(()),
    });
    if result.is_err() || *seen_close {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle TCP connection's session is its parked [`Session`], in an `Arc` (its two
    /// counts), with no task: at most 120 bytes, so that with glibc's 8-byte header it takes
    /// a 128-byte chunk, a quarter of the task it replaced (512 bytes, aligned to 128).
    #[test]
    fn a_parked_session_stays_small() {
        let size = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Session>();
        assert!(size <= 120, "{size}");
    }

    #[test]
    fn a_burst_is_allowed_then_the_rate() {
        let limit = RateLimit {
            per_second: 10,
            burst: 3,
        };
        let mut bucket = TokenBucket::full(limit.burst);
        assert!((0..3).all(|_| bucket.take(limit)), "the burst");
        assert!(!bucket.take(limit), "nothing left");
        bucket.refilled -= Duration::from_millis(250);
        assert!(bucket.take(limit), "2.5 tokens earned in 250 ms at 10/s");
        assert!(bucket.take(limit));
        assert!(!bucket.take(limit));
        bucket.refilled -= Duration::from_secs(60);
        assert!(
            (0..3).all(|_| bucket.take(limit)),
            "refills up to the burst only"
        );
        assert!(!bucket.take(limit));
    }
}
