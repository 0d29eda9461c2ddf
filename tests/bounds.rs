//! The shards' inbox bound: every kind of work gives its bytes back, a refused call is an
//! error that says nothing was sent, and keep-alive goes on while a shard is kept busy.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use wshub::{Hub, HubConfig, Message};

/// Waits until no shard has work waiting: every command gave its cost back.
async fn wait_for_empty_backlog(hub: &Hub, after: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let backlog = hub.stats().shard_backlog_bytes;
        if backlog.iter().all(|&b| b == 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the backlog stayed at {backlog:?} after {after}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `send_to_user` used to add its frame to every shard's backlog and never give it back:
/// after ~64 MiB of sends to an offline user, every publish was refused for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_to_an_offline_user_give_their_backlog_back() {
    let server = Server::start(HubConfig::builder().shards(2).build().unwrap()).await;
    let hub = server.hub.clone();
    let mut live = server.connect().await;
    subscribe(&mut live, "news").await;

    // 100 MB: more than the 64 MiB bound of each shard.
    let line = "x".repeat(400);
    let message = Message::new("note").with_data(line.as_str());
    // Each send within the progress deadline, the whole within the stream cap: a send that
    // waits for a backlog never given back hangs and fails, a slow machine does not.
    let mut progress = Progress::new("100 MB of sends to an offline user");
    for _ in 0..250_000 {
        progress
            .wait(hub.send_to_user_async("nobody-online", &message))
            .await
            .unwrap();
        progress.advanced();
    }
    wait_for_empty_backlog(&hub, "send_to_user").await;

    for k in 0..10 {
        hub.send_to_channel("news", &Message::new("message").with_data(k))
            .expect("a publish after the user sends is taken");
    }
    for k in 0..10 {
        let got = read_until_type(&mut live, "message").await;
        assert_eq!(got["data"], json!(k));
    }
    assert_eq!(hub.stats().backlog_refused, 0);
}

/// Every kind of work, publishes to client requests, leaves no bytes behind in the
/// backlog once the shards have taken it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_work_leaves_the_backlog_at_zero() {
    let server = Server::start(HubConfig::builder().shards(2).build().unwrap()).await;
    let hub = server.hub.clone();
    let mut ws = server.connect().await;
    let id = server.newest_client().await;
    subscribe(&mut ws, "room").await;
    let message = Message::new("message").with_data("hello");

    hub.send_to_channel("room", &message).unwrap();
    wait_for_empty_backlog(&hub, "send_to_channel").await;
    hub.broadcast(&message).unwrap();
    wait_for_empty_backlog(&hub, "broadcast").await;
    hub.send_to_client(id, &message).unwrap();
    wait_for_empty_backlog(&hub, "send_to_client").await;
    hub.send_to_user("someone", &message).unwrap();
    wait_for_empty_backlog(&hub, "send_to_user").await;
    hub.subscribe(id, "other").unwrap();
    wait_for_empty_backlog(&hub, "subscribe").await;
    hub.unsubscribe(id, "other").unwrap();
    wait_for_empty_backlog(&hub, "unsubscribe").await;
    send_json(&mut ws, &json!({"type": "ping"})).await;
    read_until_type(&mut ws, "pong").await;
    send_text(&mut ws, "not json").await;
    read_until_type(&mut ws, "error").await;
    wait_for_empty_backlog(&hub, "client requests").await;
    hub.disconnect(id, 1000, "bye").unwrap();
    wait_for_empty_backlog(&hub, "disconnect").await;
}

/// A publish refused for overload says so, is counted, and reached nobody: not even the
/// shards that had room (all or nothing), so a retry does not duplicate it. The async
/// variant waits for room instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_is_an_error_that_sent_nothing_and_the_async_variant_waits() {
    let bound = 64 * 1024;
    // Not started: nothing drains the shards' inboxes until the async call starts them.
    let hub = Hub::with_config(
        HubConfig::builder()
            .shards(2)
            .shard_backlog_bytes(bound)
            .build()
            .unwrap(),
    );
    let big = Message::new("fill").with_data("y".repeat(bound / 4));
    // Fill both shards; a broadcast goes to every shard.
    let mut taken = 0;
    let err = loop {
        match hub.broadcast(&big) {
            Ok(()) => taken += 1,
            Err(err) => break err,
        }
        assert!(taken < 100, "the bound never refused");
    };
    assert!(err.is_overloaded(), "{err}");
    assert!(err.to_string().contains("nothing was sent"), "{err}");
    let stats = hub.stats();
    assert_eq!(stats.backlog_refused, 1);
    assert_eq!(stats.published, taken);
    let before = stats.shard_backlog_bytes.clone();
    assert!(hub.broadcast(&big).unwrap_err().is_overloaded());
    assert_eq!(
        hub.stats().shard_backlog_bytes,
        before,
        "a refused broadcast leaves no bytes on any shard, even one with room"
    );
    assert_eq!(hub.stats().backlog_refused, 2);

    // The async variant starts the shards and waits for their room.
    within(
        "broadcast_async to find room",
        hub.broadcast_async(&Message::new("after")),
    )
    .await
    .unwrap();
    assert_eq!(hub.stats().published, taken + 1);
    wait_for_empty_backlog(&hub, "the shards started").await;
}

/// Server-side calls that carry work to one client's shard are refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_calls_to_a_full_shard_are_refused() {
    let hub = Hub::with_config(
        HubConfig::builder()
            .shards(1)
            .shard_backlog_bytes(4096)
            .build()
            .unwrap(),
    );
    let filler = Message::new("fill").with_data("z".repeat(8192));
    // An empty inbox takes one oversized message, so a large frame is never refused forever.
    hub.broadcast(&filler).unwrap();
    assert!(hub.broadcast(&filler).unwrap_err().is_overloaded());
    let stats = hub.stats();
    assert!(stats.shard_backlog_bytes[0] > 4096);
    assert_eq!(stats.backlog_refused, 1);
}

/// The keep-alive tick used to lose to a busy inbox (`biased` select): a client that never
/// answers pings stayed open for as long as commands kept coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_while_its_shard_is_kept_busy() {
    let heartbeat = Duration::from_millis(200);
    let pong_timeout = Duration::from_secs(1);
    let server = Server::start(
        HubConfig::builder()
            .shards(1)
            .heartbeat(heartbeat)
            .pong_timeout(pong_timeout)
            .strict_go_ws(true)
            .build()
            .unwrap(),
    )
    .await;
    let hub = server.hub.clone();
    // Reads everything (pings included) but never answers.
    let mut silent = Raw::connect(server.addr).await;
    wait_until("the client to register", || hub.client_count() == 1).await;
    let id = server.newest_client().await;

    // Keeps the shard busy until the test stops it (30 s at most), counting its calls.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let busy = std::thread::spawn({
        let hub = hub.clone();
        let stop = Arc::clone(&stop);
        let calls = Arc::clone(&calls);
        move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(30) {
                // Strict mode: an unsubscribe sends nothing back, so this is pure shard work.
                for _ in 0..1_000 {
                    let _ = hub.unsubscribe(id, "nothing");
                }
                calls.fetch_add(1_000, Ordering::Relaxed);
            }
        }
    });
    let started = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let RawFrame::End = silent.read_frame_unbounded().await {
                return;
            }
        }
    })
    .await;
    let closed_after = started.elapsed();
    let calls_at_close = calls.load(Ordering::Relaxed);
    // The shard was still being kept busy after the close: the close did not wait for a
    // pause in its work.
    wait_until("the busy thread to go on after the close", || {
        calls.load(Ordering::Relaxed) > calls_at_close
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    assert!(
        end.is_ok(),
        "the silent client was still open after 20 s of a busy shard ({calls_at_close} calls): \
         its heartbeat and pong timeout come to {:?}",
        heartbeat + pong_timeout
    );
    println!(
        "silent client closed after {closed_after:?} while the shard took {calls_at_close} calls"
    );
}
