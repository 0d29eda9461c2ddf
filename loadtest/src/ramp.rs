//! The ramp scenario: open connections at a fixed rate until a count, a failure, or handshakes
//! too slow; each connection subscribes and is then held (answering pings).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;

use crate::cli::Args;
use crate::conn::{self, ConnectOpts};
use crate::report::{self, HubSnapshot};
use crate::scenarios::Server;
use crate::stats::{new_histogram, HistogramJson, Latency};
use crate::sys;
use crate::ws::{self, opcode, FrameParser};

/// Connection attempts in flight at once.
const MAX_IN_FLIGHT: usize = 1000;
/// The handshake p99 bound is checked over this many latest handshakes.
const RECENT: usize = 1000;

/// What a ramp found.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RampResult {
    /// Connections asked for.
    pub(crate) target_connections: usize,
    /// Connections open and subscribed when the ramp stopped.
    pub(crate) reached: usize,
    /// Why it stopped.
    pub(crate) stop_reason: String,
    /// Failed connections by kind.
    pub(crate) failures: BTreeMap<String, u64>,
    /// Seconds the ramp took.
    pub(crate) seconds: f64,
    /// Connections opened per second (achieved).
    pub(crate) connects_per_s: f64,
    /// TCP connect plus upgrade, every successful one.
    pub(crate) handshake: Latency,
    /// The same, whole.
    pub(crate) handshake_histogram: HistogramJson,
    /// The bound on the p99 of the latest handshakes (ms).
    pub(crate) p99_bound_ms: f64,
    /// Server memory with every connection held (embedded: the whole process).
    pub(crate) rss_bytes: Option<u64>,
    /// Memory before the ramp.
    pub(crate) rss_before_bytes: Option<u64>,
    /// The hub's counters at the end (embedded only).
    pub(crate) hub: Option<HubSnapshot>,
}

impl RampResult {
    /// The result as text.
    pub(crate) fn text(&self) -> String {
        let l = &self.handshake;
        let mut s = format!(
            "\n== ramp to {} connections\n  reached           {} in {:.1} s ({}/s)\n  stopped           {}\n  handshake         p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
            report::count(self.target_connections as u64),
            report::count(self.reached as u64),
            self.seconds,
            report::rate(self.connects_per_s),
            self.stop_reason,
            report::dur(l.p50_us),
            report::dur(l.p90_us),
            report::dur(l.p99_us),
            report::dur(l.p999_us),
            report::dur(l.max_us)
        );
        if self.failures.is_empty() {
            s.push_str("  failures          none\n");
        } else {
            let f: Vec<String> = self
                .failures
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            s.push_str(&format!("  failures          {}\n", f.join(", ")));
        }
        if let (Some(b), Some(a)) = (self.rss_before_bytes, self.rss_bytes) {
            s.push_str(&format!(
                "  memory (RSS)      {} -> {} ({} per connection)\n",
                report::bytes(b),
                report::bytes(a),
                report::bytes(a.saturating_sub(b) / self.reached.max(1) as u64)
            ));
        }
        s
    }
}

struct Outcome {
    reached: usize,
    reason: String,
    failures: BTreeMap<String, u64>,
    seconds: f64,
    hist: hdrhistogram::Histogram<u64>,
}

/// Runs the ramp on one generator thread; the connections stay open until the server's memory
/// has been read.
pub(crate) fn run(
    args: &Args,
    server: &Server,
    cpus: &[usize],
    sources: u8,
    pb: &ProgressBar,
) -> Result<RampResult, String> {
    let rss_before = server.rss();
    let (tx, rx) = std::sync::mpsc::channel::<Outcome>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let target = server.targets[0].clone();
    let (rate, to, bound_ms, max_fail) = (
        args.ramp_rate,
        args.ramp_to,
        args.ramp_p99_ms,
        args.ramp_max_failures,
    );
    let channel = args.channel.clone();
    let cpus = cpus.to_vec();
    let pb2 = pb.clone();
    let join = std::thread::Builder::new()
        .name("loadgen-ramp".into())
        .spawn(move || {
            let _ = sys::pin_current_thread(&cpus);
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let held = Rc::new(Cell::new(0usize));
                let done = Rc::new(Cell::new(0usize));
                let failures: Rc<RefCell<BTreeMap<String, u64>>> = Rc::default();
                let hist = Rc::new(RefCell::new(new_histogram()));
                let recent: Rc<RefCell<VecDeque<u64>>> = Rc::default();
                let buf = Rc::new(RefCell::new(vec![0u8; 64 * 1024]));
                let start = Instant::now();
                let limit = Duration::from_secs_f64(to as f64 / rate + 60.0);
                let mut started = 0usize;
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut checked = 0;
                let reason = loop {
                    tick.tick().await;
                    pb2.set_position(held.get() as u64);
                    if held.get() >= to {
                        break "reached the target count".to_string();
                    }
                    let failed: u64 = failures.borrow().values().sum();
                    if failed >= max_fail {
                        break format!("{failed} connection(s) failed");
                    }
                    if done.get() >= checked + 50 && recent.borrow().len() >= 100 {
                        checked = done.get();
                        let mut v: Vec<u64> = recent.borrow().iter().copied().collect();
                        v.sort_unstable();
                        let p99 = v[(v.len() - 1) * 99 / 100] as f64 / 1e6;
                        if p99 > bound_ms {
                            break format!(
                                "handshake p99 {p99:.1} ms above the {bound_ms} ms bound"
                            );
                        }
                    }
                    if start.elapsed() > limit {
                        break "time limit".to_string();
                    }
                    if started >= to && done.get() >= to {
                        break "every attempt finished".to_string();
                    }
                    let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(to);
                    while started < due && started - done.get() < MAX_IN_FLIGHT {
                        let i = started;
                        started += 1;
                        let (held, done, failures, hist, recent, buf, target, channel) = (
                            held.clone(),
                            done.clone(),
                            failures.clone(),
                            hist.clone(),
                            recent.clone(),
                            buf.clone(),
                            target.clone(),
                            channel.clone(),
                        );
                        tokio::task::spawn_local(async move {
                            let t = Instant::now();
                            let opts = ConnectOpts {
                                recv_buffer: 0,
                                source: (sources > 1).then(|| (i % sources as usize) as u8),
                            };
                            let r = conn::connect(&target, opts, Duration::from_secs(10)).await;
                            done.set(done.get() + 1);
                            match r {
                                Ok(c) => {
                                    let ns = t.elapsed().as_nanos() as u64;
                                    hist.borrow_mut().saturating_record(ns.max(1));
                                    {
                                        let mut q = recent.borrow_mut();
                                        if q.len() == RECENT {
                                            q.pop_front();
                                        }
                                        q.push_back(ns);
                                    }
                                    let mut f = Vec::new();
                                    ws::subscribe_frame(&mut f, &channel, true);
                                    let stream = c.stream.into_plain();
                                    if conn::write_all(&stream, &f).await.is_err() {
                                        *failures
                                            .borrow_mut()
                                            .entry("subscribe write failed".into())
                                            .or_default() += 1;
                                        return;
                                    }
                                    held.set(held.get() + 1);
                                    hold(stream, buf).await;
                                    held.set(held.get() - 1);
                                    *failures
                                        .borrow_mut()
                                        .entry("closed by server".into())
                                        .or_default() += 1;
                                }
                                Err(e) => {
                                    *failures.borrow_mut().entry(e.kind().into()).or_default() += 1
                                }
                            }
                        });
                    }
                };
                let seconds = start.elapsed().as_secs_f64();
                // Let the last subscriptions land, then report and keep the connections open
                // until the main thread has read the server's memory.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let out = Outcome {
                    reached: held.get(),
                    reason,
                    failures: failures.borrow().clone(),
                    seconds,
                    hist: hist.borrow().clone(),
                };
                let _ = tx.send(out);
                let _ = tokio::time::timeout(Duration::from_secs(60), release_rx).await;
            });
        })
        .map_err(|e| format!("cannot start the ramp thread: {e}"))?;
    let out = rx.recv().map_err(|_| "the ramp thread died".to_string())?;
    // Let the server settle before its memory is read.
    std::thread::sleep(Duration::from_millis(500));
    let rss = server.rss();
    let hub = server.hub();
    let _ = release_tx.send(());
    let _ = join.join();
    Ok(RampResult {
        target_connections: args.ramp_to,
        reached: out.reached,
        stop_reason: out.reason,
        failures: out.failures,
        seconds: out.seconds,
        connects_per_s: out.hist.len() as f64 / out.seconds.max(1e-9),
        handshake: Latency::of(&out.hist),
        handshake_histogram: HistogramJson::of(&out.hist),
        p99_bound_ms: bound_ms,
        rss_bytes: rss,
        rss_before_bytes: rss_before,
        hub,
    })
}

/// Holds a connection: reads and discards into the shared buffer, answering pings, until the
/// server closes it (or the runtime ends).
async fn hold(s: tokio::net::TcpStream, buf: Rc<RefCell<Vec<u8>>>) {
    let mut parser = FrameParser::default();
    let mut pongs = Vec::new();
    loop {
        if s.readable().await.is_err() {
            return;
        }
        {
            let mut b = buf.borrow_mut();
            match s.try_read(&mut b) {
                Ok(0) => return,
                Ok(n) => parser.feed(&b[..n], &mut |f| {
                    if f.op == opcode::PING {
                        ws::client_frame(&mut pongs, opcode::PONG, f.head);
                    }
                }),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
        if !pongs.is_empty() {
            let _ = conn::write_all(&s, &pongs).await;
            pongs.clear();
        }
    }
}
