//! Faults at scale, a thousand connections per test (run one at a time: see [`heavy`]).
//!
//! - Slow consumers: 1,000 subscribers of which 10% never read (4 KiB receive buffer) while
//!   a stream of sequenced messages flows. Every other subscriber receives every message in
//!   order; the bytes the hub holds queued stay below slow clients × queue bound + a margin;
//!   with the default policy each slow client is closed with 4000 and counted, with
//!   `DropOldest` each is kept, loses its oldest messages, and the drops are counted.
//!
//! Churn is in churn.rs (a process of its own, so that its RSS figures are its own).
//! One slow client beside one healthy one is in slow_consumer.rs.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wshub::{Hub, HubConfig, HubStats, Message, SlowConsumerPolicy};

/// The tests here each hold a thousand connections and keep both cores busy: they take turns
/// (a tokio mutex, as the guard is held across awaits; it serves every test's runtime).
async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

const SUBSCRIBERS: usize = 1_000;
/// Every tenth subscriber is slow.
const SLOW: usize = SUBSCRIBERS / 10;
const HEALTHY: usize = SUBSCRIBERS - SLOW;
const CHANNEL: &str = "feed";
/// Large messages: the kernel holds about 3 MB of a stalled loopback connection before the
/// hub's writes to it block, and this many bytes take fewer frames to get past that.
const PAD: usize = 16 * 1024;
/// About four messages.
const QUEUE_BOUND: usize = 64 * 1024;
const BATCH: u64 = 10;
/// About 32 MB per subscriber: ten times what the kernel holds of a stalled connection.
const MAX_MESSAGES: u64 = 2_000;

fn publish(hub: &Hub, seq: u64) {
    let data = json!({"seq": seq, "pad": "x".repeat(PAD)});
    hub.send_to_channel(CHANNEL, &Message::new("tick").with_data(data))
        .expect("publish");
}

/// Connects a raw client (with a 4 KiB receive buffer when `slow`) subscribed to [`CHANNEL`].
async fn subscriber(addr: SocketAddr, slow: bool) -> Raw {
    let stream = if slow {
        connect_with_recv_buffer(addr, 4096).await
    } else {
        TcpStream::connect(addr).await.expect("tcp connect")
    };
    let mut raw = Raw::handshake(stream, addr).await;
    raw.subscribe(CHANNEL).await;
    raw
}

/// [`SUBSCRIBERS`] subscribers, connected fifty at a time: (healthy, slow).
async fn connect_subscribers(addr: SocketAddr) -> (Vec<Raw>, Vec<Raw>) {
    let mut healthy = Vec::new();
    let mut slow = Vec::new();
    for chunk in 0..SUBSCRIBERS / 50 {
        let connecting: Vec<_> = (0..50)
            .map(|k| {
                let is_slow = (chunk * 50 + k) % 10 == 0;
                tokio::spawn(async move { (is_slow, subscriber(addr, is_slow).await) })
            })
            .collect();
        for task in connecting {
            let (is_slow, raw) = within("a subscriber", task).await.unwrap();
            if is_slow {
                slow.push(raw)
            } else {
                healthy.push(raw)
            }
        }
    }
    (healthy, slow)
}

/// Reads a healthy subscriber's messages until the `end` message, checking that each is the
/// next in sequence; returns the connection and how many it got. Bounded by progress: the
/// whole stream may take as long as the machine needs, a stall may not.
fn spawn_healthy_reader(mut raw: Raw, i: usize, total: Arc<AtomicU64>) -> JoinHandle<(Raw, u64)> {
    tokio::spawn(async move {
        let mut scratch = vec![0u8; 32 * 1024];
        let mut expected = 0u64;
        let mut progress = Progress::new(format!("healthy subscriber {i}'s stream"));
        loop {
            match progress.wait(raw.read_frame_into(&mut scratch)).await {
                RawFrame::Frame {
                    opcode: OP_TEXT,
                    payload,
                } => {
                    if payload.starts_with(br#"{"type":"end""#) {
                        break;
                    }
                    assert_eq!(
                        seq_of(&payload),
                        Some(expected),
                        "healthy subscriber {i} lost a message or got one out of order"
                    );
                    expected += 1;
                    progress.advanced();
                    total.fetch_add(1, Ordering::Release);
                }
                RawFrame::Frame {
                    opcode: OP_PING, ..
                } => {}
                other => panic!("healthy subscriber {i}: unexpected {other:?}"),
            }
        }
        (raw, expected)
    })
}

/// Samples `stats().queued_bytes` every millisecond until stopped; the highest seen.
struct QueueSampler {
    stop: Arc<AtomicBool>,
    task: JoinHandle<u64>,
}

impl QueueSampler {
    fn start(hub: &Hub) -> QueueSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let hub = hub.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut most = 0;
                while !stop.load(Ordering::Acquire) {
                    most = most.max(hub.stats().queued_bytes);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                most
            })
        };
        QueueSampler { stop, task }
    }

    async fn most(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        within("the sampler", self.task).await.unwrap()
    }
}

/// Publishes batches, each once every healthy subscriber has read the one before (so only the
/// slow ones fall behind), until `done(stats)` and then `extra` more batches, or
/// [`MAX_MESSAGES`]. Returns how many were published.
async fn stream(
    hub: &Hub,
    total: &Arc<AtomicU64>,
    done: impl Fn(&HubStats) -> bool,
    extra: u64,
) -> u64 {
    let mut published = 0;
    let mut extra_left = extra;
    while published < MAX_MESSAGES {
        if done(&hub.stats()) {
            if extra_left == 0 {
                break;
            }
            extra_left -= 1;
        }
        for _ in 0..BATCH {
            publish(hub, published);
            published += 1;
        }
        let target = published * HEALTHY as u64;
        let total = Arc::clone(total);
        wait_until("the healthy subscribers to keep up", move || {
            total.load(Ordering::Acquire) >= target
        })
        .await;
    }
    assert!(
        done(&hub.stats()),
        "the slow subscribers were never treated as slow after {published} messages: {:?}",
        hub.stats()
    );
    published
}

/// The margin on top of slow clients × queue bound: a frame partly written per slow client,
/// and a megabyte for healthy clients caught between two writes.
fn queued_limit() -> u64 {
    (SLOW * (QUEUE_BOUND + PAD + 1024) + 1024 * 1024) as u64
}

/// What a slow subscriber saw once it read again: the sequence numbers of its messages, and
/// the close frame's code and reason if one came.
struct SlowSeen {
    seqs: Vec<u64>,
    close: Option<(u16, String)>,
}

/// Reads everything a slow subscriber was sent, until the close frame (answered, then the
/// end of the connection) or, with `until_end_message`, the `end` message.
async fn read_slow(raw: &mut Raw, until_end_message: bool) -> SlowSeen {
    let mut scratch = vec![0u8; 32 * 1024];
    let mut seen = SlowSeen {
        seqs: Vec::new(),
        close: None,
    };
    let mut progress = Progress::new("a slow subscriber's backlog");
    loop {
        match progress.wait(raw.read_frame_into(&mut scratch)).await {
            RawFrame::Frame {
                opcode: OP_TEXT,
                payload,
            } => {
                if until_end_message && payload.starts_with(br#"{"type":"end""#) {
                    break;
                }
                seen.seqs.push(seq_of(&payload).expect("a seq"));
                progress.advanced();
            }
            RawFrame::Frame {
                opcode: OP_CLOSE,
                payload,
            } => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
                seen.close = Some((code, reason));
                raw.send_close(code).await;
                raw.read_to_end().await;
                break;
            }
            RawFrame::Frame {
                opcode: OP_PING, ..
            } => {}
            RawFrame::Frame { opcode, .. } => panic!("unexpected frame {opcode:#x}"),
            RawFrame::End => break,
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenth_of_1000_subscribers_never_read_and_each_is_closed_with_4000() {
    let _heavy = heavy().await;
    wshub::raise_fd_limit().unwrap();
    let config = HubConfig::builder()
        .outbound_queue_bytes(QUEUE_BOUND)
        // Long enough that only the queue bound catches the slow subscribers (their writes
        // block for well under a second before their queues pass the bound).
        .write_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let started = Instant::now();
    let (healthy, slow) = connect_subscribers(server.addr).await;
    let connected = started.elapsed();

    // A slow subscriber reads nothing until the hub has dropped it (it is gone from the
    // clients), then reads everything it was sent: its close frame comes last.
    let mut pending = Vec::new();
    let mut slow_readers = Vec::new();
    for mut raw in slow {
        let (go, wait) = oneshot::channel::<()>();
        pending.push((raw.stream.local_addr().unwrap(), go));
        slow_readers.push(tokio::spawn(async move {
            // Dropped at some point of the stream, however long it takes: the watcher below
            // fails the test if one never is.
            within_stream_cap("the slow subscriber to be dropped", wait)
                .await
                .unwrap();
            read_slow(&mut raw, false).await
        }));
    }
    let watcher = {
        let hub = hub.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + STREAM_CAP;
            while !pending.is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "{} slow subscribers were never dropped: {:?}",
                    pending.len(),
                    hub.stats()
                );
                let present: HashSet<Option<SocketAddr>> = hub
                    .clients()
                    .await
                    .into_iter()
                    .map(|c| c.info.remote_addr)
                    .collect();
                for (addr, go) in std::mem::take(&mut pending) {
                    if present.contains(&Some(addr)) {
                        pending.push((addr, go));
                    } else {
                        let _ = go.send(());
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let total = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = healthy
        .into_iter()
        .enumerate()
        .map(|(i, raw)| spawn_healthy_reader(raw, i, Arc::clone(&total)))
        .collect();
    let sampler = QueueSampler::start(&hub);
    let streaming = Instant::now();
    // After every slow subscriber is dropped, two more batches: the healthy ones still get
    // them all.
    let published = stream(
        &hub,
        &total,
        |s| s.slow_consumer_disconnects >= SLOW as u64,
        2,
    )
    .await;
    let most_queued = sampler.most().await;
    hub.send_to_channel(CHANNEL, &Message::new("end")).unwrap();
    let mut healthy = Vec::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let (raw, got) = within_stream_cap("a healthy reader", reader).await.unwrap();
        assert_eq!(got, published, "healthy subscriber {i} got every message");
        healthy.push(raw);
    }
    let streamed = streaming.elapsed();

    within("the watcher", watcher).await.unwrap();
    let mut longest = 0;
    for (i, reader) in slow_readers.into_iter().enumerate() {
        let seen = within_stream_cap("a slow reader", reader).await.unwrap();
        assert_eq!(
            seen.close,
            Some((4000, "slow consumer".to_owned())),
            "slow subscriber {i} is closed with 4000 after {} messages",
            seen.seqs.len()
        );
        // What it got before the close is a whole prefix of the stream.
        for (k, seq) in seen.seqs.iter().enumerate() {
            assert_eq!(
                *seq, k as u64,
                "slow subscriber {i}'s messages before its close"
            );
        }
        assert!((seen.seqs.len() as u64) < published);
        longest = longest.max(seen.seqs.len());
    }

    let stats = hub.stats();
    assert_eq!(stats.slow_consumer_disconnects, SLOW as u64, "{stats:?}");
    assert!(
        most_queued <= queued_limit(),
        "the hub held {most_queued} bytes queued, over {} slow × {QUEUE_BOUND} + margin",
        SLOW
    );
    wait_for_baseline(&hub, HEALTHY, 1).await;
    println!(
        "slow consumers (disconnect): {SUBSCRIBERS} subscribers connected in {connected:?}; \
         {published} messages of {PAD} bytes streamed in {streamed:?}; at most {most_queued} \
         bytes queued (limit {}); slow subscribers got at most {longest} messages before 4000",
        queued_limit()
    );
    drop(healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_drop_oldest_the_slow_tenth_stays_connected_and_the_drops_are_counted() {
    let _heavy = heavy().await;
    wshub::raise_fd_limit().unwrap();
    let config = HubConfig::builder()
        .outbound_queue_bytes(QUEUE_BOUND)
        .slow_consumer_policy(SlowConsumerPolicy::DropOldest)
        .write_timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let (healthy, mut slow) = connect_subscribers(server.addr).await;

    let total = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = healthy
        .into_iter()
        .enumerate()
        .map(|(i, raw)| spawn_healthy_reader(raw, i, Arc::clone(&total)))
        .collect();
    let sampler = QueueSampler::start(&hub);
    // Until every slow subscriber's queue is at its bound (each within a message of it), then
    // three batches more, so that each drops some.
    let full = (SLOW * (QUEUE_BOUND - PAD - 1024)) as u64;
    let published = stream(&hub, &total, |s| s.queued_bytes >= full, 3).await;
    let most_queued = sampler.most().await;
    hub.send_to_channel(CHANNEL, &Message::new("end")).unwrap();
    let mut healthy = Vec::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let (raw, got) = within_stream_cap("a healthy reader", reader).await.unwrap();
        assert_eq!(got, published, "healthy subscriber {i} got every message");
        healthy.push(raw);
    }

    let stats = hub.stats();
    assert_eq!(stats.slow_consumer_disconnects, 0, "{stats:?}");
    assert_eq!(
        stats.clients, SUBSCRIBERS,
        "the slow ones are kept: {stats:?}"
    );
    assert!(
        most_queued <= queued_limit(),
        "the hub held {most_queued} bytes queued, over {SLOW} slow × {QUEUE_BOUND} + margin"
    );

    // Reading again, each slow subscriber gets an increasing sequence with a gap, ending with
    // the newest message.
    let mut lost = 0;
    for (i, raw) in slow.iter_mut().enumerate() {
        let seen = read_slow(raw, true).await;
        assert!(
            seen.close.is_none(),
            "slow subscriber {i}: {:?}",
            seen.close
        );
        assert!(
            seen.seqs.windows(2).all(|w| w[0] < w[1]),
            "slow subscriber {i}: in order, without repeats"
        );
        assert!(
            (seen.seqs.len() as u64) < published,
            "slow subscriber {i} lost some"
        );
        assert_eq!(
            seen.seqs.last(),
            Some(&(published - 1)),
            "the newest is kept"
        );
        lost += published - seen.seqs.len() as u64;
    }
    let stats = hub.stats();
    assert!(
        stats.dropped >= lost,
        "every lost message is counted: {lost} lost, {stats:?}"
    );
    // Every subscriber is still served.
    for raw in slow.iter_mut().chain(healthy.iter_mut()).step_by(97) {
        raw.send_text(r#"{"type":"ping"}"#).await;
        assert!(raw.read_text().await.starts_with(r#"{"type":"pong""#));
    }
    wait_for_baseline(&hub, SUBSCRIBERS, 1).await;
    println!(
        "slow consumers (drop oldest): {published} messages of {PAD} bytes; at most \
         {most_queued} bytes queued (limit {}); {} frames dropped",
        queued_limit(),
        stats.dropped
    );
}
