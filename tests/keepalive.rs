//! Keep-alive: the server pings every heartbeat; a client that answers (or talks) stays; a
//! client that never answers and sends nothing is dropped after the pong timeout; the server
//! answers a client's ping frame with a pong carrying the same payload.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use wshub::HubConfig;

/// Short, but with a pong timeout ten heartbeats long, so that a noisy machine's pauses do
/// not make a healthy client look silent.
const HEARTBEAT: Duration = Duration::from_millis(150);
const PONG_TIMEOUT: Duration = Duration::from_millis(1500);

fn short_keepalive() -> HubConfig {
    HubConfig::builder()
        .heartbeat(HEARTBEAT)
        .pong_timeout(PONG_TIMEOUT)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_heartbeat_delivers_ping_frames_and_an_answering_client_stays() {
    let server = Server::start(short_keepalive()).await;
    let mut ws = server.connect().await;
    // tungstenite answers each ping with a pong as it reads. Several pings, spanning several
    // pong timeouts, arrive on a connection that stays open.
    let started = Instant::now();
    let mut pings = 0;
    while pings < 12 {
        match next_seen(&mut ws).await {
            Seen::Ping(payload) => {
                pings += 1;
                assert!(payload.len() <= 125);
            }
            other => panic!("expected only pings on an idle connection, got {other:?}"),
        }
    }
    assert!(
        started.elapsed() > PONG_TIMEOUT,
        "12 pings a heartbeat apart span more than the pong timeout"
    );
    assert_eq!(server.hub.client_count(), 1);
    // Still fully usable.
    sync(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_answers_is_dropped_after_the_pong_timeout() {
    let disconnects = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&disconnects);
    let config = HubConfig::builder()
        .heartbeat(HEARTBEAT)
        .pong_timeout(PONG_TIMEOUT)
        .on_disconnect(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    let server = Server::start(config).await;
    // A healthy client beside it, which must stay.
    let mut healthy = server.connect().await;
    let healthy_pings = tokio::spawn(async move {
        let mut pings = 0;
        // Reads (and so answers pings) well past the silent client's timeout.
        while pings < 25 {
            if let Seen::Ping(_) = next_seen(&mut healthy).await {
                pings += 1;
            }
        }
        healthy
    });

    // The raw client reads what the server sends but never writes a byte after the upgrade.
    let mut silent = Raw::connect(server.addr).await;
    let hub = server.hub.clone();
    wait_until("both clients registered", move || hub.client_count() == 2).await;
    let mut pings = 0;
    let ended = within("the silent client to be dropped", async {
        loop {
            match silent.read_frame_unbounded().await {
                RawFrame::Frame {
                    opcode: OP_PING, ..
                } => pings += 1,
                // The server may say goodbye with a close frame, or just drop the socket.
                RawFrame::Frame {
                    opcode: OP_CLOSE, ..
                } => {}
                RawFrame::Frame { opcode, .. } => panic!("unexpected frame {opcode:#x}"),
                RawFrame::End => return,
            }
        }
    })
    .await;
    let () = ended;
    assert!(
        pings >= 1,
        "the silent client was pinged before being dropped"
    );

    let mut healthy = within("the healthy client's pings", healthy_pings)
        .await
        .unwrap();
    let hub = server.hub.clone();
    wait_until("the silent client to be deregistered", move || {
        hub.client_count() == 1 && hub.stats().connection_tasks == 1
    })
    .await;
    assert_eq!(disconnects.load(Ordering::SeqCst), 1);
    sync(&mut healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_frame_from_the_client_counts_as_alive() {
    let server = Server::start(short_keepalive()).await;
    // A raw client that never sends a pong frame but sends a request every 100 ms, for
    // longer than the pong timeout.
    let mut raw = Raw::connect(server.addr).await;
    let started = Instant::now();
    let mut pongs = 0;
    while started.elapsed() < PONG_TIMEOUT + Duration::from_millis(1000) {
        raw.send_text(r#"{"type":"ping"}"#).await;
        let reply = raw.read_text().await;
        assert!(reply.starts_with(r#"{"type":"pong""#), "{reply}");
        pongs += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pongs > 1);
    assert_eq!(server.hub.client_count(), 1, "a talking client is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ping_frame_is_answered_with_its_payload() {
    let server = Server::default_hub().await;
    let mut raw = Raw::connect(server.addr).await;
    raw.send_frame(FIN | OP_PING, b"are you there?").await;
    assert_eq!(
        raw.read_frame().await,
        RawFrame::Frame {
            opcode: OP_PONG,
            payload: b"are you there?".to_vec()
        }
    );
    // An empty ping and one of exactly 125 bytes (the limit) are answered too.
    raw.send_frame(FIN | OP_PING, b"").await;
    assert_eq!(
        raw.read_frame().await,
        RawFrame::Frame {
            opcode: OP_PONG,
            payload: vec![]
        }
    );
    let max = vec![b'p'; 125];
    raw.send_frame(FIN | OP_PING, &max).await;
    assert_eq!(
        raw.read_frame().await,
        RawFrame::Frame {
            opcode: OP_PONG,
            payload: max
        }
    );
    // An unsolicited pong is ignored.
    raw.send_frame(FIN | OP_PONG, b"x").await;
    raw.send_text(r#"{"type":"ping"}"#).await;
    assert!(raw.read_text().await.starts_with(r#"{"type":"pong""#));
}
