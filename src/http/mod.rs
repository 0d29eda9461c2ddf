//! Accepting connections and upgrading them: [`serve`], [`Hub::handler`] and
//! [`Hub::handle_websocket`].
//!
//! The upgrade is checked in this order, each refusal counted in
//! [`HubStats::upgrades_refused`](crate::HubStats::upgrades_refused) where it is a 401, 403 or
//! 503: shutting down (503), not a WebSocket upgrade (400), origin not allowed (403),
//! connection limit reached (503), authenticator refuses (401). fastwebsockets answers the
//! handshake; then the raw `TcpStream` is taken back from hyper so the hub can write whole
//! pre-encoded frames with vectored writes and read without a buffer per idle connection
//! (`session.rs`). A connection that cannot be taken back (a wrapped or TLS stream) is
//! served through hyper's `Upgraded` instead (`stream.rs`): slower, never dropped.

#[cfg(feature = "axum")]
pub mod axum;
pub(crate) mod session;
pub(crate) mod stream;
#[cfg(feature = "tls")]
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::auth::{origin_allowed, AuthRequest, Identity};
use crate::client::ClientInfo;
use crate::conn::{Conn, Socket};
use crate::http::session::TaskGuard;
use crate::hub::{Hub, Shared};

/// The body of every answer the hub gives over plain HTTP.
pub type Body = Full<Bytes>;

/// How long the accept loop pauses when the process is out of file descriptors, rather than
/// spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The peer address, put in the request's extensions by [`serve`] for authenticators and
/// logs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RemoteAddr(pub(crate) SocketAddr);

/// Accepts connections on `listener` and serves `hub` on its configured path (`/ws` by
/// default; other paths answer 404) until `shutdown` completes; then shuts the hub down
/// gracefully and returns.
///
/// It cannot fail: accept errors (such as running out of file descriptors) are logged and
/// retried after a pause, and a connection's errors end that connection only. Binding the
/// listener is the caller's, and where its errors are reported.
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// let hub = wshub::Hub::new();
/// wshub::serve(listener, hub, async { let _ = tokio::signal::ctrl_c().await; }).await;
/// # Ok(())
/// # }
/// ```
pub async fn serve(listener: TcpListener, hub: Hub, shutdown: impl Future<Output = ()>) {
    hub.ensure_started();
    let accept = tokio::spawn(accept_loop(listener, hub.clone()));
    hub.run(shutdown).await;
    accept.abort();
}

async fn accept_loop(listener: TcpListener, hub: Hub) {
    accept_each(listener, hub, |stream, peer, hub| {
        tokio::spawn(serve_connection(stream, peer, hub));
    })
    .await
}

/// Accepts connections until the hub starts shutting down, handing each to `start` (which
/// spawns its task): the loop of [`serve`] and, with feature `tls`, of `tls::serve`.
pub(crate) async fn accept_each(
    listener: TcpListener,
    hub: Hub,
    mut start: impl FnMut(TcpStream, SocketAddr, Hub),
) {
    let mut shutting_down = hub.shared().shutting_down.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutting_down.wait_for(|down| *down) => return,
        };
        match accepted {
            Ok((stream, peer)) => start(stream, peer, hub.clone()),
            Err(err) => {
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, hub: Hub) {
    let _ = stream.set_nodelay(true);
    serve_http(stream, peer, hub).await
}

/// Serves HTTP/1.1 on one accepted connection: the upgrade request (within the handshake
/// timeout), then the upgraded client. `io` is a `TcpStream` for [`serve`] (the hub takes it
/// back after the upgrade: the fast path) or, with feature `tls`, a TLS stream (the generic
/// path).
pub(crate) async fn serve_http<I>(io: I, peer: SocketAddr, hub: Hub)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let handshake_timeout = hub.config().handshake_timeout;
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(RemoteAddr(peer));
        let response = hub.route(request);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        // Keep-alive stays on: with it off, hyper appends `close` to the 101's `Connection:
        // upgrade` header, and strict clients (tungstenite) then refuse the handshake.
        // Refusals end the connection through their own `Connection: close` (see `answer`).
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(err) = connection.await {
        tracing::debug!(%err, %peer, "http connection ended with an error");
    }
}

/// A hyper `Service` that serves a hub on its configured path, from [`Hub::handler`].
#[derive(Clone, Debug)]
pub struct HubService {
    hub: Hub,
}

impl hyper::service::Service<Request<Incoming>> for HubService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let response = self.hub.route(request);
        Box::pin(async move { Ok(response) })
    }
}

fn answer(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // One request per connection: a refused client reconnects to try again.
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

impl Hub {
    /// A hyper 1 service for this hub: upgrades requests on the configured path (`/ws` by
    /// default) and answers 404 elsewhere. Serve it with hyper's `http1` builder and
    /// `.with_upgrades()`, and call [`run`](Hub::run) beside it.
    ///
    /// ```no_run
    /// use hyper_util::rt::TokioIo;
    ///
    /// # async fn example() -> std::io::Result<()> {
    /// let hub = wshub::Hub::new();
    /// tokio::spawn({
    ///     let hub = hub.clone();
    ///     async move { hub.run(std::future::pending()).await }
    /// });
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    /// loop {
    ///     let (stream, _) = listener.accept().await?;
    ///     let service = hub.handler();
    ///     tokio::spawn(async move {
    ///         let _ = hyper::server::conn::http1::Builder::new()
    ///             .serve_connection(TokioIo::new(stream), service)
    ///             .with_upgrades()
    ///             .await;
    ///     });
    /// }
    /// # }
    /// ```
    ///
    /// Served over a `tokio::net::TcpStream` (hyper's `TokioIo`, with hyper's `http1` builder
    /// or hyper-util's auto builder), the hub takes the socket back after the upgrade and
    /// writes to it straight from its shards: the fast path. Any other connection (a
    /// wrapped stream, TLS) is served through hyper's `Upgraded`, with the same protocol and
    /// limits, at the cost of a pass through the connection's task for every write.
    pub fn handler(&self) -> HubService {
        HubService { hub: self.clone() }
    }

    fn route(&self, request: Request<Incoming>) -> Response<Body> {
        if request.uri().path() != self.config().path {
            return answer(StatusCode::NOT_FOUND, "not found\n");
        }
        self.handle_websocket(request)
    }

    /// Upgrades one request to a client of this hub, whatever its path, and returns the
    /// response to send: `101 Switching Protocols`, or the refusal (400, 401, 403 or 503; see
    /// `PROTOCOL.md`). The connection runs on a task of its own once hyper hands it over.
    ///
    /// For routers: the request may come from any hyper 1 server, with any body type (axum's
    /// `Request` is one; with feature `axum`, `wshub::axum` mounts the hub in one line). A
    /// plain TCP connection, served by hyper's `http1` builder or hyper-util's auto builder
    /// (which `axum::serve` uses), gets the fast raw-socket path; any other stream is served
    /// through hyper's `Upgraded` (see [`handler`](Hub::handler)).
    pub fn handle_websocket<B>(&self, mut request: Request<B>) -> Response<Body> {
        let shared = self.shared();
        self.ensure_started();
        let refuse = |status: StatusCode, text: &'static str| {
            shared
                .counters
                .upgrades_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                status = status.as_u16(),
                reason = text.trim_end(),
                "upgrade refused"
            );
            answer(status, text)
        };
        if !shared.is_running() || *shared.shutting_down.borrow() {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
        }
        if !is_websocket_upgrade(request.headers()) {
            return answer(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
        }
        let origin = request.headers().get(header::ORIGIN).map(|v| v.as_bytes());
        if !origin_allowed(&shared.config.allowed_origins, origin) {
            return refuse(StatusCode::FORBIDDEN, "origin not allowed\n");
        }
        let guard = TaskGuard::new(shared);
        if shared.counters.connection_tasks.load(Ordering::Acquire) > shared.config.max_connections
        {
            drop(guard);
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "too many connections\n");
        }
        let remote_addr = request.extensions().get::<RemoteAddr>().map(|r| r.0);
        let identity = match &shared.config.authenticator {
            None => None,
            Some(auth) => {
                let auth_request = AuthRequest {
                    headers: request.headers(),
                    uri: request.uri(),
                    remote_addr,
                };
                match auth.authenticate(&auth_request) {
                    Ok(identity) => Some(identity),
                    Err(err) => {
                        if let Some(on_failure) = &shared.config.on_auth_failure {
                            on_failure(remote_addr, &err);
                        }
                        return refuse(StatusCode::UNAUTHORIZED, "unauthorized\n");
                    }
                }
            }
        };
        let headers = shared
            .config
            .on_connect
            .as_ref()
            .map(|_| request.headers().clone());
        let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut request) {
            Ok(parts) => parts,
            Err(err) => {
                tracing::debug!(%err, "bad upgrade request");
                return answer(StatusCode::BAD_REQUEST, "bad WebSocket upgrade request\n");
            }
        };
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            let upgraded = match upgrade.await {
                Ok(ws) => ws.into_inner().into_inner(),
                Err(err) => {
                    tracing::debug!(%err, "upgrade failed");
                    return;
                }
            };
            let client = Client {
                shared,
                identity,
                headers,
                remote_addr,
                guard,
            };
            match into_tcp(upgraded) {
                Ok((stream, early)) => client.start_tcp(stream, early),
                Err(upgraded) => client.start_stream(upgraded),
            }
        });
        let (head, _) = response.into_parts();
        Response::from_parts(head, Full::new(Bytes::new()))
    }
}

/// Takes the raw `TcpStream` and the bytes hyper read past the upgrade request back from
/// hyper, when the connection is one: served by hyper's own builders (`Upgraded::downcast`)
/// or by hyper-util's auto builder, which wraps the stream in a private type for its version
/// detection that only its own `auto::upgrade::downcast` sees through (`axum::serve` serves
/// with it). Otherwise the connection comes back as it was.
fn into_tcp(upgraded: Upgraded) -> Result<(TcpStream, Bytes), Upgraded> {
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return Ok((parts.io.into_inner(), parts.read_buf)),
        Err(upgraded) => upgraded,
    };
    hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>(upgraded)
        .map(|parts| (parts.io.into_inner(), parts.read_buf))
}

/// An accepted upgrade, from the request's side, until its session starts.
struct Client {
    shared: Arc<Shared>,
    identity: Option<Identity>,
    headers: Option<HeaderMap>,
    /// From the request, for a connection that is not a `TcpStream` (which knows its own).
    remote_addr: Option<SocketAddr>,
    guard: TaskGuard,
}

impl Client {
    /// The fast path: the shards write to the socket straight (`session.rs`).
    fn start_tcp(self, stream: TcpStream, early: Bytes) {
        let _ = stream.set_nodelay(true);
        let remote_addr = stream.peer_addr().ok();
        let (shared, conn, guard) = self.into_conn(Socket::Tcp(stream), remote_addr);
        session::start(shared, conn, early, guard);
    }

    /// Any other connection: its bytes go through its task (`stream.rs`). Hyper's `Upgraded`
    /// replays the bytes it read past the upgrade request itself.
    fn start_stream(self, upgraded: Upgraded) {
        tracing::debug!("the upgraded connection is not a raw TcpStream: served through its task");
        let remote_addr = self.remote_addr;
        let (shared, conn, guard) = self.into_conn(Socket::Stream, remote_addr);
        tokio::spawn(stream::run(shared, conn, TokioIo::new(upgraded), guard));
    }

    /// Makes the client, and tells the application (`on_connect`).
    ///
    /// The connection does not continue in the upgrade's task: a task's memory is the size
    /// of its largest state, and the upgrade's states (hyper's upgrade future, the identity,
    /// the headers) would otherwise be carried by every idle connection for life. Measured
    /// with massif on 2,000 idle connections: 1,536 bytes per task before, the session's own
    /// size after. A TCP session has no task at all while idle (`session.rs`).
    fn into_conn(
        self,
        socket: Socket,
        remote_addr: Option<SocketAddr>,
    ) -> (Arc<Shared>, Arc<Conn>, TaskGuard) {
        let Client {
            shared,
            identity,
            headers,
            guard,
            ..
        } = self;
        let (user_id, claims) = match identity {
            Some(identity) => (Some(identity.user_id), identity.claims),
            None => (None, serde_json::Value::Null),
        };
        let info = ClientInfo {
            id: shared.next_client_id(),
            remote_addr,
            user_id,
            claims,
            connected_at: SystemTime::now(),
        };
        if let (Some(on_connect), Some(headers)) = (&shared.config.on_connect, headers) {
            on_connect(&info, &headers);
        }
        let conn = Arc::new(Conn::new(info, socket, shared.now_ms()));
        (shared, conn, guard)
    }
}
