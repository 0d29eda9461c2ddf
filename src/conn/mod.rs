//! One client's connection as the shard and the connection task share it: the socket, the
//! outbound queue, and the write path. The connection task itself (the session), which reads
//! the client and calls into the hub, is a layer up, in `http/session.rs`; while its client
//! is idle it is no task but a step that [`idle`]'s runner runs when a waker fires.
//!
//! # The write path (hot)
//!
//! A shard hands a client every frame of one batch at once ([`Conn::send`]). When nothing is
//! queued, they are written straight from the shard with one `send` (one syscall for the
//! whole batch, gathered into a per-thread buffer; the coalescing that `DESIGN.md` measured as
//! the difference between about 200 thousand and millions of deliveries per second per core;
//! with the `io-uring` feature, one submission for many clients, see `uring.rs`). Only what
//! the socket does not take is queued, and the connection task is woken to finish the job
//! when the socket becomes writable. So an idle or keeping-up client holds no queue memory
//! and costs the shard no wake-up of another task.
//!
//! # Slow clients
//!
//! A client is behind while its queue holds frames. Three things cut it, each with 4000 `slow
//! consumer` (what was queued is discarded; only a frame already partly written is finished
//! first, since the stream would be corrupt otherwise), each counted on its own in the stats:
//!
//! - **Its bound.** A frame that takes its queue over
//!   [`HubConfigBuilder::outbound_queue_bytes`] applies the slow-consumer policy at once:
//!   close, or drop the oldest frames.
//! - **No progress.** Every write timeout while it is behind, it must have taken what was
//!   queued when that period began, or at least
//!   [`min_read_rate`](crate::HubConfigBuilder::min_read_rate) times the period
//!   ([`Conn::check_progress`]). A reader that keeps making progress survives a burst of up
//!   to its bound, however long it takes to drain.
//! - **The hub's budget.** The shard closes its largest queues first when all queues
//!   together hold more memory than the budget (see `shard/retained.rs`).
//!
//! Every frame lost this way is counted in [`HubStats::dropped`]; no other client waits for
//! a slow one.
//!
//! [`HubConfigBuilder::outbound_queue_bytes`]: crate::HubConfigBuilder::outbound_queue_bytes
//! [`HubStats::dropped`]: crate::HubStats::dropped

pub(crate) mod idle;
pub(crate) mod sys;
#[cfg(all(feature = "io-uring", target_os = "linux"))]
pub(crate) mod uring;
pub(crate) mod wake;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use smallvec::SmallVec;
use tokio::net::TcpStream;

use crate::client::ClientInfo;
use crate::conn::wake::Wake;
use crate::stats::Counters;
use crate::wire::frame::{self, close_code};

/// Frames per write (gathered into one buffer, or one `writev` for large batches). Linux
/// allows 1,024 slices; a batch rarely has more than a few dozen frames, and 64 keeps the
/// slice array on the stack small.
const MAX_IOV: usize = 64;

/// Batches of several frames up to this many bytes are gathered into one buffer per thread
/// and written with one `write` rather than a `writev` of the frames.
///
/// `shared/bench/compare.sh --peers bun --mem 0`, one run each, hub/Bun delivered/s:
/// `writev` of the frames 0.85 / 0.78 / 0.70 (1000x1, 1000x16, 10000x16); gathered (and a
/// plain `write` for one frame) 1.06 / 0.97 / 1.00. The profile had shown 90% of the time in
/// the kernel, with one send syscall per client per batch either way.
const GATHER_MAX: usize = 64 * 1024;

thread_local! {
    static GATHER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(GATHER_MAX));
}

/// How long a client closed for being slow gets to take its close frame, at least.
const SLOW_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long a client closed at once (slow consumer, protocol error) gets to take its close
/// frame: the write timeout, as for any write, and at least [`SLOW_CLOSE_GRACE`]. The close
/// frame waits behind what the kernel already holds for the client (about 3 MB on loopback),
/// and the socket turns writable again only once about half of that is read: a fixed second
/// cut off slow clients that were still reading, which then never saw their 4000 (found by
/// tests/scale.rs, 100 slow clients closed at once).
fn close_grace(env: &Env) -> Duration {
    SLOW_CLOSE_GRACE.max(env.limits.write_timeout)
}

/// The part of the hub's configuration that the write path applies (the hub copies it out of
/// `HubConfig`; see the setters of the same names on `HubConfigBuilder`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// The most bytes a client's queue holds before [`SlowConsumerPolicy`] applies.
    pub(crate) outbound_queue_bytes: usize,
    pub(crate) slow_consumer: SlowConsumerPolicy,
    /// The progress period of a client that is behind, and the least time a client closed at
    /// once gets to take its close frame (see [`close_grace`]).
    pub(crate) write_timeout: Duration,
    /// Bytes per second a client that is behind must take at least.
    pub(crate) min_read_rate: usize,
}

/// What a connection's write path needs from above: its limits, and the hub's counters that
/// it bumps. The shard holds one and the connection task reaches the hub's; every send takes
/// it by reference.
pub(crate) struct Env {
    pub(crate) limits: Limits,
    pub(crate) counters: Arc<Counters>,
}

/// The clock of keep-alive: milliseconds since the hub was created, which is what
/// [`Conn::touch`] records and the shard compares with the pong timeout.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    epoch: Instant,
}

impl Clock {
    /// A clock that starts now.
    pub(crate) fn start() -> Self {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since the clock started.
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// What the hub does to a client that cannot keep up (see [`Hub`](crate::Hub#slow-clients)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlowConsumerPolicy {
    /// Close the client at once with code 4000 `slow consumer`, discarding what it had queued.
    /// The default: the client learns it fell behind and can reconnect and resynchronise.
    #[default]
    Disconnect,
    /// Keep the client and drop its oldest queued messages to make room. The client is not
    /// told; every dropped frame is counted in [`HubStats::dropped`](crate::HubStats::dropped).
    /// A write that times out still disconnects with 4000.
    DropOldest,
}

/// Where a connection's bytes go. In an application's build, a TCP stream or a stream that
/// only its connection task can write: the null socket exists for the unit tests and with the
/// `test-support` feature.
pub(crate) enum Socket {
    /// The raw socket, taken back from hyper after the upgrade: the shard writes to it
    /// straight (the fast path).
    Tcp(TcpStream),
    /// A connection whose bytes go through its connection task (`http/stream.rs`): an
    /// upgraded connection the hub could not take back as a `TcpStream` (a wrapped or TLS
    /// stream). It has no file descriptor, so the shard never writes it: every send finds it
    /// full and queues, and wakes the task, which writes the queue with
    /// [`Conn::flush_queued_with`]. All the queue's rules (bound, slow-consumer policy,
    /// progress, pongs first, replays paced by the writes) apply unchanged.
    Stream,
    /// Takes every frame at once and counts them: the in-process benchmarks', fuzz targets'
    /// and unit tests' clients, with no kernel in the way.
    #[cfg(any(test, feature = "test-support"))]
    Null(AtomicU64),
}

/// Which way a write reaches the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// Straight to the kernel ([`sys::send`]): the shard's write to a client with nothing
    /// queued. If the socket is full, the connection task takes over and writes the rest
    /// through tokio ([`Via::Reactor`]).
    Kernel,
    /// Through tokio (`TcpStream::try_write`), which clears its record of the socket being
    /// writable when the kernel says it is full: the connection task's writes, each followed
    /// by waiting for writability, which would otherwise return at once for as long as the
    /// record is stale.
    Reactor,
}

impl Socket {
    fn write_tcp(stream: &TcpStream, buf: &[u8], via: Via) -> io::Result<usize> {
        match via {
            Via::Kernel => sys::send(stream, buf),
            Via::Reactor => stream.try_write(buf),
        }
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>], via: Via) -> io::Result<usize> {
        match (self, via) {
            (Socket::Tcp(stream), Via::Kernel) => sys::send_vectored(stream, bufs),
            (Socket::Tcp(stream), Via::Reactor) => stream.try_write_vectored(bufs),
            (Socket::Stream, _) => Err(io::ErrorKind::WouldBlock.into()),
            #[cfg(any(test, feature = "test-support"))]
            (Socket::Null(frames), _) => {
                frames.fetch_add(bufs.len() as u64, Ordering::Relaxed);
                Ok(bufs.iter().map(|b| b.len()).sum())
            }
        }
    }

    pub(crate) fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Socket::Tcp(stream) => Some(stream),
            Socket::Stream => None,
            #[cfg(any(test, feature = "test-support"))]
            Socket::Null(_) => None,
        }
    }
}

/// The state of a connection's outbound side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteState {
    /// Nothing queued: frames are written as they come.
    Open,
    /// The socket did not take everything; the queue holds the rest, and the connection task
    /// is writing it as the socket allows. `since` is when the current progress period began
    /// (see [`Conn::check_progress`]).
    Blocked { since: Instant },
    /// A close frame is queued last; once it is written (or at `deadline`) the connection ends.
    Closing { deadline: Instant },
    /// Nothing more is written; the connection task drops the socket.
    Closed,
}

/// How to close.
#[derive(Clone, Copy, Debug)]
pub(crate) enum CloseMode {
    /// After what is already queued, within the deadline (shutdown, `Hub::disconnect`).
    AfterQueued(Instant),
    /// Discard what is queued and send the close frame now (slow consumer, protocol error).
    Now,
}

/// What became of a send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Written.
    Ok,
    /// Queued, in whole or in part, behind what the socket did not take: the client is
    /// behind.
    Queued,
    /// The client was closed with 4000 as a slow consumer by this send.
    SlowConsumer,
    /// The connection is closing or closed; the frames were dropped.
    Closed,
}

struct Outbound {
    frames: VecDeque<Bytes>,
    /// Bytes in `frames`. u32, as the periods' counts below: the queue bound is at most
    /// 2 GiB (`HubConfigBuilder::build`), and a queue over it by a batch still fits; four
    /// bytes each keep `Outbound`, in every connection, as small as before they were added.
    bytes: u32,
    /// The front frame was partly written: it must be finished before anything else.
    front_partial: bool,
    /// A replay is waiting for this queue to drain: the connection task asks the shard for
    /// more when it does ([`Conn::take_feed_wanted`]).
    feed_wanted: bool,
    /// The client is subscribed to a channel with history: no drop policy applies to it,
    /// since a dropped publication would be a gap nobody notices (it is cut instead, and
    /// recovers).
    holds_history: bool,
    state: WriteState,
    /// While blocked: bytes queued when the current progress period began, and bytes
    /// written since (see [`Conn::check_progress`]).
    period_owed: u32,
    period_written: u32,
}

/// The most frames a replay hands [`Conn::send_replay`] at once.
pub(crate) const REPLAY_CHUNK: usize = 64;

/// What became of a chunk of a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Replayed {
    /// The socket took all of it: the next chunk may follow at once.
    Taken,
    /// Some or all of it waits for the socket (or the chunk was not written: the queue was
    /// not empty); the connection task asks for more when the queue drains.
    Later,
    /// The client is closing or gone.
    Closed,
}

/// Why a client is cut as a slow consumer: each has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slow {
    /// Its queue went over its bound.
    QueueBound,
    /// It read too little over a write timeout.
    Stalled,
    /// The hub's queues held more memory than the budget, and its queue was among the
    /// largest.
    Budget,
}

/// A client connection, shared by its shard (which writes to it) and its connection task
/// (which reads from it and finishes writes the socket could not take at once).
pub(crate) struct Conn {
    pub(crate) info: ClientInfo,
    pub(crate) socket: Socket,
    out: Mutex<Outbound>,
    /// Wakes the connection task: the outbound side blocked or began closing.
    pub(crate) wake: Wake,
    /// When the client was last heard from, in milliseconds of the hub's clock.
    last_seen_ms: AtomicU64,
}

/// One write of the first `MAX_IOV` of `frames`: gathered, or vectored for big batches.
///
/// The slices are filled into an array on the stack in place: collecting them into a
/// `SmallVec` moved its kilobyte around on every call, 6% of the instructions of a fan-out
/// (callgrind, `prof 1000 100`).
///
/// Up to [`GATHER_MAX`] bytes of several frames are first copied into one buffer and written
/// with one `write`: the kernel's TCP send path costs per iovec, and on loopback a `writev` of
/// 16 small frames took measurably longer than a `write` of the same bytes gathered (see
/// `GATHER_MAX`). The copy is one `memcpy` per client per batch, not per frame.
fn write_gathered<'a>(
    socket: &Socket,
    frames: impl Iterator<Item = &'a Bytes>,
    via: Via,
) -> io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    let mut count = 0;
    let mut total = 0;
    for (slot, frame) in slices.iter_mut().zip(frames) {
        *slot = IoSlice::new(frame);
        count += 1;
        total += frame.len();
    }
    if let (Socket::Tcp(stream), 1) = (socket, count) {
        // One frame: a plain `write`, which skips the kernel's iovec import.
        return Socket::write_tcp(stream, &slices[0], via);
    }
    if let (Socket::Tcp(stream), true) = (socket, total <= GATHER_MAX) {
        return GATHER.with_borrow_mut(|buf| {
            buf.clear();
            for slice in &slices[..count] {
                buf.extend_from_slice(slice);
            }
            Socket::write_tcp(stream, buf, via)
        });
    }
    socket.try_write_vectored(&slices[..count], via)
}

/// Hands `write` the front of `frames` as one buffer: up to [`GATHER_MAX`] bytes of them
/// copied into the per-thread buffer, or the first frame as it is when it alone is that large
/// (or alone). For writers that are not a TCP socket ([`Conn::flush_queued_with`]): one
/// write for many small frames, as [`write_gathered`] makes it for a socket.
pub(crate) fn with_gathered<R>(frames: &[Bytes], write: impl FnOnce(&[u8]) -> R) -> R {
    let Some(first) = frames.first() else {
        return write(&[]);
    };
    if frames.len() == 1 || first.len() + frames[1].len() > GATHER_MAX {
        return write(first);
    }
    GATHER.with_borrow_mut(|buf| {
        buf.clear();
        for frame in frames.iter().take(MAX_IOV) {
            if buf.len() + frame.len() > GATHER_MAX {
                break;
            }
            buf.extend_from_slice(frame);
        }
        write(buf)
    })
}

/// Writes as much of `frames[order[..]]` as the socket takes without blocking, straight to
/// the kernel: one write per `MAX_IOV` frames (their bytes gathered into one buffer, or a
/// `writev` when they are more than `GATHER_MAX` bytes; see [`write_gathered`]). Returns how many frames were written
/// whole, and how many bytes of the next one.
fn write_indexed(socket: &Socket, frames: &[Bytes], order: &[u32]) -> io::Result<(usize, usize)> {
    let mut whole = 0;
    while whole < order.len() {
        let result = write_gathered(
            socket,
            order[whole..].iter().map(|&i| &frames[i as usize]),
            Via::Kernel,
        );
        let written = match result {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok((whole, 0)),
            Err(err) => return Err(err),
        };
        let (taken, partial) = frames_covered(frames, &order[whole..], written);
        whole += taken;
        if partial > 0 {
            // The socket took less than offered: it is full.
            return Ok((whole, partial));
        }
    }
    Ok((whole, 0))
}

/// How far `bytes` written of `frames[order]`, end to end, got: the frames written whole, and
/// the bytes written of the next one.
fn frames_covered(frames: &[Bytes], order: &[u32], mut bytes: usize) -> (usize, usize) {
    let mut whole = 0;
    while whole < order.len() && bytes >= frames[order[whole] as usize].len() {
        bytes -= frames[order[whole] as usize].len();
        whole += 1;
    }
    (whole, bytes)
}

/// What a write attempt did.
struct Progress {
    /// Frames written whole.
    whole: usize,
    /// The next frame was partly written (and advanced past that part).
    partial: bool,
}

/// Writes as much of `frames` as `write` takes without blocking (for a TCP socket, through
/// tokio: one write per `MAX_IOV` frames, as [`write_gathered`] makes it; the connection task
/// waits for writability next). `write` writes from the front of the frames it is given and
/// returns how many bytes it wrote, or `WouldBlock`.
fn write_some(
    frames: &mut [Bytes],
    mut write: impl FnMut(&[Bytes]) -> io::Result<usize>,
) -> io::Result<Progress> {
    let mut progress = Progress {
        whole: 0,
        partial: false,
    };
    while progress.whole < frames.len() {
        let result = write(&frames[progress.whole..]);
        let mut written = match result {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
            Err(err) => return Err(err),
        };
        progress.partial = false;
        while written > 0 {
            let front = &mut frames[progress.whole];
            if written >= front.len() {
                written -= front.len();
                progress.whole += 1;
            } else {
                front.advance(written);
                progress.partial = true;
                written = 0;
            }
        }
        if progress.partial {
            // The socket took less than offered: it is full.
            return Ok(progress);
        }
    }
    Ok(progress)
}

impl Outbound {
    fn push(&mut self, frame: Bytes) {
        self.bytes = self.bytes.saturating_add(len32(&frame));
        self.frames.push_back(frame);
    }

    /// Drops every queued frame but a partly written front one; returns how many it dropped.
    fn discard(&mut self) -> usize {
        let keep = usize::from(self.front_partial);
        let dropped = self.frames.len().saturating_sub(keep);
        for frame in self.frames.drain(keep..) {
            self.bytes = self.bytes.saturating_sub(len32(&frame));
        }
        dropped
    }

    /// Drops the oldest whole frames until the queue is within `bound`; returns how many.
    fn drop_oldest(&mut self, bound: u32) -> usize {
        let first = usize::from(self.front_partial);
        let mut dropped = 0;
        while self.bytes > bound && self.frames.len() > first {
            if let Some(frame) = self.frames.remove(first) {
                self.bytes = self.bytes.saturating_sub(len32(&frame));
                dropped += 1;
            }
        }
        dropped
    }

    /// Puts a control frame (a pong) ahead of queued data: behind a partly written frame only,
    /// which must be finished first or the stream would be corrupt.
    fn push_control(&mut self, frame: Bytes) {
        let at = usize::from(self.front_partial);
        self.bytes = self.bytes.saturating_add(len32(&frame));
        self.frames.insert(at, frame);
    }

    /// Starts a progress period with what is queued now.
    fn begin_period(&mut self, now: Instant) {
        self.state = WriteState::Blocked { since: now };
        self.period_owed = self.bytes;
        self.period_written = 0;
    }

    /// Writes what is queued with `write` (see [`write_some`]); returns whether the queue is
    /// now empty.
    fn flush(&mut self, write: impl FnMut(&[Bytes]) -> io::Result<usize>) -> io::Result<bool> {
        let progress = write_some(self.frames.make_contiguous(), write)?;
        for frame in self.frames.drain(..progress.whole) {
            self.bytes = self.bytes.saturating_sub(len32(&frame));
        }
        if progress.partial {
            // `advance` shortened the front frame in place.
            self.bytes = self.frames.iter().map(len32).fold(0, u32::saturating_add);
        }
        // A flush that wrote nothing leaves a partly written front frame partly written:
        // forgetting it let `discard`/`drop_oldest` drop its rest (or a pong go in front of
        // it), corrupting the stream (found by tests/slow_consumer.rs).
        self.front_partial = progress.partial || (progress.whole == 0 && self.front_partial);
        Ok(self.frames.is_empty())
    }
}

impl Conn {
    pub(crate) fn new(info: ClientInfo, socket: Socket, now_ms: u64) -> Self {
        Conn {
            info,
            socket,
            out: Mutex::new(Outbound {
                frames: VecDeque::new(),
                bytes: 0,
                front_partial: false,
                feed_wanted: false,
                holds_history: false,
                state: WriteState::Open,
                period_owed: 0,
                period_written: 0,
            }),
            wake: Wake::default(),
            last_seen_ms: AtomicU64::new(now_ms),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Outbound> {
        // The queue is consistent between statements, so a panic elsewhere cannot poison it
        // half-way; keep serving rather than propagate.
        self.out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts loading what [`send`](Self::send) reads first (the lock and the socket) into
    /// the cache, for a send that comes after other work. The shard calls this for the next
    /// client while it writes to the current one: with thousands of clients, each `Conn`
    /// is a cache miss otherwise, half of `send`'s own time in `perf` at 10,000 x 16.
    #[inline]
    pub(crate) fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let lock: *const Mutex<Outbound> = &self.out;
            let socket: *const Socket = &self.socket;
            // SAFETY: a prefetch is only a hint; it neither reads nor faults.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(lock.cast());
                _mm_prefetch::<_MM_HINT_T0>(socket.cast());
            }
        }
    }

    pub(crate) fn write_state(&self) -> WriteState {
        self.lock().state
    }

    pub(crate) fn touch(&self, now_ms: u64) {
        self.last_seen_ms.store(now_ms, Ordering::Relaxed);
    }

    pub(crate) fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    /// Sends `frames[order[0]]`, `frames[order[1]]`, … in that order, after anything already
    /// queued. This is the hot path: one lock and, when nothing is queued, one `send` for the
    /// client's whole batch (its frames gathered), straight to the kernel. A frame is cloned
    /// (a reference-count increment) only when it has to wait in the queue.
    pub(crate) fn send(&self, frames: &[Bytes], order: &[u32], env: &Env) -> Sent {
        let mut out = self.lock();
        let before = out.bytes;
        let sent = match out.state {
            WriteState::Open => {
                let written = write_indexed(&self.socket, frames, order);
                self.after_write(&mut out, frames, order, written, env)
            }
            WriteState::Blocked { .. } => {
                for &index in order {
                    out.push(frames[index as usize].clone());
                }
                self.enforce_bound(&mut out, env).unwrap_or(Sent::Queued)
            }
            WriteState::Closing { .. } | WriteState::Closed => {
                env.counters
                    .dropped
                    .fetch_add(order.len() as u64, Ordering::Relaxed);
                tracing::trace!(
                    client = %self.info.id,
                    dropped = order.len(),
                    "frames dropped: the client is closing"
                );
                Sent::Closed
            }
        };
        account_queued(env, before, out.bytes);
        sent
    }

    /// What follows a write of `frames[order]` to an open client that took `written` (frames
    /// whole, bytes of the next): nothing if it all went; otherwise the rest is queued and the
    /// connection task woken to finish it, or the connection aborted if the socket failed.
    fn after_write(
        &self,
        out: &mut Outbound,
        frames: &[Bytes],
        order: &[u32],
        written: io::Result<(usize, usize)>,
        env: &Env,
    ) -> Sent {
        match written {
            Ok((whole, _)) if whole == order.len() => Sent::Ok,
            Ok((whole, partial)) => {
                for (k, &index) in order[whole..].iter().enumerate() {
                    let mut frame = frames[index as usize].clone();
                    if k == 0 {
                        frame.advance(partial);
                    }
                    out.push(frame);
                }
                out.front_partial = partial > 0;
                out.begin_period(Instant::now());
                self.wake.wake();
                self.enforce_bound(out, env).unwrap_or(Sent::Queued)
            }
            Err(_) => {
                self.abort_locked(out);
                Sent::Closed
            }
        }
    }

    /// For a batched write (`uring.rs`): the client's lock, held, if it is an open TCP
    /// connection (nothing queued). Otherwise the frames are sent as [`send`](Self::send)
    /// sends them, and what became of them is the error.
    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    pub(crate) fn hold_open(
        &self,
        frames: &[Bytes],
        order: &[u32],
        env: &Env,
    ) -> Result<HeldOpen<'_>, Sent> {
        let out = self.lock();
        if let (WriteState::Open, Socket::Tcp(stream)) = (out.state, &self.socket) {
            use std::os::fd::AsRawFd;
            return Ok(HeldOpen {
                conn: self,
                fd: stream.as_raw_fd(),
                out,
            });
        }
        drop(out);
        Err(self.send(frames, order, env))
    }

    /// Sends one frame; see [`send`](Self::send).
    pub(crate) fn send_one(&self, frame: Bytes, env: &Env) -> Sent {
        self.send(std::slice::from_ref(&frame), &[0], env)
    }

    /// Sends a control frame (a pong) ahead of queued data: it only waits for a frame already
    /// partly written. Dropped if the connection is closing. The state is looked at and the
    /// frame written or queued under one lock, so nothing the shard sends meanwhile can go
    /// ahead of it.
    pub(crate) fn send_control(&self, frame: Bytes, env: &Env) {
        let mut out = self.lock();
        let before = out.bytes;
        match out.state {
            WriteState::Open => {
                let frames = std::slice::from_ref(&frame);
                let written = write_indexed(&self.socket, frames, &[0]);
                self.after_write(&mut out, frames, &[0], written, env);
            }
            WriteState::Blocked { .. } => out.push_control(frame),
            WriteState::Closing { .. } | WriteState::Closed => {}
        }
        account_queued(env, before, out.bytes);
    }

    /// Applies the slow-consumer policy if the queue is over its bound; `None` if it is not.
    fn enforce_bound(&self, out: &mut Outbound, env: &Env) -> Option<Sent> {
        let bound = env.limits.outbound_queue_bytes as u32;
        if out.bytes <= bound {
            return None;
        }
        let policy = if out.holds_history {
            SlowConsumerPolicy::Disconnect
        } else {
            env.limits.slow_consumer
        };
        Some(match policy {
            SlowConsumerPolicy::Disconnect => {
                self.close_slow_locked(out, Slow::QueueBound, env);
                Sent::SlowConsumer
            }
            SlowConsumerPolicy::DropOldest => {
                let dropped = out.drop_oldest(bound);
                env.counters
                    .dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                tracing::debug!(
                    client = %self.info.id,
                    dropped,
                    "queue over its bound: dropped the oldest frames"
                );
                Sent::Queued
            }
        })
    }

    fn close_slow_locked(&self, out: &mut Outbound, why: Slow, env: &Env) {
        let dropped = out.discard();
        let counters = &env.counters;
        counters
            .dropped
            .fetch_add(dropped as u64, Ordering::Relaxed);
        let (counter, rule) = match why {
            Slow::QueueBound => (&counters.queue_bound_disconnects, "queue_bound"),
            Slow::Stalled => (&counters.stalled_disconnects, "stalled"),
            Slow::Budget => (&counters.budget_disconnects, "budget"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            client = %self.info.id,
            rule,
            dropped,
            "slow consumer: closing with 4000"
        );
        out.push(frame::close_frame(
            close_code::SLOW_CONSUMER,
            "slow consumer",
        ));
        out.state = WriteState::Closing {
            deadline: Instant::now() + close_grace(env),
        };
        self.wake.wake();
    }

    /// Ends a progress period of a client that is behind (the connection task calls this
    /// each write timeout): if it took what was queued when the period began, or at least
    /// [`min_read_rate`](crate::HubConfigBuilder::min_read_rate) times the period, a new
    /// period begins; otherwise it is cut with 4000. Returns true if it was cut.
    pub(crate) fn check_progress(&self, env: &Env) -> bool {
        // Write what the socket takes now first: the client may have read while this task
        // waited for a worker thread, and a hub that is slow to write must not blame the
        // client for it.
        if !matches!(self.flush_queued(env), WriteState::Blocked { .. }) {
            return false;
        }
        let mut out = self.lock();
        let WriteState::Blocked { since } = out.state else {
            return false;
        };
        let period = env.limits.write_timeout;
        let now = Instant::now();
        if now < since + period {
            return false;
        }
        let at_min_rate = env.limits.min_read_rate as f64 * period.as_secs_f64();
        let required = (f64::from(out.period_owed).min(at_min_rate) as u32).max(1);
        if out.period_written >= required {
            out.begin_period(now);
            return false;
        }
        let before = out.bytes;
        self.close_slow_locked(&mut out, Slow::Stalled, env);
        account_queued(env, before, out.bytes);
        true
    }

    /// Cuts the client with 4000 as a slow consumer, for `why`: from the shard, to bring the
    /// hub's queue memory under its budget ([`Slow::Budget`]), or for live publications it
    /// holds for the client behind a replay that outgrew the bound ([`Slow::QueueBound`],
    /// `shard/catch_up.rs`). Returns false if it was already closing.
    pub(crate) fn close_slow(&self, why: Slow, env: &Env) -> bool {
        let mut out = self.lock();
        if matches!(out.state, WriteState::Closing { .. } | WriteState::Closed) {
            return false;
        }
        let before = out.bytes;
        self.close_slow_locked(&mut out, why, env);
        account_queued(env, before, out.bytes);
        true
    }

    /// Marks the client as subscribed to a channel with history: from now on it is cut
    /// rather than have publications dropped when it falls behind (PROTOCOL.md: "Publications
    /// of history channels are never dropped by a drop policy").
    pub(crate) fn mark_history(&self) {
        self.lock().holds_history = true;
    }

    /// Writes `frames` of a replay, outside the client's outbound bound: what the socket does
    /// not take now waits in the queue (behind what was queued already), and the connection
    /// task asks for the next chunk once the queue has drained. So a replay holds at most one
    /// chunk in the queue, however long it is.
    pub(crate) fn send_replay(&self, frames: &[Bytes], env: &Env) -> Replayed {
        let mut out = self.lock();
        let before = out.bytes;
        match out.state {
            WriteState::Open => {}
            WriteState::Blocked { .. } => {
                // The shard has taken these frames from the replay: they wait behind what is
                // queued (dropping them here lost them, a gap in the client's offsets; found
                // by tests/stream.rs, where every send queues).
                for frame in frames {
                    out.push(frame.clone());
                }
                out.feed_wanted = true;
                account_queued(env, before, out.bytes);
                return Replayed::Later;
            }
            WriteState::Closing { .. } | WriteState::Closed => return Replayed::Closed,
        }
        let order: SmallVec<[u32; REPLAY_CHUNK]> = (0..frames.len() as u32).collect();
        let written = write_indexed(&self.socket, frames, &order);
        let sent = match written {
            Ok((whole, _)) if whole == order.len() => Replayed::Taken,
            Ok((whole, partial)) => {
                for (k, frame) in frames[whole..].iter().enumerate() {
                    let mut frame = frame.clone();
                    if k == 0 {
                        frame.advance(partial);
                    }
                    out.push(frame);
                }
                out.front_partial = partial > 0;
                out.feed_wanted = true;
                out.begin_period(Instant::now());
                self.wake.wake();
                Replayed::Later
            }
            Err(_) => {
                self.abort_locked(&mut out);
                Replayed::Closed
            }
        };
        account_queued(env, before, out.bytes);
        sent
    }

    /// Whether a replay waits for the queue to drain (see [`send_replay`](Self::send_replay));
    /// clears the request.
    pub(crate) fn take_feed_wanted(&self) -> bool {
        std::mem::take(&mut self.lock().feed_wanted)
    }

    /// Bytes queued now.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.lock().bytes as usize
    }

    /// Begins the close handshake with `code` and `reason`. Returns false if the connection
    /// was already closing, in which case nothing changes.
    pub(crate) fn close(&self, code: u16, reason: &str, mode: CloseMode, env: &Env) -> bool {
        let mut out = self.lock();
        if matches!(out.state, WriteState::Closing { .. } | WriteState::Closed) {
            return false;
        }
        let before = out.bytes;
        let deadline = match mode {
            CloseMode::AfterQueued(deadline) => deadline,
            CloseMode::Now => {
                let dropped = out.discard();
                env.counters
                    .dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                Instant::now() + close_grace(env)
            }
        };
        out.push(frame::close_frame(code, reason));
        out.state = WriteState::Closing { deadline };
        account_queued(env, before, out.bytes);
        drop(out);
        self.wake.wake();
        true
    }

    /// Stops all writing at once (the peer is gone or silent); queued frames are dropped.
    pub(crate) fn abort(&self, env: &Env) {
        let mut out = self.lock();
        let before = out.bytes;
        if !matches!(out.state, WriteState::Closed) {
            let dropped = out.frames.len();
            env.counters
                .dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
            if dropped > 0 {
                tracing::debug!(
                    client = %self.info.id,
                    dropped,
                    "connection ended with frames queued: dropped"
                );
            }
        }
        self.abort_locked(&mut out);
        account_queued(env, before, out.bytes);
    }

    fn abort_locked(&self, out: &mut Outbound) {
        out.frames = VecDeque::new();
        out.bytes = 0;
        out.front_partial = false;
        out.state = WriteState::Closed;
        self.wake.wake();
    }

    /// Writes what is queued, for the connection task once the socket is writable. Returns the
    /// state after it: `Open` once the queue is empty (its memory is freed), or `Closed` when
    /// a close frame went out or the socket failed.
    pub(crate) fn flush_queued(&self, env: &Env) -> WriteState {
        self.flush_queued_with(env, |frames| {
            write_gathered(&self.socket, frames.iter(), Via::Reactor)
        })
    }

    /// [`flush_queued`](Self::flush_queued) through `write` rather than the socket: how the
    /// connection task of a [`Socket::Stream`] writes the queue through its stream. `write`
    /// writes from the front of the frames it is given (see [`with_gathered`]) and returns
    /// how many bytes it wrote, or `WouldBlock` when the stream takes nothing now. It is
    /// called with the queue's lock held, so it must not block.
    pub(crate) fn flush_queued_with(
        &self,
        env: &Env,
        write: impl FnMut(&[Bytes]) -> io::Result<usize>,
    ) -> WriteState {
        let mut out = self.lock();
        let before = out.bytes;
        match out.state {
            WriteState::Open | WriteState::Closed => {}
            WriteState::Blocked { .. } | WriteState::Closing { .. } => {
                match out.flush(write) {
                    Ok(true) => {
                        out.frames = VecDeque::new();
                        out.state = match out.state {
                            WriteState::Closing { .. } => WriteState::Closed,
                            _ => WriteState::Open,
                        };
                    }
                    Ok(false) => {
                        // Progress, measured against the floor at the end of the period.
                        let written = before - out.bytes;
                        out.period_written = out.period_written.saturating_add(written);
                    }
                    Err(_) => self.abort_locked(&mut out),
                }
            }
        }
        account_queued(env, before, out.bytes);
        out.state
    }
}

/// An open client whose lock the shard holds while its frames are in a batched write: nothing
/// else writes to it or changes its state until the write is [settled](Self::settle), so the
/// batched write is, to everyone else, the same single write that [`Conn::send`] makes.
#[cfg(all(feature = "io-uring", target_os = "linux"))]
pub(crate) struct HeldOpen<'a> {
    conn: &'a Conn,
    fd: std::os::fd::RawFd,
    out: MutexGuard<'a, Outbound>,
}

#[cfg(all(feature = "io-uring", target_os = "linux"))]
impl HeldOpen<'_> {
    /// The socket to write to.
    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        self.fd
    }

    /// Settles a write of `frames[order]`, gathered, that took `written` bytes (or failed);
    /// then the lock is released.
    pub(crate) fn settle(
        mut self,
        frames: &[Bytes],
        order: &[u32],
        written: io::Result<usize>,
        env: &Env,
    ) -> Sent {
        let written = match written {
            Ok(0) => Err(io::ErrorKind::WriteZero.into()),
            Ok(bytes) => Ok(frames_covered(frames, order, bytes)),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok((0, 0)),
            Err(err) => Err(err),
        };
        let before = self.out.bytes;
        let sent = self
            .conn
            .after_write(&mut self.out, frames, order, written, env);
        account_queued(env, before, self.out.bytes);
        sent
    }
}

/// A frame's length as the queue counts it (no frame comes near 4 GiB; one that did would
/// count as 4 GiB and be over any bound).
fn len32(frame: &Bytes) -> u32 {
    u32::try_from(frame.len()).unwrap_or(u32::MAX)
}

/// Keeps the hub-wide count of queued bytes in step with one queue's change.
fn account_queued(env: &Env, before: u32, after: u32) {
    let counter = &env.counters.queued_bytes;
    if after > before {
        counter.fetch_add((after - before) as u64, Ordering::Relaxed);
    } else if before > after {
        counter.fetch_sub((before - after) as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientInfo;
    use std::io::Read;

    fn frame(len: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    fn pong() -> Bytes {
        frame::control_frame(frame::OPCODE_PONG, b"p")
    }

    fn queue(frames: &[Bytes], front_partial: bool) -> Outbound {
        let mut out = Outbound {
            frames: VecDeque::new(),
            bytes: 0,
            front_partial,
            feed_wanted: false,
            holds_history: false,
            state: WriteState::Blocked {
                since: Instant::now(),
            },
            period_owed: 0,
            period_written: 0,
        };
        for f in frames {
            out.push(f.clone());
        }
        out
    }

    /// A chunk of a replay that finds the queue not empty waits behind it, whole, and the
    /// connection task is asked for more once the queue has drained: nothing of it is lost.
    /// With a `Socket::Stream`, whose every send queues (the generic path's case).
    #[test]
    fn a_replay_chunk_sent_to_a_blocked_client_waits_in_the_queue() {
        let hub = crate::Hub::new();
        let env = &hub.shared().conn_env;
        let conn = Conn::new(ClientInfo::anonymous(1), Socket::Stream, 0);
        let ack = frame(10, b'a');
        assert_eq!(conn.send_one(ack.clone(), env), Sent::Queued);
        let chunk = [frame(20, b'1'), frame(30, b'2')];
        assert_eq!(conn.send_replay(&chunk, env), Replayed::Later);
        assert_eq!(conn.queued_bytes(), 60);
        let mut written = Vec::new();
        let state = conn.flush_queued_with(env, |frames| {
            written.extend_from_slice(&frames[0]);
            Ok(frames[0].len())
        });
        assert_eq!(state, WriteState::Open);
        assert_eq!(written, [&ack[..], &chunk[0][..], &chunk[1][..]].concat());
        assert!(conn.take_feed_wanted(), "the task asks for the next chunk");
        assert_eq!(hub.stats().queued_bytes, 0);
    }

    /// PROTOCOL.md: pong frames go ahead of queued data, behind only a frame already partly
    /// on the wire (which must be finished or the stream is corrupt).
    #[test]
    fn a_pong_goes_ahead_of_queued_data_in_every_state() {
        let data = [frame(100, 1), frame(100, 2), frame(100, 3)];

        let mut empty = queue(&[], false);
        empty.push_control(pong());
        assert_eq!(empty.frames[0], pong());

        let mut partly_written = queue(&data, true);
        partly_written.push_control(pong());
        assert_eq!(
            partly_written.frames[0], data[0],
            "the partial frame is finished first"
        );
        assert_eq!(partly_written.frames[1], pong());
        assert_eq!(partly_written.bytes as usize, 300 + pong().len());

        let mut full = queue(&data, false);
        full.push_control(pong());
        assert_eq!(full.frames[0], pong());
        assert_eq!(full.frames.len(), 4);
    }

    /// The same through `Conn`, with a real socket that stops taking bytes half-way through
    /// a large frame: the pong is written right after that frame, before the data queued
    /// behind it.
    #[tokio::test]
    async fn a_pong_sent_to_a_blocked_client_arrives_right_after_the_partly_written_frame() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let server = TcpStream::from_std(server).unwrap();
        let hub = crate::Hub::with_config(
            crate::HubConfig::builder()
                .outbound_queue_bytes(64 << 20)
                .build()
                .unwrap(),
        );
        let env = &hub.shared().conn_env;
        let info = ClientInfo::anonymous(1);
        let conn = Conn::new(info, Socket::Tcp(server), 0);

        // Larger than any loopback socket buffer: the kernel takes part of it.
        let big = frame(32 << 20, b'a');
        let after = frame(1000, b'b');
        assert_eq!(conn.send_one(big.clone(), env), Sent::Queued);
        assert_eq!(conn.send_one(after.clone(), env), Sent::Queued);
        assert!(conn.lock().front_partial, "the big frame is partly written");
        conn.send_control(pong(), env);

        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let want = big.len() + pong().len() + after.len();
            let mut chunk = vec![0u8; 1 << 20];
            while all.len() < want {
                let n = client.read(&mut chunk).unwrap();
                assert!(n > 0);
                all.extend_from_slice(&chunk[..n]);
            }
            all
        });
        while !matches!(conn.flush_queued(env), WriteState::Open) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let all = reader.join().unwrap();
        let pong_at = 32 << 20;
        assert!(all[..pong_at].iter().all(|&b| b == b'a'));
        assert_eq!(&all[pong_at..pong_at + pong().len()], &pong()[..]);
        assert!(all[pong_at + pong().len()..].iter().all(|&b| b == b'b'));
    }
}
