//! The quick start as a program: a wshub hub at ws://ADDR/ws.
//!
//! ```text
//! cargo run --release --example server -- [--addr 127.0.0.1:8080] [--allow-publish]
//! ```
//!
//! `--allow-publish` lets clients `publish` to any channel (what `shared/bench/compare.sh` and
//! `loadtest --target` need). Ctrl-C or SIGTERM shuts down gracefully: every client gets what
//! was already sent, then a 1001 close.

use std::net::SocketAddr;
use std::process::ExitCode;

use wshub::{Hub, HubConfig, PublishPolicy};

const USAGE: &str = "usage: server [--addr HOST:PORT] [--allow-publish]
  --addr HOST:PORT   where to listen (default 127.0.0.1:8080)
  --allow-publish    let clients publish to any channel (default: refused)";

struct Args {
    addr: SocketAddr,
    allow_publish: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        allow_publish: false,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--addr" => {
                let value = argv.next().ok_or("--addr needs HOST:PORT")?;
                args.addr = value
                    .parse()
                    .map_err(|err| format!("--addr {value:?}: {err}"))?;
            }
            "--allow-publish" => args.allow_publish = true,
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
    let config = match HubConfig::builder().publish_policy(policy).build() {
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
    ExitCode::SUCCESS
}
