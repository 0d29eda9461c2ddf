//! The load generator: connections spread over generator threads, publishers, and the steps of
//! a run (each a measured period with one load), driven from the main thread.
//!
//! Each generator thread runs a single-threaded tokio runtime that owns its share of the
//! connections, so the hot path (read, parse, count) touches no lock and no atomic beyond one
//! counter per read in closed loop. Per connection it keeps a few hundred bytes: the socket, a
//! frame parser holding at most the first bytes of a frame split across reads, the channel, and
//! the next expected sequence number. Reads go into one buffer per thread.
//!
//! Sequence numbers count per channel, and each channel has exactly one publisher (one of its
//! subscribers, as in fanout.c), so every subscriber must see them in order: a gap is a loss, a
//! number seen again a duplicate. A step's messages are those numbered from the step's first
//! publish (`measure_start`) to its last (`measure_end`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{mpsc as tmpsc, Notify, Semaphore};

use crate::conn::{self, ConnectOpts, Target};
use crate::mailbox::{self, Tagged};
use crate::stats::{Counts, NodeCounts};
use crate::sys;
use crate::ws::{self, opcode, FrameParser};

/// Bytes per read. 64 KiB holds several hundred frames; a larger buffer gained nothing.
const READ_BUF: usize = 64 * 1024;
/// Reads per wake-up of one connection before it yields to the others (fairness).
const READS_PER_WAKE: usize = 8;
/// Open loop: most publishes one channel sends per 1 ms tick; the rest count as behind schedule.
const MAX_BATCH: u64 = 4096;
/// Open loop: lateness up to this is put down to the tick, not counted as latency (see
/// `open_loop`); beyond it, a message's latency counts from its scheduled time plus this.
const SCHEDULE_SLACK_NS: u64 = 2_000_000;
/// A write that does not finish in this long is counted as an error.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A closed-loop round not complete after this long is counted as a round timeout.
const ROUND_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections each generator thread opens at once.
const CONNECT_CONCURRENCY: usize = 128;
/// How long a generator thread has to answer a command before the run is stopped. The slowest
/// answer is to EndStep, which waits for the publishers' last write (WRITE_TIMEOUT) and
/// closed-loop round (ROUND_TIMEOUT); Final reads the slow clients for at most 3 s.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long stopping waits for each generator thread to end; one that is stuck is left behind
/// (the process exits soon after) rather than hanging the run.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection does in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Subscribes to its channel, reads everything, is measured.
    Subscriber,
    /// Subscribes when a disturbed step starts and never reads (small receive buffer).
    Slow,
}

/// One connection of the plan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnSpec {
    /// Index into [`Plan::channels`].
    pub(crate) channel: u32,
    /// Its role.
    pub(crate) kind: Kind,
    /// Index into [`Plan::targets`]: the node it connects to.
    pub(crate) node: u8,
}

/// Connections that come and go during a disturbed step (the churn scenario).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Churn {
    /// New connections per second, each subscribing and leaving after `hold`.
    pub(crate) connects_per_s: f64,
    /// How long each churning connection stays.
    pub(crate) hold: Duration,
    /// Connections that toggle subscribe/unsubscribe.
    pub(crate) togglers: usize,
    /// Subscribe plus unsubscribe operations per second over all togglers.
    pub(crate) toggles_per_s: f64,
}

/// Everything a run connects: fixed for its whole life.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Where to connect: one target per node (several nodes share channels through a broker).
    pub(crate) targets: Vec<Target>,
    /// Channel names.
    pub(crate) channels: Vec<String>,
    /// The connections; the first subscriber of each channel is its publisher.
    pub(crate) conns: Vec<ConnSpec>,
    /// Data bytes per publish.
    pub(crate) payload: usize,
    /// Generator threads.
    pub(crate) threads: usize,
    /// CPUs for the generator threads (empty: any).
    pub(crate) cpus: Vec<usize>,
    /// How long subscriptions may take to prove live.
    pub(crate) live_timeout: Duration,
    /// SO_RCVBUF of slow connections.
    pub(crate) slow_recv_buffer: u32,
    /// Churn during disturbed steps.
    pub(crate) churn: Option<Churn>,
    /// Loopback source addresses to spread connections over (1 = 127.0.0.1 only).
    pub(crate) sources: u8,
}

/// How a step publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Load {
    /// Each channel's publisher sends `window` messages, then waits until every subscriber of the
    /// channel has them all (fanout.c's rounds).
    Closed {
        /// Messages in flight per channel.
        window: u32,
    },
    /// Publishes at a fixed total rate (per second) spread evenly over the channels, in 1 ms
    /// ticks; each message carries its scheduled send time (less up to 2 ms of tick lateness),
    /// so a generator or server that falls behind shows as latency rather than hiding it (no
    /// coordinated omission).
    Open {
        /// Publishes per second over all channels.
        rate: f64,
    },
    /// Nothing is published: connections are only held.
    Idle,
}

/// One measured period.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    /// Name in the report.
    pub(crate) label: String,
    /// The load.
    pub(crate) load: Load,
    /// How long it is measured.
    pub(crate) duration: Duration,
    /// Slow clients subscribe / churn runs during this step.
    pub(crate) disturb: bool,
}

const PH_CONNECT: u8 = 0;
const PH_WARMUP: u8 = 1;
const PH_RUN: u8 = 2;

/// Per-channel state shared between threads.
#[derive(Debug)]
struct Chan {
    /// Next sequence number to publish (written by the channel's publisher only).
    next_seq: AtomicU64,
    /// First sequence number of the current step (u64::MAX before the first step).
    measure_start: AtomicU64,
    /// First sequence number of the current closed-loop round.
    round_start: AtomicU64,
    /// Deliveries of the current round.
    got: AtomicU64,
    /// Measured subscribers that have received at least one message.
    live: AtomicU64,
    /// Measured subscribers still connected.
    subs: AtomicU64,
    /// Wakes the channel's round task.
    notify: Notify,
}

#[derive(Debug)]
struct Shared {
    epoch: Instant,
    phase: AtomicU8,
    /// Closed-loop window of the current step (0: not closed loop). Set by the main thread
    /// before any thread starts the step, so no receiver misses a round's first deliveries.
    window: AtomicU64,
    /// The current step is closed loop (receivers count each round's deliveries).
    closed_loop: AtomicBool,
    chans: Vec<Chan>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Commands from the main thread to a generator thread.
#[derive(Debug)]
enum Cmd {
    Warmup,
    StartStep(Load, bool),
    EndStep,
    Collect,
    Pending,
    Final(bool),
    Stop,
}

/// Replies from generator threads.
#[derive(Debug)]
enum Reply {
    Connected {
        failed: BTreeMap<String, u64>,
    },
    Ack,
    Counts {
        counts: Box<Counts>,
        cpu: Duration,
        open: u64,
    },
    Pending(u64),
    Final {
        counts: Box<Counts>,
        slow: SlowSeen,
        churn: ChurnCounts,
    },
}

/// What the slow connections saw, read once at the end of a disturbed step.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct SlowSeen {
    /// Slow connections.
    pub(crate) clients: u64,
    /// Of them, closed by the server (a close frame, end of stream or reset).
    pub(crate) closed_by_server: u64,
    /// Close codes the server sent them.
    pub(crate) close_codes: BTreeMap<String, u64>,
    /// Messages of the step they had received (what sat in their socket buffers).
    pub(crate) received: u64,
}

/// What churn did during a step.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct ChurnCounts {
    /// Connections opened.
    pub(crate) connects: u64,
    /// Connections that failed to open.
    pub(crate) connect_failures: u64,
    /// Connections closed after their hold time.
    pub(crate) disconnects: u64,
    /// Subscribe frames sent by togglers.
    pub(crate) subscribes: u64,
    /// Unsubscribe frames sent by togglers.
    pub(crate) unsubscribes: u64,
}

/// What the subscribers of one node measured in a step (several nodes only).
#[derive(Debug)]
pub(crate) struct NodeOutcome {
    /// Measured subscribers on the node.
    pub(crate) subscribers: u64,
    /// Their deliveries, losses and latencies.
    pub(crate) counts: NodeCounts,
    /// Their deliveries if nothing were lost.
    pub(crate) expected: u64,
}

/// What a step measured, summed over threads.
#[derive(Debug)]
pub(crate) struct StepOutcome {
    /// Counters and the whole latency histogram.
    pub(crate) counts: Counts,
    /// Per interval: seconds since the step began, and what it counted.
    pub(crate) intervals: Vec<(f64, Counts)>,
    /// Publishes of the step.
    pub(crate) published: u64,
    /// Deliveries expected if nothing was lost (publishes x measured subscribers, per channel).
    pub(crate) expected: u64,
    /// Measured seconds.
    pub(crate) seconds: f64,
    /// Generator CPU (its threads and the main thread) during the step.
    pub(crate) generator_cpu: Duration,
    /// Whole process CPU during the step.
    pub(crate) process_cpu: Duration,
    /// Connections open at the end.
    pub(crate) connections: u64,
    /// Slow connections, in a disturbed step.
    pub(crate) slow: SlowSeen,
    /// Churn, in a disturbed step.
    pub(crate) churn: ChurnCounts,
    /// Per node, with several nodes (empty with one).
    pub(crate) nodes: Vec<NodeOutcome>,
}

/// Called after every interval with (seconds into the step, the interval's counts).
pub(crate) type OnInterval<'a> = &'a mut dyn FnMut(f64, &Counts);

struct Worker {
    tx: tmpsc::UnboundedSender<Tagged<Cmd>>,
    rx: mpsc::Receiver<Tagged<Reply>>,
    join: Option<std::thread::JoinHandle<()>>,
}

/// A running load generator with its connections open and subscribed.
pub(crate) struct Engine {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    /// Measured subscribers per channel.
    subscribers: Vec<u64>,
    /// Measured subscribers per channel and node (several nodes only).
    node_subscribers: Vec<Vec<u64>>,
    /// The number of the last command sent (see `mailbox`).
    seq: u64,
    /// Seconds it took to open every connection.
    pub(crate) connect_seconds: f64,
    /// Seconds until every subscription was live.
    pub(crate) live_seconds: f64,
}

impl Engine {
    /// Starts the threads, opens and subscribes every connection and proves each measured
    /// subscription live with a first delivery.
    pub(crate) fn start(plan: Plan) -> Result<Engine, String> {
        let chans = (0..plan.channels.len())
            .map(|_| Chan {
                next_seq: AtomicU64::new(1),
                measure_start: AtomicU64::new(u64::MAX),
                round_start: AtomicU64::new(u64::MAX),
                got: AtomicU64::new(0),
                live: AtomicU64::new(0),
                subs: AtomicU64::new(0),
                notify: Notify::new(),
            })
            .collect::<Vec<_>>();
        for c in &plan.conns {
            if c.kind == Kind::Subscriber {
                chans[c.channel as usize].subs.fetch_add(1, Relaxed);
            }
        }
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            phase: AtomicU8::new(PH_CONNECT),
            window: AtomicU64::new(0),
            closed_loop: AtomicBool::new(false),
            chans,
        });
        let plan = Arc::new(plan);
        let t0 = Instant::now();
        let mut workers = Vec::new();
        for t in 0..plan.threads {
            let (tx, crx) = tmpsc::unbounded_channel();
            let (rtx, rx) = mpsc::channel();
            let (p, s) = (plan.clone(), shared.clone());
            let join = std::thread::Builder::new()
                .name(format!("loadgen-{t}"))
                .spawn(move || thread_main(t, p, s, crx, rtx))
                .map_err(|e| format!("cannot start a generator thread: {e}"))?;
            workers.push(Worker {
                tx,
                rx,
                join: Some(join),
            });
        }
        let mut subscribers = vec![0u64; plan.channels.len()];
        let nodes = if plan.targets.len() > 1 {
            plan.targets.len()
        } else {
            0
        };
        let mut node_subscribers = vec![vec![0u64; nodes]; plan.channels.len()];
        for c in plan.conns.iter().filter(|c| c.kind == Kind::Subscriber) {
            subscribers[c.channel as usize] += 1;
            if let Some(n) = node_subscribers[c.channel as usize].get_mut(c.node as usize) {
                *n += 1;
            }
        }
        let mut engine = Engine {
            plan,
            shared,
            workers,
            subscribers,
            node_subscribers,
            seq: 0,
            connect_seconds: 0.0,
            live_seconds: 0.0,
        };
        let mut failed: BTreeMap<String, u64> = BTreeMap::new();
        for w in &engine.workers {
            match w.rx.recv() {
                Ok(Tagged {
                    msg: Reply::Connected { failed: f },
                    ..
                }) => {
                    for (k, v) in f {
                        *failed.entry(k).or_default() += v;
                    }
                }
                _ => return Err("a generator thread died while connecting".into()),
            }
        }
        engine.connect_seconds = t0.elapsed().as_secs_f64();
        if !failed.is_empty() {
            let n: u64 = failed.values().sum();
            let kinds: Vec<String> = failed.iter().map(|(k, v)| format!("{v} {k}")).collect();
            return Err(format!(
                "{n} of {} connections failed to open: {}",
                engine.plan.conns.len(),
                kinds.join(", ")
            ));
        }
        // Prove every subscription live.
        let t1 = Instant::now();
        engine.shared.phase.store(PH_WARMUP, Relaxed);
        engine.broadcast(|| Cmd::Warmup);
        let want: u64 = engine
            .shared
            .chans
            .iter()
            .map(|c| c.subs.load(Relaxed))
            .sum();
        loop {
            let live: u64 = engine
                .shared
                .chans
                .iter()
                .map(|c| c.live.load(Relaxed).min(c.subs.load(Relaxed)))
                .sum();
            if live >= want {
                break;
            }
            if t1.elapsed() > engine.plan.live_timeout {
                return Err(format!(
                    "only {live} of {want} subscriptions became live within {:?} (is publishing allowed on the server?)",
                    engine.plan.live_timeout
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        engine.live_seconds = t1.elapsed().as_secs_f64();
        engine.shared.phase.store(PH_RUN, Relaxed);
        // Let the last warm-up messages arrive before anything is measured.
        std::thread::sleep(Duration::from_millis(200));
        engine.ask_all(|| Cmd::Collect)?;
        Ok(engine)
    }

    /// Sends `cmd` to every thread under a new number, and returns the number.
    fn broadcast(&mut self, cmd: impl Fn() -> Cmd) -> u64 {
        self.seq += 1;
        for w in &self.workers {
            let _ = w.tx.send(Tagged {
                seq: self.seq,
                msg: cmd(),
            });
        }
        self.seq
    }

    /// Sends `cmd` to every thread and returns each one's answer to it; fails (and the run
    /// must stop) if a thread does not answer within REPLY_TIMEOUT or has died.
    fn ask_all(&mut self, cmd: impl Fn() -> Cmd) -> Result<Vec<Reply>, String> {
        let seq = self.broadcast(cmd);
        mailbox::gather(
            self.workers.iter().map(|w| &w.rx),
            seq,
            Instant::now() + REPLY_TIMEOUT,
        )
    }

    fn collect(&mut self) -> Result<(Counts, Duration, u64), String> {
        let mut total = Counts::default();
        let mut cpu = Duration::ZERO;
        let mut open = 0;
        for r in self.ask_all(|| Cmd::Collect)? {
            if let Reply::Counts {
                counts,
                cpu: c,
                open: o,
            } = r
            {
                total.merge(&counts);
                cpu += c;
                open += o;
            }
        }
        Ok((total, cpu, open))
    }

    /// Runs one step: publishes with its load for its duration, then waits (up to
    /// `drain_timeout`) for what is in flight, and counts what never arrived as lost. Fails
    /// when a generator thread stops answering (see `ask_all`).
    pub(crate) fn run_step(
        &mut self,
        step: &Step,
        interval: Duration,
        drain_timeout: Duration,
        on_interval: OnInterval<'_>,
    ) -> Result<StepOutcome, String> {
        let main_cpu0 = sys::thread_cpu();
        let proc_cpu0 = sys::process_cpu();
        let (_, cpu0, _) = self.collect()?;
        let starts: Vec<u64> = self
            .shared
            .chans
            .iter()
            .map(|c| c.next_seq.load(Relaxed))
            .collect();
        let window = match step.load {
            Load::Closed { window } => u64::from(window),
            _ => 0,
        };
        self.shared.window.store(window, Relaxed);
        self.shared.closed_loop.store(window > 0, Relaxed);
        self.ask_all(|| Cmd::StartStep(step.load, step.disturb))?;
        let t0 = Instant::now();
        let mut intervals = Vec::new();
        let mut next = interval;
        while next <= step.duration + Duration::from_millis(1) {
            if let Some(wait) = next.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
            let (c, _, _) = self.collect()?;
            let at = t0.elapsed().as_secs_f64();
            on_interval(at, &c);
            intervals.push((at, c));
            next += interval;
        }
        if let Some(wait) = step.duration.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        self.ask_all(|| Cmd::EndStep)?;
        self.shared.closed_loop.store(false, Relaxed);
        let seconds = t0.elapsed().as_secs_f64();
        // Drain: wait until every measured subscriber has everything, or the timeout.
        let td = Instant::now();
        while td.elapsed() < drain_timeout {
            let pending: u64 = self
                .ask_all(|| Cmd::Pending)?
                .iter()
                .map(|r| if let Reply::Pending(n) = r { *n } else { 0 })
                .sum();
            if pending == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (mut counts, cpu1, open) = self.collect()?;
        for (_, c) in &intervals {
            counts.merge(c);
        }
        let mut slow = SlowSeen::default();
        let mut churn = ChurnCounts::default();
        for r in self.ask_all(|| Cmd::Final(step.disturb))? {
            if let Reply::Final {
                counts: c,
                slow: s,
                churn: ch,
            } = r
            {
                counts.merge(&c);
                slow.clients += s.clients;
                slow.closed_by_server += s.closed_by_server;
                slow.received += s.received;
                for (k, v) in s.close_codes {
                    *slow.close_codes.entry(k).or_default() += v;
                }
                churn.connects += ch.connects;
                churn.connect_failures += ch.connect_failures;
                churn.disconnects += ch.disconnects;
                churn.subscribes += ch.subscribes;
                churn.unsubscribes += ch.unsubscribes;
            }
        }
        let mut published = 0;
        let mut expected = 0;
        let mut nodes: Vec<NodeOutcome> = (0..self.node_subscribers.first().map_or(0, Vec::len))
            .map(|n| NodeOutcome {
                subscribers: self.node_subscribers.iter().map(|v| v[n]).sum(),
                counts: counts.nodes.get(n).cloned().unwrap_or_default(),
                expected: 0,
            })
            .collect();
        for (i, c) in self.shared.chans.iter().enumerate() {
            let ms = c.measure_start.load(Relaxed);
            let me = c.next_seq.load(Relaxed);
            let n = if ms == u64::MAX || ms < starts[i] {
                0
            } else {
                me - ms
            };
            published += n;
            expected += n * self.subscribers[i];
            for (node, subs) in nodes.iter_mut().zip(&self.node_subscribers[i]) {
                node.expected += n * subs;
            }
        }
        let generator_cpu = cpu1.saturating_sub(cpu0) + sys::thread_cpu().saturating_sub(main_cpu0);
        Ok(StepOutcome {
            counts,
            intervals,
            published,
            expected,
            seconds,
            generator_cpu,
            process_cpu: sys::process_cpu().saturating_sub(proc_cpu0),
            connections: open,
            slow,
            churn,
            nodes,
        })
    }

    /// Closes every connection and stops the threads.
    pub(crate) fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.broadcast(|| Cmd::Stop);
        // Bounded: a thread stuck in a command (the reason the run may be stopping) never
        // reads Stop, and joining it would hang the process instead of reporting.
        let deadline = Instant::now() + STOP_TIMEOUT;
        for w in &mut self.workers {
            if let Some(j) = w.join.take() {
                while !j.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if j.is_finished() {
                    let _ = j.join();
                }
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Locks a mutex, whatever a panicking holder left in it (counters stay usable).
trait Lk<T> {
    fn lk(&self) -> MutexGuard<'_, T>;
}

impl<T> Lk<T> for Mutex<T> {
    fn lk(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection as its generator thread keeps it.
#[derive(Debug)]
struct LConn {
    parser: FrameParser,
    ch: u32,
    kind: Kind,
    /// The node it is connected to.
    node: u8,
    /// Next sequence number expected (0: none seen in the current step yet).
    next: u64,
    live: bool,
    open: bool,
    close_code: Option<u16>,
    /// Where the numbers started in this connection's last message (see `scan_message_at`).
    hint: u16,
}

/// Everything a generator thread's tasks share.
struct Local {
    buf: Vec<u8>,
    conns: Vec<LConn>,
    counts: Counts,
}

struct Ctx {
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    local: Mutex<Local>,
    socks: Mutex<Vec<Option<Arc<TcpStream>>>>,
    /// Set when the current step ends: publishers stop after their current write.
    stop: AtomicBool,
    churn: Mutex<ChurnCounts>,
    churn_stop: AtomicBool,
}

fn thread_main(
    t: usize,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    mut cmds: tmpsc::UnboundedReceiver<Tagged<Cmd>>,
    replies: mpsc::Sender<Tagged<Reply>>,
) {
    if let Err(e) = sys::pin_current_thread(&plan.cpus) {
        eprintln!("warning: cannot pin generator thread {t}: {e}");
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start a generator runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let mine: Vec<usize> = (0..plan.conns.len())
            .filter(|g| g % plan.threads == t)
            .collect();
        let ctx = Arc::new(Ctx {
            shared: shared.clone(),
            plan: plan.clone(),
            local: Mutex::new(Local {
                buf: vec![0; READ_BUF],
                conns: mine
                    .iter()
                    .map(|&g| LConn {
                        parser: FrameParser::default(),
                        ch: plan.conns[g].channel,
                        kind: plan.conns[g].kind,
                        node: plan.conns[g].node,
                        next: 0,
                        live: false,
                        open: false,
                        close_code: None,
                        hint: 0,
                    })
                    .collect(),
                counts: Counts::for_nodes(plan.targets.len()),
            }),
            socks: Mutex::new(vec![None; mine.len()]),
            stop: AtomicBool::new(false),
            churn: Mutex::new(ChurnCounts::default()),
            churn_stop: AtomicBool::new(true),
        });
        // The channels this thread publishes: those whose first subscriber is here.
        let mut publishes: Vec<(u32, usize)> = Vec::new();
        {
            let mut seen = vec![false; plan.channels.len()];
            for (g, c) in plan.conns.iter().enumerate() {
                if c.kind == Kind::Subscriber && !seen[c.channel as usize] {
                    seen[c.channel as usize] = true;
                    if g % plan.threads == t {
                        publishes.push((c.channel, g / plan.threads));
                    }
                }
            }
        }
        let failed = connect_all(&ctx, &mine).await;
        let _ = replies.send(Tagged {
            seq: 0,
            msg: Reply::Connected { failed },
        });
        let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        while let Some(Tagged { seq, msg: cmd }) = cmds.recv().await {
            // Every answer carries the number of the command it answers.
            let reply = |msg: Reply| {
                let _ = replies.send(Tagged { seq, msg });
            };
            match cmd {
                Cmd::Warmup => {
                    tokio::spawn(warmup(ctx.clone(), publishes.clone()));
                }
                Cmd::StartStep(load, disturb) => {
                    ctx.stop.store(false, Relaxed);
                    for &(ch, _) in &publishes {
                        let c = &ctx.shared.chans[ch as usize];
                        c.measure_start.store(c.next_seq.load(Relaxed), Relaxed);
                    }
                    match load {
                        Load::Closed { window } => {
                            for &(ch, li) in &publishes {
                                tasks.push(tokio::spawn(rounds(ctx.clone(), ch, li, window)));
                            }
                        }
                        Load::Open { rate } => {
                            if !publishes.is_empty() {
                                let per_channel = rate / plan.channels.len() as f64;
                                tasks.push(tokio::spawn(open_loop(
                                    ctx.clone(),
                                    publishes.clone(),
                                    per_channel,
                                )));
                            }
                        }
                        Load::Idle => {}
                    }
                    if disturb {
                        subscribe_slow(&ctx).await;
                        if let (Some(churn), 0) = (plan.churn, t) {
                            ctx.churn_stop.store(false, Relaxed);
                            *ctx.churn.lk() = ChurnCounts::default();
                            tasks.push(tokio::spawn(churn_task(ctx.clone(), churn)));
                        }
                    }
                    reply(Reply::Ack);
                }
                Cmd::EndStep => {
                    ctx.stop.store(true, Relaxed);
                    ctx.churn_stop.store(true, Relaxed);
                    for &(ch, _) in &publishes {
                        ctx.shared.chans[ch as usize].notify.notify_one();
                    }
                    for task in tasks.drain(..) {
                        let _ = task.await;
                    }
                    reply(Reply::Ack);
                }
                Cmd::Collect => {
                    let counts = Box::new(ctx.local.lk().counts.take());
                    let open = ctx
                        .local
                        .lk()
                        .conns
                        .iter()
                        .filter(|c| c.open && c.kind == Kind::Subscriber)
                        .count() as u64;
                    reply(Reply::Counts {
                        counts,
                        cpu: sys::thread_cpu(),
                        open,
                    });
                }
                Cmd::Pending => {
                    let l = ctx.local.lk();
                    let mut n = 0;
                    for c in l
                        .conns
                        .iter()
                        .filter(|c| c.open && c.kind == Kind::Subscriber)
                    {
                        let ch = &ctx.shared.chans[c.ch as usize];
                        let (ms, end) = (ch.measure_start.load(Relaxed), ch.next_seq.load(Relaxed));
                        if ms != u64::MAX {
                            n += end.saturating_sub(c.next.max(ms));
                        }
                    }
                    reply(Reply::Pending(n));
                }
                Cmd::Final(disturb) => {
                    let slow = if disturb {
                        read_slow(&ctx).await
                    } else {
                        SlowSeen::default()
                    };
                    let mut l = ctx.local.lk();
                    let l = &mut *l;
                    for c in l.conns.iter_mut().filter(|c| c.kind == Kind::Subscriber) {
                        let ch = &ctx.shared.chans[c.ch as usize];
                        let (ms, end) = (ch.measure_start.load(Relaxed), ch.next_seq.load(Relaxed));
                        if ms != u64::MAX {
                            let from = c.next.max(ms);
                            l.counts.lost += end.saturating_sub(from);
                            if let Some(n) = l.counts.nodes.get_mut(c.node as usize) {
                                n.lost += end.saturating_sub(from);
                            }
                            c.next = from.max(end);
                        }
                    }
                    let counts = Box::new(l.counts.take());
                    let churn = std::mem::take(&mut *ctx.churn.lk());
                    reply(Reply::Final {
                        counts,
                        slow,
                        churn,
                    });
                }
                Cmd::Stop => break,
            }
        }
    });
}

async fn connect_all(ctx: &Arc<Ctx>, mine: &[usize]) -> BTreeMap<String, u64> {
    let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let failed: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut handles = Vec::new();
    for (li, &g) in mine.iter().enumerate() {
        let (ctx, sem, failed) = (ctx.clone(), sem.clone(), failed.clone());
        handles.push(tokio::spawn(async move {
            let Ok(_permit) = sem.acquire().await else {
                return;
            };
            let spec = ctx.plan.conns[g];
            let opts = ConnectOpts {
                recv_buffer: if spec.kind == Kind::Slow {
                    ctx.plan.slow_recv_buffer
                } else {
                    0
                },
                source: (ctx.plan.sources > 1).then(|| (g % ctx.plan.sources as usize) as u8),
            };
            let target = &ctx.plan.targets[usize::from(spec.node) % ctx.plan.targets.len()];
            match conn::connect(target, opts, Duration::from_secs(10)).await {
                Ok(c) => {
                    let sock = Arc::new(c.stream);
                    if spec.kind == Kind::Subscriber {
                        let mut frame = Vec::new();
                        ws::subscribe_frame(
                            &mut frame,
                            &ctx.plan.channels[spec.channel as usize],
                            true,
                        );
                        if let Err(e) =
                            tokio::time::timeout(WRITE_TIMEOUT, conn::write_all(&sock, &frame))
                                .await
                                .unwrap_or(Err(std::io::ErrorKind::TimedOut.into()))
                        {
                            *failed
                                .lk()
                                .entry(format!("subscribe write: {e}"))
                                .or_default() += 1;
                            return;
                        }
                    }
                    ctx.local.lk().conns[li].open = true;
                    ctx.socks.lk()[li] = Some(sock.clone());
                    if spec.kind == Kind::Subscriber {
                        if !c.leftover.is_empty() {
                            let mut l = ctx.local.lk();
                            let n = c.leftover.len().min(READ_BUF);
                            l.buf[..n].copy_from_slice(&c.leftover[..n]);
                            let mut pongs = Vec::new();
                            process(&ctx, &mut l, li, n, &mut pongs);
                        }
                        tokio::spawn(reader(ctx.clone(), li, sock));
                    }
                }
                Err(e) => *failed.lk().entry(e.kind().to_string()).or_default() += 1,
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    Arc::try_unwrap(failed)
        .map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner))
        .unwrap_or_default()
}

/// Reads one measured connection until it closes.
async fn reader(ctx: Arc<Ctx>, li: usize, sock: Arc<TcpStream>) {
    let mut pongs = Vec::new();
    let why: String = 'outer: loop {
        if let Err(e) = sock.readable().await {
            break format!("read error: {e}");
        }
        let mut drained = false;
        for _ in 0..READS_PER_WAKE {
            let mut l = ctx.local.lk();
            let l = &mut *l;
            let cap = l.buf.len();
            // A read shorter than the buffer emptied the socket: the closure then reports
            // WouldBlock so that tokio clears the readiness, and the next wake-up is a new event
            // rather than one more read that finds nothing (fanout.c saves the same syscall).
            // Tokio clears only if no new event arrived meanwhile, so nothing is missed.
            let r = sock.try_io(Interest::READABLE, || {
                // SAFETY: reads into the thread's buffer, which we hold mutably, at most its length.
                let n = unsafe {
                    libc::read(
                        std::os::fd::AsRawFd::as_raw_fd(&*sock),
                        l.buf.as_mut_ptr().cast(),
                        cap,
                    )
                };
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = n as usize;
                if n > 0 && n < cap {
                    process(&ctx, l, li, n, &mut pongs);
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match r {
                Ok(0) => break 'outer "closed by server".to_string(),
                Ok(n) => process(&ctx, l, li, n, &mut pongs),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => drained = true,
                Err(e) => break 'outer format!("read error: {}", e.kind()),
            }
            if drained || !pongs.is_empty() {
                break;
            }
        }
        if !pongs.is_empty() {
            let out = std::mem::take(&mut pongs);
            if tokio::time::timeout(WRITE_TIMEOUT, conn::write_all(&sock, &out))
                .await
                .is_err()
            {
                break "pong write timeout".to_string();
            }
        } else if !drained {
            // READS_PER_WAKE full buffers: let the other connections have a turn.
            tokio::task::yield_now().await;
        }
    };
    let mut l = ctx.local.lk();
    let code = l.conns[li].close_code;
    let kind = match code {
        Some(c) => format!("closed by server ({c})"),
        None => why,
    };
    l.counts.error(kind);
    l.conns[li].open = false;
    ctx.socks.lk()[li] = None;
    if l.conns[li].kind == Kind::Subscriber {
        let ch = &ctx.shared.chans[l.conns[li].ch as usize];
        ch.subs.fetch_sub(1, Relaxed);
        ch.notify.notify_one();
    }
}

/// Parses `n` bytes just read into the thread buffer for connection `li`, and counts.
#[inline]
fn process(ctx: &Ctx, l: &mut Local, li: usize, n: usize, pongs: &mut Vec<u8>) {
    let now = ctx.shared.now_ns();
    let Local { buf, conns, counts } = l;
    counts.bytes_in += n as u64;
    let c = &mut conns[li];
    let node = usize::from(c.node);
    let ch = &ctx.shared.chans[c.ch as usize];
    let closed_loop = ctx.shared.closed_loop.load(Relaxed);
    let mut in_round = 0u64;
    let mut became_live = false;
    let next = &mut c.next;
    let live = &mut c.live;
    let close_code = &mut c.close_code;
    let hint = &mut c.hint;
    c.parser.feed(&buf[..n], &mut |f| match f.op {
        opcode::TEXT | opcode::BINARY => {
            let Some((seq, sent)) = ws::scan_message_at(f.head, hint) else {
                if f.head.starts_with(b"{\"type\":\"error\"") {
                    counts.error("error message from server");
                } else if f.head.starts_with(ws::MESSAGE_PREFIX) {
                    counts.other += 1;
                }
                return;
            };
            if !*live {
                *live = true;
                became_live = true;
            }
            let ms = ch.measure_start.load(Relaxed);
            if seq < ms {
                return;
            }
            if *next < ms {
                *next = ms;
            }
            let latency = now.saturating_sub(sent).max(1);
            if seq >= *next {
                let gap = seq - *next;
                counts.lost += gap;
                *next = seq + 1;
                counts.delivered += 1;
                counts.hist.saturating_record(latency);
                if let Some(nc) = counts.nodes.get_mut(node) {
                    nc.lost += gap;
                    nc.delivered += 1;
                    nc.hist.saturating_record(latency);
                }
                if closed_loop && seq >= ch.round_start.load(Relaxed) {
                    in_round += 1;
                }
            } else {
                counts.duplicated += 1;
                if let Some(nc) = counts.nodes.get_mut(node) {
                    nc.duplicated += 1;
                }
            }
        }
        opcode::PING => ws::client_frame(pongs, opcode::PONG, f.head),
        opcode::CLOSE => *close_code = Some(ws::close_code(f.head).unwrap_or(1005)),
        _ => {}
    });
    if became_live {
        ch.live.fetch_add(1, Relaxed);
    }
    if in_round > 0 {
        let prev = ch.got.fetch_add(in_round, Relaxed);
        let target = ctx.shared.window.load(Relaxed) * ch.subs.load(Relaxed);
        if prev + in_round >= target {
            ch.notify.notify_one();
        }
    }
}

fn sock(ctx: &Ctx, li: usize) -> Option<Arc<TcpStream>> {
    ctx.socks.lk()[li].clone()
}

async fn timed_write(sock: &TcpStream, buf: &[u8]) -> Result<(), &'static str> {
    match tokio::time::timeout(WRITE_TIMEOUT, conn::write_all(sock, buf)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("publish write error"),
        Err(_) => Err("publish write timeout"),
    }
}

/// Publishes one message every 50 ms on each channel not yet live everywhere, until the first
/// step begins.
async fn warmup(ctx: Arc<Ctx>, publishes: Vec<(u32, usize)>) {
    let mut frame = Vec::new();
    // Bounded by the live timeout of the plan.
    let deadline = Instant::now() + ctx.plan.live_timeout + Duration::from_secs(1);
    while ctx.shared.phase.load(Relaxed) == PH_WARMUP && Instant::now() < deadline {
        for &(ch, li) in &publishes {
            let c = &ctx.shared.chans[ch as usize];
            if c.live.load(Relaxed) >= c.subs.load(Relaxed) {
                continue;
            }
            let Some(s) = sock(&ctx, li) else { continue };
            frame.clear();
            let seq = c.next_seq.fetch_add(1, Relaxed);
            ws::publish_frame(
                &mut frame,
                &ctx.plan.channels[ch as usize],
                seq,
                ctx.shared.now_ns(),
                ctx.plan.payload,
            );
            if let Err(e) = timed_write(&s, &frame).await {
                ctx.local.lk().counts.error(e);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Closed loop on one channel: `window` publishes in one write, then wait for every subscriber.
async fn rounds(ctx: Arc<Ctx>, ch: u32, li: usize, window: u32) {
    let c = &ctx.shared.chans[ch as usize];
    let name = &ctx.plan.channels[ch as usize];
    let mut batch = Vec::new();
    while !ctx.stop.load(Relaxed) {
        let Some(s) = sock(&ctx, li) else { return };
        let s0 = c.next_seq.load(Relaxed);
        c.got.store(0, Relaxed);
        c.round_start.store(s0, Relaxed);
        batch.clear();
        let now = ctx.shared.now_ns();
        for k in 0..u64::from(window) {
            ws::publish_frame(&mut batch, name, s0 + k, now, ctx.plan.payload);
        }
        c.next_seq.store(s0 + u64::from(window), Relaxed);
        if let Err(e) = timed_write(&s, &batch).await {
            ctx.local.lk().counts.error(e);
            return;
        }
        let deadline = tokio::time::Instant::now() + ROUND_TIMEOUT;
        loop {
            if ctx.stop.load(Relaxed)
                || c.got.load(Relaxed) >= u64::from(window) * c.subs.load(Relaxed)
            {
                break;
            }
            if tokio::time::timeout_at(deadline, c.notify.notified())
                .await
                .is_err()
            {
                ctx.local.lk().counts.error("round timeout");
                break;
            }
        }
        ctx.local.lk().counts.rounds += 1;
    }
}

/// Open loop over this thread's channels, each at `per_channel` publishes per second.
async fn open_loop(ctx: Arc<Ctx>, publishes: Vec<(u32, usize)>, per_channel: f64) {
    let base = ctx.shared.now_ns();
    let mut sent = vec![0u64; publishes.len()];
    let mut batch = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let gap = 1e9 / per_channel.max(1e-9);
    while !ctx.stop.load(Relaxed) {
        tick.tick().await;
        for (i, &(ch, li)) in publishes.iter().enumerate() {
            if ctx.stop.load(Relaxed) {
                break;
            }
            let elapsed = ctx.shared.now_ns().saturating_sub(base) as f64;
            let due = (elapsed / gap) as u64 + 1;
            if due <= sent[i] {
                continue;
            }
            let mut n = due - sent[i];
            if n > MAX_BATCH {
                ctx.local.lk().counts.behind += n - MAX_BATCH;
                sent[i] += n - MAX_BATCH;
                n = MAX_BATCH;
            }
            let Some(s) = sock(&ctx, li) else { continue };
            let c = &ctx.shared.chans[ch as usize];
            let s0 = c.next_seq.load(Relaxed);
            batch.clear();
            let now = ctx.shared.now_ns();
            for k in 0..n {
                // The scheduled time, forgiving up to SCHEDULE_SLACK of lateness: that much is
                // the 1 ms tick's granularity, not a backlog, and would only blur the latency.
                let scheduled = base + ((sent[i] + k) as f64 * gap) as u64;
                let at = now.min(scheduled + SCHEDULE_SLACK_NS);
                ws::publish_frame(
                    &mut batch,
                    &ctx.plan.channels[ch as usize],
                    s0 + k,
                    at,
                    ctx.plan.payload,
                );
            }
            c.next_seq.store(s0 + n, Relaxed);
            sent[i] += n;
            if let Err(e) = timed_write(&s, &batch).await {
                ctx.local.lk().counts.error(e);
            }
        }
    }
}

/// Subscribes every slow connection of this thread (they never read afterwards).
async fn subscribe_slow(ctx: &Arc<Ctx>) {
    let slow: Vec<(usize, u32)> = ctx
        .local
        .lk()
        .conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.kind == Kind::Slow && c.open)
        .map(|(i, c)| (i, c.ch))
        .collect();
    let mut frame = Vec::new();
    for (li, ch) in slow {
        let Some(s) = sock(ctx, li) else { continue };
        frame.clear();
        ws::subscribe_frame(&mut frame, &ctx.plan.channels[ch as usize], true);
        if timed_write(&s, &frame).await.is_err() {
            ctx.local.lk().counts.error("slow client subscribe failed");
        }
    }
}

/// Reads what the slow connections were sent (bounded in bytes and time): the messages they
/// hold, and whether the server closed them.
async fn read_slow(ctx: &Arc<Ctx>) -> SlowSeen {
    let mut seen = SlowSeen::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let idx: Vec<usize> = ctx
        .local
        .lk()
        .conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.kind == Kind::Slow)
        .map(|(i, _)| i)
        .collect();
    let mut buf = vec![0u8; READ_BUF];
    for li in idx {
        seen.clients += 1;
        let Some(s) = sock(ctx, li) else { continue };
        let ch = ctx.local.lk().conns[li].ch;
        let ms = ctx.shared.chans[ch as usize].measure_start.load(Relaxed);
        let mut parser = FrameParser::default();
        let mut code = None;
        let mut eof = false;
        let mut received = 0;
        // At most 64 MiB per connection; a connection still sending after that is left open.
        for _ in 0..1024 {
            let r = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(200)),
                s.readable(),
            )
            .await;
            if r.is_err() {
                break;
            }
            match s.try_read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => parser.feed(&buf[..n], &mut |f| match f.op {
                    opcode::CLOSE => code = Some(ws::close_code(f.head).unwrap_or(1005)),
                    _ => {
                        if let Some((seq, _)) = ws::scan_message(f.head) {
                            if seq >= ms {
                                received += 1;
                            }
                        }
                    }
                }),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        seen.received += received;
        if let Some(c) = code {
            *seen.close_codes.entry(c.to_string()).or_default() += 1;
        }
        if code.is_some() || eof {
            seen.closed_by_server += 1;
        }
    }
    seen
}

/// Churn during a disturbed step: connections that come and go, and togglers.
async fn churn_task(ctx: Arc<Ctx>, churn: Churn) {
    let channels = ctx.plan.channels.len().max(1);
    let targets = &ctx.plan.targets;
    // Togglers: connected at the start of the step, each flips its subscription in turn.
    let mut togglers: Vec<(Arc<TcpStream>, bool, usize)> = Vec::new();
    for i in 0..churn.togglers {
        match conn::connect(
            &targets[i % targets.len()],
            ConnectOpts::default(),
            Duration::from_secs(5),
        )
        .await
        {
            Ok(c) => {
                let s = Arc::new(c.stream);
                tokio::spawn(discard(ctx.clone(), s.clone()));
                togglers.push((s, false, i % channels));
            }
            Err(_) => ctx.churn.lk().connect_failures += 1,
        }
    }
    let start = Instant::now();
    let mut connects_done = 0u64;
    let mut toggles_done = 0u64;
    let mut next_toggler = 0usize;
    let mut frame = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !ctx.churn_stop.load(Relaxed) {
        tick.tick().await;
        let t = start.elapsed().as_secs_f64();
        let want = (t * churn.connects_per_s) as u64;
        // Bounded per tick so a slow server cannot make this spawn without limit.
        for _ in 0..(want.saturating_sub(connects_done)).min(64) {
            connects_done += 1;
            let ctx2 = ctx.clone();
            let ch = (connects_done as usize) % channels;
            let node = (connects_done as usize) % targets.len();
            tokio::spawn(async move {
                match conn::connect(
                    &ctx2.plan.targets[node],
                    ConnectOpts::default(),
                    Duration::from_secs(5),
                )
                .await
                {
                    Ok(c) => {
                        ctx2.churn.lk().connects += 1;
                        let s = Arc::new(c.stream);
                        let mut f = Vec::new();
                        ws::subscribe_frame(&mut f, &ctx2.plan.channels[ch], true);
                        let _ = timed_write(&s, &f).await;
                        let _ = tokio::time::timeout(churn.hold, discard(ctx2.clone(), s)).await;
                        ctx2.churn.lk().disconnects += 1;
                    }
                    Err(_) => ctx2.churn.lk().connect_failures += 1,
                }
            });
        }
        connects_done = connects_done.max(want.saturating_sub(64));
        if !togglers.is_empty() {
            let want = (t * churn.toggles_per_s) as u64;
            for _ in 0..(want.saturating_sub(toggles_done)).min(1024) {
                toggles_done += 1;
                let k = next_toggler % togglers.len();
                let (s, subscribed, ch) = &mut togglers[k];
                next_toggler += 1;
                *subscribed = !*subscribed;
                frame.clear();
                ws::subscribe_frame(&mut frame, &ctx.plan.channels[*ch], *subscribed);
                if timed_write(s, &frame).await.is_ok() {
                    let mut c = ctx.churn.lk();
                    if *subscribed {
                        c.subscribes += 1;
                    } else {
                        c.unsubscribes += 1;
                    }
                }
            }
            toggles_done = toggles_done.max(want.saturating_sub(1024));
        }
    }
    // Dropping the togglers' sockets here closes them (their discard tasks end on EOF or stop).
    drop(togglers);
}

/// Reads and throws away everything a connection gets, answering pings, until it closes or
/// the churn stops.
async fn discard(ctx: Arc<Ctx>, s: Arc<TcpStream>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut parser = FrameParser::default();
    let mut pongs = Vec::new();
    while !ctx.churn_stop.load(Relaxed) {
        if tokio::time::timeout(Duration::from_millis(100), s.readable())
            .await
            .is_err()
        {
            continue;
        }
        match s.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => parser.feed(&buf[..n], &mut |f| {
                if f.op == opcode::PING {
                    ws::client_frame(&mut pongs, opcode::PONG, f.head);
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        if !pongs.is_empty() {
            let _ = timed_write(&s, &pongs).await;
            pongs.clear();
        }
    }
}
