//! An echo endpoint on wshub's own connection layer, for the Autobahn conformance suite.
//!
//! ```text
//! cargo run --release --example autobahn_echo -- [--addr 127.0.0.1:9001]
//! ```
//!
//! Every message a client sends comes back as it came, text or binary, through the same
//! reader, writer, fragment reassembly, limits and close handshake as hub connections. The
//! message limit is 16 MiB (Autobahn's case 9 echoes messages that large), and the outbound
//! queue bound is raised to match, so a big echo is not taken for a slow consumer. It serves
//! every path.

use std::net::SocketAddr;
use std::process::ExitCode;

use hyper_util::rt::TokioIo;
use wshub::{Hub, HubConfig};

const MAX_MESSAGE: usize = 16 * 1024 * 1024;

fn parse_addr() -> Result<SocketAddr, String> {
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 9001));
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--addr" => {
                let value = argv.next().ok_or("--addr needs HOST:PORT")?;
                addr = value
                    .parse()
                    .map_err(|e| format!("--addr {value:?}: {e}"))?;
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: autobahn_echo [--addr HOST:PORT]"
                ))
            }
        }
    }
    Ok(addr)
}

#[tokio::main]
async fn main() -> ExitCode {
    let addr = match parse_addr() {
        Ok(addr) => addr,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::from(2);
        }
    };
    let config = HubConfig::builder()
        .echo_for_conformance_tests(true)
        .max_message_size(MAX_MESSAGE)
        .outbound_queue_bytes(4 * MAX_MESSAGE)
        .build()
        .expect("a valid configuration");
    let hub = Hub::with_config(config);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("error: cannot listen on {addr}: {err}");
            return ExitCode::FAILURE;
        }
    };
    // The address bound, not the one asked for: with port 0, .ci/autobahn.sh reads the port
    // the kernel chose from this line.
    let addr = listener.local_addr().unwrap_or(addr);
    eprintln!("autobahn echo listening on ws://{addr}/");
    tokio::spawn({
        let hub = hub.clone();
        async move { hub.run(std::future::pending()).await }
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let service = hyper::service::service_fn(move |request| {
                let response = hub.handle_websocket(request);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}
