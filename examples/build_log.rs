//! Live build logs in a browser: a hub, a page and `web/wshub.js` on one port, and a build
//! streamed to `process:ID` with `Hub::stream_process`.
//!
//! ```text
//! cargo run --example build_log -- [--addr 127.0.0.1:8080] [--id build-1] [-- CMD ARGS...]
//! ```
//!
//! Open `http://ADDR/` (or `http://ADDR/?id=ID` with another `--id`): the page subscribes to
//! `process:ID` with `since: {offset: 0}`, so opened half-way it shows the log from the first
//! line the history holds, and after a dropped connection it resumes where it left off
//! (`web/wshub.js` does that). `/go-ws.html` runs the go-ws wiki's JavaScript snippet against
//! the same hub (it connects to `ws://localhost:8080/ws`, the default address). Without a
//! command the build is a demo: 200 lines, one every 100 ms, some on stderr. The hub keeps
//! serving after the build has ended, until Ctrl-C or SIGTERM.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use wshub::{HistoryPolicy, Hub, HubConfig};

const PAGE: &str = include_str!("../web/build_log.html");
const MODULE: &str = include_str!("../web/wshub.js");
const GO_WS_PAGE: &str = include_str!("../web/go-ws.html");

const DEMO: &str = "for i in $(seq 1 200); do echo \"line $i\"; \
                    if [ $((i % 25)) -eq 0 ]; then echo \"warning: $i lines\" >&2; fi; \
                    sleep 0.1; done";

const USAGE: &str = "usage: build_log [--addr HOST:PORT] [--id ID] [-- CMD ARGS...]
  --addr HOST:PORT   where to listen (default 127.0.0.1:8080)
  --id ID            the process id: the log goes to channel process:ID (default build-1)
  -- CMD ARGS...     the build to run (default: a demo, 200 lines over 20 s)";

struct Args {
    addr: SocketAddr,
    id: String,
    command: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        id: "build-1".to_owned(),
        command: Vec::new(),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--addr" => {
                let value = argv.next().ok_or("--addr needs a value")?;
                args.addr = value
                    .parse()
                    .map_err(|err| format!("--addr {value:?}: {err}"))?;
            }
            "--id" => args.id = argv.next().ok_or("--id needs a value")?,
            "--" => {
                args.command = argv.collect();
                if args.command.is_empty() {
                    return Err("-- needs a command".to_owned());
                }
                break;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

/// The example's HTTP routes: the page at `/`, the module at `/wshub.js`, the go-ws snippet
/// at `/go-ws.html`, the hub at `/ws`, 404 elsewhere.
fn route<B>(hub: &Hub, request: Request<B>) -> Response<wshub::Body> {
    let file = |content_type: &'static str, body: &'static str| {
        Response::builder()
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("a valid response")
    };
    match request.uri().path() {
        "/ws" => hub.handle_websocket(request),
        "/" | "/index.html" => file("text/html; charset=utf-8", PAGE),
        "/wshub.js" => file("text/javascript; charset=utf-8", MODULE),
        "/go-ws.html" => file("text/html; charset=utf-8", GO_WS_PAGE),
        _ => {
            let mut response = file("text/plain; charset=utf-8", "not found\n");
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}

#[path = "common/shutdown_signal.rs"]
mod shutdown_signal;
use shutdown_signal::shutdown_signal;

/// Serves `route` on `listener` until the hub begins to shut down.
async fn accept_loop(listener: tokio::net::TcpListener, hub: Hub) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let hub = hub.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = route(&hub, request);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
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
    // Build logs: the last 10,000 lines of each run, for an hour.
    let history = HistoryPolicy::new(10_000, Duration::from_secs(3600)).expect("a valid policy");
    let config = match HubConfig::builder()
        .prefix_history("process:", history)
        .build()
    {
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
    // The address bound, not the one asked for: with port 0 the system picks a free one, which
    // is how the tests start this example without racing for a port.
    let addr = listener.local_addr().unwrap_or(args.addr);
    let hub = Hub::with_config(config);
    let accept = tokio::spawn(accept_loop(listener, hub.clone()));

    let mut command = if args.command.is_empty() {
        let mut command = tokio::process::Command::new("sh");
        command.arg("-c").arg(DEMO);
        command
    } else {
        let mut command = tokio::process::Command::new(&args.command[0]);
        command.args(&args.command[1..]);
        command
    };
    command.kill_on_drop(true);
    let query = if args.id == "build-1" {
        String::new()
    } else {
        format!("?id={}", args.id)
    };
    eprintln!("build log at http://{addr}/{query}");
    match hub.stream_process(&args.id, command) {
        Ok(run) => {
            tokio::spawn(async move {
                match run.wait().await {
                    Ok(exit) => eprintln!("build {} {}", exit.status(), exit.exit_code()),
                    Err(err) => eprintln!("build stopped: {err}"),
                }
            });
        }
        Err(err) => eprintln!("error: the build did not start: {err}"),
    }

    hub.run(shutdown_signal()).await;
    accept.abort();
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Response<wshub::Body> {
        let request = Request::get(path).body(()).unwrap();
        route(&Hub::new(), request)
    }

    fn body_of(response: Response<wshub::Body>) -> String {
        use http_body_util::BodyExt;
        let collected = block_on(response.into_body().collect());
        let bytes = match collected {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        };
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn serves_the_page_the_module_and_the_go_ws_snippet() {
        for (path, content_type, needle) in [
            (
                "/",
                "text/html",
                "import { WshubClient } from \"/wshub.js\"",
            ),
            ("/wshub.js", "text/javascript", "export class WshubClient"),
            ("/go-ws.html", "text/html", "data: \"process:build-1\""),
        ] {
            let response = get(path);
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let got = response.headers()[header::CONTENT_TYPE].to_str().unwrap();
            assert!(got.starts_with(content_type), "{path}: {got}");
            assert!(body_of(response).contains(needle), "{path}");
        }
        assert_eq!(get("/nothing").status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_hub_is_at_ws() {
        // A plain GET on the WebSocket path reaches the hub, which wants an upgrade.
        let response = block_on(async { get("/ws") });
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }
}
