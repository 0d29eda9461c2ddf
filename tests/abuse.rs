//! Abuse: hostile clients that a hub on the open internet meets.
//!
//! - Slowloris: a connection that sends nothing, half an upgrade request, or trickles its
//!   request a byte at a time is dropped after the handshake timeout, while a normal client
//!   connects and is served meanwhile.
//! - Connection flood: upgrades over `max_connections` are answered 503 while the clients
//!   already connected receive every message published meanwhile, in order.
//! - Abrupt resets mid-handshake, mid-frame and mid-fan-out: no panic, a healthy client keeps
//!   being served, and the counts of clients, channels, connection tasks and queued bytes
//!   return to their baseline.
//!
//! Close codes, malformed requests and the rate limit are in close_codes.rs and protocol.rs;
//! one slow client in slow_consumer.rs; slow clients at scale and churn in scale.rs;
//! half-open clients and shutdown under load in faults.rs.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wshub::{Hub, HubConfig, Message};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long past the handshake timeout a dropped connection may take to be noticed: generous,
/// the machine is noisy.
const MARGIN: Duration = Duration::from_secs(10);

/// Reads `stream` until the server ends the connection; returns what it sent (hyper may answer
/// a timed-out request with a 408, or say nothing) and when it ended.
async fn read_until_dropped(
    mut stream: impl tokio::io::AsyncRead + Unpin,
    started: Instant,
) -> (Vec<u8>, Duration) {
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(HANDSHAKE_TIMEOUT + MARGIN, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "a slowloris connection is still open {:?} after it stalled (handshake timeout \
         {HANDSHAKE_TIMEOUT:?}); it received {:?}",
        started.elapsed(),
        String::from_utf8_lossy(&answer)
    );
    (answer, started.elapsed())
}

fn assert_no_upgrade(answer: &[u8]) {
    let text = String::from_utf8_lossy(answer);
    assert!(
        answer.is_empty() || text.starts_with("HTTP/1.1 408") || text.starts_with("HTTP/1.1 400"),
        "a stalled request is dropped (perhaps with a 408), never upgraded: {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_dropped_after_the_handshake_timeout() {
    let config = HubConfig::builder()
        .handshake_timeout(HANDSHAKE_TIMEOUT)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let addr = server.addr;
    let request = format!("{}\r\n", upgrade_request(addr, "/ws"));
    let half = request.len() / 2;

    // Ten of each kind: silent after connecting, half a request then silence, and the whole
    // request trickled a byte every 100 ms (which would take seconds to finish).
    let mut stalled = Vec::new();
    for i in 0..30 {
        // Before connecting: the hub's timer starts when it accepts, which may come before
        // this task sees its connect complete.
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.expect("tcp connect");
        match i % 3 {
            0 => stalled.push(tokio::spawn(read_until_dropped(stream, started))),
            1 => {
                stream
                    .write_all(&request.as_bytes()[..half])
                    .await
                    .expect("write half a request");
                stalled.push(tokio::spawn(read_until_dropped(stream, started)));
            }
            _ => {
                let bytes = request.clone().into_bytes();
                stalled.push(tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let trickle = tokio::spawn(async move {
                        for byte in bytes {
                            if write.write_all(&[byte]).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    });
                    let result = read_until_dropped(read, started).await;
                    trickle.abort();
                    result
                }));
            }
        }
    }

    // Meanwhile a normal client connects and is served.
    let mut ws = server.connect().await;
    subscribe(&mut ws, "news").await;
    server
        .hub
        .send_to_channel("news", &Message::new("headline"))
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "headline");

    for (i, task) in stalled.into_iter().enumerate() {
        let (answer, after) = within("a slowloris reader", task).await.unwrap();
        assert_no_upgrade(&answer);
        // Not dropped before its time either: the timeout is what drops it.
        assert!(
            after >= HANDSHAKE_TIMEOUT.mul_f64(0.9),
            "slowloris connection {i} was dropped after only {after:?}"
        );
    }

    // The stalled connections never became clients; the normal one is still served.
    let stats = server.hub.stats();
    assert_eq!(stats.clients, 1, "{stats:?}");
    assert_eq!(stats.connection_tasks, 1, "{stats:?}");
    sync(&mut ws).await;
}

/// A message of the stream the tests publish: its sequence number and some padding.
fn tick(seq: u64, pad: usize) -> Message {
    Message::new("tick").with_data(json!({"seq": seq, "pad": "x".repeat(pad)}))
}

const FLOOD_LIMIT: usize = 50;
const FLOOD_WAVES: usize = 10;
const FLOOD_WAVE: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_refused_with_503_while_existing_clients_keep_receiving() {
    wshub::raise_fd_limit().unwrap();
    let config = HubConfig::builder()
        .max_connections(FLOOD_LIMIT)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let addr = server.addr;

    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for i in 0..FLOOD_LIMIT {
        let mut ws = server.connect().await;
        subscribe(&mut ws, "feed").await;
        readers.push(spawn_sequence_reader(
            ws,
            format!("client {i}"),
            Arc::clone(&received),
        ));
    }
    let refused_before = hub.stats().upgrades_refused;

    // The stream runs for as long as the flood does, at least 200 messages.
    let flood_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let hub = hub.clone();
        let flood_done = Arc::clone(&flood_done);
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut most_clients = 0;
            while seq < 100_000 && (seq < 200 || !flood_done.load(Ordering::Acquire)) {
                hub.send_to_channel("feed", &tick(seq, 100)).unwrap();
                seq += 1;
                if seq.is_multiple_of(10) {
                    most_clients = most_clients.max(hub.stats().clients);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            hub.send_to_channel("feed", &Message::new("end")).unwrap();
            (seq, most_clients)
        })
    };

    // Waves of upgrades, each wave at once: every one is answered 503.
    for wave in 0..FLOOD_WAVES {
        let attempts: Vec<_> = (0..FLOOD_WAVE)
            .map(|_| tokio::spawn(try_connect(addr, request(addr, "/ws"))))
            .collect();
        for attempt in attempts {
            let result = within("a flood attempt", attempt).await.unwrap();
            assert_eq!(refused_status(result), 503, "wave {wave}");
        }
    }
    flood_done.store(true, Ordering::Release);

    let (published, most_clients) = within("the publisher", publisher).await.unwrap();
    let mut clients = Vec::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let (ws, got) = within("a reader", reader).await.unwrap();
        assert_eq!(got, published, "client {i} got every message");
        clients.push(ws);
    }
    let stats = hub.stats();
    assert_eq!(
        stats.upgrades_refused - refused_before,
        (FLOOD_WAVES * FLOOD_WAVE) as u64,
        "{stats:?}"
    );
    assert!(
        most_clients <= FLOOD_LIMIT,
        "{most_clients} clients at once"
    );
    assert_eq!(stats.clients, FLOOD_LIMIT, "{stats:?}");
    assert_eq!(stats.connection_tasks, FLOOD_LIMIT, "{stats:?}");

    // Capacity comes back when a client leaves.
    let mut leaving = clients.pop().unwrap();
    close(&mut leaving, 1000).await;
    drop(leaving);
    let watched = hub.clone();
    wait_until("the leaving client's task to end", move || {
        watched.stats().connection_tasks == FLOOD_LIMIT - 1
    })
    .await;
    let mut newcomer = server.connect().await;
    sync(&mut newcomer).await;
    for ws in clients.iter_mut() {
        sync(ws).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Abrupt resets
// ---------------------------------------------------------------------------------------------

/// Connects a client that sends a subscribe to `channel` and reads its acknowledgement.
async fn raw_subscriber(stream: TcpStream, addr: std::net::SocketAddr, channel: &str) -> Raw {
    let mut raw = Raw::handshake(stream, addr).await;
    raw.send_text(&json!({"type": "subscribe", "data": channel}).to_string())
        .await;
    let ack = raw.read_text().await;
    assert!(ack.starts_with(r#"{"type":"subscribed""#), "{ack}");
    raw
}

/// The healthy client beside the abusive ones: subscribed to `healthy`, and checked to be
/// served at the end.
async fn healthy_client(server: &Server) -> Ws {
    let mut ws = server.connect().await;
    subscribe(&mut ws, "healthy").await;
    ws
}

async fn assert_still_served(hub: &Hub, ws: &mut Ws) {
    hub.send_to_channel("healthy", &Message::new("still-here"))
        .unwrap();
    assert_eq!(
        read_until_type(ws, "still-here").await["channel"],
        "healthy"
    );
    sync(ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_mid_handshake_and_mid_frame_leave_nothing_behind() {
    let panics = count_panics();
    wshub::raise_fd_limit().unwrap();
    let config = HubConfig::builder()
        .handshake_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let addr = server.addr;
    let mut healthy = healthy_client(&server).await;
    wait_for_baseline(&hub, 1, 1).await;

    let request = format!("{}\r\n", upgrade_request(addr, "/ws"));
    // Half a masked text frame: the header promises 100 bytes, ten arrive.
    let mut half_frame = client_frame(FIN | OP_TEXT, &[b' '; 100]);
    half_frame.truncate(2 + 4 + 10);
    for i in 0..240 {
        let mut stream = TcpStream::connect(addr).await.expect("tcp connect");
        let cut = 1 + (i * 7) % (request.len() - 1);
        match i % 6 {
            // Part of the request, then FIN or RST.
            0 | 1 => {
                stream.write_all(&request.as_bytes()[..cut]).await.unwrap();
                if i % 6 == 0 {
                    drop(stream)
                } else {
                    reset(stream)
                }
            }
            // The whole request, then RST before the 101 is read: the upgrade may be accepted
            // for a peer that is already gone.
            2 => {
                stream.write_all(request.as_bytes()).await.unwrap();
                reset(stream);
            }
            // Upgraded and subscribed, then half a frame, then RST or FIN; or RST right after
            // the subscribe, before its acknowledgement is read.
            3 | 4 => {
                let mut raw = raw_subscriber(stream, addr, &format!("room:{}", i % 5)).await;
                raw.send(&half_frame).await;
                if i % 6 == 3 {
                    reset(raw.stream)
                } else {
                    drop(raw)
                }
            }
            _ => {
                let mut raw = Raw::handshake(stream, addr).await;
                raw.send_text(&json!({"type": "subscribe", "data": "room:x"}).to_string())
                    .await;
                reset(raw.stream);
            }
        }
    }

    assert_still_served(&hub, &mut healthy).await;
    wait_for_baseline(&hub, 1, 1).await;
    assert_eq!(count_panics(), panics, "something panicked");
}

const FANOUT_SUBSCRIBERS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_reset_mid_fan_out_leave_nothing_behind() {
    let panics = count_panics();
    wshub::raise_fd_limit().unwrap();
    let config = HubConfig::builder()
        // Large: the subscribers that do not read keep their queues until they are reset.
        .outbound_queue_bytes(64 * 1024 * 1024)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let addr = server.addr;
    let mut healthy = server.connect().await;
    subscribe(&mut healthy, "feed").await;
    let received = Arc::new(AtomicU64::new(0));
    let reader = spawn_sequence_reader(healthy, "the healthy client".into(), Arc::clone(&received));
    wait_for_baseline(&hub, 1, 1).await;

    // Subscribers of `feed` (and one of ten rooms each): a third read until they are reset,
    // a third never read (with a small receive buffer) and are reset once the hub's writes
    // to them have blocked and frames are queued, a third read nothing and are reset soon.
    // Each is reset after a delay of its own while the stream flows.
    let (go, ready) = tokio::sync::watch::channel(false);
    let blocked_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut subscribers = Vec::new();
    for i in 0..FANOUT_SUBSCRIBERS {
        let stream = if i % 3 == 1 {
            connect_with_recv_buffer(addr, 4096).await
        } else {
            TcpStream::connect(addr).await.expect("tcp connect")
        };
        let mut raw = raw_subscriber(stream, addr, "feed").await;
        raw.send_text(
            &json!({"type": "subscribe", "data": format!("room:{}", i % 10)}).to_string(),
        )
        .await;
        let delay = Duration::from_millis(20 + (i as u64 * 13) % 400);
        let mut ready = ready.clone();
        let hub = hub.clone();
        let blocked_seen = Arc::clone(&blocked_seen);
        subscribers.push(tokio::spawn(async move {
            let _ = ready.wait_for(|go| *go).await;
            let started = Instant::now();
            if i % 3 == 0 {
                let mut scratch = vec![0u8; 16 * 1024];
                while let Some(left) = delay.checked_sub(started.elapsed()) {
                    let frame = tokio::time::timeout(left, raw.read_frame_into(&mut scratch)).await;
                    if matches!(frame, Ok(RawFrame::End)) {
                        panic!("subscriber {i} was dropped before its reset");
                    }
                }
            } else if i % 3 == 1 {
                wait_until("the hub's writes to a stalled subscriber to block", || {
                    hub.stats().queued_bytes > 0
                })
                .await;
                blocked_seen.store(true, Ordering::Release);
                tokio::time::sleep(delay).await;
            } else {
                tokio::time::sleep(delay).await;
            }
            reset(raw.stream);
        }));
    }
    assert_eq!(
        hub.channel_subscriber_count("feed"),
        FANOUT_SUBSCRIBERS + 1,
        "every subscriber is registered"
    );
    go.send_replace(true);

    // The stream: batches of 8 KiB messages, each once the healthy client has read the one
    // before, until every subscriber has been reset (at most 20,000 messages). The kernel
    // holds about 3 MB of a stalled loopback connection before the hub's writes block.
    let mut published = 0u64;
    while published < 20_000 && !subscribers.iter().all(|s| s.is_finished()) {
        for _ in 0..20 {
            hub.send_to_channel("feed", &tick(published, 8 * 1024))
                .unwrap();
            published += 1;
        }
        let target = published;
        let received = Arc::clone(&received);
        wait_until("the healthy client to keep up", move || {
            received.load(Ordering::Acquire) >= target
        })
        .await;
    }
    for subscriber in subscribers {
        within("a subscriber", subscriber).await.unwrap();
    }
    // Some resets hit clients whose writes were blocked, with frames queued.
    assert!(blocked_seen.load(Ordering::Acquire));
    hub.send_to_channel("feed", &Message::new("end")).unwrap();
    let (mut healthy, got) = within("the healthy reader", reader).await.unwrap();
    assert_eq!(got, published, "the healthy client got every message");

    sync(&mut healthy).await;
    wait_for_baseline(&hub, 1, 1).await;
    assert_eq!(count_panics(), panics, "something panicked");
}
