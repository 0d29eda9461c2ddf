//! Graceful shutdown: every client gets what was published before it, then a 1001 close;
//! `serve` returns with no connection task left; callbacks ran once per client; publishing
//! afterwards is an error; new connections are refused.

mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::net::{TcpSocket, TcpStream};
use wshub::{HubConfig, Message};

const CLIENTS: usize = 20;
const MESSAGES: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_gets_what_was_queued_then_1001_and_nothing_is_left() {
    let connects = Arc::new(AtomicUsize::new(0));
    let disconnects = Arc::new(AtomicUsize::new(0));
    let config = HubConfig::builder()
        .shards(3)
        .on_connect({
            let connects = Arc::clone(&connects);
            move |_, _| {
                connects.fetch_add(1, Ordering::SeqCst);
            }
        })
        .on_disconnect({
            let disconnects = Arc::clone(&disconnects);
            move |_| {
                disconnects.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let mut server = Server::start(config).await;
    let hub = server.hub.clone();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut ws = server.connect().await;
        // Half are subscribed; all get the broadcasts.
        if i % 2 == 0 {
            subscribe(&mut ws, "c").await;
        }
        clients.push(ws);
    }
    let id = server.newest_client().await;

    for seq in 0..MESSAGES {
        hub.send_to_channel("c", &Message::new("m").with_data(json!({"seq": seq})))
            .unwrap();
        if seq % 10 == 0 {
            hub.broadcast(&Message::new("b").with_data(json!({"seq": seq})))
                .unwrap();
        }
    }
    server.begin_shutdown();

    let mut readers = Vec::new();
    for (i, mut ws) in clients.into_iter().enumerate() {
        readers.push(tokio::spawn(async move {
            let subscribed = i % 2 == 0;
            let mut expected = Vec::new();
            for seq in 0..MESSAGES {
                if subscribed {
                    expected.push(("m".to_owned(), seq));
                }
                if seq % 10 == 0 {
                    expected.push(("b".to_owned(), seq));
                }
            }
            let mut got = Vec::new();
            let close = loop {
                match next_seen(&mut ws).await {
                    Seen::Text(text) => {
                        let message: serde_json::Value = serde_json::from_str(&text).unwrap();
                        got.push((
                            message["type"].as_str().unwrap().to_owned(),
                            message["data"]["seq"].as_u64().unwrap(),
                        ));
                    }
                    Seen::Ping(_) | Seen::Pong(_) => {}
                    Seen::Close(close) => break close,
                    other => panic!("client {i}: expected the close frame, got {other:?}"),
                }
            };
            assert_eq!(
                got, expected,
                "client {i}: everything queued before shutdown"
            );
            let (code, _reason) = close.expect("a close code");
            assert_eq!(code, 1001, "client {i}: going away");
            // tungstenite answers the close; the server then ends the connection.
            match next_seen(&mut ws).await {
                Seen::End(_) => {}
                other => panic!("client {i}: expected the end, got {other:?}"),
            }
        }));
    }
    for reader in readers {
        within("a client to see the shutdown", reader)
            .await
            .unwrap();
    }
    server.wait_stopped().await;

    let stats = hub.stats();
    assert_eq!(hub.client_count(), 0);
    assert_eq!(stats.connection_tasks, 0, "{stats:?}");
    assert_eq!(stats.clients, 0);
    assert_eq!(stats.channels, 0);
    assert_eq!(hub.channel_count(), 0);
    assert!(hub.clients().await.is_empty());
    assert_eq!(connects.load(Ordering::SeqCst), CLIENTS);
    assert_eq!(disconnects.load(Ordering::SeqCst), CLIENTS);

    // Publishing after shutdown says why nothing was sent.
    let message = Message::new("late");
    let results = [
        hub.broadcast(&message),
        hub.send_to_channel("c", &message),
        hub.send_process_output("p", "line"),
        hub.send_process_status("p", "exited", 0),
        hub.send_error("e"),
        hub.send_event("e", 1),
        hub.send_to_client(id, &message),
        hub.send_to_user("u", &message),
        hub.subscribe(id, "c"),
        hub.unsubscribe(id, "c"),
        hub.disconnect(id, 1000, ""),
    ];
    for (i, result) in results.into_iter().enumerate() {
        let err = result.expect_err("an error after shutdown");
        assert!(err.is_closed(), "call {i}: {err}");
    }

    // New connections are refused: the listener is closed (or the upgrade answered 503).
    match TcpStream::connect(server.addr).await {
        Err(_) => {}
        Ok(stream) => {
            drop(stream);
            let result = try_connect(server.addr, request(server.addr, "/ws")).await;
            match result {
                Ok(_) => panic!("an upgrade after shutdown succeeded"),
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status().as_u16(), 503)
                }
                Err(_) => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_shutdown_stops_serve_like_the_shutdown_future() {
    let mut server = Server::default_hub().await;
    let mut ws = server.connect().await;
    server.hub.shutdown();
    assert_eq!(read_until_close(&mut ws).await.0, 1001);
    server.wait_stopped().await;
    assert_eq!(server.hub.stats().connection_tasks, 0);
    assert!(server
        .hub
        .broadcast(&Message::new("x"))
        .unwrap_err()
        .is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stopped_reading_does_not_hold_shutdown_forever() {
    let config = HubConfig::builder()
        .shutdown_drain(Duration::from_millis(300))
        .outbound_queue_bytes(64 * 1024 * 1024)
        .build()
        .unwrap();
    let mut server = Server::start(config).await;
    let hub = server.hub.clone();
    let mut healthy = server.connect().await;
    subscribe(&mut healthy, "c").await;

    // A client with a small receive buffer that never reads after subscribing.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let mut stalled = Raw::handshake(stream, server.addr).await;
    stalled
        .send_text(r#"{"type":"subscribe","data":"c"}"#)
        .await;
    assert!(stalled
        .read_text()
        .await
        .starts_with(r#"{"type":"subscribed""#));

    // Enough that the stalled client's queue cannot drain; the healthy one reads along.
    let pad = "x".repeat(1000);
    let received = Arc::new(AtomicU64::new(0));
    let healthy_reader = tokio::spawn({
        let received = Arc::clone(&received);
        async move {
            let mut got = 0u64;
            loop {
                match next_seen(&mut healthy).await {
                    Seen::Text(_) => {
                        got += 1;
                        received.store(got, Ordering::Release);
                    }
                    Seen::Ping(_) | Seen::Pong(_) => {}
                    Seen::Close(close) => return (got, close),
                    other => panic!("healthy client: {other:?}"),
                }
            }
        }
    });
    let mut published = 0u64;
    while published < 20_000 && hub.stats().queued_bytes < 512 * 1024 {
        for _ in 0..100 {
            hub.send_to_channel("c", &Message::new("m").with_data(pad.as_str()))
                .unwrap();
            published += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The healthy client has taken everything before the shutdown begins, so that only the
    // stalled one holds a queue then: the drain (300 ms) is not what a busy machine's slow
    // reader is judged by.
    wait_until("the healthy client to read everything", || {
        received.load(Ordering::Acquire) == published
    })
    .await;
    assert!(
        hub.stats().queued_bytes > 0,
        "the stalled client has a queue: {:?}",
        hub.stats()
    );

    server.begin_shutdown();
    let (got, close) = within("the healthy client's close", healthy_reader)
        .await
        .unwrap();
    assert_eq!(
        got, published,
        "the healthy client got everything before the close"
    );
    assert_eq!(close.map(|c| c.0), Some(1001));
    // serve returns although the stalled client never took its messages.
    server.wait_stopped().await;
    assert_eq!(hub.stats().connection_tasks, 0);
    assert_eq!(hub.client_count(), 0);
    assert_eq!(hub.stats().queued_bytes, 0, "every queue was freed");
    // The stalled client's connection was dropped.
    stalled.read_to_end().await;
}
