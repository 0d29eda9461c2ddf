//! The client against real hubs on loopback ports: subscribe and receive, sends while
//! disconnected, recovery across cuts on a channel with history (exactly once, in order), a
//! hub restarted on the same port (a new epoch), and max_retries.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::{next_event, wait_for_event, wait_until, within, Proxy, TestHub};
use tokio::net::TcpListener;
use wshub::{HistoryPolicy, HubConfig, Message, PublishPolicy};
use wshub_client::{
    Client, ClientConfig, DisconnectReason, Envelope, Error, Event, Jitter, Position, State,
};

fn history_config() -> HubConfig {
    HubConfig::builder()
        .channel_history(
            "news",
            HistoryPolicy::new(10_000, Duration::from_secs(600)).expect("a history policy"),
        )
        .build()
        .expect("a hub config")
}

fn quick(url: String) -> wshub_client::ClientConfigBuilder {
    ClientConfig::builder(url)
        .initial_backoff(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(500))
        .jitter(Jitter::None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_receive_and_send_while_disconnected_is_an_error() {
    let seen_auth: Arc<Mutex<Vec<String>>> = Arc::default();
    let auth = Arc::clone(&seen_auth);
    let config = HubConfig::builder()
        .publish_policy(PublishPolicy::AllowAll)
        .on_connect(move |_, headers| {
            if let Some(value) = headers.get("authorization") {
                auth.lock()
                    .unwrap()
                    .push(value.to_str().unwrap_or_default().to_owned());
            }
        })
        .build()
        .expect("a hub config");
    let mut hub = TestHub::start(config).await;
    let (client, mut events) = Client::start(
        quick(hub.url())
            .header("Authorization", "Bearer test-key")
            .build()
            .expect("a client config"),
    );
    assert_eq!(next_event(&mut events, "Connected").await, Event::Connected);
    assert_eq!(client.state(), State::Connected);
    // The hub's `on_connect` runs as its side of the upgrade completes, which can be just
    // after the client has read the 101.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen_auth.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(*seen_auth.lock().unwrap(), ["Bearer test-key"]);

    client.subscribe("room").await.expect("subscribe");
    assert_eq!(
        next_event(&mut events, "the acknowledgement").await,
        Event::Subscribed {
            channel: "room".into(),
            recovered: None,
            position: None
        }
    );
    hub.hub
        .send_to_channel("room", &Message::new("chat").with_data("hi"))
        .expect("send to channel");
    match next_event(&mut events, "the hub's message").await {
        Event::Message(m) => {
            assert_eq!(
                (m.kind.as_str(), m.channel.as_deref()),
                ("chat", Some("room"))
            );
            assert_eq!(m.data, Some(json!("hi")));
            assert!(m.timestamp.is_some() && m.offset.is_none());
        }
        other => panic!("expected the message, got {other:?}"),
    }
    client
        .publish("room", json!({"from": "client"}))
        .await
        .expect("publish");
    match next_event(&mut events, "the client's own publication").await {
        Event::Message(m) => assert_eq!(m.data, Some(json!({"from": "client"}))),
        other => panic!("expected the publication, got {other:?}"),
    }
    client.ping().await.expect("ping");
    assert_eq!(next_event(&mut events, "the pong").await, Event::Pong);
    client
        .send(&Envelope::new("subscribe").with_data(42))
        .await
        .expect("send");
    assert!(matches!(
        next_event(&mut events, "the per-client error").await,
        Event::ServerError { .. }
    ));

    // The hub goes away: sends fail at once, nothing is queued.
    hub.shutdown().await;
    let (event, _) = wait_for_event(&mut events, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    assert!(
        matches!(
            event,
            Event::Disconnected {
                reason: DisconnectReason::ServerClosed { code: 1001, .. }
            }
        ),
        "{event:?}"
    );
    assert_ne!(client.state(), State::Connected);
    assert_eq!(client.ping().await, Err(Error::NotConnected));
    assert_eq!(client.publish("room", "x").await, Err(Error::NotConnected));
    assert_eq!(
        client.send(&Envelope::new("ping")).await,
        Err(Error::NotConnected)
    );
    // A subscription while disconnected is registered for the next connection.
    assert_eq!(client.subscribe("later").await, Ok(()));

    within("close", client.close()).await;
    let (event, _) =
        wait_for_event(&mut events, "Closed", |e| matches!(e, Event::Closed { .. })).await;
    assert_eq!(event, Event::Closed { error: None });
    assert!(within("the end of the events", events.recv())
        .await
        .is_none());
    assert_eq!(client.state(), State::Closed);
    assert_eq!(client.ping().await, Err(Error::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_sends_a_close_frame_with_1000() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut ws = tokio_tungstenite::accept_async(stream)
            .await
            .expect("upgrade");
        for _ in 0..100 {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => {
                    let _ = ws.close(None).await;
                    return frame.map(|f| u16::from(f.code));
                }
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
        None
    });
    let (client, mut events) =
        Client::start(quick(format!("ws://{addr}/ws")).build().expect("config"));
    assert_eq!(next_event(&mut events, "Connected").await, Event::Connected);
    within("close", client.close()).await;
    let code = within("the server to see the close", server)
        .await
        .expect("server task");
    assert_eq!(code, Some(1000));
    let (event, _) =
        wait_for_event(&mut events, "Closed", |e| matches!(e, Event::Closed { .. })).await;
    assert_eq!(event, Event::Closed { error: None });
}

/// Dropping every handle stops the client: the hub sees it go, and the events end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_client() {
    let hub = TestHub::start(HubConfig::default()).await;
    let (client, mut events) = Client::start(quick(hub.url()).build().expect("config"));
    assert_eq!(next_event(&mut events, "Connected").await, Event::Connected);
    let other = client.clone();
    drop(client);
    assert_eq!(other.state(), State::Connected, "a clone keeps it running");
    drop(other);
    let (event, _) =
        wait_for_event(&mut events, "Closed", |e| matches!(e, Event::Closed { .. })).await;
    assert_eq!(event, Event::Closed { error: None });
    assert!(within("the end of the events", events.recv())
        .await
        .is_none());
    let hub = hub.hub.clone();
    wait_until("the hub to see the client go", move || {
        hub.client_count() == 0
    })
    .await;
}

/// A server that misbehaves (offsets again, an older offset, then a new epoch): the
/// application sees each offset of an epoch once, in order, and is told of the new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_dropped_and_a_new_epoch_is_announced() {
    use tokio_tungstenite::tungstenite::Message as Frame;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut ws = tokio_tungstenite::accept_async(stream)
            .await
            .expect("upgrade");
        let request = match ws.next().await {
            Some(Ok(Frame::Text(text))) => text.as_str().to_owned(),
            other => panic!("expected the subscribe, got {other:?}"),
        };
        let ack = r#"{"type":"subscribed","channel":"news","data":{"epoch":"e1","offset":0},"timestamp":"t"}"#;
        let mut frames = vec![ack.to_owned()];
        for (offset, epoch) in [
            (1, "e1"),
            (2, "e1"),
            (2, "e1"),
            (1, "e1"),
            (3, "e1"),
            (1, "e2"),
        ] {
            frames.push(format!(
                r#"{{"type":"message","channel":"news","data":{offset},"timestamp":"t","offset":{offset},"epoch":"{epoch}"}}"#
            ));
        }
        frames.push("not json".to_owned());
        for frame in frames {
            ws.send(Frame::text(frame)).await.expect("send");
        }
        // Hold the connection until the client closes it.
        while let Some(Ok(_)) = ws.next().await {}
        request
    });
    let (client, mut events) =
        Client::start(quick(format!("ws://{addr}/ws")).build().expect("config"));
    client.subscribe("news").await.expect("subscribe");
    let mut seen = Vec::new();
    for _ in 0..8 {
        let event = next_event(&mut events, "the server's frames").await;
        seen.push(match event {
            Event::Message(m) => format!("{}@{}", m.offset.unwrap(), m.epoch.unwrap()),
            Event::EpochChanged { epoch, .. } => format!("new epoch {epoch}"),
            Event::Subscribed { .. } => "subscribed".into(),
            Event::Connected => "connected".into(),
            Event::Error(Error::Malformed(_)) => "malformed".into(),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(
        seen,
        [
            "connected",
            "subscribed",
            "1@e1",
            "2@e1",
            "3@e1",
            "new epoch e2",
            "1@e2",
            "malformed"
        ]
    );
    let stats = client.stats();
    assert_eq!(
        (stats.duplicates_dropped, stats.messages, stats.malformed),
        (2, 4, 1)
    );
    assert_eq!(client.position("news"), Some(Position::new(1, "e2")));
    client.close().await;
    let request = within("the fake server", server).await.expect("server");
    let request: serde_json::Value = serde_json::from_str(&request).expect("JSON");
    assert_eq!(request, json!({"type": "subscribe", "data": "news"}));
}

/// 2,000 publications on a channel with history while the client's connection is cut six
/// times (three `Hub::disconnect`s with 4000, three resets of its TCP connection): the
/// application sees every offset once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_recovered_exactly_once_across_cuts() {
    const TOTAL: u64 = 2_000;
    const CUTS_AT: [u64; 6] = [150, 450, 750, 1_050, 1_350, 1_650];
    let started = Instant::now();
    let hub = TestHub::start(history_config()).await;
    let proxy = Proxy::start(hub.addr).await;
    let (client, mut events) = Client::start(
        quick(proxy.url())
            // Room for every event: the test stops reading while it cuts.
            .event_capacity(16_384)
            .build()
            .expect("a client config"),
    );
    client.subscribe("news").await.expect("subscribe");
    let (event, _) = wait_for_event(&mut events, "the first acknowledgement", |e| {
        matches!(e, Event::Subscribed { .. })
    })
    .await;
    let Event::Subscribed {
        recovered: None,
        position: Some(first),
        ..
    } = event
    else {
        panic!("a plain subscribe on a channel with history is acknowledged with its position: {event:?}");
    };
    assert_eq!(first.offset, 0);

    let publisher_hub = hub.hub.clone();
    let publisher = tokio::spawn(async move {
        for n in 1..=TOTAL {
            let message = Message::new("message").with_data(json!({ "n": n }));
            let position = publisher_hub
                .publish_async("news", &message)
                .await
                .expect("publish")
                .expect("a position on a channel with history");
            assert_eq!(position.offset, n);
            if n.is_multiple_of(10) {
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        }
    });

    let mut expected = 1u64;
    let mut cuts = 0u64;
    let mut seen_ids = HashSet::new();
    let mut reconnected = Vec::new();
    let mut delays = Vec::new();
    let mut resumes = Vec::new();
    let mut disconnects = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while expected <= TOTAL {
        assert!(
            Instant::now() < deadline,
            "still streaming after 120 s, at offset {expected}"
        );
        let event = next_event(&mut events, &format!("offset {expected}")).await;
        match event {
            Event::Message(m) => {
                assert_eq!(m.channel.as_deref(), Some("news"));
                assert_eq!(
                    m.offset,
                    Some(expected),
                    "lost, duplicated or out of order after {cuts} cuts"
                );
                assert_eq!(m.epoch, first.epoch);
                assert_eq!(m.data, Some(json!({ "n": expected })));
                if CUTS_AT.contains(&expected) {
                    // Wait for the connection that follows the previous cut, then cut it.
                    let stats_client = client.clone();
                    wait_until("the client to reconnect before the next cut", move || {
                        stats_client.stats().connections == cuts + 1
                    })
                    .await;
                    let id = within("the client's new connection on the hub", async {
                        loop {
                            let fresh = hub
                                .hub
                                .clients()
                                .await
                                .into_iter()
                                .map(|c| c.info.id)
                                .find(|id| !seen_ids.contains(id));
                            if let Some(id) = fresh {
                                return id;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    })
                    .await;
                    seen_ids.insert(id);
                    if cuts.is_multiple_of(2) {
                        hub.hub.disconnect(id, 4000, "test").expect("disconnect");
                    } else {
                        assert!(proxy.cut() >= 1, "a live connection through the proxy");
                    }
                    cuts += 1;
                }
                expected += 1;
            }
            Event::Disconnected { reason } => disconnects.push(reason),
            Event::Reconnecting { attempt, delay } => delays.push((attempt, delay)),
            Event::Reconnected { attempt } => reconnected.push(attempt),
            Event::Subscribed {
                recovered,
                position,
                ..
            } => resumes.push((recovered, position)),
            Event::Connected => {}
            other => panic!("unexpected event at offset {expected}: {other:?}"),
        }
    }
    within("the publisher", publisher).await.expect("publisher");

    assert_eq!(cuts, 6);
    let stats = client.stats();
    println!(
        "2,000 offsets across 6 cuts in {:?}: {stats:?}, disconnects {disconnects:?}, \
         resumes {resumes:?}",
        started.elapsed()
    );
    assert_eq!(stats.reconnects, 6, "{stats:?}");
    assert_eq!(reconnected, [1; 6], "each cut took one attempt");
    assert_eq!(
        delays,
        [(1, Duration::from_millis(20)); 6],
        "each reconnection waited the initial backoff"
    );
    assert_eq!(resumes.len(), 6);
    let replayed: u64 = resumes
        .iter()
        .zip(CUTS_AT)
        .map(|((_, position), cut)| position.as_ref().map_or(0, |p| p.offset - cut))
        .sum();
    assert!(
        replayed > 0,
        "the publisher should have gone on during some cuts, so that recovery was needed: {resumes:?}"
    );
    for (recovered, position) in &resumes {
        assert_eq!(
            *recovered,
            Some(true),
            "every resume recovered: {resumes:?}"
        );
        assert_eq!(position.as_ref().and_then(|p| p.epoch.clone()), first.epoch);
    }
    assert!(disconnects.contains(&DisconnectReason::ServerClosed {
        code: 4000,
        reason: "test".into()
    }));
    assert_eq!(stats.messages, TOTAL);
    assert_eq!(
        client.position("news"),
        Some(Position {
            offset: TOTAL,
            epoch: first.epoch.clone()
        })
    );
    client.close().await;
}

/// The hub restarts on the same port: the client retries with a growing backoff until the new
/// hub is up, resumes with its old position, is told `recovered: false` with the new epoch,
/// and receives the new hub's messages (offsets from 1 again, not dropped as duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_hub_is_a_new_epoch() {
    let mut old = TestHub::start(history_config()).await;
    let addr = old.addr;
    let (client, mut events) = Client::start(
        quick(old.url())
            .initial_backoff(Duration::from_millis(50))
            .max_backoff(Duration::from_secs(2))
            .build()
            .expect("a client config"),
    );
    client.subscribe("news").await.expect("subscribe");
    let (event, _) = wait_for_event(&mut events, "the acknowledgement", |e| {
        matches!(e, Event::Subscribed { .. })
    })
    .await;
    let Event::Subscribed {
        position: Some(old_position),
        ..
    } = event
    else {
        panic!("expected a position: {event:?}");
    };
    for n in 1..=5u64 {
        old.hub
            .publish("news", &Message::new("message").with_data(n))
            .expect("publish");
    }
    for n in 1..=5u64 {
        match next_event(&mut events, "the old hub's messages").await {
            Event::Message(m) => {
                assert_eq!(m.offset, Some(n));
                assert_eq!(m.epoch, old_position.epoch);
            }
            other => panic!("expected message {n}, got {other:?}"),
        }
    }

    old.shutdown().await;
    wait_for_event(&mut events, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    // Two attempts fail while no hub listens, each after a longer wait.
    let (_, mut before) = wait_for_event(&mut events, "the second failed attempt", |e| {
        matches!(e, Event::ConnectFailed { attempt: 2, .. })
    })
    .await;
    assert!(
        before
            .iter()
            .any(|e| matches!(e, Event::ConnectFailed { attempt: 1, .. })),
        "{before:?}"
    );

    let new = TestHub::start_on(history_config(), addr).await;
    let (_, after) = wait_for_event(&mut events, "Reconnected", |e| {
        matches!(e, Event::Reconnected { .. })
    })
    .await;
    before.extend(after);
    let delays: Vec<Duration> = before
        .iter()
        .filter_map(|e| match e {
            Event::Reconnecting { delay, .. } => Some(*delay),
            _ => None,
        })
        .collect();
    assert!(delays.len() >= 2, "{before:?}");
    assert_eq!(delays[0], Duration::from_millis(50));
    assert!(
        delays
            .windows(2)
            .all(|w| w[1] == w[0] * 2 || w[1] == Duration::from_secs(2)),
        "the backoff doubles: {delays:?}"
    );

    let (event, _) = wait_for_event(&mut events, "the resumed acknowledgement", |e| {
        matches!(e, Event::Subscribed { .. })
    })
    .await;
    let Event::Subscribed {
        channel,
        recovered,
        position: Some(new_position),
    } = event
    else {
        panic!("expected a position: {event:?}");
    };
    assert_eq!(channel, "news");
    assert_eq!(recovered, Some(false), "a new epoch cannot be recovered");
    assert_ne!(new_position.epoch, old_position.epoch);
    assert_eq!(new_position.offset, 0);

    for n in 1..=3u64 {
        new.hub
            .publish("news", &Message::new("message").with_data(n))
            .expect("publish on the new hub");
    }
    for n in 1..=3u64 {
        match next_event(&mut events, "the new hub's messages").await {
            Event::Message(m) => {
                assert_eq!(m.offset, Some(n));
                assert_eq!(m.epoch, new_position.epoch);
            }
            other => panic!("expected message {n} of the new epoch, got {other:?}"),
        }
    }
    assert_eq!(client.stats().duplicates_dropped, 0);
    assert_eq!(client.position("news").map(|p| p.offset), Some(3));
    client.close().await;
}

/// With the hub gone and max_retries 3, the client gives up after three attempts, with
/// growing waits between them; from the start too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_is_honoured() {
    let mut hub = TestHub::start(HubConfig::default()).await;
    let (client, mut events) = Client::start(
        quick(hub.url())
            .max_retries(3)
            .build()
            .expect("a client config"),
    );
    assert_eq!(next_event(&mut events, "Connected").await, Event::Connected);
    let started = Instant::now();
    hub.shutdown().await;
    let (event, before) =
        wait_for_event(&mut events, "Closed", |e| matches!(e, Event::Closed { .. })).await;
    let Event::Closed {
        error: Some(Error::GaveUp { attempts: 3, .. }),
    } = event
    else {
        panic!("expected to give up after 3 attempts: {event:?}");
    };
    let attempts: Vec<u32> = before
        .iter()
        .filter_map(|e| match e {
            Event::ConnectFailed { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    let waits: Vec<(u32, Duration)> = before
        .iter()
        .filter_map(|e| match e {
            Event::Reconnecting { attempt, delay } => Some((*attempt, *delay)),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [1, 2, 3], "{before:?}");
    assert_eq!(
        waits,
        [
            (1, Duration::from_millis(20)),
            (2, Duration::from_millis(40)),
            (3, Duration::from_millis(80))
        ]
    );
    assert!(started.elapsed() >= Duration::from_millis(140));
    assert!(within("the end of the events", events.recv())
        .await
        .is_none());
    assert_eq!(client.state(), State::Closed);
    assert_eq!(client.stats().failed_attempts, 3);
    assert_eq!(client.ping().await, Err(Error::Closed));

    // Never connected: the first attempt is at once, then the waits.
    let unused = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    };
    let (client, mut events) = Client::start(
        quick(format!("ws://{unused}/ws"))
            .max_retries(2)
            .build()
            .expect("a client config"),
    );
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_event(&mut events, "the attempts").await);
    }
    assert!(
        matches!(
            seen.as_slice(),
            [
                Event::ConnectFailed { attempt: 1, .. },
                Event::Reconnecting { attempt: 2, .. },
                Event::ConnectFailed { attempt: 2, .. },
                Event::Closed {
                    error: Some(Error::GaveUp { attempts: 2, .. })
                },
            ]
        ),
        "{seen:?}"
    );
    assert_eq!(client.state(), State::Closed);
}

/// The root README's "Rust client" example is the crate README's, which is compiled as the
/// crate's doc test.
#[test]
fn the_root_readme_shows_the_compiled_example() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let example = |path: &str| {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let start = text
            .find("```rust,no_run\nuse std::time::Duration;\nuse wshub_client")
            .unwrap_or_else(|| panic!("{path} has no client example"));
        let end = start + text[start..].find("\n```\n").expect("the end of the block");
        text[start..end].to_owned()
    };
    assert_eq!(
        example(&format!("{dir}/../README.md")),
        example(&format!("{dir}/README.md")),
        "the root README's Rust client example must be the crate README's (compiled) one"
    );
}
