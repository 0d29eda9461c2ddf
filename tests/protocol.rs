//! Client requests: acknowledgements, each per-client error reason (to that client alone,
//! connection kept), the strict go-ws mode, the publish and subscribe policies, and the
//! subscription and channel-length limits.

mod support;

use futures_util::SinkExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use wshub::{HubConfig, Message, PublishPolicy};

/// Sends `request` and asserts the reply is exactly `expected` (plus the timestamp).
async fn expect_reply(ws: &mut Ws, request: &str, expected: &str) {
    send_text(ws, request).await;
    assert_envelope(&next_text(ws).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_unsubscribe_are_acknowledged_even_when_repeated() {
    let server = Server::default_hub().await;
    let mut ws = server.connect().await;
    let subscribed = r#"{"type":"subscribed","channel":"room:42"}"#;
    let unsubscribed = r#"{"type":"unsubscribed","channel":"room:42"}"#;

    expect_reply(
        &mut ws,
        r#"{"type":"subscribe","data":"room:42"}"#,
        subscribed,
    )
    .await;
    // Idempotent: acknowledged again, still one subscription.
    expect_reply(
        &mut ws,
        r#"{"type":"subscribe","data":"room:42"}"#,
        subscribed,
    )
    .await;
    assert_eq!(server.hub.channel_subscriber_count("room:42"), 1);

    server
        .hub
        .send_to_channel("room:42", &Message::new("m"))
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "m");

    expect_reply(
        &mut ws,
        r#"{"type":"unsubscribe","data":"room:42"}"#,
        unsubscribed,
    )
    .await;
    assert_eq!(server.hub.channel_subscriber_count("room:42"), 0);
    // Unsubscribing from a channel one is not in is a no-op, acknowledged.
    expect_reply(
        &mut ws,
        r#"{"type":"unsubscribe","data":"room:42"}"#,
        unsubscribed,
    )
    .await;
    expect_reply(
        &mut ws,
        r#"{"type":"unsubscribe","data":"never"}"#,
        r#"{"type":"unsubscribed","channel":"never"}"#,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_names_are_echoed_exactly() {
    let server = Server::default_hub().await;
    let mut ws = server.connect().await;
    let name = "é \"quoted\" \\ 漢字 / tab\t";
    send_json(&mut ws, &json!({"type": "subscribe", "data": name})).await;
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["type"], "subscribed");
    assert_eq!(ack["channel"], name);
    server
        .hub
        .send_to_channel(name, &Message::new("m"))
        .unwrap();
    assert_eq!(next_json(&mut ws).await["channel"], name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_are_read_as_json() {
    let server = Server::default_hub().await;
    let mut ws = server.connect().await;
    within(
        "a send",
        ws.send(WsMessage::binary(
            br#"{"type":"subscribe","data":"bin"}"#.to_vec(),
        )),
    )
    .await
    .unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"subscribed","channel":"bin"}"#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_requests_get_an_error_and_keep_the_connection() {
    let server = Server::default_hub().await;
    let mut ws = server.connect().await;
    let malformed = r#"{"type":"error","data":"malformed message"}"#;
    for bad in [
        "not json",
        "",
        "[1,2]",
        "\"subscribe\"",
        r#"{"data":"x"}"#,
        r#"{"type":7}"#,
        r#"{"type":"subscribe","data":"x""#,
    ] {
        expect_reply(&mut ws, bad, malformed).await;
    }
    // Data nested deeper than 128 levels is malformed (and cannot overflow the stack).
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    for kind in ["ping", "subscribe", "publish"] {
        let request = format!(
            r#"{{"type":"{kind}","channel":"c","data":{}}}"#,
            nested(30_000)
        );
        expect_reply(&mut ws, &request, malformed).await;
    }
    expect_reply(
        &mut ws,
        &format!(r#"{{"type":"ping","data":{}}}"#, nested(129)),
        malformed,
    )
    .await;
    expect_reply(
        &mut ws,
        &format!(r#"{{"type":"ping","data":{}}}"#, nested(128)),
        r#"{"type":"pong"}"#,
    )
    .await;

    expect_reply(
        &mut ws,
        r#"{"type":"shout","data":"x"}"#,
        r#"{"type":"error","data":"unknown type"}"#,
    )
    .await;
    // The connection is still usable.
    sync(&mut ws).await;
    subscribe(&mut ws, "still-here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_channel_is_an_invalid_channel() {
    let server = Server::default_hub().await;
    let mut ws = server.connect().await;
    let invalid = r#"{"type":"error","data":"invalid channel"}"#;
    for bad in [
        r#"{"type":"subscribe"}"#,
        r#"{"type":"subscribe","data":null}"#,
        r#"{"type":"subscribe","data":""}"#,
        r#"{"type":"subscribe","data":5}"#,
        r#"{"type":"subscribe","data":["a"]}"#,
        r#"{"type":"subscribe","data":{"channel":"a"}}"#,
        r#"{"type":"unsubscribe","data":false}"#,
        r#"{"type":"unsubscribe"}"#,
    ] {
        expect_reply(&mut ws, bad, invalid).await;
    }
    assert_eq!(server.hub.channel_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_errors_go_to_that_client_alone() {
    let server = Server::default_hub().await;
    let mut bad = server.connect().await;
    let mut good = server.connect().await;
    expect_reply(
        &mut bad,
        "nope",
        r#"{"type":"error","data":"malformed message"}"#,
    )
    .await;
    expect_reply(
        &mut bad,
        r#"{"type":"publish","channel":"c","data":1}"#,
        r#"{"type":"error","channel":"c","data":"publish refused"}"#,
    )
    .await;
    // The other client's first message is its own pong: it saw no error.
    send_text(&mut good, r#"{"type":"ping"}"#).await;
    assert_envelope(&next_text(&mut good).await, r#"{"type":"pong"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_length_limit_is_inclusive() {
    let config = HubConfig::builder().max_channel_len(8).build().unwrap();
    let server = Server::start(config).await;
    let mut ws = server.connect().await;
    subscribe(&mut ws, "12345678").await;
    subscribe(&mut ws, "ééé").await; // 6 bytes
                                     // 9 bytes: refused, on subscribe, unsubscribe and publish alike.
    for kind in ["subscribe", "unsubscribe"] {
        send_json(&mut ws, &json!({"type": kind, "data": "123456789"})).await;
        let error = next_json(&mut ws).await;
        assert_eq!(error["type"], "error", "{kind}: {error}");
        assert_eq!(error["data"], "invalid channel", "{kind}: {error}");
    }
    send_json(
        &mut ws,
        &json!({"type": "publish", "channel": "123456789", "data": 1}),
    )
    .await;
    let error = next_json(&mut ws).await;
    assert_eq!(error["data"], "invalid channel", "publish: {error}");
    // ééééé is 5 characters but 10 bytes.
    send_json(&mut ws, &json!({"type": "subscribe", "data": "ééééé"})).await;
    assert_eq!(next_json(&mut ws).await["data"], "invalid channel");
    assert_eq!(server.hub.channel_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_limit_refuses_a_subscription_over_it() {
    let config = HubConfig::builder().max_subscriptions(2).build().unwrap();
    let server = Server::start(config).await;
    let mut ws = server.connect().await;
    subscribe(&mut ws, "a").await;
    subscribe(&mut ws, "b").await;
    expect_reply(
        &mut ws,
        r#"{"type":"subscribe","data":"c"}"#,
        r#"{"type":"error","channel":"c","data":"too many subscriptions"}"#,
    )
    .await;
    // Re-subscribing to one it has is not a new subscription.
    subscribe(&mut ws, "a").await;
    assert_eq!(server.hub.channel_subscriber_count("c"), 0);
    // Room again after leaving one.
    expect_reply(
        &mut ws,
        r#"{"type":"unsubscribe","data":"a"}"#,
        r#"{"type":"unsubscribed","channel":"a"}"#,
    )
    .await;
    subscribe(&mut ws, "c").await;

    // The limit guards the client's own requests; the server may go past it.
    let id = server.newest_client().await;
    server.hub.subscribe(id, "d").unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    let mut subs = server.hub.client(id).await.unwrap().subscriptions;
    subs.sort();
    assert_eq!(subs, ["b", "c", "d"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscribe_policy_can_refuse_a_channel() {
    let config = HubConfig::builder()
        .subscribe_policy(|_client, channel| !channel.starts_with("admin"))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let mut ws = server.connect().await;
    expect_reply(
        &mut ws,
        r#"{"type":"subscribe","data":"admin"}"#,
        r#"{"type":"error","channel":"admin","data":"subscription refused"}"#,
    )
    .await;
    assert_eq!(server.hub.channel_subscriber_count("admin"), 0);
    subscribe(&mut ws, "lobby").await;
    server
        .hub
        .send_to_channel("admin", &Message::new("secret"))
        .unwrap();
    server
        .hub
        .send_to_channel("lobby", &Message::new("public"))
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "public");

    // Server-side subscribe is not checked.
    let id = server.newest_client().await;
    server.hub.subscribe(id, "admin").unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"subscribed","channel":"admin"}"#,
    );
}

/// A subscribe policy that panics ends that client's connection only: with one shard, so
/// that every idle client waits with the same runner, a client subscribed before goes on
/// receiving and having its requests answered, and a client that connects after is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_subscribe_policy_ends_that_client_only() {
    let config = HubConfig::builder()
        .shards(1)
        .subscribe_policy(|_client, channel| {
            assert_ne!(channel, "boom", "the policy's own panic, on purpose");
            true
        })
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let mut bystander = server.connect().await;
    subscribe(&mut bystander, "lobby").await;
    let mut victim = server.connect().await;
    send_text(&mut victim, r#"{"type":"subscribe","data":"boom"}"#).await;
    loop {
        match next_seen(&mut victim).await {
            Seen::End(_) | Seen::Close(_) => break,
            Seen::Ping(_) | Seen::Pong(_) => continue,
            other => panic!("the client whose request panicked got {other:?}"),
        }
    }
    wait_until("the panicked client's session to end", || {
        server.hub.stats().connection_tasks == 1
    })
    .await;

    server
        .hub
        .send_to_channel("lobby", &Message::new("still-here"))
        .unwrap();
    assert_eq!(next_json(&mut bystander).await["type"], "still-here");
    subscribe(&mut bystander, "lobby-2").await;
    let mut newcomer = server.connect().await;
    subscribe(&mut newcomer, "lobby").await;
    assert_eq!(server.hub.stats().clients, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_publish_is_refused_by_default() {
    let server = Server::default_hub().await;
    let mut publisher = server.connect().await;
    let mut listener = server.connect().await;
    subscribe(&mut listener, "room:42").await;
    let published_before = server.hub.stats().published;

    expect_reply(
        &mut publisher,
        r#"{"type":"publish","channel":"room:42","data":{"text":"hi"}}"#,
        r#"{"type":"error","channel":"room:42","data":"publish refused"}"#,
    )
    .await;
    // Nothing reached the channel: the listener's next message is the server's.
    server
        .hub
        .send_to_channel("room:42", &Message::new("from-server"))
        .unwrap();
    assert_eq!(next_json(&mut listener).await["type"], "from-server");
    assert_eq!(server.hub.stats().published, published_before + 1);

    // A publish without a channel is an invalid channel, whatever the policy.
    expect_reply(
        &mut publisher,
        r#"{"type":"publish","data":1}"#,
        r#"{"type":"error","data":"invalid channel"}"#,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_client_publish_reaches_subscribers_as_message() {
    let config = HubConfig::builder()
        .publish_policy(PublishPolicy::AllowAll)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let mut publisher = server.connect().await;
    let mut listener = server.connect().await;
    let mut other = server.connect().await;
    subscribe(&mut listener, "room:42").await;
    subscribe(&mut other, "room:7").await;

    send_text(
        &mut publisher,
        r#"{"type":"publish","channel":"room:42","data":{"text":"hi"},"processId":"ignored","timestamp":"x"}"#,
    )
    .await;
    assert_envelope(
        &next_text(&mut listener).await,
        r#"{"type":"message","channel":"room:42","data":{"text":"hi"}}"#,
    );
    // No data (or null data) is sent without data.
    send_text(
        &mut publisher,
        r#"{"type":"publish","channel":"room:42","data":null}"#,
    )
    .await;
    assert_envelope(
        &next_text(&mut listener).await,
        r#"{"type":"message","channel":"room:42"}"#,
    );
    // The data is passed through as the client wrote it.
    send_text(
        &mut publisher,
        r#"{"type":"publish","channel":"room:42","data":[1, "two", {"b":2,"a":1}]}"#,
    )
    .await;
    let got = next_json(&mut listener).await;
    assert_eq!(got["data"], json!([1, "two", {"b": 2, "a": 1}]));

    // Only room:42's subscribers got them.
    server
        .hub
        .send_to_channel("room:7", &Message::new("seven"))
        .unwrap();
    assert_eq!(next_json(&mut other).await["type"], "seven");
    // The publisher, not subscribed, got nothing (its next message is its own pong).
    sync(&mut publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_publish_policy_decides_per_client_and_channel() {
    let config = HubConfig::builder()
        .publish_policy(PublishPolicy::custom(|_client, channel| {
            channel.starts_with("public:")
        }))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let mut publisher = server.connect().await;
    let mut listener = server.connect().await;
    subscribe(&mut listener, "public:1").await;
    subscribe(&mut listener, "private:1").await;

    expect_reply(
        &mut publisher,
        r#"{"type":"publish","channel":"private:1","data":"no"}"#,
        r#"{"type":"error","channel":"private:1","data":"publish refused"}"#,
    )
    .await;
    send_text(
        &mut publisher,
        r#"{"type":"publish","channel":"public:1","data":"yes"}"#,
    )
    .await;
    let got = next_json(&mut listener).await;
    assert_eq!(got["type"], "message");
    assert_eq!(got["channel"], "public:1");
    assert_eq!(got["data"], "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_go_ws_mode_sends_no_acknowledgements_and_no_errors() {
    let config = HubConfig::builder()
        .strict_go_ws(true)
        .max_subscriptions(1)
        .subscribe_policy(|_, channel| channel != "admin")
        .build()
        .unwrap();
    assert!(config.strict_go_ws());
    let server = Server::start(config).await;
    let mut ws = server.connect().await;
    let id = server.newest_client().await;

    for request in [
        r#"{"type":"subscribe","data":"room"}"#,
        r#"{"type":"subscribe","data":"room"}"#,
        r#"{"type":"subscribe","data":"second"}"#,
        r#"{"type":"subscribe","data":"admin"}"#,
        r#"{"type":"subscribe","data":5}"#,
        r#"{"type":"publish","channel":"room","data":1}"#,
        r#"{"type":"unsubscribe","data":"nowhere"}"#,
        r#"{"type":"what"}"#,
        "garbage",
    ] {
        send_text(&mut ws, request).await;
    }
    // Replies go through the client's shard in order: the pong comes after whatever the
    // requests above produced, which must be nothing.
    send_text(&mut ws, r#"{"type":"ping"}"#).await;
    assert_envelope(&next_text(&mut ws).await, r#"{"type":"pong"}"#);

    // Silence is not consent: the limit and the policy still refused. "second" was over
    // max_subscriptions(1) and "admin" refused by the policy, so neither has the client,
    // while "room" was allowed.
    assert_eq!(server.hub.channel_subscriber_count("room"), 1);
    assert_eq!(server.hub.channel_subscriber_count("second"), 0);
    assert_eq!(server.hub.channel_subscriber_count("admin"), 0);
    let subscriptions = server.hub.client(id).await.unwrap().subscriptions;
    assert_eq!(subscriptions, ["room"]);
    // And what a user would notice: publishes to the refused channels do not reach the
    // client. Published first, from this one task, so had either reached it, it would come
    // before the allowed channel's message.
    for refused in ["second", "admin"] {
        server
            .hub
            .send_to_channel(refused, &Message::new("refused").with_data(refused))
            .unwrap();
    }
    server
        .hub
        .send_to_channel("room", &Message::new("m").with_data(1))
        .unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"m","channel":"room","data":1}"#,
    );
    // The limit still holds after an unsubscribe frees a place: "admin" stays refused by the
    // policy even though the count would allow it, and "second" now fits.
    for request in [
        r#"{"type":"unsubscribe","data":"room"}"#,
        r#"{"type":"subscribe","data":"admin"}"#,
        r#"{"type":"subscribe","data":"second"}"#,
    ] {
        send_text(&mut ws, request).await;
    }
    sync(&mut ws).await;
    let subscriptions = server.hub.client(id).await.unwrap().subscriptions;
    assert_eq!(subscriptions, ["second"]);
    assert_eq!(server.hub.channel_subscriber_count("admin"), 0);

    // A server-side subscribe is not acknowledged either (the limit does not apply to it).
    server.hub.subscribe(id, "server-side").unwrap();
    sync(&mut ws).await;
    assert_eq!(server.hub.channel_subscriber_count("server-side"), 1);
    server
        .hub
        .send_to_channel("admin", &Message::new("refused").with_data("admin"))
        .unwrap();
    server
        .hub
        .send_to_channel("server-side", &Message::new("m").with_data(2))
        .unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"m","channel":"server-side","data":2}"#,
    );
    // Server messages of type error (send_error) are part of go-ws and still sent.
    server.hub.send_error("boom").unwrap();
    assert_envelope(
        &next_text(&mut ws).await,
        r#"{"type":"error","data":"boom"}"#,
    );
}
