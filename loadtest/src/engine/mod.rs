//! The load generator: connections spread over generator threads, publishers, and the steps of
//! a run (each a measured period with one load), driven from the main thread.
//!
//! Each generator thread runs a single-threaded tokio runtime that owns its share of the
//! connections, so the hot path (read, parse, count) touches no lock and no atomic beyond one
//! counter per read in closed loop. Per connection it keeps a few hundred bytes: the socket, a
//! frame parser holding at most the first bytes of a frame split across reads, the channel, and
//! the next expected sequence number. Reads go into one buffer per thread.
//!
//! Every publish carries its channel's next sequence number, and `loss` counts from them what
//! was lost or duplicated.
//!
//! This file is the main thread's side: [`Engine`] starts the generator threads, waits until
//! every subscription is live, runs each step on the clock (its intervals, its end, the drain
//! after it) and sums what the threads counted. The files beside it hold one part each: `plan`
//! (what to connect, how to load), `outcome` (what a step measured), `shared` (state the threads
//! share), `worker` (a generator thread and its commands), `connect`, `receive`, `publish`,
//! `loss`, `slow` and `churn`.

mod churn;
mod connect;
mod loss;
mod outcome;
mod plan;
mod publish;
mod receive;
mod shared;
mod slow;
mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tmpsc, Notify};

use crate::mailbox::{self, Tagged};
use crate::stats::Counts;
use crate::sys;

pub(crate) use outcome::{ChurnCounts, NodeOutcome, OnInterval, SlowSeen, StepOutcome};
pub(crate) use plan::{Churn, ConnSpec, Kind, Load, Plan, Step};
pub(crate) use publish::broadcasts_bound;
use shared::{Chan, Shared, PH_CONNECT, PH_RUN, PH_WARMUP};
use worker::{thread_main, Cmd, Reply};

/// How long a generator thread has to answer a command before the run is stopped. The slowest
/// answer is to EndStep, which waits for the publishers' last write (WRITE_TIMEOUT) and
/// closed-loop round (ROUND_TIMEOUT); Final reads the slow clients for at most 3 s.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long stopping waits for each generator thread to end; one that is stuck is left behind
/// (the process exits soon after) rather than hanging the run.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

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
                round_max_ns: AtomicU64::new(0),
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
            finished: AtomicU64::new(0),
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
            // One at a time: a closed-loop round of one.
            Load::Broadcasts { .. } => 1,
            _ => 0,
        };
        self.shared.window.store(window, Relaxed);
        self.shared.closed_loop.store(window > 0, Relaxed);
        self.shared.finished.store(0, Relaxed);
        // Broadcasts end when every channel's publisher has sent its count; the duration bounds
        // them. Every other load runs for its duration.
        let publishers = self.shared.chans.len() as u64;
        let ends_early = matches!(step.load, Load::Broadcasts { .. });
        let shared = self.shared.clone();
        let done = move || ends_early && shared.finished.load(Relaxed) >= publishers;
        self.ask_all(|| Cmd::StartStep(step.load, step.disturb))?;
        let t0 = Instant::now();
        let mut intervals = Vec::new();
        let mut next = interval;
        while next <= step.duration + Duration::from_millis(1) {
            while let Some(wait) = next.checked_sub(t0.elapsed()) {
                if done() {
                    break;
                }
                std::thread::sleep(wait.min(Duration::from_millis(10)));
            }
            let (c, _, _) = self.collect()?;
            let at = t0.elapsed().as_secs_f64();
            on_interval(at, &c);
            intervals.push((at, c));
            next += interval;
            if done() {
                break;
            }
        }
        while let Some(wait) = step.duration.checked_sub(t0.elapsed()) {
            if done() {
                break;
            }
            std::thread::sleep(wait.min(Duration::from_millis(10)));
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
        let (published, expected, nodes) = loss::totals(
            &self.shared.chans,
            &starts,
            &self.subscribers,
            &self.node_subscribers,
            &counts,
        );
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
