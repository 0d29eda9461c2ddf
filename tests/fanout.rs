//! Fan-out: 1,000 subscribers each receive every one of a run of sequenced messages, in
//! order; and subscribe/unsubscribe from many tasks at once, client-side and server-side,
//! ends with exactly the counts and snapshots the operations imply.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::json;
use support::*;
use tokio::sync::Barrier;
use wshub::{HubConfig, Message};

const SUBSCRIBERS: usize = 1_000;
const MESSAGES: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_each_get_every_message_in_order() {
    // Each connection is two descriptors in this process (client and server side).
    let limit = wshub::raise_fd_limit().expect("raise the fd limit");
    assert!(
        limit >= 2 * SUBSCRIBERS as u64 + 100,
        "this test needs {} file descriptors; the hard limit is {limit}",
        2 * SUBSCRIBERS + 100
    );
    let config = HubConfig::builder().shards(4).build().unwrap();
    let server = Arc::new(Server::start(config).await);
    let ready = Arc::new(Barrier::new(SUBSCRIBERS + 1));

    let mut tasks = Vec::with_capacity(SUBSCRIBERS);
    // Connect in waves, so the listen backlog is never the thing being tested.
    let connected = Arc::new(tokio::sync::Semaphore::new(100));
    let self_subscribed = Arc::new(AtomicUsize::new(0));
    for i in 0..SUBSCRIBERS {
        let server = Arc::clone(&server);
        let ready = Arc::clone(&ready);
        let connected = Arc::clone(&connected);
        let self_subscribed = Arc::clone(&self_subscribed);
        tasks.push(tokio::spawn(async move {
            let permit = connected.acquire_owned().await.unwrap();
            let mut ws = connect(server.addr).await;
            // Half subscribe themselves; the server subscribes the other half, whose one
            // acknowledgement comes before the run.
            if i % 2 == 0 {
                subscribe(&mut ws, "fan").await;
                self_subscribed.fetch_add(1, Ordering::SeqCst);
            }
            drop(permit);
            ready.wait().await;
            if i % 2 == 1 {
                let ack = next_json(&mut ws).await;
                assert_eq!(ack["type"], "subscribed", "subscriber {i}: {ack}");
            }
            let mut got = 0u64;
            while got < MESSAGES {
                let message = next_json(&mut ws).await;
                assert_eq!(message["channel"], "fan");
                assert_eq!(
                    message["data"]["seq"], got,
                    "subscriber {i}: message out of order or missing"
                );
                got += 1;
            }
            // Nothing beyond the run: the next message is the pong.
            sync(&mut ws).await;
            got
        }));
    }
    let hub = server.hub.clone();
    let counted = Arc::clone(&self_subscribed);
    wait_until("every client to connect and half to subscribe", move || {
        hub.client_count() == SUBSCRIBERS && counted.load(Ordering::SeqCst) == SUBSCRIBERS / 2
    })
    .await;
    // The server subscribes the clients that did not subscribe themselves.
    let clients = server.hub.clients().await;
    assert_eq!(clients.len(), SUBSCRIBERS);
    let unsubscribed: Vec<_> = clients
        .iter()
        .filter(|c| c.subscriptions.is_empty())
        .collect();
    assert_eq!(unsubscribed.len(), SUBSCRIBERS / 2);
    for client in unsubscribed {
        server.hub.subscribe(client.info.id, "fan").unwrap();
    }
    let hub = server.hub.clone();
    wait_until("every client to be subscribed", move || {
        hub.channel_subscriber_count("fan") == SUBSCRIBERS
    })
    .await;
    within("every subscriber to be ready", ready.wait()).await;

    let before = server.hub.stats();
    assert_eq!(before.shard_clients.iter().sum::<usize>(), SUBSCRIBERS);
    assert!(
        before.shard_clients.iter().all(|&n| n > 0),
        "clients are spread over every shard: {:?}",
        before.shard_clients
    );
    for seq in 0..MESSAGES {
        server
            .hub
            .send_to_channel("fan", &Message::new("tick").with_data(json!({"seq": seq})))
            .unwrap();
    }
    for task in tasks {
        let got = within("a subscriber to get every message", task)
            .await
            .expect("subscriber task");
        assert_eq!(got, MESSAGES);
    }
    let after = server.hub.stats();
    assert_eq!(after.published, before.published + MESSAGES);
    // Shards add up deliveries after writing them: the count may trail the clients a little.
    let hub = server.hub.clone();
    let target = before.delivered + MESSAGES * SUBSCRIBERS as u64;
    wait_until("every delivery to be counted", move || {
        hub.stats().delivered >= target
    })
    .await;
    assert_eq!(after.slow_consumer_disconnects, 0);
}

const CLIENTS: usize = 40;
const CHANNELS: usize = 12;
const OPS: usize = 60;

/// A small deterministic generator, so a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn channel_name(n: u64) -> String {
    format!("ch-{}", n % CHANNELS as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_subscribes_and_unsubscribes_end_with_exact_counts() {
    let config = HubConfig::builder().shards(4).build().unwrap();
    let server = Arc::new(Server::start(config).await);
    let start = Arc::new(Barrier::new(CLIENTS * 2));

    // Each client task subscribes and unsubscribes at random, on its own connection, and a
    // twin task does the same for that client from the server side, all at once. Each knows
    // what its client ends subscribed to only when both are done, so the final sets are
    // computed from the acknowledgements, which arrive in the order the shard applied them.
    let mut client_tasks = Vec::new();
    let mut server_tasks = Vec::new();
    for i in 0..CLIENTS {
        let mut ws = server.connect().await;
        let id = server.newest_client().await;
        let start_client = Arc::clone(&start);
        client_tasks.push(tokio::spawn(async move {
            start_client.wait().await;
            let mut rng = Lcg(i as u64 * 7919 + 1);
            for _ in 0..OPS {
                let channel = channel_name(rng.next());
                let kind = if rng.next().is_multiple_of(3) {
                    "unsubscribe"
                } else {
                    "subscribe"
                };
                send_json(&mut ws, &json!({"type": kind, "data": channel})).await;
            }
            ws
        }));
        let hub = server.hub.clone();
        let start_server = Arc::clone(&start);
        server_tasks.push(tokio::spawn(async move {
            start_server.wait().await;
            let mut rng = Lcg(i as u64 * 104_729 + 3);
            for _ in 0..OPS {
                let channel = channel_name(rng.next());
                if rng.next().is_multiple_of(3) {
                    hub.unsubscribe(id, &channel).unwrap();
                } else {
                    hub.subscribe(id, &channel).unwrap();
                }
                if rng.next().is_multiple_of(8) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for task in server_tasks {
        within("the server-side operations", task).await.unwrap();
    }
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    let mut expected_sets = Vec::new();
    let mut connections = Vec::new();
    for task in client_tasks {
        let mut ws = within("the client-side operations", task).await.unwrap();
        // 2 * OPS acknowledgements, in the order they were applied; then the pong.
        let mut set = BTreeSet::new();
        for _ in 0..2 * OPS {
            let ack = next_json(&mut ws).await;
            let channel = ack["channel"].as_str().expect("a channel").to_owned();
            match ack["type"].as_str() {
                Some("subscribed") => {
                    set.insert(channel);
                }
                Some("unsubscribed") => {
                    set.remove(&channel);
                }
                _ => panic!("not an acknowledgement: {ack}"),
            }
        }
        sync(&mut ws).await;
        for channel in &set {
            *expected.entry(channel.clone()).or_default() += 1;
        }
        expected_sets.push(set);
        connections.push(ws);
    }

    let hub = &server.hub;
    assert_eq!(hub.channel_count(), expected.len());
    for i in 0..CHANNELS {
        let name = channel_name(i as u64);
        assert_eq!(
            hub.channel_subscriber_count(&name),
            expected.get(&name).copied().unwrap_or(0),
            "subscribers of {name}"
        );
    }
    let listed: BTreeMap<String, usize> = hub
        .channels()
        .into_iter()
        .map(|c| (c.name, c.subscribers))
        .collect();
    assert_eq!(listed, expected);
    let mut snapshot_sets: Vec<BTreeSet<String>> = hub
        .clients()
        .await
        .into_iter()
        .map(|c| c.subscriptions.into_iter().collect())
        .collect();
    snapshot_sets.sort();
    expected_sets.sort();
    assert_eq!(snapshot_sets, expected_sets);

    // Publishing reaches exactly the subscribers: count deliveries per channel.
    let before = hub.stats().delivered;
    for i in 0..CHANNELS {
        hub.send_to_channel(&channel_name(i as u64), &Message::new("m"))
            .unwrap();
    }
    let total: usize = expected.values().sum();
    let hub2 = hub.clone();
    wait_until("every delivery", move || {
        hub2.stats().delivered >= before + total as u64
    })
    .await;
    assert_eq!(
        hub.stats().delivered,
        before + total as u64,
        "exactly one delivery per subscriber"
    );

    // Every client going away leaves no channel behind.
    drop(connections);
    let hub2 = hub.clone();
    wait_until("every client and channel to be gone", move || {
        hub2.client_count() == 0 && hub2.channel_count() == 0
    })
    .await;
    assert!(hub.channels().is_empty());
}

/// Clients in different sets of channels, published to alternately and sent to directly, all
/// within the same shard batches: each gets exactly its own messages, in the order they were
/// sent. (Clients of the same channels share what the shard stages for them; one that is in
/// other channels, or got a direct message, must not be handed anyone else's frames.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_channels_and_direct_sends_reach_exactly_their_clients_in_order() {
    const ROUNDS: u64 = 300;
    let config = HubConfig::builder().shards(1).build().unwrap();
    let server = Server::start(config).await;
    // Member sets, subscribed in these orders.
    let sets: [&[&str]; 5] = [&["a"], &["b"], &["a", "b"], &["b", "a"], &["c", "a"]];
    let mut clients = Vec::new();
    for set in sets {
        let mut ws = server.connect().await;
        for channel in set {
            subscribe(&mut ws, channel).await;
        }
        let id = server.newest_client().await;
        clients.push((ws, id, set));
    }
    // What each client must receive, built as the messages are sent.
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    let direct_to = clients[2].1;
    for seq in 0..ROUNDS {
        let channel = ["a", "b", "a", "c"][(seq % 4) as usize];
        let message = Message::new("message").with_data(json!({ "seq": seq }));
        server.hub.send_to_channel(channel, &message).unwrap();
        for (k, (_, _, set)) in clients.iter().enumerate() {
            if set.contains(&channel) {
                expected[k].push(format!("{channel}:{seq}"));
            }
        }
        if seq % 7 == 0 {
            let message = Message::new("direct").with_data(json!({ "seq": seq }));
            server.hub.send_to_client(direct_to, &message).unwrap();
            expected[2].push(format!("direct:{seq}"));
        }
    }
    for (k, (ws, _, set)) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < expected[k].len() {
            let message = next_json(ws).await;
            let label = match message["type"].as_str() {
                Some("direct") => "direct".to_owned(),
                _ => message["channel"].as_str().unwrap_or("?").to_owned(),
            };
            got.push(format!("{label}:{}", message["data"]["seq"]));
        }
        assert_eq!(got, expected[k], "client {k} in {set:?}");
        // Nothing more: the next message is the pong.
        sync(ws).await;
    }
}

/// `HubConfig::io_uring(false)` is what an operator sets whose containers refuse io_uring, or
/// who wants to compare the write paths: no shard counts as an io_uring shard, and every
/// subscriber still gets every message, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_io_uring_turned_off_the_shards_write_with_send_and_deliver_everything() {
    let config = HubConfig::builder()
        .shards(2)
        .io_uring(false)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut ws = server.connect().await;
        subscribe(&mut ws, "news").await;
        clients.push(ws);
    }
    assert_eq!(server.hub.stats().io_uring_shards, 0);
    for i in 0..20 {
        server
            .hub
            .send_to_channel("news", &Message::new("tick").with_data(i))
            .unwrap();
    }
    for ws in &mut clients {
        for i in 0..20 {
            let message = next_json(ws).await;
            assert_eq!(message["data"], json!(i), "{message}");
        }
    }
}
