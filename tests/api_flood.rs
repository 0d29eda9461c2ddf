//! A server-side API flood is bounded: a thread calling `Hub::unsubscribe` in a loop, as
//! fast as it can, for a client whose shard cannot keep up, is refused with an overload
//! error once the shard's inbox holds its bound, rather than growing memory.
//!
//! A test binary of its own with a single test: it measures this process's RSS, which any
//! other test running beside it would disturb.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use wshub::HubConfig;

/// The bound on each shard's inbox. With the default (64 MiB) the shard kept up with the
/// thread on this machine (3.5 million calls in 3 s, none refused, at most 11 MB waiting),
/// so the bound was never reached; at 1 MiB it is, and the refusals can be counted.
const BACKLOG: usize = 1 << 20;
/// The most this process's RSS may grow during the flood. The inbox holds at most 1 MiB of
/// `Command::cost` (a command's size and its channel name; the name's `Arc<str>` is a
/// separate allocation the cost undercounts), so a few MiB at most; the rest is the
/// allocator's arenas for the flooding thread and the runtime. Measured: see the printed
/// figures (+1.7 and +1.9 MiB in two runs). 16 MiB fails an inbox that grows with the
/// flood (millions of calls a second).
const RSS_GROWTH_LIMIT_KIB: u64 = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.load(Ordering::Acquire) {
                peak = peak.max(rss_kib());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak.max(rss_kib())
        })
    };
    let flood = {
        let hub = hub.clone();
        std::thread::spawn(move || {
            let (mut accepted, mut refused) = (0u64, 0u64);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(3) {
                match hub.unsubscribe(id, "x") {
                    Ok(()) => accepted += 1,
                    Err(err) if err.is_overloaded() => refused += 1,
                    Err(err) => panic!("unsubscribe failed otherwise: {err}"),
                }
            }
            (accepted, refused)
        })
    };
    let (accepted, refused) = tokio::task::spawn_blocking(move || flood.join())
        .await
        .unwrap()
        .expect("the flooding thread panicked");
    let backlog_after = hub.stats().shard_backlog_bytes;
    stop.store(true, Ordering::Release);
    let peak = within("the sampler", sampler).await.unwrap();
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
    // The bound engaged: the thread outruns the shard and is told so, rather than waiting
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
