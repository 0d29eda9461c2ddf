//! A server-side API flood is bounded: a thread calling `Hub::unsubscribe` in a loop, as
//! fast as it can, for a client whose shard cannot keep up, is refused with an overload
//! error once the shard's inbox holds its bound, rather than growing memory.
//!
//! "Cannot keep up" is made certain rather than left to the scheduler: the hub runs on a
//! one-thread runtime that the test blocks while the thread floods, so the shard takes
//! nothing out of its inbox meanwhile (on two threads the shard sometimes kept up, and the
//! bound was never reached).
//!
//! A test binary of its own with a single test: it measures this process's RSS, which any
//! other test running beside it would disturb.

mod support;

use std::time::{Duration, Instant};

use support::*;
use wshub::HubConfig;

/// The bound on each shard's inbox: small, so that the memory it allows is small beside the
/// growth the test allows.
const BACKLOG: usize = 1 << 20;
/// The most this process's RSS may grow during the flood. The inbox holds at most 1 MiB of
/// `Command::cost` (a command's size and its channel name; the name's `Arc<str>` is a
/// separate allocation the cost undercounts), so a few MiB at most; the rest is the
/// allocator's arenas for the flooding thread and the runtime. Measured: see the printed
/// figures. 16 MiB fails an inbox that grows with the flood (millions of calls a second).
const RSS_GROWTH_LIMIT_KIB: u64 = 16 * 1024;

#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_server_side_calls_is_bounded_and_each_refusal_counted() {
    // Strict go-ws mode: an unsubscribe sends the client nothing, so only the inbox grows.
    let config = HubConfig::builder()
        .strict_go_ws(true)
        .shard_backlog_bytes(BACKLOG)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let mut client = server.connect().await;
    let id = server.newest_client().await;

    let baseline = rss_kib();
    let flood = {
        let hub = hub.clone();
        std::thread::spawn(move || {
            let (mut accepted, mut refused, mut peak) = (0u64, 0u64, 0u64);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(3) {
                match hub.unsubscribe(id, "x") {
                    Ok(()) => accepted += 1,
                    Err(err) if err.is_overloaded() => refused += 1,
                    Err(err) => panic!("unsubscribe failed otherwise: {err}"),
                }
                if (accepted + refused).is_multiple_of(10_000) {
                    peak = peak.max(rss_kib());
                }
            }
            (
                accepted,
                refused,
                peak.max(rss_kib()),
                hub.stats().shard_backlog_bytes,
            )
        })
    };
    // Blocks this one-thread runtime, and with it the shard, until the flood is over.
    let (accepted, refused, peak, backlog_after) =
        flood.join().expect("the flooding thread panicked");
    let growth = peak.saturating_sub(baseline);
    let hub2 = hub.clone();
    wait_until("every shard's backlog to drain", move || {
        hub2.stats().shard_backlog_bytes.iter().all(|&b| b == 0)
    })
    .await;
    let stats = hub.stats();
    println!(
        "api flood: {accepted} unsubscribes accepted, {refused} refused in 3 s; backlog when \
         the thread stopped {backlog_after:?}; RSS baseline {baseline} KiB, peak {peak} KiB \
         (+{growth} KiB, limit {RSS_GROWTH_LIMIT_KIB}); backlog_refused {}",
        stats.backlog_refused
    );

    assert!(accepted > 0, "the shard took calls while it had room");
    // The bound engaged: the thread outran the shard and was told so, rather than waiting
    // or growing the inbox.
    assert!(refused > 0, "no call was refused: the bound never engaged");
    assert!(
        backlog_after.iter().all(|&b| b <= BACKLOG + 1024),
        "a backlog over its bound: {backlog_after:?}"
    );
    assert!(
        growth < RSS_GROWTH_LIMIT_KIB,
        "RSS grew by {growth} KiB during the flood, over {RSS_GROWTH_LIMIT_KIB} KiB"
    );
    // Every refusal is counted, and nothing else was refused.
    assert_eq!(stats.backlog_refused, refused, "{stats:?}");
    // The client was never affected: still connected and served.
    assert_eq!(hub.client_count(), 1);
    assert_eq!(stats.slow_consumer_disconnects, 0, "{stats:?}");
    send_text(&mut client, r#"{"type":"subscribe","data":"after"}"#).await;
    let hub2 = hub.clone();
    wait_until("the client's subscribe after the flood", move || {
        hub2.channel_subscriber_count("after") == 1
    })
    .await;
}
