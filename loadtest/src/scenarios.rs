//! The scenarios: each builds a plan of connections and a list of steps, runs them, and says
//! what the steps mean together (the summary).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};

use crate::cli::{parse_list, Args, Scenario};
use crate::conn::Target;
use crate::engine::{broadcasts_bound, Churn, ConnSpec, Engine, Kind, Load, Plan, Step};
use crate::report::{self, HubSnapshot, ServerSide, StepReport};
use crate::stats::Counts;
use crate::sys;

/// The server under load: one node, or several sharing channels through a broker.
pub(crate) struct Server {
    /// Where to connect, one per node; publishers are on the first.
    pub(crate) targets: Vec<Target>,
    /// The URLs as given or made, one per node.
    pub(crate) urls: Vec<String>,
    /// The hubs in this process (one per node), without --target.
    #[cfg(feature = "embedded")]
    pub(crate) embedded: Vec<crate::embedded::Embedded>,
    /// The redis-server this run started to join its embedded nodes.
    #[cfg(feature = "embedded")]
    pub(crate) redis: Option<crate::redis_server::RedisServer>,
    /// Where the embedded nodes' Redis is (several embedded nodes).
    #[cfg(feature = "embedded")]
    pub(crate) redis_url: Option<String>,
    /// The server's process (--pid).
    pub(crate) pid: Option<u32>,
}

impl Server {
    /// True for the hub in this process.
    pub(crate) fn is_embedded(&self) -> bool {
        #[cfg(feature = "embedded")]
        return !self.embedded.is_empty();
        #[cfg(not(feature = "embedded"))]
        false
    }

    /// The hubs' counters, one per node (embedded only; else empty).
    pub(crate) fn hubs(&self) -> Vec<HubSnapshot> {
        #[cfg(feature = "embedded")]
        return self.embedded.iter().map(|e| e.snapshot()).collect();
        #[cfg(not(feature = "embedded"))]
        Vec::new()
    }

    /// The hubs' counters added up (embedded only).
    pub(crate) fn hub(&self) -> Option<HubSnapshot> {
        let hubs = self.hubs();
        match hubs.len() {
            0 => None,
            1 => hubs.into_iter().next(),
            _ => Some(HubSnapshot::sum(&hubs)),
        }
    }

    /// The process id of the redis-server this run started.
    fn redis_pid(&self) -> Option<u32> {
        #[cfg(feature = "embedded")]
        return self.redis.as_ref().map(|r| r.pid());
        #[cfg(not(feature = "embedded"))]
        None
    }

    /// Kills the redis-server this run started, and starts it again empty on the same port
    /// after `pause` (`recover --restart-redis-at`); how long Redis was away. Call it from the
    /// thread that started the server (see `RedisServer::restart`).
    pub(crate) fn restart_redis(&self, pause: Duration) -> Result<Duration, String> {
        #[cfg(feature = "embedded")]
        if let Some(r) = &self.redis {
            return r.restart(pause);
        }
        let _ = pause;
        Err("no redis-server of this run's own to restart (--restart-redis-at needs --nodes 2 without --redis-url or --target)".into())
    }

    /// The embedded hub's shape, or nothing.
    pub(crate) fn describe(&self) -> String {
        #[cfg(feature = "embedded")]
        if let Some(e) = self.embedded.first() {
            let joined = match (&self.redis_url, self.embedded.len()) {
                (Some(url), n) if n > 1 => format!(
                    "; {n} nodes joined by Redis at {}{}",
                    crate::cli::redact(url),
                    if self.redis.is_some() {
                        " (started for this run)"
                    } else {
                        ""
                    }
                ),
                _ => String::new(),
            };
            let each = if self.embedded.len() > 1 { " each" } else { "" };
            return format!(" ({}{each}{joined})", e.describe());
        }
        String::new()
    }

    /// Resident memory of the server: this process when embedded, else the --pid process.
    pub(crate) fn rss(&self) -> Option<u64> {
        if self.is_embedded() {
            sys::rss_bytes("self")
        } else {
            self.pid.and_then(|p| sys::rss_bytes(&p.to_string()))
        }
    }

    fn pid_cpu(&self) -> Option<Duration> {
        self.pid.and_then(sys::pid_cpu)
    }
}

/// What a scenario produced.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Output {
    /// Seconds to open the connections (the last plan's).
    pub(crate) connect_seconds: f64,
    /// Seconds until every subscription was live.
    pub(crate) live_seconds: f64,
    /// Every measured step.
    pub(crate) steps: Vec<StepReport>,
    /// What the steps mean together.
    pub(crate) summary: Value,
    /// Sweep: one point per step, in the same order (for the verdict; in `summary` too).
    #[serde(skip)]
    pub(crate) sweep: Vec<SweepPoint>,
    /// What scenarios without steps (recover) contribute to the verdict.
    #[serde(skip)]
    pub(crate) tallies: Vec<crate::verdict::StepTally>,
}

/// Runs the scenario `args` names against `server`.
pub(crate) fn run(args: &Args, server: &Server, sources: u8) -> Result<Output, String> {
    let mut r = Runner::new(args, server, sources);
    match args.scenario {
        Scenario::Fanout | Scenario::Broadcast => {
            let plan = r.plan(1, r.subscribers(), 0);
            let step = Step {
                label: args.scenario_name().into(),
                load: r.load(),
                duration: secs(args.duration),
                disturb: false,
            };
            r.progress_len(&[&step]);
            let steps = r.run_plan(plan, &[step])?;
            r.out.summary = headline(&steps[0]);
            r.out.steps = steps;
        }
        Scenario::Channels => {
            let plan = r.plan(args.channels, args.per_channel, 0);
            let step = Step {
                label: "channels".into(),
                load: r.load(),
                duration: secs(args.duration),
                disturb: false,
            };
            r.progress_len(&[&step]);
            let steps = r.run_plan(plan, &[step])?;
            r.out.summary = headline(&steps[0]);
            r.out.steps = steps;
        }
        Scenario::Slow | Scenario::Churn => {
            let n = r.subscribers();
            let (plan, label) = if args.scenario == Scenario::Slow {
                let slow = ((n as f64 * args.slow_share).round() as usize)
                    .clamp(1, n.saturating_sub(1).max(1));
                if n < 2 {
                    return Err("the slow scenario needs at least 2 clients (-n)".into());
                }
                (r.plan(1, n - slow, slow), "with slow clients")
            } else {
                let mut p = r.plan(1, n, 0);
                p.churn = Some(Churn {
                    connects_per_s: args.churn_connects,
                    hold: Duration::from_millis(args.churn_hold_ms),
                    togglers: args.churn_togglers,
                    toggles_per_s: args.churn_toggles,
                });
                (p, "with churn")
            };
            let half = secs(args.duration / 2.0);
            let steps = [
                Step {
                    label: "baseline".into(),
                    load: r.load(),
                    duration: half,
                    disturb: false,
                },
                Step {
                    label: label.into(),
                    load: r.load(),
                    duration: half,
                    disturb: true,
                },
            ];
            r.progress_len(&steps.iter().collect::<Vec<_>>());
            let out = r.run_plan(plan, &steps)?;
            r.out.summary = compare(&out[0], &out[1]);
            r.out.steps = out;
        }
        Scenario::Idle => {
            let n = args.subscribers.unwrap_or(10_000);
            let plan = r.plan(1, n, 0);
            let base = server.rss();
            let step = Step {
                label: "idle".into(),
                load: Load::Idle,
                duration: secs(args.duration),
                disturb: false,
            };
            r.progress_len(&[&step]);
            let steps = r.run_plan(plan, &[step])?;
            let held = steps[0].rss_bytes;
            let (per, note) = per_connection(server, base, held, n);
            r.out.summary = json!({"connections": n, "rss_before_bytes": base, "rss_held_bytes": held, "bytes_per_connection": per, "note": note});
            r.out.steps = steps;
        }
        Scenario::Capacity => capacity(&mut r)?,
        Scenario::Sweep => sweep(&mut r)?,
        Scenario::Recover => {
            let target = server
                .targets
                .first()
                .cloned()
                .ok_or("recover needs a hub to connect to")?;
            let opts = crate::recover::RecoverOptions {
                target,
                nodes: server.targets.clone(),
                channel: args.channel.clone(),
                subscribers: args.subscribers.unwrap_or(200),
                rate: args.recover_rate(),
                duration: secs(args.duration),
                drain: Duration::from_millis(args.drain_ms),
                drop_every: Duration::from_secs_f64(args.drop_every / 1000.0),
                seed: args.seed,
                payload: args.payload,
                threads: args.threads,
                live_timeout: secs(args.live_timeout),
                sources,
                restart: args.restart_redis_at.map(|at| crate::recover::RestartPlan {
                    at: Duration::from_secs_f64(at),
                    pause: Duration::from_secs_f64(args.restart_redis_pause / 1000.0),
                }),
            };
            r.progress.finish_and_clear();
            say!(
                "recover: {} subscribers, publishing for {:.1} s...",
                opts.subscribers,
                opts.duration.as_secs_f64()
            );
            let res = crate::recover::run(opts, server)?;
            say!("{}", res.text());
            r.out.tallies.push(res.tally());
            r.out.summary = serde_json::to_value(&res).unwrap_or(Value::Null);
        }
        Scenario::Ramp => {
            r.progress.set_length(args.ramp_to as u64);
            r.progress.set_style(
                ProgressStyle::with_template(
                    "{spinner} ramp [{bar:30}] {pos}/{len} connections {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let res = crate::ramp::run(args, server, &r.client_cpus, sources, &r.progress)?;
            r.progress.finish_and_clear();
            say!("{}", res.text());
            r.out.summary = serde_json::to_value(&res).unwrap_or(Value::Null);
        }
    }
    r.progress.finish_and_clear();
    Ok(r.out)
}

/// The server's memory growth per connection, from its resident memory before connecting
/// (`base`) and while holding `n` connections (`held`), printed and returned with what it
/// includes.
fn per_connection(
    server: &Server,
    base: Option<u64>,
    held: Option<u64>,
    n: usize,
) -> (Option<f64>, &'static str) {
    let per = match (base, held) {
        (Some(b), Some(h)) => Some(h.saturating_sub(b) as f64 / n.max(1) as f64),
        _ => None,
    };
    let note = if server.is_embedded() {
        "embedded: the growth of this whole process, so it includes the load generator's side of each connection"
    } else if server.pid.is_some() {
        "the server process's growth (--pid)"
    } else {
        "unknown: pass --pid with --target to measure the server's memory"
    };
    match per {
        Some(p) => say!(
            "\nmemory per idle subscribed connection: {} ({note})",
            report::bytes(p as u64)
        ),
        None => say!("\nmemory per idle subscribed connection: {note}"),
    }
    (per, note)
}

/// The capacity scenario: N subscribers of one channel connected (timed), held for
/// --duration (the server's memory per connection), then --broadcasts publishes one at a time,
/// each timed to its last receiver.
fn capacity(r: &mut Runner<'_>) -> Result<(), String> {
    let args = r.args;
    let n = args.subscribers.unwrap_or(10_000);
    let plan = r.plan(1, n, 0);
    let base = r.server.rss();
    let hold = Step {
        label: "held".into(),
        load: Load::Idle,
        duration: secs(args.duration),
        disturb: false,
    };
    let broadcasts = Step {
        label: "broadcasts".into(),
        load: Load::Broadcasts {
            count: args.broadcasts,
        },
        // Bounded (each broadcast waits at most 5 s for its last receiver); the step ends as
        // soon as they are done.
        duration: broadcasts_bound(args.broadcasts),
        disturb: false,
    };
    r.progress_len(&[&hold]);
    let steps = r.run_plan(plan, &[hold, broadcasts])?;
    let held = steps[0].rss_bytes;
    let (per, note) = per_connection(r.server, base, held, n);
    let b = &steps[1].broadcasts;
    let us = |v: Option<f64>| v.map_or("-".into(), report::dur);
    say!(
        "capacity: {} connections, connected in {:.2} s (every subscription live {:.2} s later); \
         {} of {} broadcasts reached every one, the last receiver after p50 {}, p99 {}, max {}",
        report::count(n as u64),
        r.out.connect_seconds,
        r.out.live_seconds,
        b.as_ref().map_or(0, |b| b.received_by_all),
        args.broadcasts,
        us(b.as_ref().and_then(|b| b.p50_us)),
        us(b.as_ref().and_then(|b| b.p99_us)),
        us(b.as_ref().and_then(|b| b.max_us)),
    );
    r.out.summary = json!({
        "connections": n,
        "connect_seconds": r.out.connect_seconds,
        "live_seconds": r.out.live_seconds,
        "rss_before_bytes": base,
        "rss_held_bytes": held,
        "rss_after_broadcasts_bytes": steps[1].rss_bytes,
        "bytes_per_connection": per,
        "note": note,
        "broadcasts": b,
    });
    r.out.steps = steps;
    Ok(())
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.001))
}

struct Runner<'a> {
    args: &'a Args,
    server: &'a Server,
    sources: u8,
    client_cpus: Vec<usize>,
    progress: ProgressBar,
    out: Output,
}

impl<'a> Runner<'a> {
    fn new(args: &'a Args, server: &'a Server, sources: u8) -> Self {
        let show = !args.no_progress && std::io::stderr().is_terminal();
        let progress = if show {
            ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        progress.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {percent:>3}% {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let client_cpus = args
            .client_cpus
            .as_deref()
            .map(crate::cli::parse_cpu_list)
            .transpose()
            .ok()
            .flatten()
            .unwrap_or_default();
        Runner {
            args,
            server,
            sources,
            client_cpus,
            progress,
            out: Output::default(),
        }
    }

    fn subscribers(&self) -> usize {
        self.args.subscribers.unwrap_or(1000)
    }

    fn load(&self) -> Load {
        if self.args.rate > 0.0 {
            Load::Open {
                rate: self.args.rate,
            }
        } else {
            Load::Closed {
                window: self.args.window,
            }
        }
    }

    /// `channels` channels with `per_channel` measured subscribers each, and `slow` slow clients
    /// on the first channel.
    fn plan(&self, channels: usize, per_channel: usize, slow: usize) -> Plan {
        let names = if channels == 1 {
            vec![self.args.channel.clone()]
        } else {
            (0..channels)
                .map(|i| format!("{}-{i}", self.args.channel))
                .collect()
        };
        // Several nodes: each channel's subscribers alternate over the nodes, its first (the
        // publisher) on node A.
        let nodes = self.server.targets.len().max(1);
        let mut conns = Vec::with_capacity(channels * per_channel + slow);
        for c in 0..channels {
            conns.extend((0..per_channel).map(|j| ConnSpec {
                channel: c as u32,
                kind: Kind::Subscriber,
                node: (j % nodes) as u8,
            }));
        }
        conns.extend((0..slow).map(|k| ConnSpec {
            channel: 0,
            kind: Kind::Slow,
            node: (k % nodes) as u8,
        }));
        Plan {
            targets: self.server.targets.clone(),
            channels: names,
            conns,
            payload: self.args.payload,
            threads: self.args.threads,
            cpus: self.client_cpus.clone(),
            live_timeout: secs(self.args.live_timeout),
            recv_buffer: self.args.rcvbuf.unwrap_or(0),
            slow_recv_buffer: self.args.slow_rcvbuf,
            churn: None,
            sources: self.sources,
        }
    }

    fn progress_len(&self, steps: &[&Step]) {
        let total: f64 = steps.iter().map(|s| s.duration.as_secs_f64()).sum();
        self.progress.set_length((total * 1000.0) as u64);
    }

    fn run_plan(&mut self, plan: Plan, steps: &[Step]) -> Result<Vec<StepReport>, String> {
        let subscribers = plan
            .conns
            .iter()
            .filter(|c| c.kind == Kind::Subscriber)
            .count() as u64;
        let slow = plan.conns.len() as u64 - subscribers;
        self.progress
            .set_message(format!("connecting {} clients", plan.conns.len()));
        let mut engine = Engine::start(plan)?;
        self.out.connect_seconds = engine.connect_seconds;
        self.out.live_seconds = engine.live_seconds;
        say!(
            "connected {} clients in {:.2} s; every subscription live {:.2} s later",
            report::count(subscribers + slow),
            engine.connect_seconds,
            engine.live_seconds
        );
        let mut reports = Vec::new();
        for step in steps {
            reports.push(self.run_step(&mut engine, step, subscribers, slow)?);
        }
        engine.stop();
        Ok(reports)
    }

    fn run_step(
        &self,
        engine: &mut Engine,
        step: &Step,
        subscribers: u64,
        slow: u64,
    ) -> Result<StepReport, String> {
        let hubs0 = self.server.hubs();
        let pid0 = self.server.pid_cpu();
        let redis0 = self.server.redis_pid().and_then(sys::pid_cpu);
        let interval = Duration::from_millis(self.args.interval_ms).min(step.duration);
        let pb = &self.progress;
        let label = step.label.clone();
        let mut last = 0.0;
        let mut on_interval = |t: f64, c: &Counts| {
            let dt = (t - last).max(1e-9);
            last = t;
            pb.inc(((dt) * 1000.0) as u64);
            let p99 = if c.hist.is_empty() {
                "-".into()
            } else {
                report::dur(c.hist.value_at_quantile(0.99) as f64 / 1000.0)
            };
            pb.set_message(format!(
                "{label}: {}/s delivered, p99 {p99}, lost {}",
                report::rate(c.delivered as f64 / dt),
                c.lost
            ));
        };
        let o = engine.run_step(
            step,
            interval,
            Duration::from_millis(self.args.drain_ms),
            &mut on_interval,
        )?;
        let cpu = if self.server.is_embedded() {
            Some(o.process_cpu.saturating_sub(o.generator_cpu))
        } else {
            match (pid0, self.server.pid_cpu()) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            }
        };
        let hubs: Vec<HubSnapshot> = self
            .server
            .hubs()
            .iter()
            .zip(&hubs0)
            .map(|(b, a)| b.since(a))
            .collect();
        let hub = match hubs.len() {
            0 => None,
            1 => hubs.first().cloned(),
            _ => Some(HubSnapshot::sum(&hubs)),
        };
        let redis_cpu = match (redis0, self.server.redis_pid().and_then(sys::pid_cpu)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let side = ServerSide {
            cpu,
            rss: self.server.rss(),
            generator_rss: if self.server.is_embedded() {
                None
            } else {
                sys::rss_bytes("self")
            },
            hub,
            hubs: if hubs.len() > 1 { hubs } else { Vec::new() },
            urls: self.server.urls.clone(),
            redis_cpu,
        };
        let r = StepReport::build(step, o, subscribers, slow, side);
        pb.suspend(|| say!("{}", r.text(self.server.is_embedded())));
        Ok(r)
    }
}

impl Args {
    /// The scenario's name as the command line spells it.
    pub(crate) fn scenario_name(&self) -> &'static str {
        match self.scenario {
            Scenario::Fanout => "fanout",
            Scenario::Channels => "channels",
            Scenario::Broadcast => "broadcast",
            Scenario::Churn => "churn",
            Scenario::Ramp => "ramp",
            Scenario::Idle => "idle",
            Scenario::Capacity => "capacity",
            Scenario::Slow => "slow",
            Scenario::Sweep => "sweep",
            Scenario::Recover => "recover",
        }
    }

    /// The embedded hub gives the scenario's channels a history (--history, and recover).
    #[cfg(feature = "embedded")]
    pub(crate) fn wants_history(&self) -> bool {
        self.history || self.scenario == Scenario::Recover
    }

    /// Recover's publications per second: --rate, or 1000.
    pub(crate) fn recover_rate(&self) -> f64 {
        if self.rate > 0.0 {
            self.rate
        } else {
            1000.0
        }
    }

    /// Publications each embedded history keeps (see --history-size).
    #[cfg(feature = "embedded")]
    pub(crate) fn history_size(&self) -> usize {
        self.history_size
            .unwrap_or(if self.scenario == Scenario::Recover {
                let secs = self.duration + self.drain_ms as f64 / 1000.0;
                ((self.recover_rate() * secs) as usize).saturating_add(1000)
            } else {
                10_000
            })
    }

    /// Connections the scenario opens at most (for the file descriptor check).
    pub(crate) fn connections_needed(&self) -> usize {
        let n = self.subscribers.unwrap_or(match self.scenario {
            Scenario::Idle | Scenario::Capacity => 10_000,
            Scenario::Recover => 200,
            _ => 1000,
        });
        match self.scenario {
            Scenario::Fanout
            | Scenario::Broadcast
            | Scenario::Slow
            | Scenario::Idle
            | Scenario::Capacity => n,
            Scenario::Channels => self.channels.saturating_mul(self.per_channel),
            Scenario::Churn => {
                n + self.churn_togglers
                    + (self.churn_connects * (self.churn_hold_ms as f64 / 1000.0 + 5.0)).ceil()
                        as usize
            }
            Scenario::Ramp => self.ramp_to,
            // Its subscribers and the publisher; a dropped connection is closed before the next.
            Scenario::Recover => n + 1,
            Scenario::Sweep => parse_list::<usize>("--sweep-subs", &self.sweep_subs)
                .ok()
                .and_then(|v| v.into_iter().max())
                .unwrap_or(0),
        }
    }
}

fn headline(s: &StepReport) -> Value {
    json!({
        "published_per_s": s.published_per_s,
        "delivered_per_s": s.delivered_per_s,
        "lost": s.lost,
        "duplicated": s.duplicated,
        "latency_p50_us": s.latency.p50_us,
        "latency_p99_us": s.latency.p99_us,
        "generator_cpu_percent": s.generator_cpu_percent,
        "hub_cpu_percent": s.hub_cpu_percent,
        "nodes": s.nodes.as_ref().map(|nodes| nodes.iter().map(|n| json!({
            "node": n.node,
            "role": n.role,
            "subscribers": n.subscribers,
            "delivered_per_s": n.delivered_per_s,
            "lost": n.lost,
            "latency_p50_us": n.latency.p50_us,
            "latency_p99_us": n.latency.p99_us,
            "broker": n.hub.as_ref().and_then(|h| h.broker.clone()),
        })).collect::<Vec<_>>()),
    })
}

/// A baseline step against a disturbed one (slow clients or churn).
fn compare(base: &StepReport, dist: &StepReport) -> Value {
    let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { 0.0 };
    say!(
        "\n{} against the baseline: delivered/s {} -> {} ({:.2}x), p99 {} -> {} ({:.2}x), lost {} -> {}",
        dist.label,
        report::rate(base.delivered_per_s),
        report::rate(dist.delivered_per_s),
        ratio(base.delivered_per_s, dist.delivered_per_s),
        report::dur(base.latency.p99_us),
        report::dur(dist.latency.p99_us),
        ratio(base.latency.p99_us, dist.latency.p99_us),
        base.lost,
        dist.lost
    );
    json!({
        "baseline": headline(base),
        "disturbed": headline(dist),
        "p99_ratio": ratio(base.latency.p99_us, dist.latency.p99_us),
        "delivered_per_s_ratio": ratio(base.delivered_per_s, dist.delivered_per_s),
        "slow": dist.slow,
        "churn": dist.churn,
        "hub": dist.hub,
    })
}

/// One point of a sweep.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SweepPoint {
    /// Subscribers.
    pub(crate) subscribers: usize,
    /// Publishes per second asked for.
    pub(crate) rate: f64,
    /// Deliveries per second asked for (rate x subscribers).
    pub(crate) offered_per_s: f64,
    /// Deliveries per second achieved.
    pub(crate) delivered_per_s: f64,
    /// p99 latency, milliseconds.
    pub(crate) p99_ms: f64,
    /// Lost messages.
    pub(crate) lost: u64,
    /// Under the bound, nothing lost, and at least 95% of the offered load delivered.
    pub(crate) ok: bool,
}

fn sweep(r: &mut Runner<'_>) -> Result<(), String> {
    let args = r.args;
    let subs = parse_list::<usize>("--sweep-subs", &args.sweep_subs)?;
    let rates = parse_list::<f64>("--sweep-rates", &args.sweep_rates)?;
    let step_d = secs(args.step_seconds);
    r.progress
        .set_length((step_d.as_secs_f64() * 1000.0) as u64 * (subs.len() * rates.len()) as u64);
    let mut points = Vec::new();
    let mut steps = Vec::new();
    let t0 = Instant::now();
    for &n in &subs {
        let plan = r.plan(1, n, 0);
        let subscribers = n as u64;
        r.progress.set_message(format!("connecting {n} clients"));
        let mut engine = Engine::start(plan)?;
        r.out.connect_seconds = engine.connect_seconds;
        r.out.live_seconds = engine.live_seconds;
        say!(
            "\nsweep: {n} subscribers connected in {:.2} s",
            engine.connect_seconds
        );
        for (i, &rate) in rates.iter().enumerate() {
            let step = Step {
                label: format!("sweep {n} subscribers x {rate} publishes/s"),
                load: Load::Open { rate },
                duration: step_d,
                disturb: false,
            };
            let rep = r.run_step(&mut engine, &step, subscribers, 0)?;
            let offered = rate * n as f64;
            let p99_ms = rep.latency.p99_us / 1000.0;
            let ok =
                p99_ms <= args.p99_ms && rep.lost == 0 && rep.delivered_per_s >= 0.95 * offered;
            points.push(SweepPoint {
                subscribers: n,
                rate,
                offered_per_s: offered,
                delivered_per_s: rep.delivered_per_s,
                p99_ms,
                lost: rep.lost,
                ok,
            });
            steps.push(rep);
            if !ok {
                // Past the knee: higher rates only take longer to say the same.
                let skipped = (rates.len() - i - 1) as u64;
                r.progress
                    .inc(skipped * (step_d.as_secs_f64() * 1000.0) as u64);
                break;
            }
        }
        engine.stop();
    }
    let knee = points
        .iter()
        .filter(|p| p.ok)
        .max_by(|a, b| a.offered_per_s.total_cmp(&b.offered_per_s))
        .cloned();
    r.progress.finish_and_clear();
    say!(
        "\nsweep (p99 bound {} ms), {:.0} s:",
        args.p99_ms,
        t0.elapsed().as_secs_f64()
    );
    say!(
        "  {:>11} {:>12} {:>14} {:>14} {:>10} {:>8}  ok",
        "subscribers",
        "publishes/s",
        "offered/s",
        "delivered/s",
        "p99",
        "lost"
    );
    for p in &points {
        say!(
            "  {:>11} {:>12} {:>14} {:>14} {:>10} {:>8}  {}",
            p.subscribers,
            report::count(p.rate as u64),
            report::rate(p.offered_per_s),
            report::rate(p.delivered_per_s),
            report::dur(p.p99_ms * 1000.0),
            p.lost,
            if p.ok { "yes" } else { "no" }
        );
    }
    match &knee {
        Some(k) => say!(
            "knee: {} deliveries/s ({} subscribers x {} publishes/s) with p99 {} and nothing lost",
            report::rate(k.delivered_per_s),
            k.subscribers,
            report::count(k.rate as u64),
            report::dur(k.p99_ms * 1000.0)
        ),
        None => say!(
            "knee: not found: no step kept p99 under {} ms with nothing lost",
            args.p99_ms
        ),
    }
    if let Some(path) = &args.plot {
        crate::plot::draw(path, &points, args.p99_ms, knee.as_ref())?;
        say!("plot written to {}", path.display());
    }
    r.out.summary = json!({ "p99_bound_ms": args.p99_ms, "points": points, "knee": knee });
    r.out.steps = steps;
    r.out.sweep = points;
    Ok(())
}
