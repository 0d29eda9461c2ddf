//! The connection task of a client whose upgraded connection the hub could not take back as
//! a raw `TcpStream` (a wrapped stream, TLS): its bytes go through the stream's `AsyncRead`
//! and `AsyncWrite`, in this task, rather than straight from the shard to the kernel.
//!
//! Slower than the TCP task (`session.rs`), but the same client: the same frame decoder and
//! request handling ([`Reader`], [`Responder`]), and the same outbound queue with all its
//! rules, because the [`Conn`] is a [`Socket::Stream`](crate::conn::Socket::Stream). Such a
//! socket takes nothing from the shard, so every send queues and wakes this task, which
//! writes the queue through the stream ([`Conn::flush_queued_with`]). From there on it is the
//! TCP task's loop:
//!
//! - **The outbound bound and the slow-consumer policy** are the queue's, applied by the
//!   shard's send as for TCP. One difference: a batch is queued whole before any of it is
//!   written, so the bound counts the whole batch (over TCP the kernel takes most of it
//!   first).
//! - **Progress**: while the queue holds frames the client is behind, as over TCP; at the end
//!   of each write timeout [`Conn::check_progress`] cuts it with 4000 if it read too little.
//! - **Back-pressure on requests**: while the queue is being written, and while the shard is
//!   full ([`Flow::Throttled`]), nothing is read.
//! - **Replays**: [`Conn::send_replay`](crate::conn::Conn::send_replay) queues the chunk;
//!   this task asks the shard for the next one when the queue has drained.
//! - **Keep-alive, close and shutdown**: pings, pongs, the pong timeout (the shard aborts a
//!   silent client, which wakes this task) and the close handshake with its codes are the
//!   same frames through the same queue.
//!
//! Generic over the stream rather than taking a `Box<dyn AsyncRead + AsyncWrite>`: what
//! hyper hands over after an upgrade ([`hyper::upgrade::Upgraded`]) is already one boxed,
//! type-erased stream, so boxing it again would add a second indirection to every read and
//! write for nothing; the crate instantiates this task once, for it. A caller with a
//! concrete stream (a tokio-rustls `TlsStream` served without hyper) gets static dispatch.

use std::future::poll_fn;
use std::io;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::conn::{with_gathered, Conn, WriteState};
use crate::http::session::{self, Flow, Reader, Responder, TaskGuard, CLOSE_LINGER};
use crate::hub::Shared;
use crate::shard::Command;

/// Runs one client's connection over `io` to its end: the generic counterpart of
/// [`session::start`]. `io` replays whatever the HTTP layer read past the upgrade request
/// (hyper's `Upgraded` does), so there are no early bytes to pass.
pub(crate) async fn run<S>(shared: Arc<Shared>, conn: Arc<Conn>, io: S, guard: TaskGuard)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    if session::register(&shared, &conn) {
        serve(&shared, &conn, io).await;
        session::deregister(&shared, &conn).await;
    }
    session::ended(&shared, &conn, guard);
}

/// The stream and the context of the poll in progress: reads and writes that map `Pending`
/// to `WouldBlock` (the stream has registered the task's waker), so that the TCP task's
/// non-blocking helpers ([`Reader::read_available`], [`Conn::flush_queued_with`]) run over
/// it unchanged.
struct Polled<'a, 'b, S> {
    io: &'a mut S,
    cx: &'a mut Context<'b>,
    /// The last read or write returned `Pending`: the task will be woken.
    pending: bool,
}

impl<'a, 'b, S: AsyncRead + AsyncWrite + Unpin> Polled<'a, 'b, S> {
    fn new(io: &'a mut S, cx: &'a mut Context<'b>) -> Self {
        Polled {
            io,
            cx,
            pending: false,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        self.pending = false;
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(err)) => Err(err),
            Poll::Pending => {
                self.pending = true;
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    /// Writes from the front of `frames`: many small ones gathered into one write.
    fn write(&mut self, frames: &[Bytes]) -> io::Result<usize> {
        self.pending = false;
        let polled = with_gathered(frames, |buf| {
            Pin::new(&mut *self.io).poll_write(self.cx, buf)
        });
        match polled {
            Poll::Ready(result) => result,
            Poll::Pending => {
                self.pending = true;
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    fn flush(&mut self) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(self.cx)
    }
}

async fn serve<S>(shared: &Arc<Shared>, conn: &Arc<Conn>, mut io: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Mutable only so that the idle wait's closure borrows it uniquely: a shared borrow held
    // across an await would need it to be `Sync`, which its rate-limit `Cell` is not.
    let mut responder = Responder::new(shared, conn);
    let mut reader = Reader::new(shared.config.max_message_size);
    let mut flow = Flow::Open;
    // Bytes were written that the stream may still hold (a TLS stream keeps records until it
    // is flushed); flushed before the task waits for anything but the stream.
    let mut unflushed = false;
    while matches!(flow, Flow::Open | Flow::Throttled) {
        match conn.write_state() {
            WriteState::Open if flow == Flow::Throttled => {
                if unflushed {
                    match flush_or_woken(conn, &mut io).await {
                        Some(Ok(())) => unflushed = false,
                        Some(Err(_)) => flow = Flow::Gone,
                        None => {}
                    }
                    continue;
                }
                match responder.wait_deferred().await {
                    Some(true) => {
                        flow = responder.on_bytes(&mut reader, &mut []);
                        continue;
                    }
                    Some(false) => continue,
                    None => {}
                }
                let shard = responder.shard();
                if session::wait_for_room(shared, conn, shard).await {
                    // Decode what was read before the client was throttled.
                    flow = responder.on_bytes(&mut reader, &mut []);
                }
            }
            WriteState::Open => {
                flow = poll_fn(|cx| {
                    if conn.wake.poll_woken(cx).is_ready() {
                        return Poll::Ready(Flow::Open);
                    }
                    let mut polled = Polled::new(&mut io, cx);
                    if unflushed {
                        match polled.flush() {
                            Poll::Ready(Ok(())) => unflushed = false,
                            Poll::Ready(Err(_)) => return Poll::Ready(Flow::Gone),
                            Poll::Pending => {}
                        }
                    }
                    poll_requests(&mut polled, &mut responder, &mut reader)
                })
                .await;
            }
            WriteState::Blocked { since } => {
                let next = write_queued(shared, conn, &mut io, since, &mut unflushed).await;
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
            finish_close(shared, conn, &mut io, &mut reader, peer_closed).await
        }
        Flow::Gone | Flow::Open | Flow::Throttled => conn.abort(&shared.conn_env),
    }
}

/// Reads and answers the client's requests: `Pending` if the stream has nothing, otherwise
/// the flow after what it had.
fn poll_requests<S: AsyncRead + AsyncWrite + Unpin>(
    polled: &mut Polled<'_, '_, S>,
    responder: &mut Responder<'_>,
    reader: &mut Reader,
) -> Poll<Flow> {
    let mut flow = Flow::Open;
    let mut reads = 0;
    let mut nothing = false;
    let read = reader.read_available(
        |buf| {
            let n = polled.read(buf);
            nothing = reads == 0 && polled.pending;
            reads += 1;
            n
        },
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
        Ok(_) if nothing => Poll::Pending,
        Ok(_) => Poll::Ready(flow),
        Err(_) => Poll::Ready(Flow::Gone),
    }
}

/// The queue holds frames: writes them through the stream as it takes them, and at the end of
/// each progress period (a write timeout) checks that the client read enough to stay, as the
/// TCP task's `write_blocked` does. Returns when the queue has drained, the task was woken or
/// the period ended; the caller looks at the state next.
async fn write_queued<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    io: &mut S,
    since: Instant,
    unflushed: &mut bool,
) -> Flow {
    let deadline = since + shared.config.write_timeout;
    tokio::select! {
        biased;
        () = conn.wake.woken() => Flow::Open,
        flow = poll_fn(|cx| poll_drain(cx, shared, conn, io, unflushed)) => flow,
        () = tokio::time::sleep_until(deadline.into()) => {
            if conn.check_progress(&shared.conn_env) {
                tracing::debug!(client = %conn.info.id, "too little read in a write timeout: slow consumer");
            }
            Flow::Open
        }
    }
}

/// Writes the queue until the stream is full (`Pending`) or the queue is empty; then asks for
/// the next chunk of a replay if one waits, and flushes the stream.
fn poll_drain<S: AsyncRead + AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    io: &mut S,
    unflushed: &mut bool,
) -> Poll<Flow> {
    let mut polled = Polled::new(io, cx);
    loop {
        let state = conn.flush_queued_with(&shared.conn_env, |frames| polled.write(frames));
        *unflushed = true;
        match state {
            // The stream took part of what it was offered, or nothing: go on, or wait.
            WriteState::Blocked { .. } if polled.pending => return Poll::Pending,
            WriteState::Blocked { .. } => continue,
            WriteState::Open => break,
            // The task's loop takes it from here.
            WriteState::Closing { .. } | WriteState::Closed => return Poll::Ready(Flow::Open),
        }
    }
    if conn.take_feed_wanted() {
        // A replay waited for the queue to drain: its shard writes the next chunk.
        let id = conn.info.id;
        let _ = shared.enqueue(shared.shard_index(id), Command::FeedReplay { client: id });
    }
    match polled.flush() {
        Poll::Ready(Ok(())) => *unflushed = false,
        Poll::Ready(Err(_)) => return Poll::Ready(Flow::Gone),
        // Finished by the idle wait, which flushes before it reads.
        Poll::Pending => {}
    }
    Poll::Ready(Flow::Open)
}

/// Flushes the stream, unless the task is woken first (`None`).
async fn flush_or_woken<S: AsyncWrite + Unpin>(conn: &Conn, io: &mut S) -> Option<io::Result<()>> {
    tokio::select! {
        biased;
        () = conn.wake.woken() => None,
        flushed = io.flush() => Some(flushed),
    }
}

/// Writes what is left through the close frame (by the close deadline) and flushes; then,
/// unless the client closed first, waits briefly for its close frame, as the TCP task does;
/// then shuts the stream down (a TLS `close_notify`, a TCP FIN).
async fn finish_close<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    io: &mut S,
    reader: &mut Reader,
    peer_closed: bool,
) {
    let deadline = match conn.write_state() {
        WriteState::Closing { deadline } => deadline,
        _ => Instant::now(),
    };
    let env = &shared.conn_env;
    let flushed = tokio::time::timeout_at(
        deadline.into(),
        poll_fn(|cx| {
            let mut polled = Polled::new(&mut *io, cx);
            loop {
                match conn.flush_queued_with(env, |frames| polled.write(frames)) {
                    WriteState::Closed => break,
                    WriteState::Closing { .. } if polled.pending => return Poll::Pending,
                    WriteState::Closing { .. } => {}
                    WriteState::Open | WriteState::Blocked { .. } => return Poll::Ready(false),
                }
            }
            polled.flush().map(|flushed| flushed.is_ok())
        }),
    )
    .await;
    if flushed != Ok(true) {
        conn.abort(env);
        return;
    }
    if !peer_closed {
        let _ = tokio::time::timeout(
            CLOSE_LINGER,
            poll_fn(|cx| {
                let mut polled = Polled::new(&mut *io, cx);
                let mut seen_close = false;
                let read = reader.read_available(
                    |buf| polled.read(buf),
                    |reader, input| session::look_for_close(reader, input, &mut seen_close),
                );
                match read {
                    Ok(ControlFlow::Continue(())) if !seen_close && polled.pending => Poll::Pending,
                    Ok(ControlFlow::Continue(())) if !seen_close => {
                        // Read something, but not the close yet: read on.
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    _ => Poll::Ready(()),
                }
            }),
        )
        .await;
    }
    let _ = tokio::time::timeout(CLOSE_LINGER, io.shutdown()).await;
}
