//! `loadtest`: capacity planning for wshub.
//!
//! Opens many WebSocket connections to a hub (one embedded in this process by default, or any
//! server speaking wshub's protocol with `--target`), publishes through them, and reports
//! published and delivered messages per second, losses, duplicates, publish-to-receive latency
//! percentiles, errors, and the CPU and memory both sides used. `loadtest --help` lists the
//! scenarios and every option.
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
mod plot;
mod ramp;
mod report;
mod scenarios;
mod stats;
mod sys;
mod ws;

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::json;

use cli::Args;
use conn::Target;
use scenarios::Server;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let target = args.target.as_deref().map(Target::parse).transpose()?;
    let conns = args.connections_needed();
    // Every connection is a file descriptor here, and one more in the hub when it is embedded.
    let fds_needed = conns as u64 * if target.is_some() { 1 } else { 2 } + 64;
    let limit =
        sys::raise_fd_limit().map_err(|e| format!("cannot read the file descriptor limit: {e}"))?;
    if fds_needed > limit {
        return Err(format!(
            "{conns} connections need about {fds_needed} file descriptors{}, but the limit is {limit} \
             (raise the hard limit, e.g. `ulimit -Hn`, or ask for fewer connections)",
            if target.is_some() { "" } else { " (both ends are in this process)" }
        ));
    }
    // One source address has only so many local ports; spread over 127.0.0.x when needed.
    let ports = sys::local_port_count().saturating_sub(1000).max(1000);
    let sources = conns.div_ceil(ports as usize).max(1);
    if sources > 1 {
        let loopback = target.as_ref().map_or(true, |t| t.addr.ip().is_loopback());
        if !loopback || sources > 250 {
            return Err(format!("{conns} connections need more local ports than {} source address(es) have ({ports} each)", if loopback { 250 } else { 1 }));
        }
    }
    let sources = sources as u8;

    let server = start_server(args, target)?;
    say!(
        "loadtest {}: {}",
        args.scenario_name(),
        if server.is_embedded() {
            format!("embedded wshub at {}{}", server.url, server.describe())
        } else {
            format!("target {}", server.url)
        }
    );
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let result = scenarios::run(args, &server, sources);
    #[cfg(feature = "embedded")]
    if let Some(e) = { server }.embedded.take() {
        e.stop();
    }
    let out = result?;
    if let Some(path) = &args.json {
        let doc = json!({
            "tool": "loadtest",
            "version": env!("CARGO_PKG_VERSION"),
            "scenario": args.scenario_name(),
            "mode": if args.target.is_some() { "target" } else { "embedded" },
            "target": args.target,
            "config": args,
            "git_revision": sys::git_revision(),
            "cpu_model": sys::cpu_model(),
            "cpus": sys::cpus(),
            "started_unix": started,
            "connect_seconds": out.connect_seconds,
            "live_seconds": out.live_seconds,
            "steps": out.steps,
            "summary": out.summary,
        });
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| format!("cannot encode the JSON report: {e}"))?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        say!("JSON report written to {}", path.display());
    }
    Ok(())
}

#[cfg(feature = "embedded")]
fn start_server(args: &Args, target: Option<Target>) -> Result<Server, String> {
    if let Some(t) = target {
        return Ok(Server {
            url: args.target.clone().unwrap_or_default(),
            target: t,
            embedded: None,
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
    };
    let e = embedded::Embedded::start(&opts)?;
    let t = Target::local(e.addr);
    Ok(Server {
        url: format!("ws://{}/ws", e.addr),
        target: t,
        embedded: Some(e),
        pid: None,
    })
}

#[cfg(not(feature = "embedded"))]
fn start_server(args: &Args, target: Option<Target>) -> Result<Server, String> {
    match target {
        Some(t) => Ok(Server {
            url: args.target.clone().unwrap_or_default(),
            target: t,
            pid: args.pid,
        }),
        None => Err(
            "this build has no embedded hub (built without the `embedded` feature): use --target"
                .into(),
        ),
    }
}
