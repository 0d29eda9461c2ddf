//! `loadtest`: capacity planning for wshub.
//!
//! Opens many WebSocket connections to a hub (one embedded in this process by default, or any
//! server speaking wshub's protocol with `--target`), publishes through them, and reports
//! published and delivered messages per second, losses, duplicates, publish-to-receive latency
//! percentiles, errors, and the CPU and memory both sides used. `loadtest --help` lists the
//! scenarios and every option. The exit status says whether measured messages were lost or
//! errors happened (`verdict`), so scripts and CI can act on it.
//!
//! The generator is a minimal WebSocket client written for this: frames are built and masked
//! here, server frames parsed here, and of each delivered message only the sequence number and
//! the send time at the start of its `data` are read, never the whole JSON, so the generator is
//! not what limits the measurement.

/// `println!` that ignores a closed stdout (`loadtest | head` must not panic).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

mod cli;
mod conn;
#[cfg(feature = "embedded")]
mod embedded;
mod engine;
mod mailbox;
mod plot;
mod ramp;
mod recover;
#[cfg(feature = "embedded")]
mod redis_server;
mod report;
mod scenarios;
mod sock;
mod stats;
mod sys;
mod tls;
mod verdict;
mod ws;

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::json;

use cli::Args;
use conn::Target;
use scenarios::Server;
use verdict::{StepTally, Verdict, EXIT_FAILED, EXIT_USAGE};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    match run(&args) {
        // The statuses are listed in `--help` (verdict::EXIT_STATUS_HELP) and the README.
        Ok(v) => ExitCode::from(v.exit_code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Runs the scenario, reports, and judges the run.
fn run(args: &Args) -> Result<Verdict, String> {
    let tls = match (&args.ca, args.insecure) {
        (Some(ca), _) => Some(tls::from_ca_file(ca)?),
        (None, true) => Some(tls::insecure()?),
        (None, false) => None,
    };
    let targets = args
        .target
        .iter()
        .map(|t| Target::parse(t, tls.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    let target = targets.first();
    let conns = args.connections_needed();
    check_fds(conns, target.is_some())?;
    // One source address has only so many local ports; spread over 127.0.0.x when needed.
    let ports = sys::local_port_count().saturating_sub(1000).max(1000);
    let sources = conns.div_ceil(ports as usize).max(1);
    if sources > 1 {
        let loopback = targets.iter().all(|t| t.addr.ip().is_loopback());
        if !loopback || sources > 250 {
            return Err(format!("{conns} connections need more local ports than {} source address(es) have ({ports} each)", if loopback { 250 } else { 1 }));
        }
    }
    let sources = sources as u8;

    let server = start_server(args, targets)?;
    let urls = server.urls.join(" and ");
    say!(
        "loadtest {}: {}",
        args.scenario_name(),
        match (server.is_embedded(), server.urls.len()) {
            (true, 1) => format!("embedded wshub at {urls}{}", server.describe()),
            (true, _) => format!(
                "embedded wshub nodes at {urls}{}; subscribers split over them, publishers on the first",
                server.describe()
            ),
            (false, 1) => format!("target {urls}"),
            (false, _) => format!("targets {urls}; subscribers split over them, publishers on the first"),
        }
    );
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let result = scenarios::run(args, &server, sources);
    let server_urls = server.urls.clone();
    #[cfg(feature = "embedded")]
    {
        let mut server = server;
        // The hubs first, then the Redis that joins them.
        for e in server.embedded.drain(..) {
            e.stop();
        }
        drop(server.redis.take());
    }
    let out = result?;
    let mut tallies: Vec<StepTally> = out.steps.iter().map(StepTally::from).collect();
    tallies.extend(out.tallies.iter().cloned());
    let verdict = verdict::judge(args.scenario, &tallies, &out.sweep);
    if let Some(path) = &args.json {
        let doc = json!({
            "tool": "loadtest",
            "version": env!("CARGO_PKG_VERSION"),
            "scenario": args.scenario_name(),
            "mode": if args.target.is_empty() { "embedded" } else { "target" },
            "target": args.target.first(),
            "nodes": args.node_count(),
            "node_urls": server_urls,
            "config": args,
            "git_revision": sys::git_revision(),
            "cpu_model": sys::cpu_model(),
            "cpus": sys::cpus(),
            "started_unix": started,
            "connect_seconds": out.connect_seconds,
            "live_seconds": out.live_seconds,
            "steps": out.steps,
            "summary": out.summary,
            "verdict": verdict,
        });
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| format!("cannot encode the JSON report: {e}"))?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        say!("JSON report written to {}", path.display());
    }
    say!("{}", verdict.text());
    Ok(verdict)
}

/// Raises the soft file descriptor limit to the hard one, and refuses a run of `conns`
/// connections that would not fit (before connecting anything), saying which limit is short.
fn check_fds(conns: usize, target: bool) -> Result<(), String> {
    // Every connection is a file descriptor here, and one more in the hub when it is embedded;
    // 64 for everything else (the runtime, stdio, the JSON file).
    let per_conn: u64 = if target { 1 } else { 2 };
    let needed = conns as u64 * per_conn + 64;
    let lim =
        sys::raise_fd_limit().map_err(|e| format!("cannot read the file descriptor limit: {e}"))?;
    let both = if target {
        ""
    } else {
        " (both ends are in this process: use --target for a hub in its own process)"
    };
    if needed > lim.hard {
        let most = lim.hard.saturating_sub(64) / per_conn;
        return Err(format!(
            "{conns} connections need about {needed} file descriptors{both}, but the hard limit \
             is {} (RLIMIT_NOFILE; only root raises it: `ulimit -Hn`, LimitNOFILE= in systemd, \
             at most fs.nr_open): ask for at most {most} connections here",
            lim.hard
        ));
    }
    if needed > lim.soft {
        let why = lim
            .raise_error
            .map_or_else(String::new, |e| format!(": {e}"));
        return Err(format!(
            "{conns} connections need about {needed} file descriptors{both}, but the soft limit \
             is {} and could not be raised to the hard limit {}{why} (try `ulimit -n {}`)",
            lim.soft, lim.hard, lim.hard
        ));
    }
    Ok(())
}

#[cfg(feature = "embedded")]
fn start_server(args: &Args, targets: Vec<Target>) -> Result<Server, String> {
    if !targets.is_empty() {
        return Ok(Server {
            urls: args.target.clone(),
            targets,
            embedded: Vec::new(),
            redis: None,
            redis_url: None,
            pid: args.pid,
        });
    }
    let opts = embedded::HubOptions {
        threads: args.hub_threads,
        shards: args.hub_shards,
        cpus: args
            .hub_cpus
            .as_deref()
            .map(cli::parse_cpu_list)
            .transpose()?
            .unwrap_or_default(),
        queue_bytes: args.hub_queue_bytes,
        slow_consumer: args.hub_slow_consumer,
        history: args
            .wants_history()
            .then(|| (args.channel.clone(), args.history_size())),
    };
    let nodes = args.node_count();
    let tls = args.tls.then(tls::embedded).transpose()?;
    let (redis, redis_url) = if nodes > 1 {
        match &args.redis_url {
            Some(url) => (None, Some(url.clone())),
            None => {
                let r = redis_server::RedisServer::start()?;
                let url = r.url();
                (Some(r), Some(url))
            }
        }
    } else {
        (None, None)
    };
    let mut server = Server {
        targets: Vec::new(),
        urls: Vec::new(),
        embedded: Vec::new(),
        redis,
        redis_url: redis_url.clone(),
        pid: None,
    };
    // Distinct node ids, unique to this run so that runs sharing one Redis do not mix.
    let run = std::process::id();
    for n in 0..nodes {
        let join = redis_url.as_ref().map(|url| embedded::Join {
            url: url.clone(),
            node_id: format!("loadtest-{run}-{}", char::from(b'a' + n as u8)),
        });
        // On an error, `server` drops: the hubs started so far stop, then the redis-server.
        let e = embedded::Embedded::start(&opts, join.as_ref(), tls.as_ref().map(|t| &t.0))?;
        let target = Target::local(e.addr, tls.as_ref().map(|t| &t.1));
        server.urls.push(target.url());
        server.targets.push(target);
        server.embedded.push(e);
    }
    Ok(server)
}

#[cfg(not(feature = "embedded"))]
fn start_server(args: &Args, targets: Vec<Target>) -> Result<Server, String> {
    if targets.is_empty() {
        return Err(
            "this build has no embedded hub (built without the `embedded` feature): use --target"
                .into(),
        );
    }
    if args.nodes.is_some_and(|n| n != targets.len()) {
        return Err("give one --target per node".into());
    }
    Ok(Server {
        urls: args.target.clone(),
        targets,
        pid: args.pid,
    })
}
