//! Churn: 20 rounds of 1,000 clients that connect, subscribe to three channels each and
//! leave (close handshake, FIN or RST) bring the counts of clients, channels, connection tasks
//! and queued bytes back to zero after every round. The process's RSS before, after the first
//! round and after the last is printed (run with `--nocapture`); the test asserts on the
//! counts, not on RSS. A test binary of its own, so that the RSS is this test's alone.

mod support;

use std::net::SocketAddr;
use std::time::Instant;

use serde_json::json;
use support::*;
use wshub::Message;

const ROUNDS: usize = 20;
const PER_ROUND: usize = 1_000;
const ROOMS: usize = 50;

/// A client that subscribes to `all`, one of [`ROOMS`] rooms and a channel of its own (three
/// subscribe frames in one write), and reads the three acknowledgements.
async fn churn_client(addr: SocketAddr, round: usize, i: usize) -> Raw {
    let mut raw = Raw::connect(addr).await;
    let mut frames = Vec::new();
    for channel in [
        "all".to_owned(),
        format!("room:{}", i % ROOMS),
        format!("own:{round}:{i}"),
    ] {
        frames.extend(client_frame(
            FIN | OP_TEXT,
            json!({"type": "subscribe", "data": channel})
                .to_string()
                .as_bytes(),
        ));
    }
    raw.send(&frames).await;
    for _ in 0..3 {
        let ack = raw.read_text().await;
        assert!(ack.starts_with(r#"{"type":"subscribed""#), "{ack}");
    }
    raw
}

/// Leaves in one of three ways: the close handshake, a FIN, or a RST.
async fn leave(mut raw: Raw, i: usize) {
    match i % 3 {
        0 => {
            raw.send_close(1000).await;
            assert_eq!(raw.read_close().await.0, 1000);
            raw.read_to_end().await;
        }
        1 => drop(raw),
        _ => reset(raw.stream),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_20_rounds_of_1000_clients_leaves_no_growth() {
    wshub::raise_fd_limit().unwrap();
    let server = Server::default_hub().await;
    let hub = server.hub.clone();
    let addr = server.addr;
    wait_for_baseline(&hub, 0, 0).await;
    let rss_before = rss_kib();
    let started = Instant::now();
    let mut rss_after_first = 0;
    for round in 0..ROUNDS {
        let mut clients = Vec::with_capacity(PER_ROUND);
        for chunk in 0..PER_ROUND / 100 {
            let connecting: Vec<_> = (chunk * 100..(chunk + 1) * 100)
                .map(|i| tokio::spawn(churn_client(addr, round, i)))
                .collect();
            for task in connecting {
                clients.push(within("a churn client", task).await.unwrap());
            }
        }
        let stats = hub.stats();
        assert_eq!(stats.clients, PER_ROUND, "round {round}: {stats:?}");
        assert_eq!(
            stats.connection_tasks, PER_ROUND,
            "round {round}: {stats:?}"
        );
        assert_eq!(
            stats.channels,
            1 + ROOMS + PER_ROUND,
            "round {round}: {stats:?}"
        );
        // Something to deliver while they leave.
        hub.send_to_channel("all", &Message::new("bye")).unwrap();

        let leaving: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, raw)| tokio::spawn(leave(raw, i)))
            .collect();
        for task in leaving {
            within("a client to leave", task).await.unwrap();
        }
        wait_for_baseline(&hub, 0, 0).await;
        if round == 0 {
            rss_after_first = rss_kib();
        }
    }
    let rss_after = rss_kib();
    println!(
        "churn: {ROUNDS} rounds of {PER_ROUND} clients (3 subscriptions each) in {:?}; \
         process RSS {rss_before} KiB before, {rss_after_first} KiB after the first round, \
         {rss_after} KiB after the last",
        started.elapsed()
    );
    let stats = hub.stats();
    assert_eq!(stats.clients, 0, "{stats:?}");
    assert_eq!(stats.channels, 0, "{stats:?}");
    assert_eq!(stats.connection_tasks, 0, "{stats:?}");
    assert_eq!(stats.queued_bytes, 0, "{stats:?}");
    assert!(hub.clients().await.is_empty());
    assert!(hub.channels().is_empty());
}
