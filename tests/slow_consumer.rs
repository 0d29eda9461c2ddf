//! Slow consumers: a client that stops reading, beside a healthy one on the same channel.
//! By default it is closed with 4000 `slow consumer` (over its queue bound, or when its write
//! times out) and counted, while the healthy client gets every message in order; with
//! `DropOldest` it is kept, loses its oldest messages, and the drops are counted.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use tokio::net::TcpSocket;
use wshub::{Hub, HubConfig, HubStats, Message, SlowConsumerPolicy};

const CHANNEL: &str = "feed";
/// Messages are about 1 KiB, so a queue bound of 16 KiB holds about 16 of them.
const PAD: usize = 1000;
const BATCH: u64 = 50;
/// The most messages any scenario publishes (about 40 MiB), far more than the kernel
/// buffers of one stalled loopback connection hold.
const MAX_MESSAGES: u64 = 40_000;

/// A raw client with a small receive buffer, subscribed to [`CHANNEL`], that then reads
/// nothing until told.
async fn stalled_client(server: &Server) -> Raw {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let mut raw = Raw::handshake(stream, server.addr).await;
    raw.send_text(&json!({"type": "subscribe", "data": CHANNEL}).to_string())
        .await;
    let ack = raw.read_text().await;
    assert!(ack.starts_with(r#"{"type":"subscribed""#), "{ack}");
    raw
}

fn publish(hub: &Hub, seq: u64) {
    let data = json!({"seq": seq, "pad": "x".repeat(PAD)});
    hub.send_to_channel(CHANNEL, &Message::new("tick").with_data(data))
        .expect("publish");
}

/// Publishes batches, each once the healthy client has read the one before (so only the
/// stalled client falls behind), until `done(stats)` or [`MAX_MESSAGES`]. Returns how many
/// were published.
async fn publish_until(
    hub: &Hub,
    received: &Arc<AtomicU64>,
    done: impl Fn(&HubStats) -> bool,
) -> u64 {
    let mut published = 0;
    while published < MAX_MESSAGES && !done(&hub.stats()) {
        for _ in 0..BATCH {
            publish(hub, published);
            published += 1;
        }
        let target = published;
        let received = Arc::clone(received);
        wait_until("the healthy client to keep up", move || {
            received.load(Ordering::Acquire) >= target
        })
        .await;
    }
    assert!(
        done(&hub.stats()),
        "the stalled client was never treated as slow after {published} messages: {:?}",
        hub.stats()
    );
    published
}

/// What the stalled client saw once it read again.
#[derive(Debug)]
struct Seen {
    seqs: Vec<u64>,
    close: Option<(u16, String)>,
    ended: bool,
}

/// Reads everything the stalled client has been sent: text frames, then a close frame (and
/// the end of the connection), or just the end.
async fn read_all(raw: &mut Raw, stop_at_end_message: bool) -> Seen {
    let mut seen = Seen {
        seqs: Vec::new(),
        close: None,
        ended: false,
    };
    for _ in 0..MAX_MESSAGES + 10 {
        match raw.read_frame().await {
            RawFrame::Frame {
                opcode: OP_TEXT,
                payload,
            } => {
                let message: Value = serde_json::from_slice(&payload).expect("JSON");
                if message["type"] == "end" && stop_at_end_message {
                    return seen;
                }
                seen.seqs
                    .push(message["data"]["seq"].as_u64().expect("seq"));
            }
            RawFrame::Frame {
                opcode: OP_PING, ..
            } => {}
            RawFrame::Frame {
                opcode: OP_CLOSE,
                payload,
            } => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                seen.close = Some((code, String::from_utf8(payload[2..].to_vec()).unwrap()));
                raw.read_to_end().await;
                seen.ended = true;
                return seen;
            }
            RawFrame::Frame { opcode, .. } => panic!("unexpected frame {opcode:#x}"),
            RawFrame::End => {
                seen.ended = true;
                return seen;
            }
        }
    }
    panic!("more frames than were ever published")
}

/// Runs the disconnect scenario with `config` and checks everything a user would notice.
/// `close_may_be_lost`: with a write timeout of a fraction of a second, a busy machine can
/// start the stalled client's reading after the hub has given up on its close frame too;
/// then the connection's end (and the counter) is what it finds.
async fn disconnected_as_slow(config: HubConfig, close_may_be_lost: bool) {
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let mut healthy = server.connect().await;
    subscribe(&mut healthy, CHANNEL).await;
    let mut stalled = stalled_client(&server).await;

    // The stalled client starts reading the moment it is counted as slow: its close frame
    // is sent at once, and it must be there to take it.
    let watcher = {
        let hub = hub.clone();
        tokio::spawn(async move {
            wait_until("the stalled client to be counted as slow", move || {
                hub.stats().slow_consumer_disconnects >= 1
            })
            .await;
            read_all(&mut stalled, false).await
        })
    };

    let received = Arc::new(AtomicU64::new(0));
    let reader = spawn_sequence_reader(healthy, "the healthy client".into(), Arc::clone(&received));
    let mut published = publish_until(&hub, &received, |s| s.slow_consumer_disconnects >= 1).await;
    // More after the slow client is gone: the healthy one still gets them all.
    for _ in 0..BATCH {
        publish(&hub, published);
        published += 1;
    }
    hub.send_to_channel(CHANNEL, &Message::new("end")).unwrap();
    let (mut healthy, got) = within("the healthy reader", reader).await.unwrap();
    assert_eq!(got, published, "the healthy client got every message");

    let seen = within("the stalled client's reading", watcher)
        .await
        .unwrap();
    if !(close_may_be_lost && seen.close.is_none()) {
        assert_eq!(
            seen.close,
            Some((4000, "slow consumer".to_owned())),
            "the stalled client is closed with 4000 (saw {} messages first)",
            seen.seqs.len()
        );
    }
    assert!(seen.ended);
    // What it got before the close is a whole prefix of the stream: no frame lost in the
    // middle, none corrupted.
    for (i, seq) in seen.seqs.iter().enumerate() {
        assert_eq!(
            *seq, i as u64,
            "the stalled client's messages before the close"
        );
    }
    assert!(
        (seen.seqs.len() as u64) < got,
        "the stalled client did fall behind"
    );

    let stats = hub.stats();
    assert_eq!(stats.slow_consumer_disconnects, 1, "{stats:?}");
    let hub2 = hub.clone();
    wait_until("the slow client to be removed", move || {
        hub2.client_count() == 1 && hub2.stats().connection_tasks == 1
    })
    .await;
    assert_eq!(hub.channel_subscriber_count(CHANNEL), 1);
    // The healthy client is still connected and served.
    sync(&mut healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_queue_bound_is_closed_with_4000_and_others_get_everything() {
    let config = HubConfig::builder()
        .outbound_queue_bytes(16 * 1024)
        // Long enough that only the queue bound can catch the stalled client.
        .write_timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    disconnected_as_slow(config, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_write_times_out_is_closed_with_4000() {
    let config = HubConfig::builder()
        // Larger than anything this test publishes: only the write timeout can catch it.
        .outbound_queue_bytes(256 * 1024 * 1024)
        .write_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    disconnected_as_slow(config, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_the_client_and_counts_the_drops() {
    let config = HubConfig::builder()
        .outbound_queue_bytes(16 * 1024)
        .slow_consumer_policy(SlowConsumerPolicy::DropOldest)
        .write_timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let mut healthy = server.connect().await;
    subscribe(&mut healthy, CHANNEL).await;
    let mut stalled = stalled_client(&server).await;

    let received = Arc::new(AtomicU64::new(0));
    let reader = spawn_sequence_reader(healthy, "the healthy client".into(), Arc::clone(&received));
    let mut published = publish_until(&hub, &received, |s| s.dropped > 0).await;
    for _ in 0..BATCH {
        publish(&hub, published);
        published += 1;
    }
    hub.send_to_channel(CHANNEL, &Message::new("end")).unwrap();
    let (mut healthy, got) = within("the healthy reader", reader).await.unwrap();
    assert_eq!(got, published, "the healthy client got every message");

    let stats = hub.stats();
    assert_eq!(stats.slow_consumer_disconnects, 0, "{stats:?}");
    assert!(stats.dropped > 0, "{stats:?}");
    assert_eq!(hub.client_count(), 2, "the stalled client is kept");

    // Reading again, it gets an increasing sequence with a gap, ending with the newest
    // messages: its oldest queued ones were dropped.
    let seen = within("the stalled client's reading", read_all(&mut stalled, true)).await;
    assert!(seen.close.is_none() && !seen.ended, "{:?}", seen.close);
    assert!(
        seen.seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, without repeats"
    );
    assert!((seen.seqs.len() as u64) < published, "some were dropped");
    assert_eq!(
        seen.seqs.last(),
        Some(&(published - 1)),
        "the newest is kept"
    );
    // Read again now: the shard counts a drop as it queues, which may be after the healthy
    // client got the last message.
    let stats = hub.stats();
    assert!(
        stats.dropped >= published - seen.seqs.len() as u64,
        "every lost message is counted: {} published, {} seen, {stats:?}",
        published,
        seen.seqs.len()
    );

    // Both clients are still served.
    stalled.send_text(r#"{"type":"ping"}"#).await;
    assert!(stalled.read_text().await.starts_with(r#"{"type":"pong""#));
    sync(&mut healthy).await;
}
