//! A wshub hub mounted in an axum app, next to the app's own routes.
//!
//! ```text
//! cargo run --example axum --features axum -- [ADDR]
//! ```
//!
//! Serves on ADDR (default 127.0.0.1:8080): `ws://ADDR/ws` (the hub), `GET /health`,
//! `GET /stats` (the hub's figures) and `POST /publish/CHANNEL` (the body, as text, to the
//! channel's subscribers). Ctrl-C or SIGTERM shuts down gracefully: every WebSocket client
//! gets what was already sent, then a 1001 close; then axum finishes its requests and stops.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use wshub::{Hub, Message};

#[path = "common/shutdown_signal.rs"]
mod shutdown_signal;
use shutdown_signal::shutdown_signal;

async fn stats(State(hub): State<Hub>) -> String {
    let stats = hub.stats();
    format!(
        "clients {}\nchannels {}\npublished {}\ndelivered {}\n",
        stats.clients, stats.channels, stats.published, stats.delivered
    )
}

async fn publish(State(hub): State<Hub>, Path(channel): Path<String>, body: String) -> String {
    match hub.send_to_channel(&channel, &Message::new("message").with_data(body)) {
        Ok(()) => "sent\n".to_string(),
        Err(err) => format!("not sent: {err}\n"),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let hub = Hub::new();

    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/stats", get(stats))
        .route("/publish/{channel}", post(publish))
        .with_state(hub.clone())
        // The hub, on its configured path (`/ws`): one line.
        .merge(wshub::axum::router(hub.clone()));

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr} (WebSocket: ws://{addr}/ws)");
    axum::serve(listener, app)
        // The hub's `run` is axum's shutdown signal: on Ctrl-C the hub closes its clients
        // (1001) and waits for them; then axum stops accepting and returns.
        .with_graceful_shutdown(async move { hub.run(shutdown_signal()).await })
        .await
}
