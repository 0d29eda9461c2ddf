//! The Redis broker against a real `redis-server` that each test starts on a free loopback
//! port (and kills when it ends): two hubs in one process share channels through it, in
//! go-ws's bridge format, and survive Redis losing their connections or dying.
//!
//! `redis-server` must be on the PATH (`.ci/install-redis.sh` installs it from Debian's
//! packages).

#![cfg(feature = "redis")]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use support::redis_server::*;
use support::*;
use tokio::task::JoinHandle;
use wshub::{BrokerStats, Hub, HubConfig, Message, RedisBroker, RedisConfig};

// ---------------------------------------------------------------------------------------------
// Nodes, clients, streams
// ---------------------------------------------------------------------------------------------

/// A hub with a Redis broker configured by `config`, served on 127.0.0.1, its broker
/// connected.
async fn node(config: RedisConfig) -> Server {
    let broker = RedisBroker::new(config).expect("a valid redis config");
    let config = HubConfig::builder()
        .shards(2)
        .outbound_queue_bytes(64 * 1024 * 1024)
        .max_subscriptions(10_000)
        .broker(broker)
        .build()
        .expect("a valid hub config");
    start_node(config).await
}

/// A hub joined to `redis` with node id `id` (see [`node`]).
async fn node_named(redis: &RedisServer, id: &str) -> Server {
    node(RedisConfig::new(redis.url()).node_id(id)).await
}

fn broker_stats(hub: &Hub) -> BrokerStats {
    hub.stats().broker.expect("the hub has a broker")
}

/// A message a client got, with the time it arrived.
#[derive(Clone, Debug)]
struct Got {
    json: Value,
    at: Instant,
}

impl Got {
    fn source(&self) -> &str {
        self.json["data"]["source"].as_str().unwrap_or("")
    }

    fn seq(&self) -> u64 {
        self.json["data"]["seq"]
            .as_u64()
            .expect("a sequenced message")
    }
}

/// A client's sequenced messages (those with `data.seq`); acknowledgements are skipped.
type Recorder = support::Recorder<Got>;

impl Recorder {
    fn spawn(ws: Ws) -> Recorder {
        Recorder::keeping(ws, |_, json| {
            json["data"]["seq"].is_u64().then(|| Got {
                json,
                at: Instant::now(),
            })
        })
    }
}

/// The sequence numbers of the messages from `source`, in the order they arrived.
fn seqs_from(got: &[Got], source: &str) -> Vec<u64> {
    got.iter()
        .filter(|g| g.source() == source)
        .map(Got::seq)
        .collect()
}

/// Publishes `seq_message(source, n)` to `channel` every `every`, n = 0, 1, …, until stopped.
struct Stream {
    stop: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Stream {
    fn start(hub: Hub, channel: &'static str, source: &'static str, every: Duration) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            let published = Arc::clone(&published);
            async move {
                let mut tick = tokio::time::interval(every);
                // At most ten minutes of messages, whatever happens.
                for seq in 0..(600_000 / every.as_millis().max(1) as u64) {
                    tick.tick().await;
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    hub.send_to_channel(channel, &seq_message(source, seq))
                        .expect("publish");
                    published.store(seq + 1, Ordering::SeqCst);
                }
            }
        });
        Stream {
            stop,
            published,
            task,
        }
    }

    /// Stops publishing and returns how many messages were published.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        within("the publishing task to stop", self.task)
            .await
            .expect("the publishing task panicked");
        self.published.load(Ordering::SeqCst)
    }
}

/// Asserts `seqs` are strictly increasing (in order, no duplicates).
fn assert_increasing(seqs: &[u64], who: &str) {
    for pair in seqs.windows(2) {
        assert!(
            pair[0] < pair[1],
            "{who}: {} came after {} (out of order or duplicated)",
            pair[1],
            pair[0]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Two hubs
// ---------------------------------------------------------------------------------------------

const SEQUENCED: u64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hubs_deliver_every_message_to_both_sides_once_in_order() {
    let redis = RedisServer::start().await;
    let a = node_named(&redis, "node-a").await;
    let b = node_named(&redis, "node-b").await;
    let mut ws_a = a.connect().await;
    let mut ws_b = b.connect().await;
    subscribe(&mut ws_a, "seq").await;
    subscribe(&mut ws_b, "seq").await;
    wait_numsub(&redis, "ws:channel:seq", 2).await;
    let on_a = Recorder::spawn(ws_a);
    let on_b = Recorder::spawn(ws_b);

    // 10,000 sequenced messages published on each hub, interleaved.
    let started = Instant::now();
    for seq in 0..SEQUENCED {
        a.hub
            .send_to_channel("seq", &seq_message("A", seq))
            .unwrap();
        b.hub
            .send_to_channel("seq", &seq_message("B", seq))
            .unwrap();
        if seq % 500 == 499 {
            tokio::task::yield_now().await;
        }
    }
    let published_in = started.elapsed();
    let (hub_a, hub_b) = (a.hub.clone(), b.hub.clone());
    wait_until("both hubs to send everything", move || {
        broker_stats(&hub_a).sent == SEQUENCED && broker_stats(&hub_b).sent == SEQUENCED
    })
    .await;
    let sent_in = started.elapsed();
    let (hub_a, hub_b) = (a.hub.clone(), b.hub.clone());
    wait_until("both hubs to receive everything", move || {
        broker_stats(&hub_a).received == SEQUENCED && broker_stats(&hub_b).received == SEQUENCED
    })
    .await;
    let received_in = started.elapsed();
    let total = 2 * SEQUENCED as usize;
    on_a.wait_for("every message on hub A", total).await;
    on_b.wait_for("every message on hub B", total).await;
    let elapsed = started.elapsed();
    // Nothing more arrives: no duplicates late.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let expected: Vec<u64> = (0..SEQUENCED).collect();
    for (side, recorder) in [("A", &on_a), ("B", &on_b)] {
        let got = recorder.snapshot();
        assert_eq!(got.len(), total, "client on hub {side}: messages received");
        for source in ["A", "B"] {
            assert!(
                seqs_from(&got, source) == expected,
                "client on hub {side}: the messages from hub {source} are not 0..{SEQUENCED} \
                 exactly once in order"
            );
        }
        assert!(got.iter().all(|g| g.json["channel"] == "seq"));
    }
    for (side, hub) in [("A", &a.hub), ("B", &b.hub)] {
        let stats = broker_stats(hub);
        assert_eq!(stats.sent, SEQUENCED, "hub {side}: {stats:?}");
        assert_eq!(stats.received, SEQUENCED, "hub {side}: {stats:?}");
        assert_eq!(stats.send_dropped, 0, "hub {side}: {stats:?}");
        assert_eq!(stats.receive_dropped, 0, "hub {side}: {stats:?}");
        assert_eq!(stats.channels, 1, "hub {side}: {stats:?}");
        assert!(stats.connected);
    }
    eprintln!(
        "two hubs: published in {published_in:?}, sent to Redis by {sent_in:?}, received from \
         it by {received_in:?}, read by the clients by {elapsed:?}"
    );
    eprintln!(
        "two hubs: {} messages published ({SEQUENCED} per hub) reached both sides in {elapsed:?}: \
         {:.0} messages/s published, {:.0} deliveries/s",
        2 * SEQUENCED,
        (2 * SEQUENCED) as f64 / elapsed.as_secs_f64(),
        (4 * SEQUENCED) as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_reach_every_client_on_both_hubs_once_in_order() {
    let redis = RedisServer::start().await;
    let a = node_named(&redis, "node-a").await;
    let b = node_named(&redis, "node-b").await;
    // Clients subscribed to nothing: a broadcast is for every client.
    let on_a = Recorder::spawn(a.connect().await);
    let on_b = Recorder::spawn(b.connect().await);
    wait_numsub(&redis, "ws:broadcast", 2).await;

    for seq in 0..200 {
        a.hub.broadcast(&seq_message("A", seq)).unwrap();
        b.hub.broadcast(&seq_message("B", seq)).unwrap();
    }
    on_a.wait_for("400 broadcasts on hub A", 400).await;
    on_b.wait_for("400 broadcasts on hub B", 400).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let expected: Vec<u64> = (0..200).collect();
    for (side, recorder) in [("A", &on_a), ("B", &on_b)] {
        let got = recorder.snapshot();
        assert_eq!(got.len(), 400, "client on hub {side}");
        assert_eq!(seqs_from(&got, "A"), expected, "client on hub {side}");
        assert_eq!(seqs_from(&got, "B"), expected, "client on hub {side}");
        assert!(got.iter().all(|g| g.json.get("channel").is_none()));
    }
}

// ---------------------------------------------------------------------------------------------
// Subscription tracking
// ---------------------------------------------------------------------------------------------

const CHANNELS: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_channels_are_subscribed_in_batches_and_left() {
    let redis = RedisServer::start().await;
    let mut plain = redis.client().await;
    let a = node(RedisConfig::new(redis.url()).unsubscribe_delay(Duration::from_millis(300))).await;
    let ws = a.connect().await;
    let client = a.newest_client().await;
    // Reads (and skips) the 5,000 acknowledgements.
    let _reader = Recorder::spawn(ws);
    let subscribes_before = command_calls(&mut plain, "subscribe").await;

    for i in 0..CHANNELS {
        a.hub.subscribe(client, &format!("room-{i}")).unwrap();
    }
    within("5,000 channels in PUBSUB CHANNELS", async {
        while pubsub_channels(&mut plain, "ws:channel:room-*").await != CHANNELS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let hub = a.hub.clone();
    wait_until("the broker to count 5,000 channels", move || {
        broker_stats(&hub).channels == CHANNELS
    })
    .await;
    let subscribes = command_calls(&mut plain, "subscribe").await - subscribes_before;
    eprintln!("{CHANNELS} channels subscribed with {subscribes} SUBSCRIBE commands");
    assert!(
        subscribes <= CHANNELS as u64 / 2,
        "{subscribes} SUBSCRIBE commands for {CHANNELS} channels: not batched"
    );

    for i in 0..CHANNELS {
        a.hub.unsubscribe(client, &format!("room-{i}")).unwrap();
    }
    within("the 5,000 channels to leave PUBSUB CHANNELS", async {
        while pubsub_channels(&mut plain, "ws:channel:*").await != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let hub = a.hub.clone();
    wait_until("the broker to count no channel", move || {
        broker_stats(&hub).channels == 0
    })
    .await;
    // Always subscribed to broadcasts.
    assert_eq!(numsub(&mut plain, "ws:broadcast").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_on_a_channel_does_not_flap_its_subscription() {
    let redis = RedisServer::start().await;
    let mut plain = redis.client().await;
    let a = node_named(&redis, "node-a").await;
    let _reader = Recorder::spawn(a.connect().await);
    let client = a.newest_client().await;
    let subscribes_before = command_calls(&mut plain, "subscribe").await;

    // 100 subscribe/unsubscribe cycles well inside the 1 s delay, ending subscribed.
    for _ in 0..100 {
        a.hub.subscribe(client, "flappy").unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        a.hub.unsubscribe(client, "flappy").unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    a.hub.subscribe(client, "flappy").unwrap();
    wait_numsub(&redis, "ws:channel:flappy", 1).await;
    // Past the unsubscribe delay: still subscribed, never unsubscribed.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(numsub(&mut plain, "ws:channel:flappy").await, 1);
    assert_eq!(command_calls(&mut plain, "unsubscribe").await, 0);
    let subscribes = command_calls(&mut plain, "subscribe").await - subscribes_before;
    assert!(
        subscribes <= 2,
        "{subscribes} SUBSCRIBE commands for one channel under churn"
    );

    // Left for good: unsubscribed once, after the delay.
    a.hub.unsubscribe(client, "flappy").unwrap();
    wait_numsub(&redis, "ws:channel:flappy", 0).await;
    assert_eq!(command_calls(&mut plain, "unsubscribe").await, 1);
    assert_eq!(broker_stats(&a.hub).channels, 0);
}

// ---------------------------------------------------------------------------------------------
// go-ws interoperability
// ---------------------------------------------------------------------------------------------

async fn publish_raw(redis: &mut redis::aio::MultiplexedConnection, key: &str, payload: &str) {
    let _: i64 = redis::cmd("PUBLISH")
        .arg(key)
        .arg(payload)
        .query_async(redis)
        .await
        .expect("PUBLISH");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_ws_payloads_from_a_plain_client_reach_local_subscribers() {
    let redis = RedisServer::start().await;
    let mut plain = redis.client().await;
    let a = node_named(&redis, "rust-node").await;
    let mut subscriber = a.connect().await;
    subscribe(&mut subscriber, "interop").await;
    let mut other = a.connect().await;
    wait_numsub(&redis, "ws:channel:interop", 1).await;

    // go-ws's form, with the channel set: framed exactly as it came.
    let as_go_sends = r#"{"type":"event","channel":"interop","data":{"n":1},"timestamp":"2024-05-01T10:00:00.123456789Z"}"#;
    publish_raw(
        &mut plain,
        "ws:channel:interop",
        &format!(r#"{{"sourceId":"0123456789abcdef0123456789abcdef","message":{as_go_sends}}}"#),
    )
    .await;
    assert_eq!(next_text(&mut subscriber).await, as_go_sends);

    // Without the channel (as a Go node may send): encoded again with it, timestamp kept.
    publish_raw(
        &mut plain,
        "ws:channel:interop",
        r#"{"sourceId":"go-node","message":{"type":"process_output","processId":"p1","data":"line","timestamp":"2024-05-01T10:00:01Z"}}"#,
    )
    .await;
    let got = next_json(&mut subscriber).await;
    assert_eq!(
        got,
        json!({"type": "process_output", "channel": "interop", "processId": "p1",
               "data": "line", "timestamp": "2024-05-01T10:00:01Z"})
    );

    // Its own id: dropped. Not the bridge format: dropped and counted.
    publish_raw(
        &mut plain,
        "ws:channel:interop",
        r#"{"sourceId":"rust-node","message":{"type":"event","data":{"n":3}}}"#,
    )
    .await;
    publish_raw(&mut plain, "ws:channel:interop", "not json").await;
    publish_raw(
        &mut plain,
        "ws:channel:interop",
        r#"{"sourceId":"go-node","message":"not an object"}"#,
    )
    .await;
    publish_raw(
        &mut plain,
        "ws:channel:interop",
        r#"{"sourceId":"go-node","message":{"type":"event","channel":"interop","data":{"n":4},"timestamp":"2024-05-01T10:00:04Z"}}"#,
    )
    .await;
    let got = next_json(&mut subscriber).await;
    assert_eq!(
        got["data"]["n"], 4,
        "the node's own message was delivered: {got}"
    );

    // A broadcast: every client.
    let broadcast =
        r#"{"type":"event","data":{"everyone":true},"timestamp":"2024-05-01T10:00:05Z"}"#;
    publish_raw(
        &mut plain,
        "ws:broadcast",
        &format!(r#"{{"sourceId":"go-node","message":{broadcast}}}"#),
    )
    .await;
    assert_eq!(next_text(&mut subscriber).await, broadcast);
    assert_eq!(next_text(&mut other).await, broadcast);

    let stats = broker_stats(&a.hub);
    assert_eq!(stats.received, 4, "{stats:?}");
    assert_eq!(stats.receive_dropped, 2, "{stats:?}");
    assert!(stats.connected);
}

/// The next message a plain pub/sub connection gets: its Redis channel and payload.
async fn next_payload(stream: &mut redis::aio::PubSubStream) -> (String, String) {
    let message = within("a message through Redis", stream.next())
        .await
        .expect("the plain pub/sub stream ended");
    (
        message.get_channel_name().to_owned(),
        String::from_utf8(message.get_payload_bytes().to_vec()).expect("UTF-8 payload"),
    )
}

/// go-ws's bridge envelope, as its Go structs read it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GoBridge {
    #[serde(rename = "sourceId")]
    source_id: String,
    message: GoMessage,
}

/// go-ws's `Message`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GoMessage {
    #[serde(rename = "type")]
    kind: String,
    channel: Option<String>,
    #[serde(rename = "processId")]
    process_id: Option<String>,
    data: Option<Value>,
    timestamp: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_wshub_publishes_parses_as_go_ws_envelopes() {
    let redis = RedisServer::start().await;
    let broker = RedisBroker::new(RedisConfig::new(redis.url())).unwrap();
    let node_id = broker.node_id().to_owned();
    assert_eq!(node_id.len(), 32);
    assert!(node_id.bytes().all(|c| c.is_ascii_hexdigit()), "{node_id}");
    let a = Server::start(HubConfig::builder().broker(broker).build().unwrap()).await;
    let hub = a.hub.clone();
    wait_until("the broker to connect", move || {
        broker_stats(&hub).connected
    })
    .await;

    let client = redis::Client::open(redis.url()).unwrap();
    let (mut sink, mut stream) = within("a plain pub/sub connection", client.get_async_pubsub())
        .await
        .unwrap()
        .split();
    within(
        "a plain SUBSCRIBE",
        sink.subscribe(&[
            "ws:channel:out",
            "ws:channel:process:build-1",
            "ws:broadcast",
        ]),
    )
    .await
    .unwrap();
    let mut local = a.connect().await;
    subscribe(&mut local, "out").await;

    a.hub
        .send_to_channel(
            "out",
            &Message::new("event").with_data(json!({"text": "héllo \"q\""})),
        )
        .unwrap();
    let local_text = next_text(&mut local).await;
    let (key, payload) = next_payload(&mut stream).await;
    assert_eq!(key, "ws:channel:out");
    // The message is exactly the bytes local clients got: concatenated, not re-encoded.
    assert_eq!(
        payload,
        format!(r#"{{"sourceId":"{node_id}","message":{local_text}}}"#)
    );
    let bridge: GoBridge = serde_json::from_str(&payload).expect("go-ws's envelope");
    assert_eq!(bridge.source_id, node_id);
    assert_eq!(bridge.message.kind, "event");
    assert_eq!(bridge.message.channel.as_deref(), Some("out"));
    assert_eq!(bridge.message.data, Some(json!({"text": "héllo \"q\""})));
    assert_timestamp(&bridge.message.timestamp);

    a.hub.send_process_output("build-1", "compiling").unwrap();
    let (key, payload) = next_payload(&mut stream).await;
    assert_eq!(key, "ws:channel:process:build-1");
    let bridge: GoBridge = serde_json::from_str(&payload).expect("go-ws's envelope");
    assert_eq!(bridge.message.kind, "process_output");
    assert_eq!(bridge.message.channel.as_deref(), Some("process:build-1"));
    assert_eq!(bridge.message.process_id.as_deref(), Some("build-1"));
    assert_eq!(bridge.message.data, Some(json!("compiling")));

    a.hub.broadcast(&Message::error("maintenance")).unwrap();
    let (key, payload) = next_payload(&mut stream).await;
    assert_eq!(key, "ws:broadcast");
    let bridge: GoBridge = serde_json::from_str(&payload).expect("go-ws's envelope");
    assert_eq!(bridge.source_id, node_id);
    assert_eq!(bridge.message.kind, "error");
    assert_eq!(bridge.message.channel, None);
    assert_timestamp(&bridge.message.timestamp);
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

/// Two hubs with a client each on channel `stream`; hub A publishes a message every 2 ms.
struct Faulty {
    a: Server,
    b: Server,
    on_a: Recorder,
    on_b: Recorder,
    stream: Stream,
}

impl Faulty {
    async fn start(redis: &RedisServer) -> Faulty {
        let a = node_named(redis, "node-a").await;
        let b = node_named(redis, "node-b").await;
        let mut ws_a = a.connect().await;
        let mut ws_b = b.connect().await;
        subscribe(&mut ws_a, "stream").await;
        subscribe(&mut ws_b, "stream").await;
        wait_numsub(redis, "ws:channel:stream", 2).await;
        let on_a = Recorder::spawn(ws_a);
        let on_b = Recorder::spawn(ws_b);
        let stream = Stream::start(a.hub.clone(), "stream", "A", Duration::from_millis(2));
        on_b.wait_for("the stream to reach hub B", 100).await;
        Faulty {
            a,
            b,
            on_a,
            on_b,
            stream,
        }
    }

    /// Waits until hub B delivers a message that arrived after `since`; returns how long
    /// after `since` it arrived.
    async fn resumed_after(&self, since: Instant) -> Duration {
        self.on_b
            .wait_until_kept("delivery across the hubs to resume", |got| {
                got.last().is_some_and(|g| g.at > since)
            })
            .await;
        let got = self.on_b.snapshot();
        let first = got.iter().find(|g| g.at > since).expect("a message after");
        first.at - since
    }

    /// Stops the stream, lets everything settle, checks what must hold after any fault, and
    /// returns (published, delivered on B, A's stats, B's stats).
    async fn finish(self) -> (u64, u64, BrokerStats, BrokerStats) {
        // Some more messages after the recovery, then stop.
        let count = self.on_b.len();
        self.on_b
            .wait_for("the stream to go on after recovery", count + 100)
            .await;
        let published = self.stream.stop().await;

        // Local delivery never stopped: every message, once, in order, on hub A.
        self.on_a
            .wait_for("every message on hub A", published as usize)
            .await;
        let on_a = seqs_from(&self.on_a.snapshot(), "A");
        assert!(
            on_a == (0..published).collect::<Vec<_>>(),
            "hub A's local client lost or reordered messages: {} of {published}",
            on_a.len()
        );

        // Every message published is either sent or counted as dropped.
        let hub_a = self.a.hub.clone();
        wait_until("hub A to account for every message", move || {
            let s = broker_stats(&hub_a);
            s.sent + s.send_dropped == published
        })
        .await;
        // Hub B counts exactly what its client got; in order, no duplicates.
        let hub_b = self.b.hub.clone();
        self.on_b
            .wait_until_kept("hub B's count to match its client", move |got| {
                broker_stats(&hub_b).received == got.len() as u64
            })
            .await;
        let on_b = seqs_from(&self.on_b.snapshot(), "A");
        assert_increasing(&on_b, "hub B's client");
        let stats_a = broker_stats(&self.a.hub);
        let stats_b = broker_stats(&self.b.hub);
        assert!(stats_b.received <= stats_a.sent, "{stats_a:?} {stats_b:?}");
        assert!(stats_a.connected && stats_b.connected);
        assert_eq!(stats_b.channels, 1);
        (published, on_b.len() as u64, stats_a, stats_b)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_kill_of_pubsub_connections_mid_stream_resumes_delivery() {
    let redis = RedisServer::start().await;
    let faulty = Faulty::start(&redis).await;
    let mut plain = redis.client().await;

    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"][..])
        .query_async(&mut plain)
        .await
        .expect("CLIENT KILL");
    let at = Instant::now();
    assert_eq!(killed, 2, "both hubs' subscription connections");
    let resumed = faulty.resumed_after(at).await;
    eprintln!("CLIENT KILL TYPE pubsub: delivery across hubs resumed {resumed:?} later");
    assert!(
        resumed < Duration::from_secs(10),
        "resumed after {resumed:?}"
    );

    let (published, delivered_b, a, b) = faulty.finish().await;
    eprintln!("CLIENT KILL: published {published}, delivered on B {delivered_b}; A {a:?}; B {b:?}");
    // The publishing connections were not touched.
    assert_eq!(a.send_dropped, 0, "{a:?}");
    assert_eq!(a.sent, published, "{a:?}");
    // Both subscription connections were made again.
    assert!(a.reconnects >= 1 && b.reconnects >= 1, "{a:?} {b:?}");
    // What B missed is what A sent that B did not receive.
    assert_eq!(published - delivered_b, a.sent - b.received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_mid_stream_resumes_and_counts_losses() {
    let mut redis = RedisServer::start().await;
    let faulty = Faulty::start(&redis).await;

    redis.kill();
    let killed_at = Instant::now();
    let hub_a = faulty.a.hub.clone();
    wait_until("hub A to notice Redis is gone", move || {
        !broker_stats(&hub_a).connected
    })
    .await;
    // Redis stays away a second; publishing goes on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = broker_stats(&faulty.a.hub);
    assert!(during.send_dropped > 0, "{during:?}");
    redis.restart().await;
    let back_at = Instant::now();

    // Local delivery never stopped while Redis was away.
    let local_while_down = faulty
        .on_a
        .snapshot()
        .iter()
        .filter(|g| g.at > killed_at && g.at < back_at)
        .count();
    assert!(
        local_while_down > 100,
        "only {local_while_down} local deliveries while Redis was away"
    );

    let resumed = faulty.resumed_after(back_at).await;
    eprintln!("redis-server SIGKILL + restart: delivery across hubs resumed {resumed:?} after it was back");
    assert!(
        resumed < Duration::from_secs(10),
        "resumed after {resumed:?}"
    );

    // Redis is a new, empty server: both hubs subscribed their channel again from their own
    // set, and the broadcast channel.
    wait_numsub(&redis, "ws:channel:stream", 2).await;
    wait_numsub(&redis, "ws:broadcast", 2).await;

    let (published, delivered_b, a, b) = faulty.finish().await;
    eprintln!("SIGKILL: published {published}, delivered on B {delivered_b}; A {a:?}; B {b:?}");
    assert!(a.send_dropped > 0, "{a:?}");
    assert!(delivered_b < published);
    assert!(a.reconnects >= 1 && b.reconnects >= 1, "{a:?} {b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_local_delivery_works_and_publishes_are_counted_as_dropped() {
    // A port nobody listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let broker =
        RedisBroker::new(RedisConfig::new(format!("redis://127.0.0.1:{port}/")).queue_capacity(16))
            .unwrap();
    let a = Server::start(HubConfig::builder().broker(broker).build().unwrap()).await;
    let mut ws = a.connect().await;
    subscribe(&mut ws, "local").await;
    // Until the first connection attempt fails, publishes are queued (16 at most); then
    // they are counted as dropped at once.
    let hub = a.hub.clone();
    wait_until("the broker to give up on the first connection", move || {
        hub.send_to_channel("warmup", &Message::new("event"))
            .unwrap();
        broker_stats(&hub).send_dropped > 16
    })
    .await;
    for seq in 0..1_000 {
        a.hub
            .send_to_channel("local", &seq_message("A", seq))
            .unwrap();
    }
    let on_a = Recorder::spawn(ws);
    on_a.wait_for("1,000 local messages", 1_000).await;
    assert_eq!(
        seqs_from(&on_a.snapshot(), "A"),
        (0..1_000).collect::<Vec<_>>()
    );
    let stats = broker_stats(&a.hub);
    assert!(!stats.connected, "{stats:?}");
    assert_eq!(stats.sent, 0);
    assert!(stats.send_dropped >= 1_000, "{stats:?}");
    assert_eq!(stats.channels, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_the_hub_down_stops_the_broker() {
    let redis = RedisServer::start().await;
    let mut plain = redis.client().await;
    let mut a = node_named(&redis, "node-a").await;
    let mut ws = a.connect().await;
    subscribe(&mut ws, "bye").await;
    wait_numsub(&redis, "ws:channel:bye", 1).await;
    a.shutdown().await;
    // Its connections close: Redis counts no subscriber left.
    within("the broker's subscriptions to go", async {
        while numsub(&mut plain, "ws:broadcast").await != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(numsub(&mut plain, "ws:channel:bye").await, 0);
}
