//! Faults: clients that vanish without a word, and a shutdown while messages flow.
//!
//! - Half-open: a client that completes the upgrade and then never reads or writes a byte,
//!   and one that never reads (small receive buffer) while a stream is sent to it, are both
//!   closed within heartbeat + pong timeout (+ a margin), by the keep-alive rather than the
//!   slow-consumer policy; a healthy client gets every message; the counts return to baseline.
//! - Shutdown under load: while messages stream to hundreds of clients, shutdown begins; each
//!   client receives every message published before it began, in order, then 1001, within
//!   the drain deadline (+ a margin); nothing is left.
//!
//! The keep-alive basics are in keepalive.rs, shutdown's details in shutdown.rs.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::net::TcpStream;
use wshub::{HubConfig, Message};

/// Generous slack on top of any configured deadline: the machine is shared and noisy.
const MARGIN: Duration = Duration::from_secs(10);

fn tick(seq: u64, pad: usize) -> Message {
    Message::new("tick").with_data(json!({"seq": seq, "pad": "x".repeat(pad)}))
}

/// Reads a raw client's frames (what the kernel held for it, megabytes for the stalled one)
/// until the connection ends; panics on a frame that is not a ping, text or close, or when no
/// text or close frame came for [`PROGRESS`].
async fn read_until_end(raw: &mut Raw) {
    let mut scratch = vec![0u8; 16 * 1024];
    let mut progress = Progress::new("the server to drop the connection");
    for _ in 0..1_000_000 {
        match progress.wait(raw.read_frame_into(&mut scratch)).await {
            RawFrame::End => return,
            RawFrame::Frame {
                opcode: OP_TEXT | OP_CLOSE,
                ..
            } => progress.advanced(),
            RawFrame::Frame {
                opcode: OP_PING, ..
            } => {}
            RawFrame::Frame { opcode, .. } => panic!("unexpected frame {opcode:#x}"),
        }
    }
    panic!("a million frames and no end");
}

const HEARTBEAT: Duration = Duration::from_millis(250);
const PONG_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_clients_are_closed_within_heartbeat_plus_pong_timeout() {
    let config = HubConfig::builder()
        .heartbeat(HEARTBEAT)
        .pong_timeout(PONG_TIMEOUT)
        // Neither the write timeout nor the queue bound may catch the client that does not
        // read: only the keep-alive.
        .write_timeout(Duration::from_secs(300))
        .outbound_queue_bytes(256 * 1024 * 1024)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let addr = server.addr;

    // A healthy client reads everything (and so answers every ping).
    let mut healthy = server.connect().await;
    subscribe(&mut healthy, "feed").await;
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            let mut expected = 0u64;
            loop {
                let message = next_json(&mut healthy).await;
                if message["type"] == "end" {
                    return (healthy, expected);
                }
                assert_eq!(message["data"]["seq"], expected, "the healthy client");
                expected += 1;
                received.store(expected, Ordering::Release);
            }
        })
    };

    // Silent: upgraded, then not a byte either way.
    let silent_started = Instant::now();
    let mut silent = Raw::connect(addr).await;
    let silent_addr = silent.stream.local_addr().unwrap();
    // Stalled: subscribed, then never reads (not even the acknowledgement) while the stream
    // fills its small receive buffer and then the hub's queue for it.
    let stalled_started = Instant::now();
    let stream = connect_with_recv_buffer(addr, 4096).await;
    let mut stalled = Raw::handshake(stream, addr).await;
    let stalled_addr = stalled.stream.local_addr().unwrap();
    stalled
        .send_text(&json!({"type": "subscribe", "data": "feed"}).to_string())
        .await;
    let watched = hub.clone();
    wait_until("both half-open clients registered", move || {
        watched.client_count() == 3 && watched.channel_subscriber_count("feed") == 2
    })
    .await;

    // Stream 16 KiB messages (in step with the healthy client) until both are gone, noting
    // when each disappears from the hub's clients. The kernel takes about 3 MB for a stalled
    // loopback connection before the hub's writes to it block and frames are queued.
    let limit = HEARTBEAT + PONG_TIMEOUT + MARGIN;
    let mut silent_gone: Option<Duration> = None;
    let mut stalled_gone: Option<Duration> = None;
    let mut most_queued = 0;
    let mut published = 0u64;
    let began = Instant::now();
    let mut round = 0u64;
    while silent_gone.is_none() || stalled_gone.is_none() {
        assert!(
            began.elapsed() < limit + MARGIN,
            "half-open clients still connected after {:?}: silent gone {silent_gone:?}, \
             stalled gone {stalled_gone:?}, {:?}",
            began.elapsed(),
            hub.stats()
        );
        round += 1;
        for _ in 0..10 {
            hub.send_to_channel("feed", &tick(published, 16 * 1024))
                .unwrap();
            published += 1;
        }
        let target = published;
        let counter = Arc::clone(&received);
        wait_until("the healthy client to keep up", move || {
            counter.load(Ordering::Acquire) >= target
        })
        .await;
        most_queued = most_queued.max(hub.stats().queued_bytes);
        if !round.is_multiple_of(4) {
            continue;
        }
        let present: Vec<Option<SocketAddr>> = hub
            .clients()
            .await
            .into_iter()
            .map(|c| c.info.remote_addr)
            .collect();
        if silent_gone.is_none() && !present.contains(&Some(silent_addr)) {
            silent_gone = Some(silent_started.elapsed());
        }
        if stalled_gone.is_none() && !present.contains(&Some(stalled_addr)) {
            stalled_gone = Some(stalled_started.elapsed());
        }
    }
    println!(
        "half-open: silent client gone after {silent_gone:?}, stalled after {stalled_gone:?} \
         (heartbeat {HEARTBEAT:?}, pong timeout {PONG_TIMEOUT:?}); {published} messages, \
         at most {most_queued} bytes queued"
    );
    for (name, gone) in [("silent", silent_gone), ("stalled", stalled_gone)] {
        let gone = gone.unwrap();
        // Not before the pong timeout (the client was alive when it connected), and within
        // heartbeat + pong timeout + the margin.
        assert!(gone >= PONG_TIMEOUT, "{name} dropped after only {gone:?}");
        assert!(gone <= limit, "{name} dropped only after {gone:?}");
    }
    assert!(
        most_queued > 0,
        "the stalled client's writes blocked and frames were queued for it"
    );
    let stats = hub.stats();
    assert_eq!(
        stats.slow_consumer_disconnects, 0,
        "closed by the keep-alive: {stats:?}"
    );

    // Their sockets are closed, not just forgotten: each reads what the kernel held, then
    // the end of the connection.
    read_until_end(&mut silent).await;
    read_until_end(&mut stalled).await;

    hub.send_to_channel("feed", &Message::new("end")).unwrap();
    let (mut healthy, got) = within("the healthy reader", reader).await.unwrap();
    assert_eq!(got, published, "the healthy client got every message");
    sync(&mut healthy).await;
    wait_for_baseline(&hub, 1, 1).await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown under load
// ---------------------------------------------------------------------------------------------

const SHUTDOWN_CLIENTS: usize = 400;
/// Shutdown begins after this many messages.
const BEFORE_SHUTDOWN: u64 = 1_000;
/// The most messages a client may have in flight (sent, not yet read): keeps each client's
/// queue far below its bound, so that nobody is a slow consumer.
const IN_FLIGHT: u64 = 100;
const DRAIN: Duration = Duration::from_secs(10);

/// What one client saw.
struct Outcome {
    /// Messages received, all in sequence from 0.
    received: u64,
    close: Option<u16>,
    closed_at: Option<Instant>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_every_client_gets_what_was_published_before_shutdown_then_1001() {
    wshub::raise_fd_limit().unwrap();
    let config = HubConfig::builder().shutdown_drain(DRAIN).build().unwrap();
    let mut server = Server::start(config).await;
    let hub = server.hub.clone();
    let addr = server.addr;

    let mut clients = Vec::new();
    for _ in 0..SHUTDOWN_CLIENTS {
        let mut raw = Raw::connect(addr).await;
        raw.send_text(&json!({"type": "subscribe", "data": "feed"}).to_string())
            .await;
        let ack = raw.read_text().await;
        assert!(ack.starts_with(r#"{"type":"subscribed""#), "{ack}");
        clients.push(raw);
    }

    let total = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut raw)| {
            let total = Arc::clone(&total);
            tokio::spawn(async move {
                let mut scratch = vec![0u8; 16 * 1024];
                let mut outcome = Outcome {
                    received: 0,
                    close: None,
                    closed_at: None,
                };
                // Bounded by progress, not by the whole stream's length: the close frame and
                // the end of the connection count as progress too.
                let mut progress = Progress::new(format!("client {i}'s stream and close"));
                loop {
                    match progress.wait(raw.read_frame_into(&mut scratch)).await {
                        RawFrame::Frame {
                            opcode: OP_TEXT,
                            payload,
                        } => {
                            let seq = seq_of(&payload).expect("a seq");
                            assert_eq!(seq, outcome.received, "client {i}: in order, no gap");
                            outcome.received += 1;
                            progress.advanced();
                            total.fetch_add(1, Ordering::Release);
                        }
                        RawFrame::Frame {
                            opcode: OP_CLOSE,
                            payload,
                        } => {
                            outcome.closed_at = Some(Instant::now());
                            outcome.close = Some(u16::from_be_bytes([payload[0], payload[1]]));
                            progress.advanced();
                            raw.send_close(1001).await;
                        }
                        RawFrame::Frame {
                            opcode: OP_PING, ..
                        } => {}
                        RawFrame::Frame { opcode, .. } => {
                            panic!("client {i}: unexpected frame {opcode:#x}")
                        }
                        RawFrame::End => break,
                    }
                }
                outcome
            })
        })
        .collect();

    // The publisher streams, keeping at most IN_FLIGHT messages ahead of the slowest reader,
    // begins the shutdown after BEFORE_SHUTDOWN messages, and keeps publishing until the hub
    // refuses (those may or may not arrive).
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let hub = hub.clone();
        let total = Arc::clone(&total);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut began = None;
            while seq < 100_000 && !stop.load(Ordering::Acquire) {
                if hub.send_to_channel("feed", &tick(seq, 200)).is_err() {
                    break;
                }
                seq += 1;
                if seq == BEFORE_SHUTDOWN {
                    hub.shutdown();
                    began = Some(Instant::now());
                }
                if began.is_none() && seq.is_multiple_of(10) {
                    let floor = seq.saturating_sub(IN_FLIGHT) * SHUTDOWN_CLIENTS as u64;
                    for _ in 0..100_000 {
                        if total.load(Ordering::Acquire) >= floor {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                } else if seq.is_multiple_of(10) {
                    tokio::task::yield_now().await;
                }
            }
            (began.expect("the shutdown began"), seq)
        })
    };

    let mut outcomes = Vec::new();
    for reader in readers {
        outcomes.push(within_stream_cap("a reader", reader).await.unwrap());
    }
    stop.store(true, Ordering::Release);
    let (began, attempted) = within("the publisher", publisher).await.unwrap();
    server.wait_stopped().await;

    for (i, outcome) in outcomes.iter().enumerate() {
        assert!(
            outcome.received >= BEFORE_SHUTDOWN,
            "client {i} got {} of the {BEFORE_SHUTDOWN} messages published before shutdown",
            outcome.received
        );
        assert!(outcome.received <= attempted);
        assert_eq!(outcome.close, Some(1001), "client {i}: going away");
        let after = outcome.closed_at.unwrap().saturating_duration_since(began);
        assert!(
            after <= DRAIN + MARGIN,
            "client {i} got its 1001 {after:?} after shutdown began (drain {DRAIN:?})"
        );
    }
    let most = outcomes.iter().map(|o| o.received).max().unwrap();
    println!(
        "shutdown under load: {SHUTDOWN_CLIENTS} clients, {BEFORE_SHUTDOWN} messages before \
         shutdown, up to {} after it reached clients; last 1001 {:?} after shutdown began",
        most - BEFORE_SHUTDOWN,
        outcomes
            .iter()
            .filter_map(|o| o.closed_at)
            .max()
            .unwrap()
            .saturating_duration_since(began)
    );
    let stats = hub.stats();
    assert_eq!(stats.connection_tasks, 0, "{stats:?}");
    assert_eq!(stats.clients, 0, "{stats:?}");
    assert_eq!(stats.channels, 0, "{stats:?}");
    assert_eq!(stats.slow_consumer_disconnects, 0, "{stats:?}");
    // The listener is closed or answers 503.
    if let Ok(stream) = TcpStream::connect(addr).await {
        drop(stream);
        if let Err(tokio_tungstenite::tungstenite::Error::Http(response)) =
            try_connect(addr, request(addr, "/ws")).await
        {
            assert_eq!(response.status().as_u16(), 503);
        }
    }
}
