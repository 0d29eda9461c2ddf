//! Each `Hub` method and each server message type, with its exact JSON: keys in the
//! envelope's order, empty fields left out, and a UTC RFC 3339 timestamp last.

mod support;

use std::collections::HashMap;

use serde_json::json;
use support::*;
use wshub::{Hub, HubConfig, Message};

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}

#[test]
fn hub_is_a_cheap_shareable_handle() {
    assert_send_sync_clone::<Hub>();
    // Publishing before any runtime or server exists is allowed and does not block.
    let hub = Hub::new();
    hub.broadcast(&Message::new("early"))
        .expect("publish before run");
    assert_eq!(hub.client_count(), 0);
    assert_eq!(hub.channel_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_output_and_status_have_the_go_ws_json() {
    let server = Server::default_hub().await;
    let mut ws = server.connect().await;
    subscribe(&mut ws, "process:build-1").await;

    server
        .hub
        .send_process_output("build-1", "Compiling...")
        .unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"process_output","channel":"process:build-1","processId":"build-1","data":"Compiling..."}"#,
    );

    server
        .hub
        .send_process_status("build-1", "exited", 0)
        .unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"process_status","channel":"process:build-1","processId":"build-1","data":{"status":"exited","exitCode":0}}"#,
    );

    server
        .hub
        .send_process_status("build-1", "failed", -3)
        .unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"process_status","channel":"process:build-1","processId":"build-1","data":{"status":"failed","exitCode":-3}}"#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_messages_reach_only_that_process_subscribers() {
    let server = Server::default_hub().await;
    let mut one = server.connect().await;
    let mut two = server.connect().await;
    subscribe(&mut one, "process:a").await;
    subscribe(&mut two, "process:b").await;

    server.hub.send_process_output("a", "for a").unwrap();
    server.hub.send_process_output("b", "for b").unwrap();
    assert_eq!(next_json(&mut one).await["data"], "for a");
    assert_eq!(next_json(&mut two).await["data"], "for b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_and_error_go_to_every_client() {
    let server = Server::default_hub().await;
    let mut one = server.connect().await;
    let mut two = server.connect().await;
    subscribe(&mut two, "somewhere").await;

    server
        .hub
        .send_event("user_joined", json!({"id": 7}))
        .unwrap();
    server.hub.send_error("disk full").unwrap();
    for ws in [&mut one, &mut two] {
        assert_envelope(
            &next_text(ws).await,
            r#"{"type":"event","data":{"event":"user_joined","data":{"id":7}}}"#,
        );
        assert_envelope(
            &next_text(ws).await,
            r#"{"type":"error","data":"disk full"}"#,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_sends_any_type_in_key_order_and_stamps_the_time() {
    let server = Server::default_hub().await;
    let mut ws = server.connect().await;

    // Every field, set out of order: the wire has them in the envelope's order.
    let mut full = Message::new("custom")
        .with_data(json!([1, 2]))
        .with_process_id("p-1")
        .with_channel("c");
    // The caller's timestamp is overwritten with the time of sending.
    full.timestamp = Some("1999-01-01T00:00:00Z".to_owned());
    server.hub.broadcast(&full).unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"custom","channel":"c","processId":"p-1","data":[1,2]}"#,
    );

    // Empty channel and processId are left out; null data is left out.
    let sparse = Message::new("notice")
        .with_channel("")
        .with_process_id("")
        .with_data(serde_json::Value::Null);
    server.hub.broadcast(&sparse).unwrap();
    assert_envelope(&next_text(&mut ws).await, r#"{"type":"notice"}"#);

    // Data of every JSON kind survives the trip unchanged.
    let data = json!({"s": "é\"\\\n", "n": -1.5, "b": true, "z": null, "a": [{}], "big": 12345678901234u64});
    server
        .hub
        .broadcast(&Message::new("kinds").with_data(data.clone()))
        .unwrap();
    let got = next_json(&mut ws).await;
    assert_eq!(got["data"], data);
    assert_timestamp(got["timestamp"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_channel_sets_the_channel_and_reaches_only_subscribers() {
    let server = Server::default_hub().await;
    let mut in_room = server.connect().await;
    let mut elsewhere = server.connect().await;
    subscribe(&mut in_room, "room:1").await;
    subscribe(&mut elsewhere, "room:2").await;

    // Nobody subscribed is not an error.
    server
        .hub
        .send_to_channel("empty", &Message::new("chat"))
        .unwrap();

    let chat = Message::new("chat").with_channel("wrong").with_data("hi");
    server.hub.send_to_channel("room:1", &chat).unwrap();
    server
        .hub
        .send_to_channel("room:2", &Message::new("chat").with_data("two"))
        .unwrap();
    assert_envelope(
        &next_text(&mut in_room).await,
        r#"{"type":"chat","channel":"room:1","data":"hi"}"#,
    );
    // The other client's first message is its own channel's: it never saw room:1's.
    assert_envelope(
        &next_text(&mut elsewhere).await,
        r#"{"type":"chat","channel":"room:2","data":"two"}"#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_client_reaches_that_client_alone() {
    let server = Server::default_hub().await;
    let mut first = server.connect().await;
    let first_id = server.newest_client().await;
    let mut second = server.connect().await;
    let second_id = server.newest_client().await;
    assert_ne!(first_id, second_id);

    server
        .hub
        .send_to_client(second_id, &Message::new("direct").with_data(2))
        .unwrap();
    server
        .hub
        .send_to_client(first_id, &Message::new("direct").with_data(1))
        .unwrap();
    assert_envelope(
        &next_text(&mut first).await,
        r#"{"type":"direct","data":1}"#,
    );
    assert_envelope(
        &next_text(&mut second).await,
        r#"{"type":"direct","data":2}"#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_subscribe_and_unsubscribe_are_acknowledged() {
    let server = Server::default_hub().await;
    let mut ws = server.connect().await;
    let id = server.newest_client().await;

    server.hub.subscribe(id, "news").unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"subscribed","channel":"news"}"#,
    );
    assert_eq!(server.hub.channel_subscriber_count("news"), 1);
    let snapshot = server
        .hub
        .client(id)
        .await
        .expect("the client is connected");
    assert_eq!(snapshot.subscriptions, vec!["news".to_owned()]);

    server
        .hub
        .send_to_channel("news", &Message::new("headline").with_data("x"))
        .unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"headline","channel":"news","data":"x"}"#,
    );

    server.hub.unsubscribe(id, "news").unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"unsubscribed","channel":"news"}"#,
    );
    assert_eq!(server.hub.channel_subscriber_count("news"), 0);
    assert_eq!(server.hub.channel_count(), 0);

    // No longer subscribed: the next message it gets is the direct one, not the headline.
    server
        .hub
        .send_to_channel("news", &Message::new("headline"))
        .unwrap();
    server
        .hub
        .send_to_client(id, &Message::new("marker"))
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "marker");

    let err = server.hub.subscribe(id, "").unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ping_gets_a_pong() {
    let server = Server::default_hub().await;
    let mut ws = server.connect().await;
    send_text(&mut ws, r#"{"type":"ping"}"#).await;
    assert_envelope(&next_text(&mut ws).await, r#"{"type":"pong"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_gets_messages_in_the_order_they_were_sent() {
    let server = Server::start(HubConfig::builder().shards(4).build().unwrap()).await;
    let mut ws = server.connect().await;
    let id = server.newest_client().await;
    subscribe(&mut ws, "c").await;
    subscribe(&mut ws, "process:p").await;

    for i in 0..50 {
        match i % 4 {
            0 => server
                .hub
                .send_to_channel("c", &Message::new("m").with_data(i))
                .unwrap(),
            1 => server
                .hub
                .broadcast(&Message::new("m").with_data(i))
                .unwrap(),
            2 => server
                .hub
                .send_to_client(id, &Message::new("m").with_data(i))
                .unwrap(),
            _ => server.hub.send_process_output("p", &i.to_string()).unwrap(),
        }
    }
    for i in 0..50 {
        let message = next_json(&mut ws).await;
        let data = &message["data"];
        let got = data
            .as_i64()
            .or_else(|| data.as_str().and_then(|s| s.parse().ok()));
        assert_eq!(got, Some(i), "message {i} out of order: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_snapshots_and_stats_follow_the_clients() {
    let server = Server::start(HubConfig::builder().shards(3).build().unwrap()).await;
    let hub = &server.hub;
    assert_eq!(hub.config().shards(), 3);
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let mut c = server.connect().await;
    subscribe(&mut a, "x").await;
    subscribe(&mut b, "x").await;
    subscribe(&mut b, "y").await;
    sync(&mut c).await;

    assert_eq!(hub.client_count(), 3);
    assert_eq!(hub.channel_count(), 2);
    assert_eq!(hub.channel_subscriber_count("x"), 2);
    assert_eq!(hub.channel_subscriber_count("y"), 1);
    assert_eq!(hub.channel_subscriber_count("nope"), 0);
    let channels: Vec<(String, usize)> = hub
        .channels()
        .into_iter()
        .map(|c| (c.name, c.subscribers))
        .collect();
    assert_eq!(channels, vec![("x".to_owned(), 2), ("y".to_owned(), 1)]);

    let clients = hub.clients().await;
    assert_eq!(clients.len(), 3);
    let mut local_addrs = vec![
        a.get_ref().local_addr().unwrap(),
        b.get_ref().local_addr().unwrap(),
        c.get_ref().local_addr().unwrap(),
    ];
    let mut remote_addrs: Vec<_> = clients
        .iter()
        .map(|c| c.info.remote_addr.unwrap())
        .collect();
    local_addrs.sort();
    remote_addrs.sort();
    assert_eq!(
        remote_addrs, local_addrs,
        "each client's remote address is its socket"
    );
    for client in &clients {
        assert_eq!(client.info.user_id, None);
        assert!(client.info.claims.is_null());
    }
    let mut subs: Vec<Vec<String>> = clients
        .iter()
        .map(|c| {
            let mut s = c.subscriptions.clone();
            s.sort();
            s
        })
        .collect();
    subs.sort();
    assert_eq!(
        subs,
        vec![
            vec![],
            vec!["x".to_owned()],
            vec!["x".to_owned(), "y".to_owned()]
        ]
    );

    let before = hub.stats();
    assert_eq!(before.clients, 3);
    assert_eq!(before.channels, 2);
    assert_eq!(before.connection_tasks, 3);
    assert_eq!(before.shard_clients.len(), 3);
    assert_eq!(before.shard_clients.iter().sum::<usize>(), 3);

    hub.send_to_channel("x", &Message::new("m")).unwrap();
    hub.broadcast(&Message::new("all")).unwrap();
    assert_eq!(next_json(&mut a).await["type"], "m");
    assert_eq!(next_json(&mut a).await["type"], "all");
    assert_eq!(next_json(&mut b).await["type"], "m");
    assert_eq!(next_json(&mut b).await["type"], "all");
    assert_eq!(next_json(&mut c).await["type"], "all");
    let after = hub.stats();
    assert_eq!(after.published, before.published + 2);
    // A shard adds its deliveries up after writing them: the count may trail the client.
    let hub2 = hub.clone();
    let delivered_before = before.delivered;
    wait_until("5 frames counted as delivered", move || {
        hub2.stats().delivered == delivered_before + 5
    })
    .await;

    // A client leaving takes its subscriptions with it.
    close(&mut b, 1000).await;
    wait_until("b to be gone", || hub.client_count() == 2).await;
    assert_eq!(hub.channel_subscriber_count("x"), 1);
    assert_eq!(hub.channel_subscriber_count("y"), 0);
    assert_eq!(hub.channel_count(), 1);
    assert_eq!(hub.stats().shard_clients.iter().sum::<usize>(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unencodable_event_data_is_an_encode_error() {
    let server = Server::default_hub().await;
    let bad: HashMap<(i32, i32), i32> = HashMap::from([((1, 2), 3)]);
    let err = server.hub.send_event("bad", bad).unwrap_err();
    assert!(err.is_encode(), "{err}");
}

/// Asking for snapshots before anything started the hub answers (empty) instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_a_hub_never_served_answer() {
    let hub = wshub::Hub::new();
    let clients = tokio::time::timeout(std::time::Duration::from_secs(10), hub.clients())
        .await
        .expect("clients() answered");
    assert!(clients.is_empty());
    assert!(hub.channels().is_empty());
}
