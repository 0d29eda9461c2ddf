//! Bursts and the slow-consumer policy, over real loopback sockets:
//!
//! - a reader that keeps reading, but slower than the publisher, survives a 16 MB burst with
//!   the defaults (the burst fits its 16 MiB bound and it makes progress every period);
//! - a thousand subscribers that never read are cut by the hub-wide memory budget, with the
//!   memory their queues hold staying near the budget, while a reader beside them gets all;
//! - a reader that trickles (far below `min_read_rate`) is cut for stalling, and counted.
//!
//! Every loop is bounded in count and time; the figures are printed (`--nocapture`).

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use wshub::{Hub, HubConfig, Message};

/// The tests here measure time and memory, and one holds a thousand connections: they take
/// turns, so that none measures another's load (a tokio mutex: held across awaits, and
/// shared by every test's runtime).
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// Publishes `{"seq": seq, "pad": pad}` on `channel`; an overload refusal fails the test.
fn publish(hub: &Hub, channel: &str, seq: u64, pad: &str) {
    let message = Message::new("tick").with_data(json!({"seq": seq, "pad": pad}));
    if let Err(err) = hub.send_to_channel(channel, &message) {
        panic!(
            "publish {seq} on {channel} refused (overloaded: {}): {err}",
            err.is_overloaded()
        );
    }
}

/// A raw client subscribed to `channel`, with a receive buffer of `recv_buffer` bytes.
async fn raw_subscriber(addr: SocketAddr, channel: &str, recv_buffer: u32) -> Raw {
    let stream = connect_with_recv_buffer(addr, recv_buffer).await;
    let mut raw = Raw::handshake(stream, addr).await;
    raw.send_text(&json!({"type": "subscribe", "data": channel}).to_string())
        .await;
    let ack = raw.read_text().await;
    assert!(ack.starts_with(r#"{"type":"subscribed""#), "{ack}");
    raw
}

/// Samples `stats().queued_memory_bytes` and `queued_bytes` every 2 ms until stopped; the
/// highest of each.
struct Peaks {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(u64, u64)>,
}

impl Peaks {
    fn start(hub: &Hub) -> Peaks {
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let hub = hub.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let (mut memory, mut queued) = (0, 0);
                while !stop.load(Ordering::Acquire) {
                    let stats = hub.stats();
                    memory = memory.max(stats.queued_memory_bytes);
                    queued = queued.max(stats.queued_bytes);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (memory, queued)
            })
        };
        Peaks { stop, task }
    }

    /// (peak queued memory, peak queued bytes summed over queues)
    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Release);
        within("the sampler", self.task).await.unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// A burst and a reader that keeps up on average.
// ---------------------------------------------------------------------------------------------

/// What the throttled reader saw.
#[derive(Debug, Default)]
struct Throttled {
    seqs: Vec<u64>,
    /// The code of a close frame, if one came.
    close: Option<u16>,
    /// The connection ended (EOF or error) before `want` messages.
    ended: bool,
    bytes: u64,
    reading: Duration,
}

/// A client on its own OS thread with a blocking socket: handshake, subscribe to `channel`,
/// wait for the ack, say so on `ready`, then read at no more than `rate` bytes per second
/// (after each read it sleeps until bytes read / time since the first read <= rate) until
/// it has `want` messages, a close frame, the end of the connection, or `limit`.
fn throttled_reader(
    addr: SocketAddr,
    channel: &'static str,
    rate: f64,
    want: usize,
    limit: Duration,
    ready: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<Throttled> {
    std::thread::spawn(move || {
        let give_up = Instant::now() + limit;
        let mut stream = std::net::TcpStream::connect(addr).expect("tcp connect");
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        stream
            .write_all(format!("{}\r\n", upgrade_request(addr, "/ws")).as_bytes())
            .expect("write upgrade");
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut read = |stream: &mut std::net::TcpStream, buf: &mut Vec<u8>| -> Option<usize> {
            loop {
                assert!(Instant::now() < give_up, "the reader ran out of time");
                match stream.read(&mut chunk) {
                    Ok(0) => return None,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        return Some(n);
                    }
                    Err(err)
                        if matches!(
                            err.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return None,
                }
            }
        };
        let head_end = loop {
            read(&mut stream, &mut buf).expect("the upgrade answer");
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        assert!(buf.starts_with(b"HTTP/1.1 101"), "upgrade refused");
        buf.drain(..head_end);
        let subscribe = json!({"type": "subscribe", "data": channel}).to_string();
        stream
            .write_all(&client_frame(FIN | OP_TEXT, subscribe.as_bytes()))
            .unwrap();
        loop {
            if let Some((frame, used)) = parse_server_frame(&buf) {
                buf.drain(..used);
                match frame {
                    RawFrame::Frame {
                        opcode: OP_TEXT,
                        payload,
                    } if payload.starts_with(br#"{"type":"subscribed""#) => break,
                    RawFrame::Frame {
                        opcode: OP_PING, ..
                    } => continue,
                    other => panic!("expected the subscribed ack, got {other:?}"),
                }
            }
            read(&mut stream, &mut buf).expect("the subscribed ack");
        }
        ready.send(()).unwrap();

        let mut seen = Throttled::default();
        let start = Instant::now();
        'reading: while seen.seqs.len() < want {
            let Some(n) = read(&mut stream, &mut buf) else {
                seen.ended = true;
                break;
            };
            seen.bytes += n as u64;
            let mut at = 0;
            while let Some((frame, used)) = parse_server_frame(&buf[at..]) {
                at += used;
                match frame {
                    RawFrame::Frame {
                        opcode: OP_TEXT,
                        payload,
                    } => seen.seqs.push(seq_of(&payload).expect("a seq")),
                    RawFrame::Frame {
                        opcode: OP_CLOSE,
                        payload,
                    } => {
                        seen.close = Some(u16::from_be_bytes([payload[0], payload[1]]));
                        break 'reading;
                    }
                    RawFrame::Frame { .. } => {}
                    RawFrame::End => unreachable!("not parsed"),
                }
            }
            buf.drain(..at);
            // The throttle: no faster than `rate` on average since the first read.
            let due = start + Duration::from_secs_f64(seen.bytes as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        seen.reading = start.elapsed();
        seen
    })
}

/// The defaults let a client that keeps reading take a burst of up to its 16 MiB bound
/// however slowly it drains, as long as it makes progress: a reader at 20 MB/s gets all of
/// a 16 MB burst published at full speed, in order, and nobody is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_at_20_mb_per_s_receives_all_of_a_16_mb_burst() {
    let _turn = one_at_a_time().await;
    const MESSAGES: usize = 2_000;
    const RATE: f64 = 20e6;
    let server = Server::default_hub().await;
    let hub = server.hub.clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let reader = throttled_reader(
        server.addr,
        "burst",
        RATE,
        MESSAGES,
        Duration::from_secs(30),
        ready_tx,
    );
    tokio::task::spawn_blocking(move || ready.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("the reader to subscribe");

    // Built beforehand, so that the loop publishes at the hub's own speed.
    let pad = "x".repeat(8_000);
    let messages: Vec<Message> = (0..MESSAGES)
        .map(|seq| Message::new("tick").with_data(json!({"seq": seq, "pad": pad})))
        .collect();
    let peaks = Peaks::start(&hub);
    let started = Instant::now();
    for (seq, message) in messages.iter().enumerate() {
        if let Err(err) = hub.send_to_channel("burst", message) {
            panic!(
                "publish {seq} refused (overloaded: {}): {err}",
                err.is_overloaded()
            );
        }
    }
    let publishing = started.elapsed();
    let seen = tokio::time::timeout(
        Duration::from_secs(40),
        tokio::task::spawn_blocking(move || reader.join()),
    )
    .await
    .expect("the reader to finish within 40 s")
    .unwrap()
    .expect("the reader panicked");
    let (peak_memory, peak_queued) = peaks.stop().await;
    let stats = hub.stats();
    println!(
        "burst: published {MESSAGES} x 8 KB in {publishing:?}; reader got {} messages, {} bytes \
         in {:?} ({:.1} MB/s); peak queued {peak_queued} bytes, peak queued memory \
         {peak_memory} bytes; close {:?}, ended {}; slow-consumer disconnects {}",
        seen.seqs.len(),
        seen.bytes,
        seen.reading,
        seen.bytes as f64 / seen.reading.as_secs_f64() / 1e6,
        seen.close,
        seen.ended,
        stats.slow_consumer_disconnects,
    );

    assert_eq!(seen.close, None, "the reader was closed");
    assert!(!seen.ended, "the connection ended early");
    assert_eq!(seen.seqs.len(), MESSAGES, "every message of the burst");
    assert!(
        seen.seqs.iter().enumerate().all(|(i, &s)| s == i as u64),
        "in order, none lost or repeated"
    );
    assert_eq!(stats.slow_consumer_disconnects, 0, "{stats:?}");
    assert_eq!(stats.dropped, 0, "{stats:?}");
}

// ---------------------------------------------------------------------------------------------
// A thousand subscribers that never read, and the hub-wide budget.
// ---------------------------------------------------------------------------------------------

/// With the budget at 8 MiB and a write timeout of 300 s (so the stall rule cannot be what
/// cuts them in this test's time, however slow the machine), a thousand subscribers that never read are all cut by the
/// budget as 1 KB messages flow, the memory queued frames hold stays near the budget, each
/// cut client finds a 4000 close (or the end of the connection) behind what the kernel held
/// for it, and a reader on the same channel gets every message and is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_that_never_read_are_cut_within_the_memory_budget() {
    let _turn = one_at_a_time().await;
    const CHANNEL: &str = "feed";
    const STALLED: usize = 1_000;
    const BUDGET: u64 = 8 << 20;
    /// A shard looks at the budget after each batch of up to 256 commands, and the other
    /// shard may have just queued its own batch (each shard holds its own copy of a frame):
    /// 2 x 256 x ~1.1 KB is about 0.6 MB; 1 MiB covers that and the sampler's lag.
    const SLACK: u64 = 1 << 20;
    const BURST: u64 = 500;
    const MAX_MESSAGES: u64 = 100_000;
    let config = HubConfig::builder()
        .queue_memory_budget(BUDGET as usize)
        .write_timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let addr = server.addr;

    let mut stalled = Vec::with_capacity(STALLED);
    for _ in 0..STALLED / 50 {
        let connecting: Vec<_> = (0..50)
            .map(|_| tokio::spawn(async move { raw_subscriber(addr, CHANNEL, 4096).await }))
            .collect();
        for task in connecting {
            stalled.push(within("a subscriber", task).await.unwrap());
        }
    }
    let mut healthy = server.connect().await;
    subscribe(&mut healthy, CHANNEL).await;
    let received = Arc::new(AtomicU64::new(0));
    let reader = spawn_sequence_reader(healthy, "the healthy client".into(), Arc::clone(&received));

    let peaks = Peaks::start(&hub);
    let pad = "x".repeat(1_000);
    let started = Instant::now();
    let mut published = 0u64;
    let all_cut = |hub: &Hub| {
        let s = hub.stats();
        s.queue_bound_disconnects + s.stalled_disconnects + s.budget_disconnects >= STALLED as u64
    };
    while published < MAX_MESSAGES && !all_cut(&hub) {
        for _ in 0..BURST {
            publish(&hub, CHANNEL, published, &pad);
            published += 1;
        }
        // The healthy reader keeps up (so only the stalled ones fall behind), then a pause.
        let target = published;
        let received2 = Arc::clone(&received);
        wait_until("the healthy client to keep up", move || {
            received2.load(Ordering::Acquire) >= target
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cutting = started.elapsed();
    let (peak_memory, peak_queued) = peaks.stop().await;
    assert!(
        all_cut(&hub),
        "not every stalled subscriber was cut after {published} messages: {:?}",
        hub.stats()
    );
    hub.send_to_channel(CHANNEL, &Message::new("end")).unwrap();
    let (mut healthy, got) = within("the healthy reader", reader).await.unwrap();
    let stats = hub.stats();
    println!(
        "budget: {STALLED} stalled cut after {published} x 1 KB in {cutting:?}; peak queued \
         memory {peak_memory} bytes (budget {BUDGET}, slack {SLACK}), peak queued bytes summed \
         over queues {peak_queued}; budget cuts {}, stalled {}, queue bound {}; healthy got {got}",
        stats.budget_disconnects, stats.stalled_disconnects, stats.queue_bound_disconnects
    );
    assert!(
        peak_memory <= BUDGET + SLACK,
        "queued memory peaked at {peak_memory} bytes, over the budget {BUDGET} + {SLACK}"
    );
    assert_eq!(
        stats.slow_consumer_disconnects, STALLED as u64,
        "every stalled subscriber, and only they: {stats:?}"
    );
    // Not the stall rule (30 s), and a stalled client's queue never nears 16 MiB here.
    assert_eq!(stats.budget_disconnects, STALLED as u64, "{stats:?}");
    assert_eq!(got, published, "the healthy client got every message");

    // Each cut client, reading now, finds what the kernel held for it and then the 4000
    // close frame, or the end of the connection (its close grace may have run out).
    let draining: Vec<_> = stalled
        .into_iter()
        .map(|mut raw| {
            tokio::spawn(async move {
                let mut scratch = vec![0u8; 16 * 1024];
                within("a cut client's socket to drain", async {
                    for _ in 0..MAX_MESSAGES + 10 {
                        match raw.read_frame_into(&mut scratch).await {
                            RawFrame::Frame {
                                opcode: OP_CLOSE,
                                payload,
                            } => return Some(u16::from_be_bytes([payload[0], payload[1]])),
                            RawFrame::Frame { .. } => {}
                            RawFrame::End => return None,
                        }
                    }
                    panic!("more frames than were published")
                })
                .await
            })
        })
        .collect();
    let (mut closed, mut ended) = (0, 0);
    for task in draining {
        match within("a drain", task).await.unwrap() {
            Some(code) => {
                assert_eq!(code, 4000, "a cut client's close code");
                closed += 1;
            }
            None => ended += 1,
        }
    }
    println!("budget: of the cut clients, {closed} saw a 4000 close and {ended} the end");
    assert_eq!(closed + ended, STALLED);

    let hub2 = hub.clone();
    wait_until("only the healthy client to remain", move || {
        hub2.client_count() == 1 && hub2.stats().connection_tasks == 1
    })
    .await;
    assert_eq!(hub.stats().slow_consumer_disconnects, STALLED as u64);
    sync(&mut healthy).await;
}

// ---------------------------------------------------------------------------------------------
// A reader that trickles.
// ---------------------------------------------------------------------------------------------

/// A client that reads, but only 100 bytes every 200 ms (500 B/s, far below the 64 KiB/s
/// floor), while the publisher keeps its queue from emptying, is cut with 4000 within a few
/// write timeouts and counted as stalled (its bound, 64 MiB, is never reached: about 6 MB
/// is published at once, then about 1 MB/s for at most 30 s); a client that reads everything on the same channel is
/// not cut and gets every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_trickles_is_cut_for_stalling_and_counted() {
    let _turn = one_at_a_time().await;
    const CHANNEL: &str = "trickle";
    let config = HubConfig::builder()
        .write_timeout(Duration::from_secs(1))
        .min_read_rate(64 * 1024)
        .outbound_queue_bytes(64 << 20)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let mut healthy = server.connect().await;
    subscribe(&mut healthy, CHANNEL).await;
    let received = Arc::new(AtomicU64::new(0));
    let reader = spawn_sequence_reader(healthy, "the healthy client".into(), Arc::clone(&received));

    let trickler = raw_subscriber(server.addr, CHANNEL, 4096).await;
    let stop = Arc::new(AtomicBool::new(false));
    let trickling = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut stream = trickler.stream;
            let mut taken = 0u64;
            let mut chunk = [0u8; 100];
            // At most 60 s of trickling, whatever happens.
            for _ in 0..300 {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => taken += n as u64,
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            taken
        })
    };

    // First more than the kernel can hold for it (its send buffer grows to tcp_wmem's
    // largest; its receive buffer is 4 KiB), at once, so that its queue is certainly not
    // empty from then on; the healthy client reads it all.
    let kernel_holds = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse::<u64>().ok())
        .unwrap_or(4 << 20);
    let pad = "x".repeat(10_000);
    let started = Instant::now();
    let mut published = 0u64;
    let mut first_queued = None;
    while published * 10_000 < kernel_holds + (2 << 20) {
        publish(&hub, CHANNEL, published, &pad);
        published += 1;
        if first_queued.is_none() && hub.stats().queued_bytes > 0 {
            first_queued = Some(started.elapsed());
        }
        tokio::task::yield_now().await;
    }
    let filled = started.elapsed();
    // Then 10 KB every 10 ms, about 1 MB/s, so that its queue never empties, for at most
    // 30 s: a hub that waited for the queue bound (64 MiB) would take a minute.
    while started.elapsed() < filled + Duration::from_secs(30)
        && hub.stats().stalled_disconnects == 0
    {
        publish(&hub, CHANNEL, published, &pad);
        published += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cut_after = started.elapsed();
    // A few more, once it is gone: the healthy client still gets them.
    for _ in 0..10 {
        publish(&hub, CHANNEL, published, &pad);
        published += 1;
    }
    hub.send_to_channel(CHANNEL, &Message::new("end")).unwrap();
    let (mut healthy, got) = within("the healthy reader", reader).await.unwrap();
    stop.store(true, Ordering::Release);
    let trickled = within("the trickler to stop", trickling).await.unwrap();
    let stats = hub.stats();
    println!(
        "trickle: cut after {cut_after:?} of publishing ({published} x 10 KB published; \
         something first queued after {first_queued:?}; the kernel's share filled after \
         {filled:?}); the trickler read {trickled} bytes; the healthy client got {got}; \
         stalled {}, queue bound {}, budget {}",
        stats.stalled_disconnects, stats.queue_bound_disconnects, stats.budget_disconnects
    );

    assert_eq!(stats.stalled_disconnects, 1, "{stats:?}");
    assert_eq!(stats.slow_consumer_disconnects, 1, "{stats:?}");
    // Once its queue holds something, the first whole write-timeout period (1 s) in which
    // it reads less than the floor ends it: measured 1.0 s after the kernel's share filled.
    // Five periods leave room on a busy machine, and still fail a hub that waits for the
    // queue bound (about 60 s at this rate).
    assert!(
        cut_after - filled < Duration::from_secs(5),
        "cut {:?} after its queue filled, more than 5 write timeouts",
        cut_after - filled
    );
    assert_eq!(got, published, "the healthy client got every message");
    let hub2 = hub.clone();
    wait_until("the trickler to be removed", move || {
        hub2.client_count() == 1
    })
    .await;
    sync(&mut healthy).await;
}
