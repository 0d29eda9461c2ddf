//! The connection task: one per client, from the upgrade to the close.
//!
//! It reads and decodes the client's frames and answers them; it finishes writes that the
//! shard could not complete at once (the socket was full), under the write timeout; and it
//! runs the close handshake. While a client is idle the task holds no buffer: it waits for
//! readiness, then reads into a per-thread scratch buffer, and only the tail of a frame still
//! arriving is copied into a buffer of the connection's own, freed once the frame is whole.
//!
//! It lives above the hub (not in `conn/`) because it is the hub's client: it enqueues the
//! client's requests to its shard, publishes, waits for room and counts itself in the hub's
//! connection tasks. `conn/` keeps what the shard and this task share: the [`Conn`].

use std::cell::{Cell, RefCell};
use std::io;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::config::RateLimit;
use crate::conn::{CloseMode, Conn, WriteState};
use crate::hub::Shared;
use crate::shard::Command;
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
        Responder {
            shared,
            conn,
            budget: Cell::new(shared.config.rate_limit.map(|l| TokenBucket::full(l.burst))),
            deferred: Cell::new(None),
        }
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

/// Runs one client's connection to its end. `early` holds bytes the HTTP layer read past the
/// upgrade request (a client may send its first frame right behind it).
pub(crate) async fn run(shared: Arc<Shared>, conn: Arc<Conn>, early: Bytes, guard: TaskGuard) {
    // `early` is a slice of hyper's read buffer (kilobytes): keep a copy of the few bytes it
    // holds, not the buffer, or every idle connection would keep one alive.
    let early_bytes = (!early.is_empty()).then(|| early.to_vec());
    drop(early);
    if register(&shared, &conn) {
        if let Some(tcp) = conn.socket.tcp() {
            serve_client(&shared, &conn, tcp, early_bytes).await;
        }
        deregister(&shared, &conn).await;
    }
    ended(&shared, &conn, guard);
}

/// Hands the client to its shard; false if the hub has stopped (then the connection ends at
/// once). The first step of both connection tasks.
pub(crate) fn register(shared: &Shared, conn: &Arc<Conn>) -> bool {
    // The connection's life is told by events rather than a span held across its awaits: a
    // `Span` is 32 bytes of every idle connection's task, whatever the filter. What happens
    // while its requests are read is in the `client` span (`read_requests`).
    tracing::debug!(
        client = %conn.info.id,
        peer = ?conn.info.remote_addr,
        user = conn.info.user_id.as_deref(),
        "client connected"
    );
    // The shard is worked out again each time rather than kept: a local kept across the
    // connection's awaits would be 8 bytes more in every idle connection's task.
    let shard = shared.shard_index(conn.info.id);
    shared
        .enqueue(shard, Command::Register(Arc::clone(conn)))
        .is_ok()
}

/// Removes the client from its shard and waits until the shard has let go of it.
pub(crate) async fn deregister(shared: &Shared, conn: &Conn) {
    let id = conn.info.id;
    let (done, removed) = oneshot::channel();
    let remove = Command::Remove {
        client: id,
        done: Some(done),
    };
    if shared.enqueue(shared.shard_index(id), remove).is_ok() {
        let _ = removed.await;
    }
}

/// The last step of both connection tasks: the application's `on_disconnect`, then the task
/// stops counting.
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

async fn serve_client(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    tcp: &TcpStream,
    early: Option<Vec<u8>>,
) {
    let mut responder = Responder::new(shared, conn);
    let mut reader = Reader::new(shared.config.max_message_size);
    let mut flow = Flow::Open;
    if let Some(mut early) = early {
        flow = responder.on_bytes(&mut reader, &mut early);
    }
    while matches!(flow, Flow::Open | Flow::Throttled) {
        match conn.write_state() {
            WriteState::Open if flow == Flow::Throttled => {
                // Boxed, and only when a subscribe waits for Redis: a client throttled by its
                // shard's backlog neither allocates nor carries that wait in its future.
                if responder.has_deferred() {
                    if Box::pin(responder.wait_deferred()).await == Some(true) {
                        flow = responder.on_bytes(&mut reader, &mut []);
                    }
                    continue;
                }
                // Boxed: only a throttled client pays for the wait.
                let shard = responder.shard();
                if Box::pin(wait_for_room(shared, conn, shard)).await {
                    // Decode what was read before the client was throttled.
                    flow = responder.on_bytes(&mut reader, &mut []);
                }
            }
            WriteState::Open => {
                // A hand-written select rather than `tokio::select!` over `wake.woken()` and
                // `tcp.readable()`: those two futures would be 216 bytes of every idle
                // connection's task (see `wake.rs`); this keeps the wakers where they live
                // anyway, in the `Conn` and in tokio's per-socket state.
                let woken = std::future::poll_fn(|cx| {
                    if conn.wake.poll_woken(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    tcp.poll_read_ready(cx).map(Some)
                })
                .await;
                flow = match woken {
                    None => Flow::Open,
                    Some(Ok(())) => read_requests(&responder, &mut reader, tcp),
                    Some(Err(_)) => Flow::Gone,
                };
            }
            WriteState::Blocked { since } => {
                // Boxed: only a client that falls behind pays for the timer's memory, not
                // every idle connection's task.
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
    match flow {
        Flow::Closing { peer_closed } => {
            Box::pin(finish_close(shared, conn, tcp, &mut reader, peer_closed)).await
        }
        Flow::Gone | Flow::Open | Flow::Throttled => conn.abort(&shared.conn_env),
    }
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
    use crate::client::ClientInfo;
    use crate::conn::Socket;

    /// Every idle connection holds one of these futures: memory per connection is what decides
    /// how many a machine holds (see `DESIGN.md`). Rarely used states (a blocked write, the
    /// close handshake) are boxed so that they do not count here, and the idle wait keeps no
    /// futures of its own (see `wake.rs`). 320 bytes with rustc 1.95.
    #[test]
    fn connection_task_stays_small() {
        let hub = crate::Hub::new();
        let shared = Arc::clone(hub.shared());
        let info = ClientInfo::anonymous(1);
        let conn = Arc::new(Conn::new(info, Socket::Null(Default::default()), 0));
        let task = run(
            Arc::clone(&shared),
            conn,
            Bytes::new(),
            TaskGuard::new(&shared),
        );
        assert!(
            std::mem::size_of_val(&task) <= 400,
            "{}",
            std::mem::size_of_val(&task)
        );
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
