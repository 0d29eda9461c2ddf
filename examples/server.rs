//! The quick start as a program: a wshub hub at ws://ADDR/ws.
//!
//! ```text
//! cargo run --release --example server -- [--addr 127.0.0.1:8080] [--allow-publish]
//!     [--history N [--history-ttl SECS]] [--max-connections N] [--no-io-uring]
//! cargo run --release --features metrics --example server -- --metrics 127.0.0.1:9090
//! cargo run --release --features tls --example server -- --tls-cert cert.pem --tls-key key.pem
//! cargo run --release --features redis --example server -- --redis redis://127.0.0.1:6379/ \
//!     --history 1000
//! ```
//!
//! `--allow-publish` lets clients `publish` to any channel (what `shared/bench/compare.sh` and
//! `loadtest --target` need). `--history N` keeps the last N publications of every channel
//! (for an hour, or `--history-ttl` seconds), so that a client that reconnects subscribes with
//! `since` and misses nothing. Ctrl-C or SIGTERM shuts down gracefully: every client gets what
//! was already sent, then a 1001 close.
//!
//! Built with the cargo feature `redis`, `--redis URL` joins this node to the others on that
//! Redis (PROTOCOL.md, "Several nodes"); with `--history`, the channels' histories and offsets
//! then live in Redis, so a client recovers on whichever node it reaches.
//!
//! Built with the cargo feature `metrics`, `--metrics HOST:PORT` serves the hub's Prometheus
//! metrics at `http://HOST:PORT/metrics`, on a listener of its own; without the feature the
//! flag is refused. Built with the cargo feature `tls`, `--tls-cert PEM --tls-key PEM` serve
//! `wss://ADDR/ws` instead of `ws://` (the certificate chain, server's first, and its private
//! key); without the feature those flags are refused. Logs go to stderr through
//! `tracing-subscriber`, filtered by `RUST_LOG` (default `warn,wshub=info`: the hub's one
//! startup line says whether the shards write with io_uring or send(2); `RUST_LOG=wshub=debug`
//! shows each connection's life, refusals and cuts).

use std::net::SocketAddr;
use std::process::ExitCode;

use std::time::Duration;

use wshub::{HistoryPolicy, Hub, HubConfig, PublishPolicy};

const USAGE: &str =
    "usage: server [--addr HOST:PORT] [--allow-publish] [--history N [--history-ttl SECS]]
              [--max-connections N] [--no-io-uring]
  --addr HOST:PORT     where to listen (default 127.0.0.1:8080)
  --allow-publish      let clients publish to any channel (default: refused)
  --history N          keep the last N publications of every channel (default: no history)
  --history-ttl SECS   and each for at most SECS seconds (default 3600)
  --max-connections N  refuse upgrades (503) past N connections (default 100000, the hub's);
                       the open-file limit must allow N too (it is raised to its hard limit)
  --no-io-uring        write with send(2) even where io_uring is available (to compare)";

/// The flags of the cargo feature `metrics`, in the usage only when it is built in.
#[cfg(feature = "metrics")]
const METRICS_USAGE: &str = "
  --metrics HOST:PORT  serve Prometheus metrics at http://HOST:PORT/metrics (default: off)";
#[cfg(not(feature = "metrics"))]
const METRICS_USAGE: &str = "";

/// The flags of the cargo feature `tls`, in the usage only when it is built in.
#[cfg(feature = "tls")]
const TLS_USAGE: &str = "
  --tls-cert PEM       serve wss:// with this certificate chain (server's first) ...
  --tls-key PEM        ... and this private key (PKCS#8, PKCS#1 or SEC1); both or neither";
#[cfg(not(feature = "tls"))]
const TLS_USAGE: &str = "";

/// The flag of the cargo feature `redis`, in the usage only when it is built in.
#[cfg(feature = "redis")]
const REDIS_USAGE: &str = "
  --redis URL          join the nodes on this Redis (redis://HOST:PORT/); with --history,
                       histories and offsets live there (default: one node)";
#[cfg(not(feature = "redis"))]
const REDIS_USAGE: &str = "";

struct Args {
    addr: SocketAddr,
    allow_publish: bool,
    history: Option<usize>,
    history_ttl: Duration,
    max_connections: Option<usize>,
    io_uring: bool,
    #[cfg(feature = "metrics")]
    metrics: Option<SocketAddr>,
    #[cfg(feature = "tls")]
    tls_cert: Option<std::path::PathBuf>,
    #[cfg(feature = "tls")]
    tls_key: Option<std::path::PathBuf>,
    #[cfg(feature = "redis")]
    redis: Option<String>,
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
        max_connections: None,
        io_uring: true,
        #[cfg(feature = "metrics")]
        metrics: None,
        #[cfg(feature = "tls")]
        tls_cert: None,
        #[cfg(feature = "tls")]
        tls_key: None,
        #[cfg(feature = "redis")]
        redis: None,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--addr" => args.addr = value_of(&mut argv, "--addr")?,
            "--allow-publish" => args.allow_publish = true,
            "--no-io-uring" => args.io_uring = false,
            "--max-connections" => {
                args.max_connections = Some(value_of(&mut argv, "--max-connections")?)
            }
            "--history" => args.history = Some(value_of(&mut argv, "--history")?),
            "--history-ttl" => {
                args.history_ttl = Duration::from_secs(value_of(&mut argv, "--history-ttl")?)
            }
            #[cfg(feature = "metrics")]
            "--metrics" => args.metrics = Some(value_of(&mut argv, "--metrics")?),
            #[cfg(not(feature = "metrics"))]
            "--metrics" => {
                return Err(
                    "unknown argument \"--metrics\": this build has no metrics; \
                     build with `--features metrics`"
                        .to_owned(),
                )
            }
            #[cfg(feature = "tls")]
            "--tls-cert" => args.tls_cert = Some(value_of(&mut argv, "--tls-cert")?),
            #[cfg(feature = "tls")]
            "--tls-key" => args.tls_key = Some(value_of(&mut argv, "--tls-key")?),
            #[cfg(not(feature = "tls"))]
            flag @ ("--tls-cert" | "--tls-key") => {
                return Err(format!(
                    "unknown argument {flag:?}: this build has no TLS; \
                     build with `--features tls`"
                ))
            }
            #[cfg(feature = "redis")]
            "--redis" => args.redis = Some(value_of(&mut argv, "--redis")?),
            #[cfg(not(feature = "redis"))]
            "--redis" => {
                return Err(
                    "unknown argument \"--redis\": this build has no Redis broker; \
                     build with `--features redis`"
                        .to_owned(),
                )
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    #[cfg(feature = "tls")]
    if args.tls_cert.is_some() != args.tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".to_owned());
    }
    Ok(args)
}

/// Serves `GET /metrics` (the hub's Prometheus text) on `listener`, anything else 404, until
/// the process ends: a tiny hyper HTTP/1 service, apart from the WebSocket listener.
#[cfg(feature = "metrics")]
async fn serve_metrics(listener: tokio::net::TcpListener, hub: Hub) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let response = if request.uri().path() == "/metrics" {
                    Response::builder()
                        .header(hyper::header::CONTENT_TYPE, wshub::METRICS_CONTENT_TYPE)
                        .body(Full::new(Bytes::from(hub.metrics())))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"not found: try /metrics\n")))
                };
                std::future::ready(response)
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%err, "metrics connection ended with an error");
            }
        });
    }
}

#[path = "common/shutdown_signal.rs"]
mod shutdown_signal;
use shutdown_signal::shutdown_signal;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,wshub=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(args) => args,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("error: {why}");
            }
            eprintln!("{USAGE}{METRICS_USAGE}{TLS_USAGE}{REDIS_USAGE}");
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
    let mut builder = HubConfig::builder()
        .publish_policy(policy)
        .io_uring(args.io_uring);
    if let Some(max) = args.max_connections {
        builder = builder.max_connections(max);
    }
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
    #[cfg(feature = "redis")]
    if let Some(url) = &args.redis {
        match wshub::RedisBroker::new(wshub::RedisConfig::new(url.as_str())) {
            Ok(broker) => builder = builder.broker(broker),
            Err(err) => {
                eprintln!("error: --redis: {err}");
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
    #[cfg(feature = "tls")]
    let acceptor = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match wshub::tls::acceptor_from_pem(cert, key) {
            Ok(acceptor) => Some(acceptor),
            Err(err) => {
                eprintln!("error: --tls-cert/--tls-key: {err}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    #[cfg(feature = "tls")]
    let scheme = if acceptor.is_some() { "wss" } else { "ws" };
    #[cfg(not(feature = "tls"))]
    let scheme = "ws";
    let hub = Hub::with_config(config);
    // The address bound: with `--addr 127.0.0.1:0` the system picks a free port and this line
    // names it (the browser tests start the server that way).
    let addr = listener.local_addr().unwrap_or(args.addr);
    eprintln!(
        "wshub listening on {scheme}://{addr}/ws ({} shards)",
        hub.config().shards()
    );
    #[cfg(feature = "metrics")]
    if let Some(addr) = args.metrics {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                eprintln!("metrics at http://{addr}/metrics");
                tokio::spawn(serve_metrics(listener, hub.clone()));
            }
            Err(err) => {
                eprintln!("error: cannot listen on {addr} for --metrics: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    #[cfg(feature = "tls")]
    if let Some(acceptor) = acceptor {
        wshub::tls::serve(listener, acceptor, hub.clone(), shutdown_signal()).await;
        eprintln!(
            "TLS handshakes failed or timed out: {}",
            hub.stats().tls_handshake_failures
        );
    } else {
        wshub::serve(listener, hub.clone(), shutdown_signal()).await;
    }
    #[cfg(not(feature = "tls"))]
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
