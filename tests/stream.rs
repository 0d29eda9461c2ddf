//! The generic path: a connection the hub cannot take back as a raw `TcpStream` is served
//! through hyper's `Upgraded`, with the same protocol and rules, rather than dropped. Here the
//! stream is a TCP socket behind a wrapper type of the test's own (as a TLS stream would be),
//! served by hyper's `http1` builder and `Hub::handle_websocket`, over real sockets.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use hyper_util::rt::TokioIo;
use serde_json::json;
use support::*;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use wshub::{HistoryPolicy, Hub, HubConfig, Message};

/// A hub served over [`Wrapped`] streams, with `Hub::run` beside it.
struct WrappedServer {
    hub: Hub,
    addr: SocketAddr,
    /// Bytes written through every wrapper, the 101s included.
    written: Arc<AtomicU64>,
    shutdown: Option<oneshot::Sender<()>>,
    run: Option<JoinHandle<()>>,
}

impl WrappedServer {
    async fn start(config: HubConfig) -> WrappedServer {
        let hub = Hub::with_config(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let written = Arc::new(AtomicU64::new(0));
        let (tx, rx) = oneshot::channel::<()>();
        let run = tokio::spawn({
            let hub = hub.clone();
            async move {
                hub.run(async move {
                    let _ = rx.await;
                })
                .await
            }
        });
        tokio::spawn({
            let hub = hub.clone();
            let written = Arc::clone(&written);
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let io = TokioIo::new(Wrapped::new(stream, Arc::clone(&written)));
                    let hub = hub.clone();
                    let service = hyper::service::service_fn(move |request| {
                        let response = hub.handle_websocket(request);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .with_upgrades(),
                    );
                }
            }
        });
        WrappedServer {
            hub,
            addr,
            written,
            shutdown: Some(tx),
            run: Some(run),
        }
    }

    async fn connect(&self) -> Ws {
        let before = self.hub.client_count();
        let ws = connect(self.addr).await;
        let hub = self.hub.clone();
        wait_until("the client to be registered", move || {
            hub.client_count() > before
        })
        .await;
        ws
    }

    /// Waits until the hub has no client left.
    async fn wait_for_no_clients(&self) {
        let hub = self.hub.clone();
        wait_until("every client to be gone", move || hub.client_count() == 0).await;
    }

    /// Waits until more than `after` bytes went through the wrappers: the hub wrote to the
    /// client through its stream, not around it.
    async fn wait_written_past(&self, after: u64) {
        let written = Arc::clone(&self.written);
        wait_until("bytes written through the wrapper", move || {
            written.load(Ordering::Relaxed) > after
        })
        .await;
    }

    async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(run) = self.run.take() {
            within("Hub::run to return after the shutdown", run)
                .await
                .expect("the run task");
        }
    }
}

impl Drop for WrappedServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_publish_and_pings_go_through_the_stream() {
    let config = HubConfig::builder()
        .heartbeat(Duration::from_millis(150))
        .pong_timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let server = WrappedServer::start(config).await;
    let mut ws = server.connect().await;
    let after_handshake = server.written.load(Ordering::Relaxed);

    subscribe(&mut ws, "news").await;
    server.wait_written_past(after_handshake).await;
    for n in 0..200 {
        server
            .hub
            .send_to_channel("news", &Message::new("m").with_data(json!({"n": n})))
            .unwrap();
    }
    for n in 0..200 {
        let got = next_json(&mut ws).await;
        assert_eq!(got["channel"], "news", "{got}");
        assert_eq!(got["data"]["n"], n, "in order: {got}");
    }
    // The protocol's ping, and a WebSocket ping frame answered with its payload.
    sync(&mut ws).await;
    within(
        "a ping frame",
        ws.send(WsMessage::Ping(b"hello"[..].into())),
    )
    .await
    .unwrap();
    loop {
        match next_seen(&mut ws).await {
            Seen::Pong(payload) => {
                assert_eq!(payload, b"hello");
                break;
            }
            Seen::Ping(_) => continue,
            other => panic!("expected the pong, got {other:?}"),
        }
    }
    // The server's keep-alive pings arrive, and a client that answers them stays past the
    // pong timeout.
    let mut pings = 0;
    while pings < 12 {
        match next_seen(&mut ws).await {
            Seen::Ping(_) => pings += 1,
            other => panic!("expected only pings on an idle connection, got {other:?}"),
        }
    }
    assert_eq!(server.hub.client_count(), 1);
    sync(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_the_pong_timeout() {
    let config = HubConfig::builder()
        .heartbeat(Duration::from_millis(100))
        .pong_timeout(Duration::from_millis(600))
        .build()
        .unwrap();
    let server = WrappedServer::start(config).await;
    let before = server.hub.client_count();
    // A raw client answers nothing: only its handshake and then silence.
    let mut raw = Raw::connect(server.addr).await;
    let hub = server.hub.clone();
    wait_until("the client to be registered", move || {
        hub.client_count() > before
    })
    .await;
    raw.read_to_end().await;
    let hub = server.hub.clone();
    wait_until("the silent client to be removed", move || {
        hub.client_count() == before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_cut_with_4000_under_a_small_outbound_bound() {
    let config = HubConfig::builder()
        .outbound_queue_bytes(16 * 1024)
        .build()
        .unwrap();
    let server = WrappedServer::start(config).await;
    let before = server.hub.client_count();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let mut raw = Raw::handshake(stream, server.addr).await;
    let hub = server.hub.clone();
    wait_until("the client to be registered", move || {
        hub.client_count() > before
    })
    .await;
    raw.send_text(&json!({"type": "subscribe", "data": "feed"}).to_string())
        .await;
    let ack = raw.read_text().await;
    assert!(ack.starts_with(r#"{"type":"subscribed""#), "{ack}");

    // About 1 KiB each; the client reads nothing until it has been cut. 40,000 at most:
    // far more than the kernel buffers of one stalled loopback connection hold.
    let pad = "x".repeat(1000);
    let mut published = 0;
    while server.hub.stats().queue_bound_disconnects == 0 {
        assert!(published < 40_000, "never cut: {:?}", server.hub.stats());
        for _ in 0..50 {
            // A shard over its backlog refuses: the next batch tries again.
            let _ = server.hub.send_to_channel(
                "feed",
                &Message::new("tick").with_data(json!({"seq": published, "pad": pad})),
            );
            published += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (code, reason) = raw.read_close().await;
    assert_eq!((code, reason.as_str()), (4000, "slow consumer"));
    raw.read_to_end().await;
    let hub = server.hub.clone();
    wait_until("the slow client to be removed", move || {
        hub.client_count() == before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_close_handshake_either_way_and_1001_on_shutdown() {
    let mut server = WrappedServer::start(HubConfig::default()).await;

    // The client closes: the server answers with the same code, then drops the connection.
    let mut raw = Raw::connect(server.addr).await;
    raw.send_text(r#"{"type":"ping"}"#).await;
    let pong = raw.read_text().await;
    assert!(pong.starts_with(r#"{"type":"pong""#), "{pong}");
    raw.send_frame(FIN | OP_CLOSE, &1000u16.to_be_bytes()).await;
    let (code, _) = raw.read_close().await;
    assert_eq!(code, 1000);
    raw.read_to_end().await;
    // `connect` waits for the client count to rise: first let the count fall, or a new client
    // registering as the old one leaves would leave it where it was.
    server.wait_for_no_clients().await;

    // The server closes one client: its code and reason.
    let mut ws = server.connect().await;
    let id = server.hub.clients().await.last().expect("a client").info.id;
    server.hub.disconnect(id, 4001, "bye").unwrap();
    assert_eq!(read_until_close(&mut ws).await, (4001, "bye".to_string()));
    server.wait_for_no_clients().await;

    // Shutdown: what was published before it, then 1001; `run` returns.
    let mut ws = server.connect().await;
    subscribe(&mut ws, "c").await;
    for n in 0..50 {
        server
            .hub
            .send_to_channel("c", &Message::new("m").with_data(json!({"n": n})))
            .unwrap();
    }
    server.shutdown().await;
    for n in 0..50 {
        let got = next_json(&mut ws).await;
        assert_eq!(got["data"]["n"], n, "{got}");
    }
    assert_eq!(read_until_close(&mut ws).await.0, 1001);
    assert_eq!(server.hub.stats().connection_tasks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_written_through_the_stream_chunk_by_chunk() {
    const PUBLISHED: u64 = 1_000;
    let config = HubConfig::builder()
        .channel_history(
            "log",
            HistoryPolicy::new(10_000, Duration::from_secs(600)).unwrap(),
        )
        .build()
        .unwrap();
    let server = WrappedServer::start(config).await;
    let mut epoch = None;
    for n in 1..=PUBLISHED {
        let position = server
            .hub
            .publish("log", &Message::new("m").with_data(json!({"n": n})))
            .unwrap()
            .expect("a position on a channel with history");
        assert_eq!(position.offset, n);
        epoch = Some(position.epoch);
    }
    let epoch = epoch.unwrap();

    let mut ws = server.connect().await;
    send_json(
        &mut ws,
        &json!({"type": "subscribe", "data": "log", "since": {"offset": 0, "epoch": &*epoch}}),
    )
    .await;
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    // Many chunks of a replay (64 frames each), each asked for once the last was written.
    for n in 1..=PUBLISHED {
        let got = next_json(&mut ws).await;
        assert_eq!(got["data"]["n"], n, "{got}");
    }
    // Then the live stream.
    server
        .hub
        .publish(
            "log",
            &Message::new("m").with_data(json!({"n": PUBLISHED + 1})),
        )
        .unwrap();
    let got = next_json(&mut ws).await;
    assert_eq!(got["data"]["n"], PUBLISHED + 1, "{got}");
}
