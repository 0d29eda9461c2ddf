//! The quick start as a program: a wshub hub at ws://ADDR/ws.
//!
//! ```text
//! cargo run --release --example server -- [--addr 127.0.0.1:8080] [--allow-publish]
//!     [--history N [--history-ttl SECS]]
//! ```
//!
//! `--allow-publish` lets clients `publish` to any channel (what `shared/bench/compare.sh` and
//! `loadtest --target` need). `--history N` keeps the last N publications of every channel
//! (for an hour, or `--history-ttl` seconds), so that a client that reconnects subscribes with
//! `since` and misses nothing. Ctrl-C or SIGTERM shuts down gracefully: every client gets what
//! was already sent, then a 1001 close.

use std::net::SocketAddr;
use std::process::ExitCode;

use std::time::Duration;

use wshub::{HistoryPolicy, Hub, HubConfig, PublishPolicy};

const USAGE: &str =
    "usage: server [--addr HOST:PORT] [--allow-publish] [--history N [--history-ttl SECS]]
  --addr HOST:PORT     where to listen (default 127.0.0.1:8080)
  --allow-publish      let clients publish to any channel (default: refused)
  --history N          keep the last N publications of every channel (default: no history)
  --history-ttl SECS   and each for at most SECS seconds (default 3600)";

struct Args {
    addr: SocketAddr,
    allow_publish: bool,
    history: Option<usize>,
    history_ttl: Duration,
}

/// The value after flag `name`, parsed.
fn value_of<T: std::str::FromStr>(
    argv: &mut impl Iterator<Item = String>,
    name: &str,
) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let value = argv.next().ok_or(format!("{name} needs a value"))?;
    value
        .parse()
        .map_err(|err| format!("{name} {value:?}: {err}"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        allow_publish: false,
        history: None,
        history_ttl: Duration::from_secs(3600),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--addr" => args.addr = value_of(&mut argv, "--addr")?,
            "--allow-publish" => args.allow_publish = true,
            "--history" => args.history = Some(value_of(&mut argv, "--history")?),
            "--history-ttl" => {
                args.history_ttl = Duration::from_secs(value_of(&mut argv, "--history-ttl")?)
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("error: {why}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(err) = wshub::raise_fd_limit() {
        eprintln!("warning: could not raise the open-file limit: {err}");
    }
    let policy = if args.allow_publish {
        PublishPolicy::AllowAll
    } else {
        PublishPolicy::Refuse
    };
    let mut builder = HubConfig::builder().publish_policy(policy);
    if let Some(count) = args.history {
        // Every channel: the empty prefix matches every name.
        match HistoryPolicy::new(count, args.history_ttl) {
            Ok(history) => builder = builder.prefix_history("", history),
            Err(err) => {
                eprintln!("error: --history: {err}");
                return ExitCode::from(2);
            }
        }
    }
    let config = match builder.build() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("error: cannot listen on {}: {err}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    let hub = Hub::with_config(config);
    eprintln!(
        "wshub listening on ws://{}/ws ({} shards)",
        args.addr,
        hub.config().shards()
    );
    wshub::serve(listener, hub.clone(), shutdown_signal()).await;
    let stats = hub.stats();
    // What an operator checks after a run: whether anything was refused or cut, and how long
    // a shard held a worker thread at most (the README quotes it).
    eprintln!(
        "wshub stopped: {} published, {} delivered, {} dropped, {} slow consumers cut, \
         {} refused for overload, longest shard turn {:?}",
        stats.published,
        stats.delivered,
        stats.dropped,
        stats.slow_consumer_disconnects,
        stats.backlog_refused,
        stats.longest_shard_turn
    );
    if args.history.is_some() {
        eprintln!(
            "histories: {} channels, {} publications, {} bytes",
            stats.history.channels, stats.history.publications, stats.history.memory_bytes
        );
    }
    ExitCode::SUCCESS
}
