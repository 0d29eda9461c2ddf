//! Channel histories across nodes (PROTOCOL.md, "Several nodes"): hubs on one `redis-server`
//! (started by each test on a free loopback port) share offsets, epochs and histories that
//! live in Redis.
//!
//! `redis-server` must be on the PATH (`.ci/install-redis.sh` installs it).

#![cfg(feature = "redis")]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::redis_server::*;
use support::*;
use tokio::task::JoinHandle;
use wshub::{HistoryPolicy, Hub, HubConfig, PublishPolicy, RedisBroker, RedisConfig};

// ---------------------------------------------------------------------------------------------
// Nodes and clients
// ---------------------------------------------------------------------------------------------

const CHANNEL: &str = "room:1";
const KEY: &str = "ws:channel:room:1";

/// A hub joined to `redis` that keeps a history of `room:` channels (10,000 publications,
/// an hour), its broker connected.
async fn node(redis: &RedisServer, id: &str) -> Server {
    node_waiting(redis, id, Duration::from_secs(5)).await
}

/// [`node`], whose subscribes wait at most `history_wait` for Redis.
async fn node_waiting(redis: &RedisServer, id: &str, history_wait: Duration) -> Server {
    let broker = RedisBroker::new(
        RedisConfig::new(redis.url())
            .node_id(id)
            .history_wait(history_wait)
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200)),
    )
    .expect("a valid redis config");
    let config = HubConfig::builder()
        .shards(2)
        .outbound_queue_bytes(64 * 1024 * 1024)
        // Clients may publish (a client's publish while Redis is away is refused, and told).
        .publish_policy(PublishPolicy::AllowAll)
        .prefix_history(
            "room:",
            HistoryPolicy::new(10_000, Duration::from_secs(3600)).unwrap(),
        )
        .broker(broker)
        .build()
        .expect("a valid hub config");
    start_node(config).await
}

/// A publication a client got: its offset, epoch, source and seq.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Got {
    offset: u64,
    epoch: String,
    source: String,
    seq: u64,
}

/// A client's publications (acknowledgements skipped).
type Recorder = support::Recorder<Got>;

impl Recorder {
    fn spawn(ws: Ws) -> Recorder {
        Recorder::keeping(ws, |text, json| {
            if json["type"] != "event" {
                return None;
            }
            let (offset, epoch) = position_of(text);
            Some(Got {
                offset,
                epoch,
                source: json["data"]["source"].as_str().unwrap_or("").to_owned(),
                seq: json["data"]["seq"].as_u64().expect("a seq"),
            })
        })
    }
}

/// A client of `server` subscribed to `channel` (plain), recording.
async fn subscriber(server: &Server, channel: &str) -> Recorder {
    let mut ws = server.connect().await;
    subscribe_since(&mut ws, channel, None).await;
    Recorder::spawn(ws)
}

/// Offsets `from..=to`, each once, in order, all in one epoch: the epoch.
fn assert_offsets(got: &[Got], from: u64, to: u64, who: &str) -> String {
    let offsets: Vec<u64> = got.iter().map(|g| g.offset).collect();
    let expected: Vec<u64> = (from..=to).collect();
    assert_eq!(offsets, expected, "{who}: offsets");
    let epoch = got.first().map(|g| g.epoch.clone()).unwrap_or_default();
    assert!(got.iter().all(|g| g.epoch == epoch), "{who}: one epoch");
    epoch
}

/// Publishes `count` messages from `source` with `publish_async`, returning their positions.
fn publisher(hub: Hub, source: &'static str, count: u64) -> JoinHandle<Vec<(u64, u64, String)>> {
    tokio::spawn(async move {
        let mut positions = Vec::new();
        for seq in 0..count {
            let position = hub
                .publish_async(CHANNEL, &seq_message(source, seq))
                .await
                .expect("publish")
                .expect("a position on a history channel");
            positions.push((seq, position.offset, position.epoch.to_string()));
        }
        positions
    })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Four publishers on two nodes, one channel: both nodes' clients get every publication
/// once, with the same offsets (1, 2, … without gaps), the same epoch and in the same order;
/// and `publish_async` returned exactly the position the clients saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_deliver_one_order_with_the_same_offsets() {
    const EACH: u64 = 500;
    let redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    let b = node(&redis, "b").await;
    let on_a = subscriber(&a, CHANNEL).await;
    let on_b = subscriber(&b, CHANNEL).await;
    wait_numsub(&redis, KEY, 2).await;

    let publishers = vec![
        publisher(a.hub.clone(), "a1", EACH),
        publisher(a.hub.clone(), "a2", EACH),
        publisher(b.hub.clone(), "b1", EACH),
        publisher(b.hub.clone(), "b2", EACH),
    ];
    let mut returned = HashMap::new();
    for (publisher, source) in publishers.into_iter().zip(["a1", "a2", "b1", "b2"]) {
        for (seq, offset, epoch) in within("the publishers", publisher).await.unwrap() {
            returned.insert((source.to_owned(), seq), (offset, epoch));
        }
    }
    let total = 4 * EACH;
    on_a.wait_for("every publication on a", total as usize)
        .await;
    on_b.wait_for("every publication on b", total as usize)
        .await;
    let (got_a, got_b) = (on_a.snapshot(), on_b.snapshot());
    let epoch = assert_offsets(&got_a, 1, total, "a");
    assert_offsets(&got_b, 1, total, "b");
    assert_eq!(got_a, got_b, "one order on both nodes");
    for g in &got_a {
        assert_eq!(
            returned[&(g.source.clone(), g.seq)],
            (g.offset, epoch.clone()),
            "publish_async returned the position the clients saw"
        );
    }
    // Each publisher's own messages in its order.
    for source in ["a1", "a2", "b1", "b2"] {
        let seqs: Vec<u64> = got_a
            .iter()
            .filter(|g| g.source == source)
            .map(|g| g.seq)
            .collect();
        assert_eq!(seqs, (0..EACH).collect::<Vec<_>>(), "{source} in order");
    }
    // The local histories hold the same as Redis numbered.
    let page = b.hub.history(CHANNEL, 0, 10).expect("a history channel");
    assert_eq!((&*page.epoch, page.latest), (&*epoch, total));
}

/// Reads the next `count` publications from `ws` (acknowledgements and pongs skipped),
/// returning their positions and seqs.
async fn read_publications(ws: &mut Ws, count: usize) -> Vec<(u64, String, u64)> {
    let mut got = Vec::with_capacity(count);
    within(&format!("{count} publications"), async {
        while got.len() < count {
            let text = next_text(ws).await;
            let json: Value = serde_json::from_str(&text).expect("JSON");
            if json["type"] == "event" {
                let (offset, epoch) = position_of(&text);
                got.push((offset, epoch, json["data"]["seq"].as_u64().expect("a seq")));
            }
        }
    })
    .await;
    got
}

/// A client reaching node b with a position from node a recovers there: b, which had no
/// subscriber to the channel, reads Redis's history before it answers, then replays from it
/// and joins the live stream. The sync `publish` queues for Redis and returns no position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_the_other_node() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    let b = node(&redis, "b").await;
    let mut epoch = String::new();
    for seq in 0..100 {
        let position = a
            .hub
            .publish_async(CHANNEL, &seq_message("a", seq))
            .await
            .expect("publish")
            .expect("a position");
        assert_eq!(position.offset, seq + 1);
        epoch = position.epoch.to_string();
    }
    let mut ws = b.connect().await;
    let ack = subscribe_since(&mut ws, CHANNEL, Some((40, Some(&epoch)))).await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    assert_eq!(ack_position(&ack), (100, epoch.clone()), "{ack}");
    let replay = read_publications(&mut ws, 60).await;
    let expected: Vec<(u64, String, u64)> = (41..=100).map(|o| (o, epoch.clone(), o - 1)).collect();
    assert_eq!(
        replay, expected,
        "the replay after offset 40, from node a's publications"
    );
    // Then live, published on a with the sync call, which cannot wait for Redis's answer.
    for seq in 100..120 {
        let position = a
            .hub
            .publish(CHANNEL, &seq_message("a", seq))
            .expect("publish");
        assert_eq!(
            position, None,
            "the sync publish on a Redis history channel"
        );
    }
    let live = read_publications(&mut ws, 20).await;
    let expected: Vec<(u64, String, u64)> =
        (101..=120).map(|o| (o, epoch.clone(), o - 1)).collect();
    assert_eq!(live, expected, "live after the replay");
}

/// While Redis is unreachable a subscribe with `since` waits the bounded time, then the
/// client gets `history unavailable` and no subscription; a plain subscribe is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_while_redis_is_unreachable_is_history_unavailable() {
    let mut redis = RedisServer::start().await;
    let b = node_waiting(&redis, "b", Duration::from_millis(400)).await;
    redis.kill();
    let hub = b.hub.clone();
    wait_until("the broker to see redis gone", move || {
        hub.stats().broker.is_some_and(|s| !s.connected)
    })
    .await;
    // A publish while Redis is away fails, and says so.
    let err = b
        .hub
        .publish_async(CHANNEL, &seq_message("b", 0))
        .await
        .expect_err("no publish without Redis");
    assert!(err.is_unavailable(), "{err}");

    let mut ws = b.connect().await;
    let started = std::time::Instant::now();
    send_text(&mut ws, &subscribe_request(CHANNEL, Some((3, Some("e"))))).await;
    let error = next_json(&mut ws).await;
    let waited = started.elapsed();
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["data"], "history unavailable", "{error}");
    assert_eq!(error["channel"], CHANNEL, "{error}");
    assert!(
        waited >= Duration::from_millis(350),
        "answered after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
    // No subscription was made; requests after it are answered in order.
    send_text(&mut ws, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    assert_eq!(b.hub.channel_subscriber_count(CHANNEL), 0);
    // A client's own publish is refused as the hub's is, and the client is told why.
    let publish = json!({"type": "publish", "channel": CHANNEL, "data": "x"}).to_string();
    send_text(&mut ws, &publish).await;
    let refused = next_json(&mut ws).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["data"], "history unavailable", "{refused}");
    assert_eq!(refused["channel"], CHANNEL, "{refused}");
    // A plain subscribe is made after the wait, from what this node holds.
    let ack = subscribe_since(&mut ws, CHANNEL, None).await;
    assert_eq!(ack["data"]["offset"], 0, "{ack}");
    assert_eq!(b.hub.channel_subscriber_count(CHANNEL), 1);
}

/// A node whose pub/sub connection is killed mid-stream (CLIENT KILL) fills the gap when it
/// is back, the tail included (what was published while it was away, and nothing after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_connection_is_killed_fills_the_gap_and_the_tail() {
    const BEFORE: u64 = 1000;
    const AFTER: u64 = 300;
    let redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    let b = node(&redis, "b").await;
    let on_b = subscriber(&b, CHANNEL).await;
    wait_numsub(&redis, KEY, 1).await;
    for seq in 0..BEFORE {
        a.hub
            .publish_async(CHANNEL, &seq_message("a", seq))
            .await
            .expect("publish");
    }
    let mut admin = redis.client().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await
        .expect("CLIENT KILL");
    assert!(killed >= 1, "killed {killed} pub/sub connections");
    // Published while b is away: the last of them is the channel's tail.
    for seq in BEFORE..BEFORE + AFTER {
        a.hub
            .publish_async(CHANNEL, &seq_message("a", seq))
            .await
            .expect("publish");
    }
    on_b.wait_for("every publication on b", (BEFORE + AFTER) as usize)
        .await;
    let got = on_b.snapshot();
    assert_offsets(&got, 1, BEFORE + AFTER, "b");
    let seqs: Vec<u64> = got.iter().map(|g| g.seq).collect();
    assert_eq!(seqs, (0..BEFORE + AFTER).collect::<Vec<_>>());
    assert!(b.hub.stats().broker.unwrap().reconnects >= 1);
}

/// Redis killed and restarted (empty) mid-stream: a client that stays gets each epoch's
/// offsets once, in order, from 1 (what Redis lost is what the new epoch says); a client
/// that resubscribes since its last position of the old epoch is told `recovered: false`
/// and gets the new epoch from its first offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_stream_moves_every_node_to_a_new_epoch() {
    let mut redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    let b = node(&redis, "b").await;
    let on_b = subscriber(&b, CHANNEL).await;
    let mut returning = b.connect().await;
    subscribe_since(&mut returning, CHANNEL, None).await;
    wait_numsub(&redis, KEY, 1).await;
    let mut old = Vec::new();
    for seq in 0..200 {
        old.push(
            a.hub
                .publish_async(CHANNEL, &seq_message("a", seq))
                .await
                .expect("publish"),
        );
    }
    let seen = read_publications(&mut returning, 200).await;
    let (last, old_epoch) = (seen[199].0, seen[199].1.clone());
    assert_eq!(last, 200);
    drop(returning);

    redis.kill();
    // Publishes while Redis is away fail (never delivered without an offset).
    let hub = a.hub.clone();
    wait_until("a to see redis gone", move || {
        hub.stats().broker.is_some_and(|s| !s.connected)
    })
    .await;
    assert!(a
        .hub
        .publish_async(CHANNEL, &seq_message("a", 999))
        .await
        .is_err());
    redis.restart().await;
    let hub = a.hub.clone();
    wait_until("a to reconnect", move || {
        hub.stats().broker.is_some_and(|s| s.connected)
    })
    .await;
    let mut new = Vec::new();
    for seq in 200..300 {
        let position = within("a publish after the restart", async {
            loop {
                match a.hub.publish_async(CHANNEL, &seq_message("a", seq)).await {
                    Ok(position) => return position.expect("a position"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await;
        new.push(position);
    }
    let new_epoch = new[0].epoch.to_string();
    assert_ne!(
        new_epoch, old_epoch,
        "a restarted (empty) Redis starts a new epoch"
    );
    let offsets: Vec<u64> = new.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (1..=100).collect::<Vec<_>>());

    on_b.wait_for("both epochs on b", 300).await;
    let got = on_b.snapshot();
    assert_offsets(&got[..200], 1, 200, "b, the old epoch");
    assert_eq!(got[0].epoch, old_epoch);
    assert_offsets(&got[200..], 1, 100, "b, the new epoch");
    assert_eq!(got[200].epoch, new_epoch);

    // The client that left at offset 200 of the old epoch comes back.
    let mut back = b.connect().await;
    let ack = subscribe_since(&mut back, CHANNEL, Some((last, Some(&old_epoch)))).await;
    assert_eq!(ack["data"]["recovered"], false, "{ack}");
    assert_eq!(ack_position(&ack), (100, new_epoch.clone()), "{ack}");
    let replay = read_publications(&mut back, 100).await;
    let expected: Vec<(u64, String, u64)> =
        (1..=100).map(|o| (o, new_epoch.clone(), 199 + o)).collect();
    assert_eq!(replay, expected);
}

/// Redis comes back older (its counter below offsets already delivered, as after a failover
/// to a lagging replica): the node does not wait for offsets it already has, nor deliver
/// others under them; the channel moves to a new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_that_went_back_starts_a_new_epoch() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    let b = node(&redis, "b").await;
    let on_b = subscriber(&b, CHANNEL).await;
    wait_numsub(&redis, KEY, 1).await;
    let mut epoch = String::new();
    for seq in 0..10 {
        let position = a
            .hub
            .publish_async(CHANNEL, &seq_message("a", seq))
            .await
            .unwrap();
        epoch = position.unwrap().epoch.to_string();
    }
    on_b.wait_for("the first ten", 10).await;
    // Redis "comes back older": its counter at 5.
    let mut admin = redis.client().await;
    let _: () = redis::cmd("HSET")
        .arg("ws:history-meta:room:1")
        .arg("offset")
        .arg(5)
        .query_async(&mut admin)
        .await
        .expect("HSET");
    let mut seq = 10;
    within("b to move to a new epoch", async {
        loop {
            let _ = a.hub.publish_async(CHANNEL, &seq_message("a", seq)).await;
            seq += 1;
            if on_b.snapshot().iter().any(|g| g.epoch != epoch) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let got = on_b.snapshot();
    let old: Vec<&Got> = got.iter().filter(|g| g.epoch == epoch).collect();
    let offsets: Vec<u64> = old.iter().map(|g| g.offset).collect();
    assert_eq!(
        offsets,
        (1..=10).collect::<Vec<_>>(),
        "nothing delivered under offsets already given"
    );
    let new: Vec<Got> = got.iter().filter(|g| g.epoch != epoch).cloned().collect();
    assert_eq!(new[0].offset, 1, "the new epoch from its first offset");
    assert_offsets(&new, 1, new.len() as u64, "b, the new epoch");
}
