//! Clients that flood the hub with requests, as fast as their sockets take them, while the
//! shard inboxes are bounded (`shard_backlog_bytes`): the process's memory stays bounded,
//! the flooders are still answered, and a subscriber beside them gets every message.
//!
//! A test binary of its own with a single test: it measures this process's RSS, which any
//! other test running beside it would disturb.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use wshub::{HubConfig, Message};

const FLOODERS: usize = 20;
/// Requests per flooder, at most; each also stops after [`FLOOD_FOR`].
const MAX_REQUESTS: u64 = 200_000;
const FLOOD_FOR: Duration = Duration::from_secs(5);
/// The bound on each shard's inbox. Small, so that the flood reaches it within
/// milliseconds and the memory it allows (this bound times two shards) is small beside what
/// the test measures: with the default 64 MiB, two shards could hold 128 MiB of requests
/// within the bound, more than the growth this test allows.
const BACKLOG: usize = 1 << 20;
/// The most this process's RSS may grow during the flood. What the hub may hold for it: the
/// two inboxes (2 x 1 MiB of request cost, a few times that in allocations: a command and
/// its channel name are separate allocations, and a request's cost counts the bytes, not
/// the allocator's rounding), each connection's read buffer (up to a 64 KiB message, 21
/// connections), the flooders' reply queues while their readers catch up (kilobytes each:
/// they read as fast as the hub writes), and the test's own buffers (under 1 MiB). About
/// 10 MiB in all; 64 MiB leaves room for the allocator's arenas on two threads and still
/// fails a hub whose inbox grows with the flood (see the test's figures).
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

/// Masked request frames for flooder `k`, cycling subscribe, unsubscribe, ping: `cycles`
/// of them end to end, to be written as one buffer.
fn request_cycle(k: usize, cycles: usize) -> Vec<u8> {
    let subscribe = format!(r#"{{"type":"subscribe","data":"f{k}"}}"#);
    let unsubscribe = format!(r#"{{"type":"unsubscribe","data":"f{k}"}}"#);
    let ping = r#"{"type":"ping"}"#;
    let mut bytes = Vec::new();
    for _ in 0..cycles {
        for request in [subscribe.as_str(), unsubscribe.as_str(), ping] {
            bytes.extend_from_slice(&client_frame(FIN | OP_TEXT, request.as_bytes()));
        }
    }
    bytes
}

/// Whole server frames at the front of `buf`: how many, and the bytes they use (headers
/// walked, payloads not copied: the replies are discarded, and there are millions).
fn count_frames(buf: &[u8]) -> (u64, usize) {
    let (mut frames, mut at) = (0, 0);
    while let Some(&[_, second]) = buf
        .get(at..at + 2)
        .map(|b| <&[u8; 2]>::try_from(b).unwrap())
    {
        let (len, header) = match second & 0x7F {
            126 => match buf.get(at + 2..at + 4) {
                Some(b) => (u16::from_be_bytes([b[0], b[1]]) as usize, 4),
                None => break,
            },
            127 => match buf.get(at + 2..at + 10) {
                Some(b) => (u64::from_be_bytes(b.try_into().unwrap()) as usize, 10),
                None => break,
            },
            n => (n as usize, 2),
        };
        if buf.len() < at + header + len {
            break;
        }
        at += header + len;
        frames += 1;
    }
    (frames, at)
}

/// One flooder: how many requests it sent, and how many replies it read.
struct Flooder {
    writer: JoinHandle<(u64, tokio::net::tcp::OwnedWriteHalf)>,
    /// Replies read, and the longest it went between two reads that returned data.
    reader: JoinHandle<(u64, Duration)>,
}

/// Connects flooder `k`: its writer sends requests as fast as the socket takes them (up to
/// [`MAX_REQUESTS`] or [`FLOOD_FOR`]), once `go` is set; its reader reads and counts every
/// reply until it has one per request sent, or nothing came for 20 s after the writer was
/// done.
async fn flooder(addr: SocketAddr, k: usize, mut go: watch::Receiver<bool>) -> Flooder {
    let stream = TcpStream::connect(addr).await.expect("tcp connect");
    let raw = Raw::handshake(stream, addr).await;
    let (mut read_half, mut write_half) = raw.stream.into_split();
    // How many requests the writer sent, once it is done.
    let (sent_tx, mut sent_rx) = watch::channel(None::<u64>);
    let writer = tokio::spawn(async move {
        let _ = go.wait_for(|go| *go).await;
        // 100 cycles of 3 requests: about 13 KB per write.
        let chunk = request_cycle(k, 100);
        let per_chunk = 300;
        let started = Instant::now();
        let mut sent = 0u64;
        // A write is never cut short (a chunk is sent whole or the test fails), so that
        // `sent` is exactly what the hub was given; the whole flood is bounded instead.
        let flood = async {
            while sent + per_chunk <= MAX_REQUESTS && started.elapsed() < FLOOD_FOR {
                write_half
                    .write_all(&chunk)
                    .await
                    .unwrap_or_else(|e| panic!("flooder {k}: the hub closed on it ({e})"));
                sent += per_chunk;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), flood)
            .await
            .unwrap_or_else(|_| panic!("flooder {k}: a write waited past a minute"));
        sent_tx.send_replace(Some(sent));
        // The write half is kept open until the reader is done: dropping it would end the
        // connection (FIN) before the replies are read.
        (sent, write_half)
    });
    let reader = tokio::spawn(async move {
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 32 * 1024];
        let mut replies = 0u64;
        let mut last_data = Instant::now();
        let mut longest_gap = Duration::ZERO;
        let give_up = Instant::now() + Duration::from_secs(90);
        // Until a reply to every request, or 20 s without one once the writer is done (a
        // flooder's requests may wait seconds in its socket while the others fill its
        // shard's inbox: the shard takes no turns between them).
        while Instant::now() < give_up {
            let sent = *sent_rx.borrow_and_update();
            if sent.is_some_and(|sent| replies >= sent) {
                break;
            }
            let idle = if sent.is_some() { 20_000 } else { 500 };
            let read =
                tokio::time::timeout(Duration::from_millis(idle), read_half.read(&mut chunk));
            match read.await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => {
                    longest_gap = longest_gap.max(last_data.elapsed());
                    last_data = Instant::now();
                    buf.extend_from_slice(&chunk[..n]);
                    let (frames, used) = count_frames(&buf);
                    replies += frames;
                    buf.drain(..used);
                }
                Err(_) if sent.is_some() => break,
                Err(_) => {}
            }
        }
        (replies, longest_gap)
    });
    Flooder { writer, reader }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_flooding_requests_keep_memory_bounded_while_others_receive() {
    /// The healthy subscriber's stream: 200 a second, for as long as the flood and a bit.
    const LIVE_MESSAGES: u64 = 1_400;
    // The hub, the flooders and their readers share this process's two worker threads, so a
    // flooder's reader can go without the CPU for seconds (a CI run saw a shard turn of 115 ms
    // and a reader that took less than 640 KiB in 10 s). The progress rule is
    // tests/bursts.rs's subject, not this test's: a floor of 1 KiB/s keeps it from judging
    // this process's scheduler.
    let config = HubConfig::builder()
        .shard_backlog_bytes(BACKLOG)
        .min_read_rate(1024)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();

    let mut live = server.connect().await;
    subscribe(&mut live, "live").await;
    let received = Arc::new(AtomicU64::new(0));
    let reader = spawn_sequence_reader(live, "the live subscriber".into(), Arc::clone(&received));

    let (go, ready) = watch::channel(false);
    let mut flooders = Vec::new();
    for k in 0..FLOODERS {
        flooders.push(flooder(server.addr, k, ready.clone()).await);
    }
    let hub2 = hub.clone();
    wait_until("every flooder to be registered", move || {
        hub2.client_count() == FLOODERS + 1
    })
    .await;

    // The process's memory and the shards' backlogs, sampled while the flood lasts.
    let baseline = rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let hub = hub.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let (mut rss, mut backlog, mut ticks) = (0u64, 0usize, 0u64);
            while !stop.load(Ordering::Acquire) {
                if ticks % 100 == 0 {
                    rss = rss.max(rss_kib());
                }
                let stats = hub.stats();
                backlog = backlog.max(stats.shard_backlog_bytes.iter().copied().max().unwrap());
                ticks += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (rss.max(rss_kib()), backlog)
        })
    };

    go.send_replace(true);
    let flood_began = Instant::now();
    // The live stream, at 200 a second; a publish waits for room rather than fail.
    let publisher = {
        let hub = hub.clone();
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            for seq in 0..LIVE_MESSAGES {
                tick.tick().await;
                let message = Message::new("tick").with_data(serde_json::json!({"seq": seq}));
                let started = Instant::now();
                hub.send_to_channel_async("live", &message)
                    .await
                    .expect("publish");
                slowest = slowest.max(started.elapsed());
            }
            hub.send_to_channel_async("live", &Message::new("end"))
                .await
                .expect("publish the end");
            slowest
        })
    };

    let mut sent = Vec::new();
    let mut readers = Vec::new();
    let mut write_halves = Vec::new();
    for flooder in flooders {
        let (requests, write_half) = within("a flooder's writer", flooder.writer).await.unwrap();
        sent.push(requests);
        write_halves.push(write_half);
        readers.push(flooder.reader);
    }
    let mut replies = Vec::new();
    let mut gaps = Vec::new();
    for reader in readers {
        // Bounded by the reader itself (90 s at most).
        let (count, gap) = reader.await.unwrap();
        replies.push(count);
        gaps.push(gap.as_millis());
    }
    let flood_took = flood_began.elapsed();
    let slowest = within("the publisher", publisher).await.unwrap();
    let (mut live, got) = within("the live subscriber", reader).await.unwrap();
    stop.store(true, Ordering::Release);
    let (peak_rss, peak_backlog) = within("the sampler", sampler).await.unwrap();
    let stats = hub.stats();
    println!(
        "flood: over in {flood_took:?}; {FLOODERS} flooders sent {} requests ({:?} each); RSS baseline {baseline} KiB, \
         peak {peak_rss} KiB (+{} KiB); peak shard backlog {peak_backlog} bytes (bound \
         {BACKLOG}); replies {:?}; longest gaps between replies (ms) {:?}; live got {got}/{LIVE_MESSAGES}, slowest publish \
         {slowest:?}; {stats:?}",
        sent.iter().sum::<u64>(),
        sent,
        peak_rss.saturating_sub(baseline),
        replies,
        gaps,
    );
    let growth = peak_rss.saturating_sub(baseline);
    assert!(
        growth < RSS_GROWTH_LIMIT_KIB,
        "RSS grew by {growth} KiB during the flood, over {RSS_GROWTH_LIMIT_KIB} KiB"
    );
    // The bound itself: a connection task stops reading once a request takes its shard over
    // the bound, so the backlog overshoots by at most a request per client (about 100 bytes
    // each, 21 clients); 64 KiB covers that and a publish let in while the inbox was empty.
    assert!(
        peak_backlog <= BACKLOG + 64 * 1024,
        "a shard's backlog reached {peak_backlog} bytes, over the bound {BACKLOG}"
    );
    assert_eq!(
        got, LIVE_MESSAGES,
        "the live subscriber got every message, in order"
    );
    // The hub kept serving the flooders to the end: each got a reply to every request, and
    // none was cut as a slow consumer, since each reads everything it is sent.
    for (k, (&sent, &replies)) in sent.iter().zip(&replies).enumerate() {
        assert!(sent > 0, "flooder {k} sent nothing");
        assert_eq!(replies, sent, "flooder {k} got a reply to every request");
    }
    assert_eq!(
        stats.slow_consumer_disconnects, 0,
        "no flooder that reads was cut: {stats:?}"
    );
    let hub2 = hub.clone();
    wait_until("every shard's backlog to drain", move || {
        hub2.stats().shard_backlog_bytes.iter().all(|&b| b == 0)
    })
    .await;
    assert_eq!(
        hub.client_count(),
        FLOODERS + 1,
        "the flooders and the live subscriber are still connected"
    );
    sync(&mut live).await;
    drop(write_halves);
}
