//! A hub in an [axum](https://docs.rs/axum/0.8) 0.8 app (feature `axum`): one line mounts it,
//! beside the app's own routes, served by `axum::serve`.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use wshub::Hub;
//!
//! # async fn example() -> std::io::Result<()> {
//! let hub = Hub::new();
//! let app = Router::new()
//!     .route("/health", get(|| async { "ok" }))
//!     .merge(wshub::axum::router(hub.clone()));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app)
//!     // Ctrl-C: the hub closes its clients with 1001 first, then axum stops.
//!     .with_graceful_shutdown(async move {
//!         hub.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//!     })
//!     .await
//! # }
//! ```
//!
//! [`router`] serves the hub on its configured path (`/ws` by default); [`websocket`] is the
//! handler itself, to mount on a path of your own with the hub in axum's `State`:
//! `.route("/live", get(wshub::axum::websocket)).with_state(hub)`.
//!
//! `axum::serve` serves a `TcpListener`'s connections with hyper-util's auto builder, and the
//! hub takes each upgraded connection back as its raw `TcpStream`: the same fast path as
//! [`serve`](crate::serve). A listener of another kind (a `UnixListener`, a TLS acceptor)
//! works too, through the slower generic path (see [`Hub::handler`]).
//!
//! # Shutting down
//!
//! A WebSocket connection leaves axum once it is upgraded (hyper hands it to the hub), so
//! axum's graceful shutdown neither closes nor waits for the hub's clients; [`Hub::run`]
//! does. Hand axum the hub's `run` as its shutdown signal, as above: when your signal
//! fires, the hub shuts down gracefully first (each client gets what was queued for it,
//! then a 1001 close; new upgrades are answered 503 while axum still serves its other
//! routes); once the hub's connections are done, or its drain deadline has passed, axum
//! stops accepting, finishes its requests in flight, and the server's future returns.
//! [`Hub::shutdown`], called from anywhere (an admin route), starts the same sequence.
//!
//! If you run the hub on a task of its own instead, call [`Hub::shutdown`] in axum's
//! shutdown signal and await that task after `axum::serve` returns: otherwise the hub's
//! clients are cut without their 1001 when the process exits.

use std::net::SocketAddr;

use ::axum::body::Body;
use ::axum::extract::{ConnectInfo, Request, State};
use ::axum::response::Response;
use ::axum::routing::get;
use ::axum::Router;

use crate::http::RemoteAddr;
use crate::hub::Hub;

/// A `Router` that serves `hub` on its configured path (`/ws` by default, see
/// [`HubConfigBuilder::path`](crate::HubConfigBuilder::path)); merge it into your app's.
///
/// It carries its own state (the hub), so it merges into a router of any state type.
///
/// ```
/// use axum::{routing::get, Router};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let hub = wshub::Hub::new();
/// let app: Router = Router::new()
///     .route("/", get(|| async { "hello" }))
///     .merge(wshub::axum::router(hub));
/// # }
/// ```
pub fn router<S>(hub: Hub) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let path = hub.config().path.clone();
    Router::<Hub>::new()
        .route(&path, get(websocket))
        .with_state(hub)
}

/// The axum handler: upgrades the request to a client of the hub in axum's `State` (any
/// state the hub can be taken from, through `FromRef`), or answers the refusal, as
/// [`Hub::handle_websocket`] does. With `into_make_service_with_connect_info`, the peer's
/// address reaches authenticators through `AuthRequest::remote_addr`.
///
/// ```
/// use axum::{routing::get, Router};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let hub = wshub::Hub::new();
/// let app: Router = Router::new()
///     .route("/live", get(wshub::axum::websocket))
///     .with_state(hub);
/// # }
/// ```
pub async fn websocket(State(hub): State<Hub>, mut request: Request) -> Response {
    if let Some(ConnectInfo(peer)) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .copied()
    {
        request.extensions_mut().insert(RemoteAddr(peer));
    }
    hub.handle_websocket(request).map(Body::new)
}
