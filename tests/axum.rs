//! wshub under axum: a handler that calls `Hub::handle_websocket`, served by `axum::serve`
//! (hyper-util's auto connection builder, which wraps the socket); the `wshub::axum` mount
//! with axum's graceful shutdown; and the generic path for a connection the hub cannot take
//! back as a raw `TcpStream`.

mod support;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::routing::get;
use axum::Router;
use serde_json::json;
use support::*;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use wshub::{AuthError, AuthRequest, Hub, HubConfig, Identity, Message};

/// Serves `app` with `axum::serve` on 127.0.0.1:0, with the hub running beside it.
async fn serve_axum(hub: &Hub, app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn({
        let hub = hub.clone();
        async move { hub.run(std::future::pending()).await }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Connects to `/ws` and waits until the hub counts one more client.
async fn connect_client(hub: &Hub, addr: SocketAddr) -> Ws {
    let before = hub.client_count();
    let ws = connect(addr).await;
    let hub = hub.clone();
    wait_until("the client to be registered", move || {
        hub.client_count() > before
    })
    .await;
    ws
}

/// Issue 13: what a new user writes first. Before the fix the downcast to
/// `TokioIo<TcpStream>` failed under the auto builder and the client was dropped after the 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_calling_handle_websocket_under_axum_serve_subscribes_and_receives() {
    let hub = Hub::new();
    let app =
        Router::new()
            .route(
                "/ws",
                get(|State(hub): State<Hub>, request: Request| async move {
                    hub.handle_websocket(request)
                }),
            )
            .with_state(hub.clone());
    let addr = serve_axum(&hub, app).await;

    let mut ws = connect_client(&hub, addr).await;
    subscribe(&mut ws, "news").await;
    hub.send_to_channel("news", &Message::new("m").with_data(json!({"n": 1})))
        .unwrap();
    let got = next_json(&mut ws).await;
    assert_eq!(got["channel"], "news", "{got}");
    assert_eq!(got["data"]["n"], 1, "{got}");
    sync(&mut ws).await;

    // The fast path: the hub took the raw TcpStream back through the auto builder's
    // wrapper (it knows the peer's address from the socket; axum passed none).
    let local = ws.get_ref().local_addr().unwrap();
    let clients = hub.clients().await;
    assert_eq!(clients[0].info.remote_addr, Some(local));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_mounts_the_hub_beside_ordinary_routes() {
    let hub = Hub::new();
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(wshub::axum::router(hub.clone()));
    let addr = serve_axum(&hub, app).await;

    let (status, answer) = http_request(
        addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");

    let mut a = connect_client(&hub, addr).await;
    let mut b = connect_client(&hub, addr).await;
    subscribe(&mut a, "c").await;
    subscribe(&mut b, "c").await;
    for n in 0..100 {
        hub.send_to_channel("c", &Message::new("m").with_data(json!({"n": n})))
            .unwrap();
    }
    for ws in [&mut a, &mut b] {
        for n in 0..100 {
            let got = next_json(ws).await;
            assert_eq!(got["data"]["n"], n, "{got}");
        }
    }
    // A refusal is axum's answer too: not an upgrade.
    let (status, answer) = http_request(
        addr,
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{answer}");
}

/// The handler on a path of the app's own, with the hub in axum's state, and the peer's
/// address from axum's `ConnectInfo` reaching the authenticator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_on_a_path_of_its_own_sees_the_peer_address() {
    let config = HubConfig::builder()
        .authenticator(|request: &AuthRequest<'_>| match request.remote_addr {
            Some(peer) if peer.ip().is_loopback() => Ok(Identity::new(peer.to_string())),
            _ => Err(AuthError::new("no peer address")),
        })
        .build()
        .unwrap();
    let hub = Hub::with_config(config);
    let app = Router::new()
        .route("/live", get(wshub::axum::websocket))
        .with_state(hub.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    let (mut ws, _) = try_connect(addr, request(addr, "/live"))
        .await
        .expect("the handshake on /live");
    let local = ws.get_ref().local_addr().unwrap();
    sync(&mut ws).await;
    let clients = hub.clients().await;
    assert_eq!(
        clients[0].info.user_id.as_deref(),
        Some(&*local.to_string())
    );
}

/// Axum's graceful shutdown with the hub's `run` as its signal: every client gets what was
/// published before, then 1001, and the server's future returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_through_axum_sends_1001_and_the_server_returns() {
    let hub = Hub::with_config(HubConfig::builder().shards(2).build().unwrap());
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(wshub::axum::router(hub.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn({
        let hub = hub.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    hub.run(async move {
                        let _ = stopped.await;
                    })
                    .await
                })
                .await
        }
    });

    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut ws = connect_client(&hub, addr).await;
        subscribe(&mut ws, "c").await;
        clients.push(ws);
    }
    for n in 0..50 {
        hub.send_to_channel("c", &Message::new("m").with_data(json!({"n": n})))
            .unwrap();
    }
    stop.send(()).unwrap();
    for ws in &mut clients {
        for n in 0..50 {
            let got = next_json(ws).await;
            assert_eq!(got["data"]["n"], n, "{got}");
        }
        assert_eq!(read_until_close(ws).await.0, 1001);
    }
    within("axum::serve to return after the shutdown", server)
        .await
        .expect("the server task")
        .expect("axum::serve");
    assert_eq!(hub.stats().connection_tasks, 0);
    assert!(hub.publish("c", &Message::new("late")).is_err());
}

/// A listener of another kind, as a TLS acceptor would be: its streams are not `TcpStream`s.
struct WrappingListener {
    inner: TcpListener,
    written: Arc<AtomicU64>,
}

impl axum::serve::Listener for WrappingListener {
    type Io = Wrapped;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Wrapped, SocketAddr) {
        loop {
            if let Ok((stream, peer)) = self.inner.accept().await {
                return (Wrapped::new(stream, Arc::clone(&self.written)), peer);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Under axum's auto builder, a stream the hub cannot take back as a `TcpStream` is served
/// through the generic path (before: dropped after the 101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_of_another_kind_is_served_through_the_generic_path() {
    let hub = Hub::new();
    let written = Arc::new(AtomicU64::new(0));
    let listener = WrappingListener {
        inner: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        written: Arc::clone(&written),
    };
    let addr = listener.inner.local_addr().unwrap();
    let app = Router::new().merge(wshub::axum::router(hub.clone()));
    let server = tokio::spawn({
        let hub = hub.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { hub.run(std::future::pending()).await })
                .await
        }
    });

    let mut ws = connect_client(&hub, addr).await;
    let after_handshake = written.load(Ordering::Relaxed);
    subscribe(&mut ws, "c").await;
    for n in 0..100 {
        hub.send_to_channel("c", &Message::new("m").with_data(json!({"n": n})))
            .unwrap();
    }
    for n in 0..100 {
        let got = next_json(&mut ws).await;
        assert_eq!(got["data"]["n"], n, "{got}");
    }
    sync(&mut ws).await;
    assert!(
        written.load(Ordering::Relaxed) > after_handshake,
        "the frames went through the listener's stream"
    );
    // No address from a socket the hub does not hold (and none from axum without
    // ConnectInfo): the generic path.
    assert_eq!(hub.clients().await[0].info.remote_addr, None);

    hub.shutdown();
    assert_eq!(read_until_close(&mut ws).await.0, 1001);
    within("axum::serve to return after the shutdown", server)
        .await
        .expect("the server task")
        .expect("axum::serve");
}
