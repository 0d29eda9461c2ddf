//! Command-line arguments.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::Serialize;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Scenario {
    /// N subscribers on one channel; one of them publishes, closed loop (--window in flight) or
    /// open loop (--rate).
    Fanout,
    /// --channels channels with --per-channel subscribers each; the first subscriber of each
    /// channel publishes to it.
    Channels,
    /// Every connection receives every message. Done as every connection subscribed to one
    /// channel (a server-side broadcast cannot be triggered through the protocol), so this is
    /// fanout where the subscribers are all the connections there are.
    Broadcast,
    /// Fanout while other clients connect, subscribe, unsubscribe and disconnect: the first half
    /// of --duration runs without churn (the baseline), the second with it.
    Churn,
    /// Opens connections at --ramp-rate until --ramp-to, a failure, or a handshake p99 above
    /// --ramp-p99-ms; reports the count reached and handshake latencies.
    Ramp,
    /// Holds N subscribed connections for --duration and reports memory per connection.
    Idle,
    /// The connection limit: connects N subscribers of one channel (default 10000) and reports
    /// the time that took, holds them for --duration and reports the server's memory per
    /// connection (with --target, pass --pid), then publishes --broadcasts messages to them one
    /// at a time and reports, for each, the time until the last of them received it (p50, p99,
    /// max). Refused when N is more than the file descriptor limit allows.
    Capacity,
    /// Fanout with a share (--slow-share) of clients that never read: the first half of
    /// --duration runs without them (the baseline), the second with them subscribed.
    Slow,
    /// Open-loop fanout over --sweep-subs x --sweep-rates, to find the knee: the highest load
    /// with p99 under --p99-ms and nothing lost.
    Sweep,
    /// Subscribers of one history channel drop their connections at random (--drop-every;
    /// alternately a TCP reset and a clean close) while a publisher streams at --rate
    /// (default 1000/s), reconnect and resume with `since` their last seen offset and epoch;
    /// each must end with every offset exactly once, in order. Reports reconnects, lost,
    /// duplicated, out-of-order and the recovery time (from the old connection's end to the
    /// end of the replay). Embedded (its channel gets a history holding the whole run) or a
    /// --target whose channel has a history. With --nodes 2 (two embedded hubs joined by
    /// Redis, whose history they share) each subscriber's connections alternate between the
    /// nodes, so every resume is answered by the other node; the publisher is on the first.
    /// --restart-redis-at adds a Redis restart (empty: a new epoch), checked epoch by epoch.
    Recover,
}

/// What the embedded hub does with a client whose outbound queue goes over its bound
/// (wshub's `SlowConsumerPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum SlowConsumer {
    /// Close it with 4000 `slow consumer` (the hub's default).
    #[default]
    Disconnect,
    /// Keep it and drop its oldest queued messages: it loses messages without being told.
    DropOldest,
}

/// Drive a WebSocket hub with many connections and report throughput and latency.
///
/// Without --target, a wshub hub runs in this process (on its own threads, on 127.0.0.1 at a
/// free port) and the report includes its CPU time and statistics. With --target, any server
/// that speaks wshub's PROTOCOL.md and lets clients publish is driven the same way.
///
/// Two nodes (--nodes 2, or --target given twice): the subscribers are split evenly over two
/// hubs that share channels through Redis, and every publisher is on the first (node A), so
/// half the deliveries cross Redis; the report shows the local and the cross-node subscribers
/// apart. Embedded, the two hubs run in this process, each with a Redis broker, joined through
/// --redis-url or a redis-server started here for the run.
///
/// Every publish carries a sequence number and its send time, so the report counts lost and
/// duplicated messages and the publish-to-receive latency. Subscriptions are proven live by a
/// first delivery before anything is measured (no acknowledgement is needed).
#[derive(Debug, Parser, Serialize)]
#[command(
    name = "loadtest",
    version,
    verbatim_doc_comment,
    after_help = crate::verdict::EXIT_STATUS_HELP
)]
pub(crate) struct Args {
    /// The scenario.
    #[arg(value_enum, default_value_t = Scenario::Fanout)]
    pub(crate) scenario: Scenario,

    /// Drive this server (ws://HOST:PORT/PATH, or wss:// with --ca or --insecure) instead of
    /// an embedded hub. The server must let clients publish. Given twice: two nodes of one
    /// cluster (subscribers split over both, publishers on the first).
    #[arg(long, value_name = "URL")]
    pub(crate) target: Vec<String>,

    /// The embedded hub serves wss:// (wshub's `tls` feature) with a self-signed certificate
    /// for 127.0.0.1 made at start, which the clients trust: the TLS path, measured in one
    /// command. Every connection is TLS. Not for the ramp and recover scenarios.
    #[arg(long)]
    pub(crate) tls: bool,

    /// wss:// targets: trust the certificates in this PEM file (a CA, or the server's own
    /// certificate).
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,

    /// wss:// targets: accept any certificate (a test server on a network you own).
    #[arg(long)]
    pub(crate) insecure: bool,

    /// Nodes: 1, or 2 for two hubs sharing channels through Redis (embedded: two hubs in this
    /// process; with --target: the two targets). Subscribers are split evenly, publishers are
    /// on the first node. Not for the ramp scenario. [default: 1, or 2 with two --target]
    #[arg(long, value_name = "N")]
    pub(crate) nodes: Option<usize>,

    /// Embedded, two nodes: the Redis server joining them (redis://HOST:PORT/). Without it,
    /// a redis-server is started on a free 127.0.0.1 port for the run and stopped at the end.
    #[arg(long, value_name = "URL")]
    #[serde(serialize_with = "redacted")]
    pub(crate) redis_url: Option<String>,

    /// The server's process id (with --target): its CPU time and memory go into the report
    /// (idle: its memory growth per connection). With two targets, the first one's.
    #[arg(long)]
    pub(crate) pid: Option<u32>,

    /// Measured seconds (churn and slow: half baseline, half disturbed; idle: seconds held;
    /// capacity: seconds held before the broadcasts).
    #[arg(short, long, default_value_t = 20.0, value_name = "SECONDS")]
    pub(crate) duration: f64,

    /// Connections subscribed (fanout, broadcast, churn, slow: all clients; idle; capacity;
    /// recover). [default: 1000; idle and capacity: 10000; recover: 200]
    #[arg(short = 'n', long, value_name = "N")]
    pub(crate) subscribers: Option<usize>,

    /// Closed loop: messages in flight per channel (a round of W publishes in one write, then
    /// wait for every subscriber to have them).
    #[arg(short, long, default_value_t = 16)]
    pub(crate) window: u32,

    /// Open loop instead: publishes per second over all channels (0 = closed loop). Latency then
    /// counts from each message's scheduled send time, so falling behind shows. Recover always
    /// publishes at a rate: this one, or 1000 when 0.
    #[arg(short, long, default_value_t = 0.0, value_name = "PER_SECOND")]
    pub(crate) rate: f64,

    /// Capacity: broadcasts after the hold, one at a time (each sent 100 ms after every
    /// subscriber has the one before), from 1 to 1000.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub(crate) broadcasts: u32,

    /// Bytes of data per publish (the sequence number and send time included).
    #[arg(short, long, default_value_t = 100, value_name = "BYTES")]
    pub(crate) payload: usize,

    /// Channels (channels scenario).
    #[arg(long, default_value_t = 100)]
    pub(crate) channels: usize,

    /// Subscribers per channel (channels scenario).
    #[arg(long, default_value_t = 10)]
    pub(crate) per_channel: usize,

    /// Channel name (a number is appended when there are several).
    #[arg(long, default_value = "bench")]
    pub(crate) channel: String,

    /// Load generator threads, each with its share of the connections.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,

    /// Pin the generator threads to these CPUs, e.g. 1 or 2-3,5.
    #[arg(long, value_name = "LIST")]
    pub(crate) client_cpus: Option<String>,

    /// Embedded hub: worker threads of its runtime. [default: available cores]
    #[arg(long)]
    pub(crate) hub_threads: Option<usize>,

    /// Embedded hub: shards. [default: the hub's own default, available cores]
    #[arg(long)]
    pub(crate) hub_shards: Option<usize>,

    /// Embedded hub: pin its threads to these CPUs, e.g. 0.
    #[arg(long, value_name = "LIST")]
    pub(crate) hub_cpus: Option<String>,

    /// Embedded hub: the most bytes queued for one client before the hub treats it as a slow
    /// consumer (HubConfigBuilder::outbound_queue_bytes; tunes the slow scenario).
    /// [default: 262144, the hub's own default of 256 KiB]
    #[arg(long, value_name = "BYTES")]
    pub(crate) hub_queue_bytes: Option<usize>,

    /// Embedded hub: what it does with a client over --hub-queue-bytes
    /// (HubConfigBuilder::slow_consumer_policy). drop-oldest makes measured subscribers that
    /// fall behind lose messages, which the report counts and the exit status shows.
    #[arg(long, value_enum, value_name = "POLICY")]
    pub(crate) hub_slow_consumer: Option<SlowConsumer>,

    /// Embedded hub: give the scenario's channels a history (PROTOCOL.md, "History and
    /// recovery"): every channel whose name starts with --channel keeps its last
    /// --history-size publications for up to an hour, so its messages carry an offset and an
    /// epoch. Compare a run with and without it to see what the history costs. The recover
    /// scenario always has it.
    #[arg(long)]
    pub(crate) history: bool,

    /// Embedded hub, with --history (and recover): publications each history keeps (its age
    /// limit is one hour). [default: 10000, the last 10,000 (a run that publishes more also
    /// trims, which is part of what --history measures); recover: every publication of the run,
    /// rate x (duration + drain) + 1000]
    #[arg(long, value_name = "N")]
    pub(crate) history_size: Option<usize>,

    /// Recover: the mean time between one subscriber's drops (exponential intervals), e.g.
    /// 500ms, 2s, or a number of milliseconds.
    #[arg(long, default_value = "500ms", value_name = "DURATION", value_parser = parse_millis)]
    pub(crate) drop_every: f64,

    /// Recover with --nodes 2: this many seconds after publishing starts, kill the
    /// redis-server the run started (SIGKILL: its histories are gone) and start it again,
    /// empty, on the same port after --restart-redis-pause. The channel moves to a new epoch:
    /// the verdict then checks each epoch apart, and counts the publications refused while
    /// Redis was away instead of as lost. Off by default; not with --redis-url or --target
    /// (only a Redis this run started is restarted). E.g. 1.5.
    #[arg(long, value_name = "SECS")]
    pub(crate) restart_redis_at: Option<f64>,

    /// Recover with --restart-redis-at: how long Redis stays down, e.g. 500ms, 2s. Keep it
    /// short: a resume meanwhile waits for Redis (up to RedisConfig::history_wait, 5 s) and
    /// its connection reads nothing else, so a subscriber's clean close is answered only once
    /// its resume is (a subscriber waits up to 7 s for that; longer counts as an error).
    #[arg(long, default_value = "500ms", value_name = "DURATION", value_parser = parse_millis)]
    pub(crate) restart_redis_pause: f64,

    /// Recover: the seed of the drop times (a run repeats its drops with its seed).
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,

    /// Milliseconds per reporting interval.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub(crate) interval_ms: u64,

    /// After publishing stops, milliseconds to wait for messages in flight before counting them
    /// lost.
    #[arg(long, default_value_t = 3000, value_name = "MS")]
    pub(crate) drain_ms: u64,

    /// Seconds every subscription has to prove itself live with a first delivery.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub(crate) live_timeout: f64,

    /// Write the intervals and the summary (configuration, git revision, CPU model, whole
    /// histograms) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,

    /// Sweep: draw delivered/s and p99 latency against load into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub(crate) plot: Option<PathBuf>,

    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub(crate) no_progress: bool,

    /// Churn: new connections per second, each subscribing and leaving after --churn-hold-ms.
    #[arg(long, default_value_t = 50.0, value_name = "PER_SECOND")]
    pub(crate) churn_connects: f64,

    /// Churn: how long each churning connection stays.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub(crate) churn_hold_ms: u64,

    /// Churn: connections that toggle subscribe and unsubscribe.
    #[arg(long, default_value_t = 20)]
    pub(crate) churn_togglers: usize,

    /// Churn: subscribe and unsubscribe operations per second over all togglers.
    #[arg(long, default_value_t = 200.0, value_name = "PER_SECOND")]
    pub(crate) churn_toggles: f64,

    /// Ramp: connections opened per second.
    #[arg(long, default_value_t = 500.0, value_name = "PER_SECOND")]
    pub(crate) ramp_rate: f64,

    /// Ramp: stop at this many connections.
    #[arg(long, default_value_t = 5000)]
    pub(crate) ramp_to: usize,

    /// Ramp: stop when the handshake p99 (over the last 1000) goes above this.
    #[arg(long, default_value_t = 100.0, value_name = "MS")]
    pub(crate) ramp_p99_ms: f64,

    /// Ramp: stop after this many failed connections.
    #[arg(long, default_value_t = 1)]
    pub(crate) ramp_max_failures: u64,

    /// Receive buffer (SO_RCVBUF) of the subscribers that read, in bytes: a small one models
    /// clients behind a narrow window, which the hub cannot write a large message to at once.
    /// [default: the system's]
    #[arg(long, value_name = "BYTES")]
    pub(crate) rcvbuf: Option<u32>,

    /// Slow: share of the clients that never read, from 0 to 1.
    #[arg(long, default_value_t = 0.1, value_name = "FRACTION")]
    pub(crate) slow_share: f64,

    /// Slow: receive buffer (SO_RCVBUF) of the clients that never read.
    #[arg(long, default_value_t = 4096, value_name = "BYTES")]
    pub(crate) slow_rcvbuf: u32,

    /// Sweep: subscriber counts, comma-separated.
    #[arg(long, default_value = "100,1000,5000", value_name = "LIST")]
    pub(crate) sweep_subs: String,

    /// Sweep: publish rates per second, comma-separated, in increasing order. For each
    /// subscriber count the sweep stops at the first rate past the knee.
    #[arg(
        long,
        default_value = "100,300,1000,3000,10000,30000",
        value_name = "LIST"
    )]
    pub(crate) sweep_rates: String,

    /// Sweep: measured seconds per step.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub(crate) step_seconds: f64,

    /// Sweep: the latency bound of the knee (p99, milliseconds).
    #[arg(long, default_value_t = 50.0, value_name = "MS")]
    pub(crate) p99_ms: f64,
}

/// A Redis URL without its password, if it has one.
pub(crate) fn redact(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((head, host)) => {
            let scheme = head.split_once("://").map_or("redis", |(s, _)| s);
            format!("{scheme}://…@{host}")
        }
        None => url.to_string(),
    }
}

/// Serializes `--redis-url` without its password (the JSON report goes places).
fn redacted<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&redact(u)),
        None => s.serialize_none(),
    }
}

/// Parses `500ms`, `2s`, `1.5s` or `250` (milliseconds) into milliseconds.
pub(crate) fn parse_millis(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (t, 1.0)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * scale <= 3_600_000.0 => Ok(v * scale),
        _ => Err(format!(
            "bad duration {s:?}: expected e.g. 500ms, 2s or 250 (milliseconds), above 0 and at most an hour"
        )),
    }
}

/// Parses `1,3-5` into [1, 3, 4, 5].
pub(crate) fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("bad CPU list {s:?}: expected e.g. 0 or 1,3-5");
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) =
                (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if a > b || b > 1023 {
                return Err(bad());
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| bad())?);
        }
    }
    Ok(out)
}

/// Parses a comma-separated list of positive numbers.
pub(crate) fn parse_list<T: std::str::FromStr + PartialOrd + Default>(
    what: &str,
    s: &str,
) -> Result<Vec<T>, String> {
    let v: Result<Vec<T>, _> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse::<T>)
        .collect();
    match v {
        Ok(v) if !v.is_empty() && v.iter().all(|x| *x > T::default()) => Ok(v),
        _ => Err(format!(
            "bad {what} {s:?}: expected positive numbers separated by commas"
        )),
    }
}

impl Args {
    /// Nodes of the run: --nodes, else one per --target, else 1.
    pub(crate) fn node_count(&self) -> usize {
        self.nodes.unwrap_or(self.target.len().max(1))
    }

    /// Checks what clap cannot.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let pos = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
        pos(
            self.duration.is_finite() && self.duration > 0.0 && self.duration <= 86_400.0,
            "--duration must be above 0 and at most 86400",
        )?;
        pos(
            self.window >= 1 && self.window <= 65_536,
            "--window must be from 1 to 65536",
        )?;
        pos(
            self.rate.is_finite() && self.rate >= 0.0 && self.rate <= 1e9,
            "--rate must be from 0 to 1e9",
        )?;
        pos(
            self.payload <= 60_000,
            "--payload must be at most 60000 bytes (the server's message limit is 64 KiB)",
        )?;
        pos(
            (1..=1000).contains(&self.broadcasts),
            "--broadcasts must be from 1 to 1000",
        )?;
        pos(self.channels >= 1, "--channels must be at least 1")?;
        pos(self.per_channel >= 1, "--per-channel must be at least 1")?;
        pos(
            self.threads >= 1 && self.threads <= 256,
            "--threads must be from 1 to 256",
        )?;
        pos(
            self.subscribers.is_none_or(|n| n >= 1),
            "--subscribers must be at least 1",
        )?;
        pos(self.interval_ms >= 10, "--interval-ms must be at least 10")?;
        pos(
            self.live_timeout.is_finite() && self.live_timeout > 0.0 && self.live_timeout < 3600.0,
            "--live-timeout must be above 0 and under 3600",
        )?;
        pos(
            self.slow_share > 0.0 && self.slow_share < 1.0,
            "--slow-share must be between 0 and 1",
        )?;
        pos(
            self.ramp_rate.is_finite() && self.ramp_rate > 0.0,
            "--ramp-rate must be above 0",
        )?;
        pos(self.ramp_to >= 1, "--ramp-to must be at least 1")?;
        pos(
            self.churn_connects.is_finite() && self.churn_connects >= 0.0,
            "--churn-connects must be 0 or more",
        )?;
        pos(
            self.churn_toggles.is_finite() && self.churn_toggles >= 0.0,
            "--churn-toggles must be 0 or more",
        )?;
        pos(
            self.step_seconds.is_finite() && self.step_seconds > 0.0 && self.step_seconds <= 3600.0,
            "--step-seconds must be above 0",
        )?;
        pos(
            self.p99_ms.is_finite() && self.p99_ms > 0.0,
            "--p99-ms must be above 0",
        )?;
        pos(
            self.hub_threads.is_none_or(|n| (1..=1024).contains(&n)),
            "--hub-threads must be from 1 to 1024",
        )?;
        pos(
            self.hub_shards.is_none_or(|n| (1..=1024).contains(&n)),
            "--hub-shards must be from 1 to 1024",
        )?;
        pos(
            self.history_size
                .is_none_or(|n| (1..=10_000_000).contains(&n)),
            "--history-size must be from 1 to 10000000",
        )?;
        pos(
            self.hub_queue_bytes.is_none_or(|n| n >= 1024),
            "--hub-queue-bytes must be at least 1024",
        )?;
        for t in &self.target {
            crate::conn::Target::split(t)?;
        }
        if self.target.len() > 2 {
            return Err("--target may be given at most twice (two nodes)".into());
        }
        pos(
            self.nodes.is_none_or(|n| (1..=2).contains(&n)),
            "--nodes must be 1 or 2",
        )?;
        if !self.target.is_empty() && self.nodes.is_some_and(|n| n != self.target.len()) {
            return Err(format!(
                "--nodes {} with {} --target: give one --target per node",
                self.nodes.unwrap_or(1),
                self.target.len()
            ));
        }
        if self.node_count() > 1 && self.scenario == Scenario::Ramp {
            return Err(
                "the ramp scenario runs on one node: drop --nodes 2 / the second --target".into(),
            );
        }
        if self.node_count() > 1 && self.scenario == Scenario::Capacity {
            return Err(
                "the capacity scenario measures one hub: drop --nodes 2 / the second --target"
                    .into(),
            );
        }
        if self.tls && !self.target.is_empty() {
            return Err("--tls makes the embedded hub serve wss://; for a --target, give a wss:// URL with --ca or --insecure".into());
        }
        if self.ca.is_some() && self.insecure {
            return Err("--ca and --insecure: choose one".into());
        }
        let wss = self.target.iter().any(|t| t.starts_with("wss://"));
        if (self.ca.is_some() || self.insecure) && !wss {
            return Err("--ca and --insecure are for wss:// targets".into());
        }
        if (self.tls || wss) && matches!(self.scenario, Scenario::Ramp | Scenario::Recover) {
            return Err(
                "the ramp and recover scenarios drive plain sockets: TLS (--tls, wss://) is for the others"
                    .into(),
            );
        }
        if self.rcvbuf.is_some() && matches!(self.scenario, Scenario::Ramp | Scenario::Recover) {
            return Err("--rcvbuf is for the scenarios whose subscribers the engine drives: not ramp or recover".into());
        }
        if let Some(at) = self.restart_redis_at {
            if self.scenario != Scenario::Recover || self.node_count() != 2 {
                return Err("--restart-redis-at is for recover --nodes 2".into());
            }
            if !self.target.is_empty() || self.redis_url.is_some() {
                return Err("--restart-redis-at restarts the redis-server this run starts itself: not with --target or --redis-url (restart your own Redis yourself)".into());
            }
            if !(at > 0.0 && at < self.duration) {
                return Err(format!(
                    "--restart-redis-at must be after 0 and before the end of publishing (-d {})",
                    self.duration
                ));
            }
        }
        if self.redis_url.is_some() && (self.node_count() < 2 || !self.target.is_empty()) {
            return Err(
                "--redis-url joins two embedded hubs: use it with --nodes 2 and no --target".into(),
            );
        }
        if !self.target.is_empty()
            && (self.hub_threads.is_some()
                || self.hub_shards.is_some()
                || self.hub_cpus.is_some()
                || self.hub_queue_bytes.is_some()
                || self.hub_slow_consumer.is_some()
                || self.history)
        {
            return Err("--hub-threads, --hub-shards, --hub-cpus, --hub-queue-bytes, --hub-slow-consumer and --history apply to the embedded hub, not to --target".into());
        }
        if self.pid.is_some() && self.target.is_empty() {
            return Err("--pid goes with --target (the embedded hub is this process)".into());
        }
        if self.plot.is_some() && self.scenario != Scenario::Sweep {
            return Err("--plot draws a sweep: use it with the sweep scenario".into());
        }
        parse_list::<usize>("--sweep-subs", &self.sweep_subs)?;
        let rates = parse_list::<f64>("--sweep-rates", &self.sweep_rates)?;
        pos(
            rates.windows(2).all(|w| w[0] < w[1]),
            "--sweep-rates must increase",
        )?;
        if let Some(c) = &self.client_cpus {
            parse_cpu_list(c)?;
        }
        if let Some(c) = &self.hub_cpus {
            parse_cpu_list(c)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn lists() {
        assert_eq!(parse_cpu_list("1,3-5").unwrap(), vec![1, 3, 4, 5]);
        assert!(parse_cpu_list("5-3").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert_eq!(parse_list::<usize>("x", "1, 2").unwrap(), vec![1, 2]);
        assert!(parse_list::<usize>("x", "0").is_err());
        assert!(parse_list::<f64>("x", "").is_err());
    }

    #[test]
    fn tls_flags_go_with_what_they_configure() {
        let a = |v: &[&str]| {
            Args::try_parse_from(std::iter::once("loadtest").chain(v.iter().copied()))
                .unwrap()
                .validate()
        };
        let wss = ["--target", "wss://127.0.0.1:1/ws"];
        assert!(a(&["--tls"]).is_ok());
        assert!(a(&[&wss[..], &["--insecure"]].concat()).is_ok());
        assert!(a(&[&wss[..], &["--ca", "ca.pem"]].concat()).is_ok());
        assert!(a(&[&wss[..], &["--ca", "ca.pem", "--insecure"]].concat()).is_err());
        assert!(a(&[&wss[..], &["--tls"]].concat()).is_err());
        assert!(a(&["--insecure"]).is_err());
        assert!(a(&["--target", "ws://127.0.0.1:1/ws", "--ca", "ca.pem"]).is_err());
        assert!(a(&["ramp", "--tls"]).is_err());
        assert!(a(&[&["recover"], &wss[..], &["--insecure"]].concat()).is_err());
    }

    #[test]
    fn redis_passwords_are_hidden() {
        assert_eq!(redact("redis://:pw@h:1/"), "redis://…@h:1/");
        assert_eq!(redact("redis://h:1/"), "redis://h:1/");
    }

    #[test]
    fn nodes_follow_the_targets() {
        let a = |v: &[&str]| {
            Args::try_parse_from(std::iter::once("loadtest").chain(v.iter().copied())).unwrap()
        };
        assert_eq!(a(&[]).node_count(), 1);
        assert_eq!(a(&["--nodes", "2"]).node_count(), 2);
        let two = a(&[
            "--target",
            "ws://127.0.0.1:1/ws",
            "--target",
            "ws://127.0.0.1:2/ws",
        ]);
        assert_eq!(two.node_count(), 2);
        assert!(two.validate().is_ok());
        assert!(a(&["--nodes", "2", "--target", "ws://127.0.0.1:1/ws"])
            .validate()
            .is_err());
        assert!(a(&["--nodes", "3"]).validate().is_err());
        assert!(a(&["ramp", "--nodes", "2"]).validate().is_err());
        assert!(a(&["recover", "--nodes", "2"]).validate().is_ok());
        let restart = [
            "recover",
            "--nodes",
            "2",
            "-d",
            "3",
            "--restart-redis-at",
            "1",
        ];
        assert!(a(&restart).validate().is_ok());
        assert_eq!(a(&restart).restart_redis_pause, 500.0);
        assert!(a(&["recover", "-d", "3", "--restart-redis-at", "1"])
            .validate()
            .is_err());
        assert!(
            a(&[&restart[..], &["--redis-url", "redis://127.0.0.1:1/"]].concat())
                .validate()
                .is_err()
        );
        assert!(a(&[
            "recover",
            "--nodes",
            "2",
            "-d",
            "3",
            "--restart-redis-at",
            "3"
        ])
        .validate()
        .is_err());
        assert!(a(&[
            "fanout",
            "--nodes",
            "2",
            "-d",
            "3",
            "--restart-redis-at",
            "1"
        ])
        .validate()
        .is_err());
        assert!(a(&["capacity", "--nodes", "2"]).validate().is_err());
        assert!(a(&["capacity", "--broadcasts", "0"]).validate().is_err());
        assert!(a(&["capacity", "--broadcasts", "1001"]).validate().is_err());
        assert_eq!(a(&["capacity"]).broadcasts, 20);
        assert_eq!(a(&["recover", "--drop-every", "2s"]).drop_every, 2000.0);
        assert_eq!(a(&["recover"]).drop_every, 500.0);
        assert!(parse_millis("0ms").is_err() && parse_millis("x").is_err());
        assert_eq!(parse_millis("250").unwrap(), 250.0);
        assert!(a(&["--redis-url", "redis://127.0.0.1:1/"])
            .validate()
            .is_err());
        assert!(a(&["--hub-queue-bytes", "100"]).validate().is_err());
        assert_eq!(a(&["--rcvbuf", "4096"]).rcvbuf, Some(4096));
        assert!(a(&["ramp", "--rcvbuf", "4096"]).validate().is_err());
        assert_eq!(
            a(&["--hub-slow-consumer", "drop-oldest"]).hub_slow_consumer,
            Some(SlowConsumer::DropOldest)
        );
        assert!(a(&[
            "--target",
            "ws://127.0.0.1:1/ws",
            "--hub-slow-consumer",
            "disconnect"
        ])
        .validate()
        .is_err());
    }
}
