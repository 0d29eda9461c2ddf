//! The recover scenario: subscribers of one history channel drop their connections at random
//! while a publisher streams, come back with `since` their last seen position, and must end
//! with every offset exactly once and in order (PROTOCOL.md, "History and recovery").
//!
//! Unlike the other scenarios this one reads every frame whole (the position is at its end),
//! keeps per subscriber one byte per offset, and runs on one tokio runtime of its own; it is a
//! correctness run under load, not a throughput measurement.
//!
//! - The publisher is a client of the hub like the others: it subscribes first (plain), then
//!   publishes `--rate` numbered messages per second in 1 ms ticks for `--duration`, and reads
//!   its own channel; the offset of the last publication it reads is the run's last offset.
//! - Each subscriber subscribes (plain: its acknowledgement gives the offset it starts after),
//!   then, while the publisher publishes, drops its connection at random moments (exponential
//!   intervals with mean `--drop-every`, from a seeded generator), alternately abruptly (TCP
//!   reset, no close frame) and cleanly (close frame, then the server's), reconnects at once
//!   and resubscribes with `since` its last seen offset and epoch. A cut by the server (e.g. as
//!   a slow consumer) is recovered from the same way, and counted as an error.
//! - Recovery time: from the moment the old connection is gone (the start of the reconnect) to
//!   the moment the subscriber holds every offset up to the one its resume acknowledgement
//!   names (the end of the replay); when nothing was missed, that is the acknowledgement's
//!   arrival. Live messages after the replay do not wait on the publisher's rate, so this is
//!   what the reconnect and the replay cost.
//! - At the end every subscriber must hold each offset after its first acknowledgement's, up to
//!   the last, exactly once, in order: missing offsets are lost, a second arrival is a
//!   duplicate, a first arrival below the highest already seen is out of order.
//! - With `--restart-redis-at` (two nodes, the run's own redis-server), Redis is killed
//!   mid-run and started again empty: the channel gets a new epoch, with offsets from 1.
//!   Offsets are only comparable within an epoch, so a subscriber's record is one segment per
//!   epoch it enters (by a resume answered `recovered: false` in another epoch, or a live
//!   message in one), each checked on its own: the last epoch up to the last offset; an
//!   earlier one up to the highest offset the subscriber got in it (what others got above
//!   that went with the killed Redis before this subscriber's node delivered it: reported,
//!   not lost). Each subscriber may change epoch once per restart; more, or a move back to an
//!   epoch it had left, is an error. Publications the hub refused while Redis was away
//!   (`history unavailable` to the publisher) were never numbered: counted apart, not lost.
//!
//! Every loop is bounded: connection attempts by count and the whole run by a deadline
//! (duration + drain + 10 s), every read and write by a timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::conn::{self, ConnectOpts, Target};
use crate::report::{self, HubSnapshot};
use crate::stats::{new_histogram, HistogramJson, Latency};
use crate::ws::{self, opcode};

/// A write that does not finish in this long ends the connection (and counts an error).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connect (TCP and upgrade) that does not finish in this long is retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a clean close waits for the server's close frame (or EOF). A wshub node does not
/// read the close while the subscriber's resume waits for Redis (`RedisConfig::history_wait`,
/// 5 s by default), which a Redis restart can make it do: longer than that.
const CLOSE_WAIT: Duration = Duration::from_secs(7);
/// Connection attempts per subscriber, at most (with the deadline, bounds the reconnect loop).
const MAX_CONNECTS: u64 = 100_000;
/// The highest offset a subscriber keeps a byte for (a run needs far fewer).
const MAX_OFFSET: u64 = 50_000_000;
/// Bytes per read.
const READ_CHUNK: usize = 16 * 1024;

/// What the scenario is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct RecoverOptions {
    /// The hub: the publisher's node.
    pub(crate) target: Target,
    /// Every node (the first is `target`): with two, a subscriber's connections alternate
    /// between them, so that each resume is answered by the other node than the one it
    /// left (its history across nodes lives in Redis).
    pub(crate) nodes: Vec<Target>,
    /// The history channel.
    pub(crate) channel: String,
    /// Subscribers that drop and resume.
    pub(crate) subscribers: usize,
    /// Publications per second.
    pub(crate) rate: f64,
    /// How long the publisher publishes (and subscribers drop).
    pub(crate) duration: Duration,
    /// After publishing, how long subscribers have to catch up.
    pub(crate) drain: Duration,
    /// Mean time between one subscriber's drops.
    pub(crate) drop_every: Duration,
    /// Seed of the drop times.
    pub(crate) seed: u64,
    /// Data bytes per publication.
    pub(crate) payload: usize,
    /// Generator runtime threads.
    pub(crate) threads: usize,
    /// How long the first subscriptions may take.
    pub(crate) live_timeout: Duration,
    /// Loopback source addresses to spread connections over.
    pub(crate) sources: u8,
    /// `--restart-redis-at`: when (after publishing starts) to kill the run's own
    /// redis-server, and how long to leave it down before starting it again, empty.
    pub(crate) restart: Option<RestartPlan>,
}

/// A Redis restart to do during the run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RestartPlan {
    /// After publishing starts.
    pub(crate) at: Duration,
    /// Down for this long (then as long as it takes to answer PING).
    pub(crate) pause: Duration,
}

/// A Redis restart done.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RedisRestart {
    /// Seconds after publishing started that it was killed.
    pub(crate) at_seconds: f64,
    /// Milliseconds from the kill until the new one answered PING.
    pub(crate) away_ms: f64,
}

/// The offsets of one epoch, as the publisher read its own publications back.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct EpochSpan {
    pub(crate) epoch: String,
    /// The first offset read back in it (0: none; the first epoch starts after
    /// `first_offset`).
    pub(crate) first: u64,
    /// The highest offset read back in it (the first epoch: at least its acknowledgement's).
    pub(crate) last: u64,
}

/// What the run found.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RecoverResult {
    /// Subscribers that dropped and resumed.
    pub(crate) subscribers: usize,
    /// The channel.
    pub(crate) channel: String,
    /// Publications per second asked for.
    pub(crate) rate: f64,
    /// Seconds of publishing.
    pub(crate) seconds: f64,
    /// Mean milliseconds between one subscriber's drops.
    pub(crate) drop_every_ms: f64,
    /// Seed of the drop times.
    pub(crate) seed: u64,
    /// Publications the publisher sent.
    pub(crate) published: u64,
    /// Publications refused by the hub (error frames to the publisher), for any reason.
    pub(crate) publish_refused: u64,
    /// Of them, refused while Redis was away (`history unavailable`): never numbered, never
    /// delivered, so not lost.
    pub(crate) refused_while_away: u64,
    /// Publications neither read back nor refused: in flight to a Redis that was killed (its
    /// history went with it). Only legitimate with a restart.
    pub(crate) unconfirmed: u64,
    /// The offset the channel was at when the publisher subscribed (in the first epoch).
    pub(crate) first_offset: u64,
    /// The offset of the last publication (as the publisher read it back), in `epoch`.
    pub(crate) last_offset: u64,
    /// The channel's last epoch.
    pub(crate) epoch: String,
    /// Every epoch the publisher read its publications back in, in order (one per restart
    /// more than the first).
    pub(crate) epochs: Vec<EpochSpan>,
    /// The Redis restarts done (`--restart-redis-at`).
    pub(crate) redis_restarts: Vec<RedisRestart>,
    /// Reconnects over all subscribers.
    pub(crate) reconnects: u64,
    /// Drops done with a TCP reset, no close frame.
    pub(crate) abrupt_drops: u64,
    /// Drops done with a close frame.
    pub(crate) clean_drops: u64,
    /// Connections the server closed (counted as errors too).
    pub(crate) server_closes: u64,
    /// Messages received, every one (replays included).
    pub(crate) received: u64,
    /// Of them, those a resume replayed (offsets up to the resume acknowledgement's).
    pub(crate) replayed: u64,
    /// Offsets a subscriber should hold and does not: in each epoch, every offset after the
    /// one it started from (its first acknowledgement's, else 0 in a new epoch) up to the
    /// last offset (the last epoch) or the highest it received there (an earlier epoch).
    pub(crate) lost: u64,
    /// Offsets of an earlier epoch above the highest a subscriber received in it, up to the
    /// highest anyone read in it: numbered by a Redis that was killed before this subscriber's
    /// node delivered them, so no history could give them. Not counted as lost.
    pub(crate) lost_with_epoch: u64,
    /// Offsets received a second time.
    pub(crate) duplicated: u64,
    /// Offsets received for the first time after a higher one.
    pub(crate) out_of_order: u64,
    /// Resume acknowledgements with `recovered: false`.
    pub(crate) not_recovered: u64,
    /// Acknowledgements or messages in another epoch than the subscriber's, over all
    /// subscribers (each should see one per Redis restart that it lived through).
    pub(crate) epoch_changes: u64,
    /// Of them, not explained by a restart: more changes for a subscriber than restarts, or a
    /// move back to an epoch it had left (each an error).
    pub(crate) unexpected_epoch_changes: u64,
    /// Resumes answered `history unavailable` (Redis away longer than the node waits), then
    /// made again.
    pub(crate) resumes_unavailable: u64,
    /// Subscribers that ended holding every offset exactly once.
    pub(crate) complete_subscribers: usize,
    /// Recovery time (see the module's documentation), every completed recovery.
    pub(crate) recovery: Latency,
    /// The same, whole.
    pub(crate) recovery_histogram: HistogramJson,
    /// Recoveries cut by the next drop (or by an epoch change) before their replay ended (not
    /// timed).
    pub(crate) recoveries_interrupted: u64,
    /// Errors by kind.
    pub(crate) errors: BTreeMap<String, u64>,
    /// The hub's counters over the run (embedded only).
    pub(crate) hub: Option<HubSnapshot>,
}

/// A small seeded generator (SplitMix64): the drop times of a run repeat with its seed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// An exponential interval with mean `mean`, at least 1 ms and at most 20 means.
    fn interval(&mut self, mean: Duration) -> Duration {
        let x = -self.unit().ln();
        Duration::from_secs_f64((mean.as_secs_f64() * x.min(20.0)).max(0.001))
    }
}

/// State every task shares.
struct Shared {
    /// Subscribers whose first subscription was acknowledged.
    acked: AtomicUsize,
    /// Set when publishing starts: drops begin.
    publishing: AtomicBool,
    /// Set when publishing ends: drops stop.
    published: AtomicBool,
    /// The last epoch and offset, once the publisher has read its last publication.
    last: std::sync::OnceLock<(String, u64)>,
    /// Where the run must have ended.
    deadline: Mutex<Instant>,
}

impl Shared {
    fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A server frame, whole.
enum Got<'a> {
    /// A `message` with its position.
    Message { offset: u64, epoch: &'a str },
    /// A `subscribed` acknowledgement: (`recovered`, epoch, offset).
    Subscribed {
        recovered: Option<bool>,
        epoch: Option<String>,
        offset: Option<u64>,
    },
    /// An `error` message; `unavailable` when it says `history unavailable` (Redis away:
    /// a resume not made, or a publication refused before it was numbered).
    Error { unavailable: bool },
    /// A ping to answer.
    Ping(&'a [u8]),
    /// A close frame with its code.
    Close(u16),
    /// Anything else (a message without a position, a pong).
    Other,
}

/// Reads the position at the end of a history channel's message:
/// `…,"offset":N,"epoch":"E"}`.
pub(crate) fn tail_position(payload: &[u8]) -> Option<(u64, &str)> {
    const OFF: &[u8] = b",\"offset\":";
    const EP: &[u8] = b",\"epoch\":\"";
    let body = payload.strip_suffix(b"\"}")?;
    let at = body.windows(OFF.len()).rposition(|w| w == OFF)?;
    let rest = &body[at + OFF.len()..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let offset = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let epoch = rest[digits..].strip_prefix(EP)?;
    if epoch.contains(&b'"') || epoch.contains(&b'\\') {
        return None;
    }
    Some((offset, std::str::from_utf8(epoch).ok()?))
}

fn classify(op: u8, payload: &[u8]) -> Got<'_> {
    match op {
        opcode::TEXT | opcode::BINARY => {
            if payload.starts_with(ws::MESSAGE_PREFIX) {
                match tail_position(payload) {
                    Some((offset, epoch)) => Got::Message { offset, epoch },
                    None => Got::Other,
                }
            } else if payload.starts_with(b"{\"type\":\"subscribed\"") {
                let v: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
                let d = &v["data"];
                Got::Subscribed {
                    recovered: d["recovered"].as_bool(),
                    epoch: d["epoch"].as_str().map(str::to_owned),
                    offset: d["offset"].as_u64(),
                }
            } else if payload.starts_with(b"{\"type\":\"error\"") {
                const AWAY: &[u8] = b"\"history unavailable\"";
                Got::Error {
                    unavailable: payload.windows(AWAY.len()).any(|w| w == AWAY),
                }
            } else {
                Got::Other
            }
        }
        opcode::PING => Got::Ping(payload),
        opcode::CLOSE => Got::Close(ws::close_code(payload).unwrap_or(1005)),
        _ => Got::Other,
    }
}

/// Takes every whole frame off the front of `buf`, calling `f` with each.
fn frames(buf: &mut Vec<u8>, f: &mut impl FnMut(u8, &[u8])) {
    let mut at = 0;
    while let Some((hl, len, op, masked)) = ws::header(&buf[at..]) {
        let Ok(len) = usize::try_from(len) else {
            break;
        };
        if buf.len() - at - hl < len {
            break;
        }
        let start = at + hl;
        if masked {
            // Servers never mask; unmask anyway so that a misbehaving one is still read.
            let key: [u8; 4] = [
                buf[start - 4],
                buf[start - 3],
                buf[start - 2],
                buf[start - 1],
            ];
            for (i, b) in buf[start..start + len].iter_mut().enumerate() {
                *b ^= key[i & 3];
            }
        }
        f(op, &buf[start..start + len]);
        at = start + len;
    }
    buf.drain(..at);
}

/// The subscribe frame, with `since` when resuming.
fn subscribe(channel: &str, since: Option<(u64, &str)>) -> Vec<u8> {
    let ch = serde_json::to_string(channel).unwrap_or_else(|_| "\"\"".into());
    let json = match since {
        Some((offset, epoch)) => {
            let ep = serde_json::to_string(epoch).unwrap_or_else(|_| "\"\"".into());
            format!(
                "{{\"type\":\"subscribe\",\"data\":{ch},\"since\":{{\"offset\":{offset},\"epoch\":{ep}}}}}"
            )
        }
        None => format!("{{\"type\":\"subscribe\",\"data\":{ch}}}"),
    };
    let mut out = Vec::new();
    ws::client_frame(&mut out, opcode::TEXT, json.as_bytes());
    out
}

async fn write(sock: &TcpStream, buf: &[u8]) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, conn::write_all(sock, buf)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write error: {}", e.kind())),
        Err(_) => Err("write timeout".into()),
    }
}

/// Makes dropping `sock` send a TCP reset instead of a FIN (SO_LINGER with a zero timeout).
fn reset_on_drop(sock: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a `linger` of the size passed.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// What one subscriber received in one epoch: offsets are only comparable within an epoch,
/// so each epoch it enters is checked on its own.
struct Segment {
    epoch: String,
    /// It must hold every offset after this one: its first acknowledgement's (the first
    /// segment), else 0 (a new epoch is replayed or delivered from its first offset, which is
    /// 1 after a Redis that came back empty).
    start: u64,
    /// Arrivals per offset (saturating).
    got: Vec<u8>,
    /// The highest offset received (or `start`).
    max_seen: u64,
}

impl Segment {
    fn new(epoch: String, start: u64) -> Segment {
        Segment {
            epoch,
            start,
            got: Vec::new(),
            max_seen: start,
        }
    }

    /// Offsets in (`start`, `end`] it does not hold.
    fn missing(&self, end: u64) -> u64 {
        (self.start + 1..=end)
            .filter(|&o| self.got.get(o as usize).copied().unwrap_or(0) == 0)
            .count() as u64
    }
}

/// One subscriber's record.
struct Sub {
    /// One per epoch entered, in order; empty until the first acknowledgement.
    segments: Vec<Segment>,
    /// A resume in progress: when the reconnect started, and the acknowledgement's epoch and
    /// offset once it came.
    recovering: Option<(Instant, Option<(String, u64)>)>,
    received: u64,
    replayed: u64,
    duplicated: u64,
    out_of_order: u64,
    not_recovered: u64,
    /// Moves to another epoch (by a resume acknowledgement or a live message).
    epoch_changes: u64,
    /// Moves back to an epoch it had already left (never legitimate).
    epoch_returns: u64,
    /// Resumes answered `history unavailable` (Redis away longer than the node waits).
    unavailable: u64,
    reconnects: u64,
    abrupt: u64,
    clean: u64,
    server_closes: u64,
    interrupted: u64,
    hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl Sub {
    fn new() -> Sub {
        Sub {
            segments: Vec::new(),
            recovering: None,
            received: 0,
            replayed: 0,
            duplicated: 0,
            out_of_order: 0,
            not_recovered: 0,
            epoch_changes: 0,
            epoch_returns: 0,
            unavailable: 0,
            reconnects: 0,
            abrupt: 0,
            clean: 0,
            server_closes: 0,
            interrupted: 0,
            hist: new_histogram(),
            errors: BTreeMap::new(),
        }
    }

    fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    fn acked(&self) -> bool {
        !self.segments.is_empty()
    }

    /// The epoch it is in and the highest offset it holds there (once acknowledged).
    fn position(&self) -> Option<(&str, u64)> {
        self.segments.last().map(|s| (s.epoch.as_str(), s.max_seen))
    }

    /// The position to resume from: the highest offset seen in its epoch.
    fn since(&self) -> Option<(u64, &str)> {
        self.position().map(|(e, o)| (o, e))
    }

    /// Starts a segment in `epoch`, which must be new to this subscriber.
    fn enter(&mut self, epoch: &str, start: u64) {
        self.epoch_changes += 1;
        if self.segments.iter().any(|s| s.epoch == epoch) {
            self.epoch_returns += 1;
            self.error("back in an epoch it had left");
        }
        self.segments.push(Segment::new(epoch.to_owned(), start));
    }

    fn on_message(&mut self, offset: u64, epoch: &str) {
        self.received += 1;
        let Some(cur) = self.segments.last() else {
            self.error("message before the acknowledgement");
            return;
        };
        if cur.epoch != epoch {
            // Live in a new epoch: its offsets start again from the first one.
            self.enter(epoch, 0);
        }
        if offset == 0 || offset > MAX_OFFSET {
            self.error("offset out of range");
            return;
        }
        if let Some((_, Some((e, end)))) = &self.recovering {
            if e == epoch && offset <= *end {
                self.replayed += 1;
            }
        }
        let Some(cur) = self.segments.last_mut() else {
            return;
        };
        let i = offset as usize;
        if cur.got.len() <= i {
            cur.got.resize((i + 1).max(cur.got.len() * 2), 0);
        }
        if cur.got[i] > 0 {
            self.duplicated += 1;
        } else if offset < cur.max_seen {
            self.out_of_order += 1;
        }
        cur.got[i] = cur.got[i].saturating_add(1);
        cur.max_seen = cur.max_seen.max(offset);
        self.check_recovered();
    }

    fn on_ack(&mut self, recovered: Option<bool>, epoch: Option<String>, offset: Option<u64>) {
        let (Some(epoch), Some(offset)) = (epoch, offset) else {
            self.error("acknowledgement without a position (no history on the channel?)");
            return;
        };
        let Some(cur) = self.segments.last() else {
            self.segments.push(Segment::new(epoch, offset));
            return;
        };
        if cur.epoch != epoch {
            // Another epoch: the server replays it from its first offset, `recovered: false`
            // (PROTOCOL.md); whether the change was legitimate is judged at the end, against
            // the Redis restarts.
            if recovered == Some(true) {
                self.error("recovered:true in another epoch");
            }
            self.enter(&epoch, 0);
        } else if self.recovering.is_some() && recovered != Some(true) {
            self.not_recovered += 1;
            self.error("resume answered recovered:false");
        }
        if let Some((_, end)) = &mut self.recovering {
            if end.is_none() {
                *end = Some((epoch, offset));
            }
        }
        self.check_recovered();
    }

    /// (lost, lost with the epoch): what it misses in each epoch it entered. The last
    /// epoch (`epoch`, up to `last`) it must hold whole, from where it entered it; an earlier
    /// one up to the highest offset it received there, and what anyone read above that
    /// (`ends`) went with the Redis that numbered it. A subscriber that never reached the last
    /// epoch lost all of it after `from`.
    fn verdict(
        &self,
        (epoch, from, last): (&str, u64, u64),
        ends: &BTreeMap<&str, u64>,
    ) -> (u64, u64) {
        let (mut lost, mut with_epoch) = (0, 0);
        for seg in &self.segments {
            if seg.epoch == epoch {
                lost += seg.missing(last);
            } else {
                lost += seg.missing(seg.max_seen);
                let end = ends.get(seg.epoch.as_str()).copied().unwrap_or(0);
                with_epoch += end.saturating_sub(seg.max_seen);
            }
        }
        if !self.segments.iter().any(|s| s.epoch == epoch) {
            lost += last.saturating_sub(from);
        }
        (lost, with_epoch)
    }

    fn check_recovered(&mut self) {
        let Some((t, Some((epoch, end)))) = &self.recovering else {
            return;
        };
        let Some(cur) = self.segments.last() else {
            return;
        };
        if cur.epoch != *epoch {
            // The epoch changed during the replay: nothing to time.
            self.interrupted += 1;
            self.recovering = None;
        } else if cur.max_seen >= *end {
            let ns = t.elapsed().as_nanos() as u64;
            self.hist.saturating_record(ns.max(1));
            self.recovering = None;
        }
    }
}

/// How a connection's reading ended.
enum End {
    /// Publishing has started and no drop time is drawn yet: draw one, read on.
    Arm,
    /// Time to drop it.
    Drop,
    /// Closed or broken by the server (or a write failed).
    Lost(String),
    /// The server answered the resume `history unavailable`: no subscription; resume again.
    Retry,
    /// The subscriber holds the last offset: done.
    Done,
    /// The run's deadline passed.
    Deadline,
}

/// Reads `sock` for `sub` until a drop is due (`drop_at`), the server ends it, or done.
async fn read_until(
    sock: &TcpStream,
    buf: &mut Vec<u8>,
    sub: &mut Sub,
    shared: &Shared,
    drop_at: Option<Instant>,
    acked_first: &mut bool,
) -> End {
    let mut chunk = vec![0u8; READ_CHUNK];
    let deadline = shared.deadline();
    loop {
        if let (Some((epoch, last)), Some((at, seen))) = (shared.last.get(), sub.position()) {
            if at == epoch && seen >= *last && sub.recovering.is_none() {
                return End::Done;
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return End::Deadline;
        }
        let drops = shared.publishing.load(Relaxed) && !shared.published.load(Relaxed);
        if drops && drop_at.is_none() {
            return End::Arm;
        }
        if let Some(at) = drop_at.filter(|_| drops) {
            if now >= at {
                return End::Drop;
            }
        }
        let wake = (now + Duration::from_millis(20)).min(deadline);
        let wake = match drop_at.filter(|_| drops) {
            Some(at) => wake.min(at),
            None => wake,
        };
        tokio::select! {
            r = sock.readable() => {
                if let Err(e) = r {
                    return End::Lost(format!("read error: {}", e.kind()));
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => continue,
        }
        match sock.try_read(&mut chunk) {
            Ok(0) => return End::Lost("closed by server".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return End::Lost(format!("read error: {}", e.kind())),
        }
        let mut pongs = Vec::new();
        let mut closed = None;
        let mut unavailable = false;
        frames(buf, &mut |op, p| match classify(op, p) {
            Got::Message { offset, epoch } => sub.on_message(offset, epoch),
            Got::Subscribed {
                recovered,
                epoch,
                offset,
            } => {
                let first = !sub.acked();
                sub.on_ack(recovered, epoch, offset);
                if first && sub.acked() {
                    *acked_first = true;
                }
            }
            Got::Error { unavailable: true } => unavailable = true,
            Got::Error { .. } => sub.error("error message from server"),
            Got::Ping(p) => ws::client_frame(&mut pongs, opcode::PONG, p),
            Got::Close(code) => closed = Some(code),
            Got::Other => {}
        });
        if *acked_first {
            *acked_first = false;
            shared.acked.fetch_add(1, Relaxed);
        }
        if let Some(code) = closed {
            return End::Lost(format!("closed by server ({code})"));
        }
        if unavailable {
            // The resume was not made (Redis away longer than the node waits): try again.
            sub.unavailable += 1;
            return End::Retry;
        }
        if !pongs.is_empty() {
            if let Err(e) = write(sock, &pongs).await {
                return End::Lost(e);
            }
        }
    }
}

/// Closes cleanly: a close frame, then reads (recording what still arrives) until the
/// server's close frame or EOF, for at most CLOSE_WAIT.
async fn close_cleanly(sock: &TcpStream, buf: &mut Vec<u8>, sub: &mut Sub) {
    let mut frame = Vec::new();
    ws::client_frame(&mut frame, opcode::CLOSE, &1000u16.to_be_bytes());
    if write(sock, &frame).await.is_err() {
        return;
    }
    let until = Instant::now() + CLOSE_WAIT;
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            sub.error(format!(
                "no close frame from the server within {} s",
                CLOSE_WAIT.as_secs()
            ));
            return;
        }
        match tokio::time::timeout(left, sock.readable()).await {
            Ok(Ok(())) => {}
            _ => continue,
        }
        match sock.try_read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
        let mut closed = false;
        frames(buf, &mut |op, p| match classify(op, p) {
            Got::Message { offset, epoch } => sub.on_message(offset, epoch),
            Got::Close(_) => closed = true,
            Got::Error { .. } => sub.error("error message from server"),
            _ => {}
        });
        if closed {
            return;
        }
    }
}

/// One subscriber: connects, subscribes, drops and resumes until it holds the last offset or
/// the deadline passes.
async fn subscriber(
    opts: Arc<RecoverOptions>,
    shared: Arc<Shared>,
    gate: Arc<tokio::sync::Semaphore>,
    i: usize,
) -> Sub {
    let mut sub = Sub::new();
    let mut permit = gate.acquire_owned().await.ok();
    let mut rng = Rng(opts.seed ^ (i as u64).wrapping_mul(0xa076_1d64_78bd_642f));
    let mut abrupt_next = rng.next_u64() & 1 == 0;
    let copts = ConnectOpts {
        recv_buffer: 0,
        source: (opts.sources > 1).then(|| (i % opts.sources as usize) as u8),
    };
    let mut drop_at: Option<Instant> = None;
    let mut acked_first = false;
    for attempt in 0..MAX_CONNECTS {
        if Instant::now() >= shared.deadline() {
            break;
        }
        let mut retry = false;
        let node = &opts.nodes[(i + attempt as usize) % opts.nodes.len()];
        let c = match conn::connect(node, copts, CONNECT_TIMEOUT).await {
            Ok(c) => c,
            Err(e) => {
                sub.error(e.kind());
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let sock = c.stream.into_plain();
        let mut buf = c.leftover;
        let frame = subscribe(&opts.channel, sub.since());
        if attempt > 0 && sub.acked() {
            sub.reconnects += 1;
        }
        let written = write(&sock, &frame).await;
        drop(permit.take());
        if let Err(e) = written {
            sub.error(format!("subscribe {e}"));
            continue;
        }
        loop {
            // Drop times are drawn from when publishing starts; none before.
            if drop_at.is_none() && shared.publishing.load(Relaxed) {
                drop_at = Some(Instant::now() + rng.interval(opts.drop_every));
            }
            let end = read_until(
                &sock,
                &mut buf,
                &mut sub,
                &shared,
                drop_at,
                &mut acked_first,
            )
            .await;
            match end {
                End::Arm => continue,
                End::Drop => {
                    drop_at = Some(Instant::now() + rng.interval(opts.drop_every));
                    if abrupt_next {
                        sub.abrupt += 1;
                        reset_on_drop(&sock);
                    } else {
                        sub.clean += 1;
                        close_cleanly(&sock, &mut buf, &mut sub).await;
                    }
                    abrupt_next = !abrupt_next;
                    break;
                }
                End::Lost(why) => {
                    sub.server_closes += 1;
                    sub.error(why);
                    break;
                }
                End::Retry => {
                    retry = true;
                    // Not at once: Redis is away, and the node waits for it anyway.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
                End::Done => return sub,
                End::Deadline => {
                    sub.error("did not hold the last offset by the deadline");
                    return sub;
                }
            }
        }
        drop(sock);
        // A resume refused for Redis being away goes on being the same recovery (timed
        // from the first reconnect); any other recovery still open was cut by this drop.
        let began = match &sub.recovering {
            Some((t, _)) if retry => *t,
            Some(_) => {
                sub.interrupted += 1;
                Instant::now()
            }
            None => Instant::now(),
        };
        sub.recovering = Some((began, None));
    }
    sub
}

/// What the publisher saw.
#[derive(Default)]
struct Pub {
    published: u64,
    /// Refused with an error frame, for any reason.
    refused: u64,
    /// Of them, refused with `history unavailable` (Redis away).
    refused_away: u64,
    /// Published, but neither read back nor refused (in flight to a Redis that died).
    unconfirmed: u64,
    /// Each epoch its publications came back in, in order.
    spans: Vec<EpochSpan>,
    first_offset: u64,
    last_offset: u64,
    epoch: String,
    errors: BTreeMap<String, u64>,
    /// The reader still running: its stop flag, its task (with its errors), the socket.
    reader: Option<PublisherReader>,
}

type PublisherReader = (
    Arc<AtomicBool>,
    tokio::task::JoinHandle<BTreeMap<String, u64>>,
    Arc<TcpStream>,
);

/// The publisher: subscribes, waits for `go`, publishes at the rate for the duration, and reads
/// its channel until it has its last publication back.
async fn publisher(
    opts: Arc<RecoverOptions>,
    shared: Arc<Shared>,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
    go: tokio::sync::oneshot::Receiver<()>,
) -> Pub {
    let mut p = Pub::default();
    let c = match conn::connect(&opts.target, ConnectOpts::default(), CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(format!("the publisher cannot connect: {}", e.kind())));
            return p;
        }
    };
    let sock = Arc::new(c.stream.into_plain());
    if let Err(e) = write(&sock, &subscribe(&opts.channel, None)).await {
        let _ = ready.send(Err(format!("the publisher's subscribe: {e}")));
        return p;
    }
    // Its acknowledgement first: the channel's position before anything is published.
    let mut buf = c.leftover;
    let mut chunk = vec![0u8; READ_CHUNK];
    let t0 = Instant::now();
    let mut ack: Option<(String, u64)> = None;
    while ack.is_none() && t0.elapsed() < opts.live_timeout {
        let mut bad = false;
        frames(&mut buf, &mut |op, pl| {
            if let Got::Subscribed { epoch, offset, .. } = classify(op, pl) {
                match (epoch, offset) {
                    (Some(e), Some(o)) => ack = Some((e, o)),
                    _ => bad = true,
                }
            }
        });
        if bad {
            let _ = ready.send(Err(format!(
                "the acknowledgement of {} carries no position: the channel has no history (on \
                 a --target, give it one; embedded, this is a bug)",
                opts.channel
            )));
            return p;
        }
        if ack.is_some() {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(100), sock.readable()).await {
            Ok(Ok(())) => match sock.try_read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            },
            Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    let Some((epoch, first)) = ack else {
        let _ = ready.send(Err(format!(
            "no acknowledgement of the publisher's subscribe to {} within {:?}",
            opts.channel, opts.live_timeout
        )));
        return p;
    };
    p.epoch = epoch;
    p.first_offset = first;
    let _ = ready.send(Ok(()));
    if go.await.is_err() {
        return p;
    }
    // The reader: the epochs and offsets of its own publications, the highest sequence
    // number, how many came back, and refusals (for overload, or Redis away).
    let spans = Arc::new(Mutex::new(vec![EpochSpan {
        epoch: p.epoch.clone(),
        first: 0,
        last: first,
    }]));
    let max_seq = Arc::new(AtomicU64::new(0));
    let returned = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let refused_away = Arc::new(AtomicU64::new(0));
    let stop_reading = Arc::new(AtomicBool::new(false));
    let reader = {
        let (sock, spans, max_seq, returned, refused, refused_away, stop) = (
            sock.clone(),
            spans.clone(),
            max_seq.clone(),
            returned.clone(),
            refused.clone(),
            refused_away.clone(),
            stop_reading.clone(),
        );
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 64 * 1024];
            let mut errors = BTreeMap::<String, u64>::new();
            while !stop.load(Relaxed) {
                match tokio::time::timeout(Duration::from_millis(50), sock.readable()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => continue,
                }
                match sock.try_read(&mut chunk) {
                    Ok(0) => {
                        *errors
                            .entry("publisher closed by server".into())
                            .or_default() += 1;
                        break;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => break,
                }
                let mut pongs = Vec::new();
                let mut back = false;
                frames(&mut buf, &mut |op, pl| match classify(op, pl) {
                    Got::Message { offset, epoch } => {
                        returned.fetch_add(1, Relaxed);
                        let mut spans = spans.lock().unwrap_or_else(PoisonError::into_inner);
                        match spans.last_mut() {
                            Some(s) if s.epoch == epoch => s.last = s.last.max(offset),
                            _ => {
                                back |= spans.iter().any(|s| s.epoch == epoch);
                                spans.push(EpochSpan {
                                    epoch: epoch.to_owned(),
                                    first: offset,
                                    last: offset,
                                });
                            }
                        }
                        if let Some(s) = spans.last_mut() {
                            if s.first == 0 {
                                s.first = offset;
                            }
                        }
                        if let Some((seq, _)) = ws::scan_message(pl) {
                            max_seq.fetch_max(seq, Relaxed);
                        }
                    }
                    Got::Error { unavailable } => {
                        refused.fetch_add(1, Relaxed);
                        if unavailable {
                            refused_away.fetch_add(1, Relaxed);
                        }
                    }
                    Got::Ping(pl) => ws::client_frame(&mut pongs, opcode::PONG, pl),
                    _ => {}
                });
                if back {
                    *errors
                        .entry("the publisher read an epoch it had left".into())
                        .or_default() += 1;
                }
                if !pongs.is_empty() {
                    let _ = write(&sock, &pongs).await;
                }
            }
            errors
        })
    };
    // Open loop in 1 ms ticks; what the writes cannot keep up with is published late, not
    // skipped (the run checks offsets, not latency).
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut out = Vec::new();
    let origin = Instant::now();
    while start.elapsed() < opts.duration {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * opts.rate) as u64).saturating_sub(p.published);
        out.clear();
        for _ in 0..due.min(10_000) {
            p.published += 1;
            let sent = origin.elapsed().as_nanos() as u64;
            ws::publish_frame(&mut out, &opts.channel, p.published, sent, opts.payload);
        }
        if !out.is_empty() {
            if let Err(e) = write(&sock, &out).await {
                *p.errors.entry(format!("publish {e}")).or_default() += 1;
                break;
            }
        }
    }
    shared.published.store(true, Relaxed);
    // Wait (bounded) for the last publication back, or for every one refused or read.
    let until = Instant::now() + opts.drain + Duration::from_secs(5);
    while Instant::now() < until {
        if max_seq.load(Relaxed) >= p.published
            || max_seq.load(Relaxed) + refused.load(Relaxed) >= p.published
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A refusal may come after the last accepted publication; let the reader settle a moment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    p.spans = spans.lock().unwrap_or_else(PoisonError::into_inner).clone();
    if let Some(s) = p.spans.last() {
        p.epoch.clone_from(&s.epoch);
        p.last_offset = s.last;
    }
    p.refused = refused.load(Relaxed);
    p.refused_away = refused_away.load(Relaxed);
    p.unconfirmed = p
        .published
        .saturating_sub(returned.load(Relaxed) + p.refused);
    if max_seq.load(Relaxed) < p.published && p.refused == 0 {
        *p.errors
            .entry("the publisher did not read back its last publication".into())
            .or_default() += 1;
    }
    let _ = shared.last.set((p.epoch.clone(), p.last_offset));
    // The reader goes on (answering pings) until the subscribers are done; `run` stops it.
    p.reader = Some((stop_reading, reader, sock));
    p
}

/// Runs the scenario.
pub(crate) fn run(
    opts: RecoverOptions,
    server: &crate::scenarios::Server,
) -> Result<RecoverResult, String> {
    let hub0 = server.hub();
    let opts = Arc::new(opts);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads)
        .thread_name("loadgen-recover")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the generator's runtime: {e}"))?;
    let shared = Arc::new(Shared {
        acked: AtomicUsize::new(0),
        publishing: AtomicBool::new(false),
        published: AtomicBool::new(false),
        last: std::sync::OnceLock::new(),
        // Until publishing starts: the time the first subscriptions have.
        deadline: Mutex::new(Instant::now() + opts.live_timeout + Duration::from_secs(10)),
    });
    let n = opts.subscribers;
    // When publishing starts (for the restart, done on this thread: see below).
    let (started_tx, started_rx) = std::sync::mpsc::channel::<Instant>();
    let task = {
        let (opts, shared) = (opts.clone(), shared.clone());
        rt.spawn(async move {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let (go_tx, go_rx) = tokio::sync::oneshot::channel();
            let publisher = tokio::spawn(publisher(opts.clone(), shared.clone(), ready_tx, go_rx));
            match ready_rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("the publisher ended before it was ready".into()),
            }
            // Subscribers, at most 128 opening their first connection at once.
            let gate = Arc::new(tokio::sync::Semaphore::new(128));
            let subs: Vec<_> = (0..n)
                .map(|i| tokio::spawn(subscriber(opts.clone(), shared.clone(), gate.clone(), i)))
                .collect();
            let t1 = Instant::now();
            while shared.acked.load(Relaxed) < n {
                if t1.elapsed() > opts.live_timeout {
                    return Err(format!(
                        "only {} of {n} subscriptions were acknowledged within {:?}",
                        shared.acked.load(Relaxed),
                        opts.live_timeout
                    ));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // A restart adds its pause and the nodes' reconnects (backoff up to 1 s) to the
            // time the subscribers need.
            let restart_slack = opts
                .restart
                .map_or(Duration::ZERO, |r| r.pause + Duration::from_secs(10));
            *shared
                .deadline
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Instant::now()
                + opts.duration
                + opts.drain
                + Duration::from_secs(10)
                + restart_slack;
            shared.publishing.store(true, Relaxed);
            let start = Instant::now();
            let _ = started_tx.send(start);
            let _ = go_tx.send(());
            let mut p = publisher
                .await
                .map_err(|e| format!("the publisher failed: {e}"))?;
            let seconds = start
                .elapsed()
                .as_secs_f64()
                .min(opts.duration.as_secs_f64());
            let mut out = Vec::with_capacity(n);
            for s in subs {
                match s.await {
                    Ok(sub) => out.push(sub),
                    _ => return Err("a subscriber task failed".into()),
                }
            }
            if let Some((stop, reader, _sock)) = p.reader.take() {
                stop.store(true, Relaxed);
                if let Ok(Ok(errors)) = tokio::time::timeout(Duration::from_secs(2), reader).await {
                    for (k, v) in errors {
                        *p.errors.entry(k).or_default() += v;
                    }
                }
            }
            Ok(((p, out), seconds))
        })
    };
    // The restart happens on this thread, the one that started the redis-server: on Linux
    // the server dies with the thread that spawned it, so a runtime thread must not.
    let mut restarts = Vec::new();
    let mut restart_errors = BTreeMap::<String, u64>::new();
    if let Some(plan) = opts.restart {
        // Bounded: the subscriptions' time, then the run's end.
        if let Ok(start) = started_rx.recv_timeout(opts.live_timeout + Duration::from_secs(15)) {
            std::thread::sleep((start + plan.at).saturating_duration_since(Instant::now()));
            let at_seconds = start.elapsed().as_secs_f64();
            match server.restart_redis(plan.pause) {
                Ok(away) => restarts.push(RedisRestart {
                    at_seconds,
                    away_ms: away.as_secs_f64() * 1000.0,
                }),
                Err(e) => *restart_errors.entry(e).or_default() += 1,
            }
        }
    }
    let result = match rt.block_on(task) {
        Ok(r) => r,
        Err(e) => Err(format!("the run failed: {e}")),
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    let ((p, subs), seconds) = result?;
    let restarted = restarts.len() as u64;
    let mut r = RecoverResult {
        subscribers: n,
        channel: opts.channel.clone(),
        rate: opts.rate,
        seconds,
        drop_every_ms: opts.drop_every.as_secs_f64() * 1000.0,
        seed: opts.seed,
        published: p.published,
        publish_refused: p.refused,
        refused_while_away: p.refused_away,
        unconfirmed: p.unconfirmed,
        first_offset: p.first_offset,
        last_offset: p.last_offset,
        epoch: p.epoch.clone(),
        epochs: p.spans.clone(),
        redis_restarts: restarts,
        reconnects: 0,
        abrupt_drops: 0,
        clean_drops: 0,
        server_closes: 0,
        received: 0,
        replayed: 0,
        lost: 0,
        lost_with_epoch: 0,
        duplicated: 0,
        out_of_order: 0,
        not_recovered: 0,
        epoch_changes: 0,
        unexpected_epoch_changes: 0,
        resumes_unavailable: 0,
        complete_subscribers: 0,
        recovery: Latency::default(),
        recovery_histogram: HistogramJson::of(&new_histogram()),
        recoveries_interrupted: 0,
        errors: p.errors.clone(),
        hub: None,
    };
    for (k, v) in restart_errors {
        *r.errors.entry(k).or_default() += v;
    }
    // The highest offset anyone read in each epoch: where an earlier epoch ended.
    let mut epoch_end: BTreeMap<&str, u64> = BTreeMap::new();
    for s in &p.spans {
        let e = epoch_end.entry(s.epoch.as_str()).or_default();
        *e = (*e).max(s.last);
    }
    for sub in &subs {
        for seg in &sub.segments {
            let e = epoch_end.entry(seg.epoch.as_str()).or_default();
            *e = (*e).max(seg.max_seen);
        }
    }
    // Where the last epoch starts for a subscriber that never entered it: after the
    // publisher's acknowledgement in the first epoch, from the first offset in a later one.
    let from = if p.spans.len() > 1 { 0 } else { p.first_offset };
    let mut hist = new_histogram();
    for s in &subs {
        let (missing, with_epoch) = s.verdict((p.epoch.as_str(), from, p.last_offset), &epoch_end);
        r.lost += missing;
        r.lost_with_epoch += with_epoch;
        r.duplicated += s.duplicated;
        r.out_of_order += s.out_of_order;
        if missing == 0 && s.duplicated == 0 && s.out_of_order == 0 {
            r.complete_subscribers += 1;
        }
        // Each restart moves a subscriber to one new epoch, at most.
        let beyond = s.epoch_changes.saturating_sub(restarted);
        r.unexpected_epoch_changes += beyond.max(s.epoch_returns);
        r.resumes_unavailable += s.unavailable;
        r.reconnects += s.reconnects;
        r.abrupt_drops += s.abrupt;
        r.clean_drops += s.clean;
        r.server_closes += s.server_closes;
        r.received += s.received;
        r.replayed += s.replayed;
        r.not_recovered += s.not_recovered;
        r.epoch_changes += s.epoch_changes;
        r.recoveries_interrupted += s.interrupted;
        let _ = hist.add(&s.hist);
        for (k, v) in &s.errors {
            *r.errors.entry(k.clone()).or_default() += v;
        }
    }
    let flags: Vec<(&str, u64)> = if restarted == 0 {
        // Without a restart, Redis (or the one-node hub) never lost a history: an epoch
        // change, a resume refused or a publication gone without a word is a fault.
        vec![
            (
                "epoch changes without a Redis restart",
                r.unexpected_epoch_changes,
            ),
            (
                "resumes answered history unavailable",
                r.resumes_unavailable,
            ),
            ("publications neither read back nor refused", r.unconfirmed),
        ]
    } else {
        vec![(
            "epoch changes beyond one per Redis restart",
            r.unexpected_epoch_changes,
        )]
    };
    for (why, n) in flags {
        if n > 0 {
            *r.errors.entry(why.into()).or_default() += n;
        }
    }
    r.recovery = Latency::of(&hist);
    r.recovery_histogram = HistogramJson::of(&hist);
    r.hub = match (hub0, server.hub()) {
        (Some(a), Some(b)) => Some(b.since(&a)),
        _ => None,
    };
    Ok(r)
}

impl RecoverResult {
    /// The result as text.
    pub(crate) fn text(&self) -> String {
        let l = &self.recovery;
        let c = report::count;
        let mut s = format!(
            "\n== recover: {} subscribers on {}, {} publications/s for {:.1} s, each subscriber \
             dropping every {} on average (alternately abrupt and clean), seed {}\n",
            self.subscribers,
            self.channel,
            report::rate(self.rate),
            self.seconds,
            report::dur(self.drop_every_ms * 1000.0),
            self.seed
        );
        let spans: Vec<String> = self
            .epochs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let first = if i == 0 {
                    self.first_offset + 1
                } else {
                    e.first
                };
                format!("offsets {first}..={} in epoch {}", e.last, e.epoch)
            })
            .collect();
        let spans = if spans.is_empty() {
            format!(
                "offsets {}..={} in epoch {}",
                self.first_offset + 1,
                self.last_offset,
                self.epoch
            )
        } else {
            spans.join(", then ")
        };
        let other_refusals = self.publish_refused - self.refused_while_away;
        s.push_str(&format!(
            "  publications      {} ({spans}){}\n",
            c(self.published),
            if other_refusals > 0 {
                format!(", {} refused", c(other_refusals))
            } else {
                String::new()
            }
        ));
        for r in &self.redis_restarts {
            s.push_str(&format!(
                "  redis restart     killed at {:.2} s, answering again {} later (empty: a new epoch)\n",
                r.at_seconds,
                report::dur(r.away_ms * 1000.0)
            ));
        }
        if !self.redis_restarts.is_empty() || self.refused_while_away + self.unconfirmed > 0 {
            s.push_str(&format!(
                "  refused while away {} publications (history unavailable: never numbered nor delivered); {} neither read back nor refused (in flight to the killed Redis)\n",
                c(self.refused_while_away),
                c(self.unconfirmed)
            ));
        }
        s.push_str(&format!(
            "  reconnects        {} ({} abrupt drops, {} clean drops, {} cut by the server)\n",
            c(self.reconnects),
            c(self.abrupt_drops),
            c(self.clean_drops),
            c(self.server_closes)
        ));
        s.push_str(&format!(
            "  received          {} messages, {} of them replayed on resume\n",
            c(self.received),
            c(self.replayed)
        ));
        s.push_str(&format!(
            "  lost              {}{}\n  duplicated        {}\n  out of order      {}\n",
            c(self.lost),
            if self.lost_with_epoch > 0 {
                format!(
                    " (and {} offsets of an earlier epoch that went with the killed Redis before \
                     the subscriber's node delivered them)",
                    c(self.lost_with_epoch)
                )
            } else {
                String::new()
            },
            c(self.duplicated),
            c(self.out_of_order)
        ));
        s.push_str(&format!(
            "  not recovered     {} resume acknowledgements with recovered:false in the same epoch\n",
            c(self.not_recovered),
        ));
        s.push_str(&format!(
            "  epochs            {} seen by the publisher; {} epoch changes over all subscribers, {} not explained by a Redis restart{}\n",
            self.epochs.len().max(1),
            c(self.epoch_changes),
            c(self.unexpected_epoch_changes),
            if self.resumes_unavailable > 0 {
                format!(
                    "; {} resumes answered history unavailable and made again",
                    c(self.resumes_unavailable)
                )
            } else {
                String::new()
            }
        ));
        s.push_str(&format!(
            "  recovery time     p50 {}  p90 {}  p99 {}  max {}  ({} recoveries timed; {} cut by the next drop or an epoch change)\n",
            report::dur(l.p50_us),
            report::dur(l.p90_us),
            report::dur(l.p99_us),
            report::dur(l.max_us),
            c(l.count),
            c(self.recoveries_interrupted)
        ));
        s.push_str(&format!(
            "  complete          {} of {} subscribers hold every offset they should, once, in order (in each epoch)\n",
            self.complete_subscribers, self.subscribers
        ));
        if self.errors.is_empty() {
            s.push_str("  errors            none\n");
        } else {
            let e: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            s.push_str(&format!("  errors            {}\n", e.join(", ")));
        }
        if let Some(h) = &self.hub {
            s.push_str(&format!(
                "  hub counters      published {}, delivered {}, dropped {}, slow-consumer disconnects {}\n",
                c(h.published),
                c(h.delivered),
                c(h.dropped),
                c(h.slow_consumer_disconnects)
            ));
        }
        s.push_str("  (recovery time: from the old connection's end to holding every offset up to the resume acknowledgement's)\n");
        s
    }

    /// What the run contributes to the verdict: out-of-order arrivals count with duplicates.
    pub(crate) fn tally(&self) -> crate::verdict::StepTally {
        crate::verdict::StepTally {
            label: "recover".into(),
            lost: self.lost,
            duplicated: self.duplicated + self.out_of_order,
            errors: self.errors.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_tail_position() {
        let m = br#"{"type":"message","channel":"c","data":"1:2:x","timestamp":"t","offset":17,"epoch":"a9f3c2"}"#;
        assert_eq!(tail_position(m), Some((17, "a9f3c2")));
        assert_eq!(tail_position(br#"{"type":"message","data":"x"}"#), None);
        assert_eq!(
            tail_position(br#"{"type":"message","offset":,"epoch":"e"}"#),
            None
        );
    }

    #[test]
    fn frames_come_whole_from_any_split() {
        let mut stream = Vec::new();
        for p in [&b"{\"a\":1}"[..], &[b'y'; 300][..], &b"ping"[..]] {
            stream.push(0x81);
            if p.len() < 126 {
                stream.push(p.len() as u8);
            } else {
                stream.push(126);
                stream.extend_from_slice(&(p.len() as u16).to_be_bytes());
            }
            stream.extend_from_slice(p);
        }
        for chunk in [1, 2, 5, 100, stream.len()] {
            let mut buf = Vec::new();
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                buf.extend_from_slice(c);
                frames(&mut buf, &mut |_, p| got.push(p.len()));
            }
            assert_eq!(got, vec![7, 300, 4], "chunk {chunk}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_subscriber_counts_gaps_duplicates_and_disorder() {
        let mut s = Sub::new();
        s.on_ack(None, Some("e".into()), Some(0));
        for o in [1, 2, 2, 4, 3] {
            s.on_message(o, "e");
        }
        assert_eq!((s.duplicated, s.out_of_order), (1, 1));
        assert_eq!(s.since(), Some((4, "e")));
        s.recovering = Some((Instant::now(), None));
        s.on_ack(Some(true), Some("e".into()), Some(6));
        assert!(s.recovering.is_some());
        s.on_message(5, "e");
        s.on_message(6, "e");
        assert!(s.recovering.is_none());
        assert_eq!((s.replayed, s.hist.len()), (2, 1));
        let ends = BTreeMap::from([("e", 8)]);
        // Up to the last offset, 7 and 8 are missing.
        assert_eq!(s.verdict(("e", 0, 8), &ends), (2, 0));
        assert!(s.errors.is_empty(), "{:?}", s.errors);
    }

    /// A Redis restart: the old epoch counts up to what the subscriber got (its tail went
    /// with Redis), the new one from offset 1; a gap inside either is lost.
    #[test]
    fn each_epoch_is_checked_on_its_own() {
        let mut s = Sub::new();
        s.on_ack(None, Some("a".into()), Some(0));
        for o in 1..=5 {
            s.on_message(o, "a");
        }
        // Dropped, resumed in the new epoch: recovered:false, replayed from 1.
        s.recovering = Some((Instant::now(), None));
        s.on_ack(Some(false), Some("b".into()), Some(3));
        assert_eq!((s.epoch_changes, s.not_recovered), (1, 0));
        for o in [1, 2, 3] {
            s.on_message(o, "b");
        }
        assert!(
            s.recovering.is_none(),
            "the replay of the new epoch was timed"
        );
        // Live into a third epoch, missing its offset 2.
        for o in [1, 3, 4] {
            s.on_message(o, "c");
        }
        assert_eq!((s.epoch_changes, s.duplicated, s.out_of_order), (2, 0, 0));
        let ends = BTreeMap::from([("a", 9), ("b", 3), ("c", 4)]);
        // a: 6..=9 went with Redis; c: 2 is lost.
        assert_eq!(s.verdict(("c", 0, 4), &ends), (1, 4));
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        // One that never reached the last epoch lost all of it.
        assert_eq!(s.verdict(("d", 0, 7), &ends).0, 1 + 7);
        // Back to an epoch it had left: flagged.
        s.on_message(6, "a");
        assert_eq!(s.epoch_returns, 1);
        assert!(s.errors.contains_key("back in an epoch it had left"));
    }

    #[test]
    fn drop_intervals_repeat_with_the_seed() {
        let mean = Duration::from_millis(500);
        let a: Vec<_> = (0..5)
            .map({
                let mut r = Rng(7);
                move |_| r.interval(mean)
            })
            .collect();
        let b: Vec<_> = (0..5)
            .map({
                let mut r = Rng(7);
                move |_| r.interval(mean)
            })
            .collect();
        assert_eq!(a, b);
        let mut r = Rng(1);
        let avg = (0..10_000)
            .map(|_| r.interval(mean).as_secs_f64())
            .sum::<f64>()
            / 10_000.0;
        assert!((0.45..0.55).contains(&avg), "{avg}");
    }
}
