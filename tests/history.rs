//! Channel history and recovery (PROTOCOL.md, "History and recovery"), rule by rule, over
//! real loopback sockets:
//!
//! - offsets and epochs on the wire: from 1 without gaps, the last two keys after `timestamp`,
//!   on every type sent to a history channel and on nothing else;
//! - the position in every acknowledgement, `since` replay then live delivery exactly once and
//!   in order, each case where `recovered` is false, `since` without an epoch, a `since` while
//!   subscribed, an unsubscribe during a replay, malformed `since`, strict go-ws mode;
//! - clients that drop their connections at random and resume while four publishers stream
//!   (the key property: every client ends with every offset exactly once, in order);
//! - slow consumers on history channels (cut with 4000, never a silent gap; then recovered),
//!   a repeated subscribe while publications are queued, a long replay beside a live channel;
//! - `Hub::publish` positions and `Hub::history` pages.
//!
//! Every wait is bounded; the figures of the long tests are printed (`--nocapture`).

mod support;

use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use wshub::{HistoryPolicy, Hub, HubConfig, Message, PublishPolicy, SlowConsumerPolicy};

const NEWS: &str = "news";
/// An age no test reaches: histories trimmed by count or memory only.
const LONG: Duration = Duration::from_secs(3600);

/// The history policy of a channel that keeps `count` publications for `max_age`.
fn policy(count: usize, max_age: Duration) -> HistoryPolicy {
    HistoryPolicy::new(count, max_age).expect("a valid history policy")
}

/// A hub whose channel [`NEWS`] keeps its last `count` publications.
async fn news_server(count: u64) -> Server {
    let config = HubConfig::builder()
        .channel_history(NEWS, policy(count as usize, LONG))
        .history_memory_budget(64 << 20)
        .build()
        .unwrap();
    Server::start(config).await
}

/// The tests that stream megabytes or measure time take turns, so that none measures another's
/// load (a tokio mutex: held across awaits, and shared by every test's runtime).
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// `"text"` as a JSON string literal.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A `tick` whose data is `{"seq": seq, "pad": "xxx…"}` with `pad` bytes of padding.
fn tick(seq: u64, pad: usize) -> Message {
    Message::new("tick").with_data(json!({"seq": seq, "pad": "x".repeat(pad)}))
}

/// Publishes `tick(seq)` for every `seq` of `seqs` on `channel` with `Hub::publish_async`
/// (which waits for room rather than refusing), asserting that each gets offset `seq` (the
/// tests publish nothing else there) in one epoch, and returns that epoch.
async fn publish_ticks(hub: &Hub, channel: &str, seqs: RangeInclusive<u64>, pad: usize) -> String {
    let mut epoch: Option<String> = None;
    for seq in seqs {
        let position = within(
            "a publish_async",
            hub.publish_async(channel, &tick(seq, pad)),
        )
        .await
        .unwrap_or_else(|err| panic!("publish {seq} on {channel} failed: {err}"))
        .unwrap_or_else(|| panic!("publish {seq} on {channel}: no position (no history?)"));
        assert_eq!(
            position.offset, seq,
            "the offset of publication {seq} on {channel}"
        );
        match &epoch {
            Some(epoch) => assert_eq!(&*position.epoch, epoch, "the epoch of publication {seq}"),
            None => epoch = Some(position.epoch.to_string()),
        }
    }
    epoch.expect("at least one publication")
}

/// Reads the ticks `seqs` of `channel`: each the next message, with offset `seq` in `epoch`
/// and `data.seq` equal to its offset.
async fn expect_ticks(ws: &mut Ws, channel: &str, seqs: RangeInclusive<u64>, epoch: &str) {
    let mut progress = Progress::new(format!("ticks {seqs:?} of {channel}"));
    for seq in seqs {
        let text = progress.wait(next_text(ws)).await;
        let message = parse(&text);
        assert_eq!(
            message["channel"], channel,
            "expected tick {seq} of {channel}, got {text}"
        );
        assert_eq!(
            position_of(&text),
            (seq, epoch.to_owned()),
            "expected offset {seq} in epoch {epoch}, got {text}"
        );
        assert_eq!(message["data"]["seq"], seq, "the payload of offset {seq}");
        progress.advanced();
    }
}

/// Asserts that the next message is `expected_without_timestamp` + `timestamp` + the position
/// (`offset`, `epoch`), exactly and in that key order.
async fn expect_at(ws: &mut Ws, expected_without_timestamp: &str, offset: u64, epoch: &str) {
    let text = next_text(ws).await;
    let suffix = format!(",\"offset\":{offset},\"epoch\":{}}}", quoted(epoch));
    let Some(head) = text.strip_suffix(&suffix) else {
        panic!(
            "expected {expected_without_timestamp} ending with\n  {suffix}\n(timestamp, then \
             offset {offset} and epoch as the last keys), got\n  {text}"
        );
    };
    assert_envelope(&format!("{head}}}"), expected_without_timestamp);
}

/// Asserts the next message is exactly `expected_without_timestamp` + `timestamp`: no
/// position.
async fn expect_plain(ws: &mut Ws, expected_without_timestamp: &str) {
    let text = next_text(ws).await;
    assert!(
        tail_position(&text).is_none(),
        "a message that carries no offset has one: {text}"
    );
    assert_envelope(&text, expected_without_timestamp);
}

/// A raw client with a 4 KiB receive buffer: what it does not read waits in the hub (a
/// replay stays in progress, live frames stay queued).
async fn slow_socket(server: &Server) -> Raw {
    let stream = connect_with_recv_buffer(server.addr, 4096).await;
    Raw::handshake(stream, server.addr).await
}

/// Reads frames, each the offset after `*last` in `epoch` (advancing `*last`), until a
/// message of type `kind`, and returns that message's text. `what` names the stream.
async fn offsets_until(
    raw: &mut Raw,
    kind: &str,
    last: &mut u64,
    epoch: &str,
    what: &str,
) -> String {
    let start = format!(r#"{{"type":{}"#, quoted(kind));
    let mut progress = Progress::new(format!("{what}, then {kind}"));
    loop {
        let text = progress.wait(raw.read_text()).await;
        progress.advanced();
        if text.starts_with(&start) {
            return text;
        }
        assert_eq!(
            position_of(&text),
            (*last + 1, epoch.to_owned()),
            "{what}: in order, before the {kind}"
        );
        *last += 1;
    }
}

/// Reads the frames `seqs`, each the next one, with that offset in `epoch`.
async fn expect_offsets(raw: &mut Raw, seqs: RangeInclusive<u64>, epoch: &str, what: &str) {
    let mut progress = Progress::new(format!("{what}: {seqs:?}"));
    for seq in seqs {
        let text = progress.wait(raw.read_text()).await;
        assert_eq!(
            position_of(&text),
            (seq, epoch.to_owned()),
            "{what}: exactly once and in order"
        );
        progress.advanced();
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Offsets and epochs on the wire
// ---------------------------------------------------------------------------------------------

/// Every type sent to a history channel carries `offset` and `epoch` as the last two keys,
/// after `timestamp`, counting from 1 without gaps per channel in one epoch; broadcasts,
/// per-client sends, sends to a channel without history, acknowledgements, errors and pongs
/// carry none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_count_from_one_and_come_last_after_the_timestamp() {
    let config = HubConfig::builder()
        .channel_history(NEWS, policy(100, LONG))
        .prefix_history("process:", policy(100, LONG))
        .publish_policy(PublishPolicy::AllowAll)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = &server.hub;
    let mut ws = server.connect().await;
    let me = server.newest_client().await;
    let (offset, news) = ack_position(&subscribe_since(&mut ws, NEWS, None).await);
    assert_eq!(offset, 0, "a fresh channel");
    let (offset, build) = ack_position(&subscribe_since(&mut ws, "process:build-1", None).await);
    assert_eq!(offset, 0, "a fresh prefix-history channel");
    // A channel without history: acknowledged as before, without data.
    send_text(&mut ws, &subscribe_request("plain", None)).await;
    expect_plain(&mut ws, r#"{"type":"subscribed","channel":"plain"}"#).await;

    // `message`, from a client's publish.
    let mut publisher = server.connect().await;
    send_json(
        &mut publisher,
        &json!({"type": "publish", "channel": NEWS, "data": {"text": "hi"}}),
    )
    .await;
    expect_at(
        &mut ws,
        r#"{"type":"message","channel":"news","data":{"text":"hi"}}"#,
        1,
        &news,
    )
    .await;
    // An application's own type, and `message` from the hub.
    hub.send_to_channel(NEWS, &Message::new("tick").with_data(json!({"n": 2})))
        .unwrap();
    expect_at(
        &mut ws,
        r#"{"type":"tick","channel":"news","data":{"n":2}}"#,
        2,
        &news,
    )
    .await;
    // `process_output` and `process_status`, on a channel with a prefix history.
    hub.send_process_output("build-1", "Compiling...").unwrap();
    expect_at(
        &mut ws,
        r#"{"type":"process_output","channel":"process:build-1","processId":"build-1","data":"Compiling..."}"#,
        1,
        &build,
    )
    .await;
    hub.send_process_output("build-1", "Finished").unwrap();
    expect_at(
        &mut ws,
        r#"{"type":"process_output","channel":"process:build-1","processId":"build-1","data":"Finished"}"#,
        2,
        &build,
    )
    .await;
    hub.send_process_status("build-1", "exited", 0).unwrap();
    expect_at(
        &mut ws,
        r#"{"type":"process_status","channel":"process:build-1","processId":"build-1","data":{"status":"exited","exitCode":0}}"#,
        3,
        &build,
    )
    .await;
    hub.send_to_channel(NEWS, &Message::new("message").with_data("three"))
        .unwrap();
    expect_at(
        &mut ws,
        r#"{"type":"message","channel":"news","data":"three"}"#,
        3,
        &news,
    )
    .await;

    // Nothing else carries a position.
    hub.send_to_channel("plain", &Message::new("tick").with_data(1))
        .unwrap();
    expect_plain(&mut ws, r#"{"type":"tick","channel":"plain","data":1}"#).await;
    hub.send_event("user_joined", json!({"id": 7})).unwrap();
    expect_plain(
        &mut ws,
        r#"{"type":"event","data":{"event":"user_joined","data":{"id":7}}}"#,
    )
    .await;
    hub.broadcast(&Message::new("notice").with_data("all"))
        .unwrap();
    expect_plain(&mut ws, r#"{"type":"notice","data":"all"}"#).await;
    // A per-client send that names a history channel is still not a publication to it.
    hub.send_to_client(me, &Message::new("direct").with_channel(NEWS).with_data(1))
        .unwrap();
    expect_plain(&mut ws, r#"{"type":"direct","channel":"news","data":1}"#).await;
    send_text(&mut ws, r#"{"type":"ping"}"#).await;
    expect_plain(&mut ws, r#"{"type":"pong"}"#).await;
    send_text(&mut ws, "not json").await;
    expect_plain(&mut ws, r#"{"type":"error","data":"malformed message"}"#).await;
    // A repeated subscribe's ack carries the position in `data` only.
    send_text(&mut ws, &subscribe_request(NEWS, None)).await;
    expect_plain(
        &mut ws,
        &format!(
            r#"{{"type":"subscribed","channel":"news","data":{{"epoch":{},"offset":3}}}}"#,
            quoted(&news)
        ),
    )
    .await;
    send_json(&mut ws, &json!({"type": "unsubscribe", "data": NEWS})).await;
    expect_plain(&mut ws, r#"{"type":"unsubscribed","channel":"news"}"#).await;

    // The positions continue without gaps after all that.
    assert_eq!(
        hub.publish(NEWS, &Message::new("tick"))
            .unwrap()
            .map(|p| p.offset),
        Some(4)
    );
    assert_eq!(
        hub.publish("process:build-1", &Message::new("tick"))
            .unwrap()
            .map(|p| (p.offset, p.epoch.to_string())),
        Some((4, build))
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The position in every acknowledgement
// ---------------------------------------------------------------------------------------------

/// `{"type":"subscribed","channel":"news","data":{"epoch":E,"offset":N}}` + timestamp.
fn position_ack(epoch: &str, offset: u64) -> String {
    format!(
        r#"{{"type":"subscribed","channel":"news","data":{{"epoch":{},"offset":{offset}}}}}"#,
        quoted(epoch)
    )
}

/// A fresh channel acks offset 0; after five publications a new subscriber gets 5; a repeated
/// plain subscribe gets the last offset already sent or queued to that client; a server-side
/// subscribe gets the position too; a client that unsubscribed and comes back gets the latest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscribe_ack_on_a_history_channel_carries_the_position() {
    let server = news_server(100).await;
    let hub = &server.hub;
    let mut first = server.connect().await;
    send_text(&mut first, &subscribe_request(NEWS, None)).await;
    let text = next_text(&mut first).await;
    let (offset, epoch) = ack_position(&parse(&text));
    assert_eq!(offset, 0, "a fresh channel's position: {text}");
    assert_envelope(&text, &position_ack(&epoch, 0));

    assert_eq!(
        publish_ticks(hub, NEWS, 1..=5, 0).await,
        epoch,
        "the ack's epoch"
    );
    expect_ticks(&mut first, NEWS, 1..=5, &epoch).await;

    let mut second = server.connect().await;
    send_text(&mut second, &subscribe_request(NEWS, None)).await;
    assert_envelope(&next_text(&mut second).await, &position_ack(&epoch, 5));

    // Repeated, with everything read: the last offset sent.
    send_text(&mut first, &subscribe_request(NEWS, None)).await;
    assert_envelope(&next_text(&mut first).await, &position_ack(&epoch, 5));

    // Repeated, with 6..=8 published before the request: they come first, then the ack with 8.
    publish_ticks(hub, NEWS, 6..=8, 0).await;
    send_text(&mut first, &subscribe_request(NEWS, None)).await;
    expect_ticks(&mut first, NEWS, 6..=8, &epoch).await;
    assert_envelope(&next_text(&mut first).await, &position_ack(&epoch, 8));
    expect_ticks(&mut second, NEWS, 6..=8, &epoch).await;

    // Server-side subscribes are acknowledged with the position as well.
    let mut third = server.connect().await;
    let id = server.newest_client().await;
    hub.subscribe(id, NEWS).unwrap();
    assert_envelope(&next_text(&mut third).await, &position_ack(&epoch, 8));

    // Out and back in: the latest offset, and live from the next one.
    send_json(&mut first, &json!({"type": "unsubscribe", "data": NEWS})).await;
    assert_eq!(next_json(&mut first).await["type"], "unsubscribed");
    publish_ticks(hub, NEWS, 9..=9, 0).await;
    send_text(&mut first, &subscribe_request(NEWS, None)).await;
    assert_envelope(&next_text(&mut first).await, &position_ack(&epoch, 9));
    publish_ticks(hub, NEWS, 10..=10, 0).await;
    expect_ticks(&mut first, NEWS, 10..=10, &epoch).await;
    sync(&mut first).await;
}

// ---------------------------------------------------------------------------------------------
// 3.–5. Resuming with `since`
// ---------------------------------------------------------------------------------------------

/// Asserts a `since` acknowledgement's data is exactly
/// `{"recovered":recovered,"epoch":epoch,"offset":offset}`.
fn assert_recovery(ack: &Value, recovered: bool, epoch: &str, offset: u64) {
    assert_eq!(
        ack["data"],
        json!({"recovered": recovered, "epoch": epoch, "offset": offset}),
        "the ack {ack}"
    );
}

/// Ten published with nobody subscribed; a client that saw 1..=4 resumes: the ack says
/// recovered at 10, then 5..=10 (replay), then 11 and 12 (live), each once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_replays_what_was_missed_then_continues_live() {
    let server = news_server(100).await;
    let hub = &server.hub;
    let epoch = publish_ticks(hub, NEWS, 1..=10, 0).await;
    let mut ws = server.connect().await;
    send_text(&mut ws, &subscribe_request(NEWS, Some((4, Some(&epoch))))).await;
    let text = next_text(&mut ws).await;
    assert_envelope(
        &text,
        &format!(
            r#"{{"type":"subscribed","channel":"news","data":{{"recovered":true,"epoch":{},"offset":10}}}}"#,
            quoted(&epoch)
        ),
    );
    expect_ticks(&mut ws, NEWS, 5..=10, &epoch).await;
    publish_ticks(hub, NEWS, 11..=12, 0).await;
    expect_ticks(&mut ws, NEWS, 11..=12, &epoch).await;
    // Nothing repeated after that: the pong is next.
    sync(&mut ws).await;
}

/// `since.epoch` is not the current epoch: not recovered, and the current epoch is replayed
/// from the first offset the history holds (4, with a history of 5 after 8 publications).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_another_epoch_replays_the_current_epoch_from_its_start() {
    let server = news_server(5).await;
    let epoch = publish_ticks(&server.hub, NEWS, 1..=8, 0).await;
    let other = format!("{epoch}-not");
    let mut ws = server.connect().await;
    let ack = subscribe_since(&mut ws, NEWS, Some((3, Some(&other)))).await;
    assert_recovery(&ack, false, &epoch, 8);
    expect_ticks(&mut ws, NEWS, 4..=8, &epoch).await;
    publish_ticks(&server.hub, NEWS, 9..=9, 0).await;
    expect_ticks(&mut ws, NEWS, 9..=9, &epoch).await;
    sync(&mut ws).await;
}

/// `since.offset` beyond the latest offset: not recovered, nothing replayed, live follows.
/// `since.offset` equal to the latest: recovered, nothing to replay, live follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_at_or_beyond_the_latest_offset_replays_nothing() {
    let server = news_server(100).await;
    let epoch = publish_ticks(&server.hub, NEWS, 1..=5, 0).await;
    let mut beyond = server.connect().await;
    let ack = subscribe_since(&mut beyond, NEWS, Some((9, Some(&epoch)))).await;
    assert_recovery(&ack, false, &epoch, 5);
    sync(&mut beyond).await;
    // The largest offset there is, too.
    let mut far = server.connect().await;
    let ack = subscribe_since(&mut far, NEWS, Some((u64::MAX, None))).await;
    assert_recovery(&ack, false, &epoch, 5);
    sync(&mut far).await;
    let mut at = server.connect().await;
    let ack = subscribe_since(&mut at, NEWS, Some((5, Some(&epoch)))).await;
    assert_recovery(&ack, true, &epoch, 5);
    sync(&mut at).await;

    publish_ticks(&server.hub, NEWS, 6..=6, 0).await;
    expect_ticks(&mut beyond, NEWS, 6..=6, &epoch).await;
    expect_ticks(&mut at, NEWS, 6..=6, &epoch).await;
    sync(&mut beyond).await;
    sync(&mut at).await;
}

/// A history of 5 after 20 publications no longer holds offset 4: `since` 3 is not
/// recovered and replays what is left, 16..=20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_a_trimmed_offset_replays_what_is_left() {
    let server = news_server(5).await;
    let epoch = publish_ticks(&server.hub, NEWS, 1..=20, 0).await;
    let mut ws = server.connect().await;
    let ack = subscribe_since(&mut ws, NEWS, Some((3, Some(&epoch)))).await;
    assert_recovery(&ack, false, &epoch, 20);
    expect_ticks(&mut ws, NEWS, 16..=20, &epoch).await;
    publish_ticks(&server.hub, NEWS, 21..=21, 0).await;
    expect_ticks(&mut ws, NEWS, 21..=21, &epoch).await;
    sync(&mut ws).await;
}

/// Publications older than the history's age are gone (`Hub::history` shows it): a resume
/// is not recovered and replays nothing. A subscriber stays on the channel throughout, so
/// that its counter, and so its epoch, is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_the_history_expired_is_not_recovered() {
    const AGE: Duration = Duration::from_millis(1000);
    let config = HubConfig::builder()
        .channel_history(NEWS, policy(100, AGE))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let mut watcher = server.connect().await;
    let (_, epoch) = ack_position(&subscribe_since(&mut watcher, NEWS, None).await);
    let published = Instant::now();
    assert_eq!(publish_ticks(&hub, NEWS, 1..=5, 0).await, epoch);
    expect_ticks(&mut watcher, NEWS, 1..=5, &epoch).await;
    let page = hub.history(NEWS, 0, 100).expect("news has a history");
    // Judged only if the age has not passed yet, as it may have on a busy machine.
    if published.elapsed() < AGE {
        let held: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
        assert_eq!(held, [1, 2, 3, 4, 5], "held before they expire");
    }

    // The age passes (the hub may trim on a periodic sweep: wait for it, bounded).
    tokio::time::sleep(AGE).await;
    {
        let hub = hub.clone();
        wait_until("the expired publications to leave the history", move || {
            hub.history(NEWS, 0, 100)
                .is_some_and(|page| page.publications.is_empty())
        })
        .await;
    }
    let page = hub.history(NEWS, 0, 100).expect("news has a history");
    assert_eq!(
        (&*page.epoch, page.latest),
        (epoch.as_str(), 5),
        "expiry trims, it does not reset the counter or the epoch"
    );

    let mut ws = server.connect().await;
    let ack = subscribe_since(&mut ws, NEWS, Some((3, Some(&epoch)))).await;
    assert_recovery(&ack, false, &epoch, 5);
    sync(&mut ws).await;
    publish_ticks(&hub, NEWS, 6..=6, 0).await;
    expect_ticks(&mut ws, NEWS, 6..=6, &epoch).await;
    expect_ticks(&mut watcher, NEWS, 6..=6, &epoch).await;
}

/// A hub-wide history memory budget of 16 KiB holds about 15 of 100 publications of 1 KB:
/// the oldest are trimmed, the held ones are the newest without gaps, and a resume from 3
/// is not recovered and replays exactly what is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_past_the_history_memory_budget_is_not_recovered() {
    const BUDGET: usize = 16 * 1024;
    let config = HubConfig::builder()
        .channel_history(NEWS, policy(10_000, LONG))
        .history_memory_budget(BUDGET as _)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = &server.hub;
    let epoch = publish_ticks(hub, NEWS, 1..=100, 1000).await;
    let page = hub.history(NEWS, 0, 1000).expect("news has a history");
    assert_eq!((&*page.epoch, page.latest), (epoch.as_str(), 100));
    let held: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
    let bytes: usize = page.publications.iter().map(|p| p.message.len()).sum();
    assert!(
        !held.is_empty() && held.len() < 100 && bytes <= BUDGET,
        "a budget of {BUDGET} bytes holds some but not all of 100 publications of 1 KB: \
         holds {} ({bytes} bytes of messages)",
        held.len()
    );
    let first = held[0];
    assert_eq!(
        held,
        (first..=100).collect::<Vec<_>>(),
        "the newest are held, without gaps"
    );

    let mut ws = server.connect().await;
    let ack = subscribe_since(&mut ws, NEWS, Some((3, Some(&epoch)))).await;
    assert_recovery(&ack, false, &epoch, 100);
    expect_ticks(&mut ws, NEWS, first..=100, &epoch).await;
    sync(&mut ws).await;
}

/// A client cut after its ack but before its first message resumes from the ack's position:
/// recovered, with everything published meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_before_its_first_message_resumes_from_the_acked_position() {
    let server = news_server(100).await;
    let epoch = publish_ticks(&server.hub, NEWS, 1..=5, 0).await;
    let mut ws = server.connect().await;
    let (acked, acked_epoch) = ack_position(&subscribe_since(&mut ws, NEWS, None).await);
    assert_eq!((acked, acked_epoch.as_str()), (5, epoch.as_str()));
    reset(ws.into_inner());
    publish_ticks(&server.hub, NEWS, 6..=8, 0).await;
    // Not `server.connect()`, which waits for the count of clients to rise: the reset one may
    // leave meanwhile. The subscribe is handled once the client is registered anyway.
    let mut ws = connect(server.addr).await;
    let ack = subscribe_since(&mut ws, NEWS, Some((acked, Some(&acked_epoch)))).await;
    assert_recovery(&ack, true, &epoch, 8);
    expect_ticks(&mut ws, NEWS, 6..=8, &epoch).await;
    sync(&mut ws).await;
}

/// An in-memory history does not survive a restart: the new hub's channel has another epoch,
/// so a client resuming with the old one is not recovered and gets the new epoch's history
/// from its first offset (it must reset what it had).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_resume_gets_the_new_epoch_from_its_start() {
    let mut before = news_server(100).await;
    let old = publish_ticks(&before.hub, NEWS, 1..=5, 0).await;
    before.shutdown().await;
    let after = news_server(100).await;
    let new = publish_ticks(&after.hub, NEWS, 1..=2, 0).await;
    assert_ne!(
        old, new,
        "a restarted hub's channel keeps the epoch of the one before"
    );
    let mut ws = after.connect().await;
    let ack = subscribe_since(&mut ws, NEWS, Some((5, Some(&old)))).await;
    assert_recovery(&ack, false, &new, 2);
    expect_ticks(&mut ws, NEWS, 1..=2, &new).await;
    sync(&mut ws).await;
}

/// A channel with neither subscribers nor publications for longer than its history's age
/// forgets its counter: its next publication is offset 1 in a new epoch, and a resume with
/// the old epoch is not recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_channel_past_its_age_starts_a_new_epoch() {
    const AGE: Duration = Duration::from_millis(500);
    let config = HubConfig::builder()
        .channel_history(NEWS, policy(100, AGE))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let old = publish_ticks(&hub, NEWS, 1..=3, 0).await;
    // Idle for longer than the age (the hub may forget on a periodic sweep: wait, bounded).
    tokio::time::sleep(AGE).await;
    {
        let hub = hub.clone();
        let old = old.clone();
        wait_until("the idle channel to forget its counter", move || {
            hub.history(NEWS, 0, 10)
                .is_none_or(|page| page.latest == 0 || *page.epoch != *old)
        })
        .await;
    }
    let position = hub.publish(NEWS, &tick(1, 0)).unwrap().expect("a position");
    assert_eq!(position.offset, 1, "offsets start again at 1");
    assert_ne!(&*position.epoch, old.as_str(), "in a new epoch");
    let new = position.epoch.to_string();
    let mut ws = server.connect().await;
    let ack = subscribe_since(&mut ws, NEWS, Some((3, Some(&old)))).await;
    assert_recovery(&ack, false, &new, 1);
    expect_ticks(&mut ws, NEWS, 1..=1, &new).await;
    sync(&mut ws).await;
}

/// `since` without an epoch means the current one: everything held is replayed, recovered
/// when that starts at offset 1; on a history of 5 after 8 publications, from 4 and not
/// recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_without_an_epoch_replays_the_whole_history() {
    let config = HubConfig::builder()
        .channel_history(NEWS, policy(100, LONG))
        .channel_history("short", policy(5, LONG))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let news = publish_ticks(&server.hub, NEWS, 1..=5, 0).await;
    let short = publish_ticks(&server.hub, "short", 1..=8, 0).await;
    let mut ws = server.connect().await;
    let ack = subscribe_since(&mut ws, NEWS, Some((0, None))).await;
    assert_recovery(&ack, true, &news, 5);
    expect_ticks(&mut ws, NEWS, 1..=5, &news).await;
    let ack = subscribe_since(&mut ws, "short", Some((0, None))).await;
    assert_recovery(&ack, false, &short, 8);
    expect_ticks(&mut ws, "short", 4..=8, &short).await;
    sync(&mut ws).await;
}

/// A client already subscribed asks again since 2 while a publisher streams: what arrives
/// before the ack is live and in order; from the ack on, every offset from 3 arrives exactly
/// once and in order (the replay, then live).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_while_subscribed_replays_once_then_continues_live() {
    const LAST: u64 = 300;
    let server = news_server(10_000).await;
    let hub = server.hub.clone();
    let mut ws = server.connect().await;
    let (_, epoch) = ack_position(&subscribe_since(&mut ws, NEWS, None).await);
    assert_eq!(publish_ticks(&hub, NEWS, 1..=5, 0).await, epoch);
    expect_ticks(&mut ws, NEWS, 1..=5, &epoch).await;

    let publisher = {
        let hub = hub.clone();
        tokio::spawn(async move {
            for seq in 6..=LAST {
                publish_ticks(&hub, NEWS, seq..=seq, 0).await;
                if seq % 8 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    send_text(&mut ws, &subscribe_request(NEWS, Some((2, Some(&epoch))))).await;
    let mut live = 5;
    let ack = loop {
        let text = next_text(&mut ws).await;
        let message = parse(&text);
        if message["type"] == "subscribed" {
            break message;
        }
        assert_eq!(
            position_of(&text).0,
            live + 1,
            "before the ack, live publications in order: {text}"
        );
        live += 1;
    };
    let (acked, _) = ack_position(&ack);
    assert_recovery(&ack, true, &epoch, acked);
    assert!(
        acked >= live,
        "the ack's offset {acked} is below the {live} already sent"
    );
    expect_ticks(&mut ws, NEWS, 3..=LAST, &epoch).await;
    within("the publisher", publisher).await.unwrap();
    sync(&mut ws).await;
}

/// Asks for a replay again while the first is still being written (a 4 KiB receive buffer,
/// 5,000 of 1 KiB held): before the second ack, the first replay goes on in order; from the
/// ack on, exactly 101..=5,000 once and in order, then live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_resume_during_a_replay_replays_from_its_own_offset() {
    const HELD: u64 = 5_000;
    let _turn = one_at_a_time().await;
    let server = news_server(HELD).await;
    let epoch = publish_ticks(&server.hub, NEWS, 1..=HELD, PAD).await;
    let mut raw = slow_socket(&server).await;
    raw.send_text(&subscribe_request(NEWS, Some((0, None))))
        .await;
    let ack = parse(&raw.read_text().await);
    assert_recovery(&ack, true, &epoch, HELD);
    expect_offsets(&mut raw, 1..=10, &epoch, "the replay").await;
    raw.send_text(&subscribe_request(NEWS, Some((100, Some(&epoch)))))
        .await;
    let mut last = 10;
    let first = "the first replay";
    let ack = offsets_until(&mut raw, "subscribed", &mut last, &epoch, first).await;
    assert_recovery(&parse(&ack), true, &epoch, HELD);
    println!("the first replay had reached {last} of {HELD} at the second ack");
    expect_offsets(&mut raw, 101..=HELD, &epoch, "after the second ack").await;
    publish_ticks(&server.hub, NEWS, HELD + 1..=HELD + 1, 0).await;
    assert_eq!(position_of(&raw.read_text().await), (HELD + 1, epoch));
    raw.sync().await;
}

/// A page that leaves and comes back during a replay: unsubscribe, then subscribe since 100,
/// both while the first replay (5,000 of 1 KiB through a 4 KiB receive buffer) is still being
/// written. Before the `unsubscribed` ack, the first replay in order; nothing of the channel
/// between the two acks; after the `subscribed` ack, exactly 101..=5,000 once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_and_resuming_during_a_replay_replays_exactly_the_new_range() {
    const HELD: u64 = 5_000;
    let _turn = one_at_a_time().await;
    let server = news_server(HELD).await;
    let epoch = publish_ticks(&server.hub, NEWS, 1..=HELD, PAD).await;
    let mut raw = slow_socket(&server).await;
    raw.send_text(&subscribe_request(NEWS, Some((0, None))))
        .await;
    let ack = parse(&raw.read_text().await);
    assert_recovery(&ack, true, &epoch, HELD);
    expect_offsets(&mut raw, 1..=10, &epoch, "the replay").await;
    raw.send_text(&json!({"type": "unsubscribe", "data": NEWS}).to_string())
        .await;
    raw.send_text(&subscribe_request(NEWS, Some((100, Some(&epoch)))))
        .await;
    let mut last = 10;
    offsets_until(
        &mut raw,
        "unsubscribed",
        &mut last,
        &epoch,
        "the first replay",
    )
    .await;
    let text = raw.read_text().await;
    let ack = parse(&text);
    assert_eq!(
        ack["type"], "subscribed",
        "right after the unsubscribed ack: {text}"
    );
    assert_recovery(&ack, true, &epoch, HELD);
    println!("the first replay had reached {last} of {HELD} at the unsubscribe");
    expect_offsets(&mut raw, 101..=HELD, &epoch, "after the subscribed ack").await;
    raw.sync().await;
}

/// The replay is the range as it stood when the subscription took effect: a client replaying
/// 1..=1,000 slowly (a 4 KiB receive buffer) while 2,000 more are published, which trim every
/// one of those from a history of 1,000, still gets 1..=3,000 exactly once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_during_a_replay_does_not_cut_it() {
    const HELD: u64 = 1_000;
    const LAST: u64 = 3_000;
    let _turn = one_at_a_time().await;
    let server = news_server(HELD).await;
    let epoch = publish_ticks(&server.hub, NEWS, 1..=HELD, PAD).await;
    let mut raw = slow_socket(&server).await;
    raw.send_text(&subscribe_request(NEWS, Some((0, Some(&epoch)))))
        .await;
    let ack = parse(&raw.read_text().await);
    assert_recovery(&ack, true, &epoch, HELD);
    assert_eq!(position_of(&raw.read_text().await), (1, epoch.clone()));
    publish_ticks(&server.hub, NEWS, HELD + 1..=LAST, 100).await;
    let page = server.hub.history(NEWS, 0, 1).expect("a history");
    assert_eq!(
        page.publications.first().map(|p| p.offset),
        Some(LAST - HELD + 1),
        "the history was trimmed past the replay meanwhile"
    );
    let what = "the replay of what was trimmed meanwhile, then the live publications";
    expect_offsets(&mut raw, 2..=LAST, &epoch, what).await;
    raw.sync().await;
}

/// One client resumes two channels at once (two requests before it reads) while both keep
/// publishing: each channel's ack comes before its frames, and each channel's offsets arrive
/// 1..=2,500 exactly once and in order, its replay then its live publications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_at_once_each_stay_in_order_with_live_publications_behind() {
    const HELD: u64 = 2_000;
    const LAST: u64 = 2_500;
    let config = HubConfig::builder()
        .channel_history(NEWS, policy(10_000, LONG))
        .channel_history("sport", policy(10_000, LONG))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    let mut epochs = Vec::new();
    for channel in [NEWS, "sport"] {
        epochs.push(publish_ticks(&hub, channel, 1..=HELD, 200).await);
    }
    let mut ws = server.connect().await;
    send_text(&mut ws, &subscribe_request(NEWS, Some((0, None)))).await;
    send_text(&mut ws, &subscribe_request("sport", Some((0, None)))).await;
    let publisher = {
        let hub = hub.clone();
        tokio::spawn(async move {
            for seq in HELD + 1..=LAST {
                for channel in [NEWS, "sport"] {
                    publish_ticks(&hub, channel, seq..=seq, 200).await;
                }
            }
        })
    };
    // Per channel: the ack's offset once it came, and the last offset received.
    let mut acked: [Option<u64>; 2] = [None, None];
    let mut last = [0u64; 2];
    let mut progress = Progress::new("two replays and their live publications");
    while last != [LAST, LAST] {
        let text = progress.wait(next_text(&mut ws)).await;
        progress.advanced();
        let message = parse(&text);
        let k = match message["channel"].as_str() {
            Some(NEWS) => 0,
            Some("sport") => 1,
            _ => panic!("a message of neither channel: {text}"),
        };
        if message["type"] == "subscribed" {
            assert!(acked[k].is_none(), "a second ack: {text}");
            let (offset, _) = ack_position(&message);
            assert_recovery(&message, true, &epochs[k], offset);
            acked[k] = Some(offset);
            continue;
        }
        assert!(
            acked[k].is_some(),
            "a frame before its channel's ack: {text}"
        );
        assert_eq!(
            position_of(&text),
            (last[k] + 1, epochs[k].clone()),
            "each channel in order, once"
        );
        last[k] += 1;
    }
    within("the publisher", publisher).await.unwrap();
    sync(&mut ws).await;
}

/// A live subscriber that fell behind (3,000 of 1 KiB queued for it behind a 4 KiB receive
/// buffer) asks again since 100 without reading: before the ack, its live stream in order;
/// from the ack on, exactly 101..=3,000 once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_while_live_frames_are_queued_replays_exactly_once() {
    const LAST: u64 = 3_000;
    let _turn = one_at_a_time().await;
    let server = news_server(10_000).await;
    let mut raw = slow_socket(&server).await;
    raw.send_text(&subscribe_request(NEWS, None)).await;
    let (_, epoch) = ack_position(&parse(&raw.read_text().await));
    assert_eq!(publish_ticks(&server.hub, NEWS, 1..=LAST, PAD).await, epoch);
    raw.send_text(&subscribe_request(NEWS, Some((100, Some(&epoch)))))
        .await;
    let mut last = 0;
    let ack = offsets_until(&mut raw, "subscribed", &mut last, &epoch, "the live stream").await;
    assert_recovery(&parse(&ack), true, &epoch, LAST);
    expect_offsets(&mut raw, 101..=LAST, &epoch, "after the ack").await;
    raw.sync().await;
}

/// The same through a 4 KiB receive buffer, 3,000 of 1 KiB held on each channel: two replays
/// for one slow socket at once, each channel's offsets exactly 1..=3,000 once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_at_once_through_a_slow_socket_each_stay_whole() {
    const HELD: u64 = 3_000;
    let _turn = one_at_a_time().await;
    let config = HubConfig::builder()
        .channel_history(NEWS, policy(10_000, LONG))
        .channel_history("sport", policy(10_000, LONG))
        .history_memory_budget(64 << 20)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let mut epochs = Vec::new();
    for channel in [NEWS, "sport"] {
        epochs.push(publish_ticks(&server.hub, channel, 1..=HELD, PAD).await);
    }
    let mut raw = slow_socket(&server).await;
    raw.send_text(&subscribe_request(NEWS, Some((0, None))))
        .await;
    raw.send_text(&subscribe_request("sport", Some((0, None))))
        .await;
    let mut acked = [false; 2];
    let mut last = [0u64; 2];
    let mut progress = Progress::new("two replays through a slow socket");
    while last != [HELD, HELD] {
        let text = progress.wait(raw.read_text()).await;
        progress.advanced();
        let message = parse(&text);
        let k = match message["channel"].as_str() {
            Some(NEWS) => 0,
            Some("sport") => 1,
            _ => panic!("a message of neither channel: {text}"),
        };
        if message["type"] == "subscribed" {
            assert!(!acked[k], "a second ack: {text}");
            assert_recovery(&message, true, &epochs[k], HELD);
            acked[k] = true;
            continue;
        }
        assert!(acked[k], "a frame before its channel's ack: {text}");
        assert_eq!(
            position_of(&text),
            (last[k] + 1, epochs[k].clone()),
            "each channel's replay in order, once (the other's at {})",
            last[1 - k]
        );
        last[k] += 1;
    }
    raw.sync().await;
}

/// A client replaying 5,000 publications of 1 KB through a small receive buffer unsubscribes
/// after ten: the frames of the channel before the `unsubscribed` ack are a prefix of the
/// replay, the replay stopped (not all 5,000 came), and nothing of the channel follows the ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_during_a_replay_stops_it() {
    unsubscribed_during_a_replay(false).await;
}

/// The same with a server-side `Hub::unsubscribe` of that client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_side_unsubscribe_during_a_replay_stops_it() {
    unsubscribed_during_a_replay(true).await;
}

async fn unsubscribed_during_a_replay(server_side: bool) {
    let _turn = one_at_a_time().await;
    const HELD: u64 = 5_000;
    let server = news_server(HELD).await;
    let epoch = publish_ticks(&server.hub, NEWS, 1..=HELD, 1000).await;
    let mut raw = slow_socket(&server).await;
    raw.send_text(&subscribe_request(NEWS, Some((0, None))))
        .await;
    let ack = parse(&raw.read_text().await);
    assert_eq!(ack["type"], "subscribed", "{ack}");
    assert_recovery(&ack, true, &epoch, HELD);
    expect_offsets(&mut raw, 1..=10, &epoch, "the replay").await;
    if server_side {
        let id = server.newest_client().await;
        server.hub.unsubscribe(id, NEWS).unwrap();
    } else {
        raw.send_text(&json!({"type": "unsubscribe", "data": NEWS}).to_string())
            .await;
    }
    let mut last = 10;
    let ack = offsets_until(&mut raw, "unsubscribed", &mut last, &epoch, "the replay").await;
    assert_envelope(&ack, r#"{"type":"unsubscribed","channel":"news"}"#);
    println!("replayed {last} of {HELD} before the unsubscribe took effect");
    assert!(
        last < HELD,
        "the replay ran to its end ({HELD}) although the client unsubscribed after 10"
    );
    // Nothing of the channel after the ack, not a live publication either: the pong is next.
    publish_ticks(&server.hub, NEWS, HELD + 1..=HELD + 1, 0).await;
    raw.send_text(r#"{"type":"ping"}"#).await;
    let next = raw.read_text().await;
    assert!(
        next.starts_with(r#"{"type":"pong""#),
        "after the unsubscribed ack, expected the pong, got {next}"
    );
}

/// A `since` on a channel the subscribe policy refuses: `subscription refused`, and nothing
/// replayed or delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscribe_with_since_replays_nothing() {
    let config = HubConfig::builder()
        .channel_history("secret", policy(100, LONG))
        .subscribe_policy(|_client, channel| channel != "secret")
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let epoch = publish_ticks(&server.hub, "secret", 1..=3, 0).await;
    let mut ws = server.connect().await;
    send_text(
        &mut ws,
        &subscribe_request("secret", Some((0, Some(&epoch)))),
    )
    .await;
    expect_plain(
        &mut ws,
        r#"{"type":"error","channel":"secret","data":"subscription refused"}"#,
    )
    .await;
    publish_ticks(&server.hub, "secret", 4..=4, 0).await;
    sync(&mut ws).await;
}

/// `since` on a channel without history: `{"recovered":false}`, then live delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_a_channel_without_history_is_not_recovered() {
    let server = news_server(100).await;
    let mut ws = server.connect().await;
    send_text(&mut ws, &subscribe_request("plain", Some((3, Some("e"))))).await;
    expect_plain(
        &mut ws,
        r#"{"type":"subscribed","channel":"plain","data":{"recovered":false}}"#,
    )
    .await;
    server
        .hub
        .send_to_channel("plain", &Message::new("tick").with_data(1))
        .unwrap();
    expect_plain(&mut ws, r#"{"type":"tick","channel":"plain","data":1}"#).await;
    assert!(
        server
            .hub
            .publish("plain", &Message::new("tick"))
            .unwrap()
            .is_none(),
        "a channel without history has no positions"
    );
    assert_eq!(next_json(&mut ws).await["type"], "tick");
}

/// A `since` that is not an object with a non-negative integer `offset` (and a string
/// `epoch` if any) is answered `malformed message` with the channel, and subscribes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_since_is_refused_and_subscribes_nothing() {
    let server = news_server(100).await;
    let hub = &server.hub;
    let epoch = publish_ticks(hub, NEWS, 1..=3, 0).await;
    let mut ws = server.connect().await;
    for channel in [NEWS, "plain"] {
        for since in [
            "5",
            r#"{"offset":-1}"#,
            r#"{"offset":"3"}"#,
            r#"{"epoch":7,"offset":1}"#,
            r#"{}"#,
            r#"{"offset":1.5}"#,
            r#"{"epoch":"e"}"#,
            r#"[1]"#,
            r#""3""#,
            r#"{"offset":18446744073709551616}"#,
        ] {
            send_text(
                &mut ws,
                &format!(
                    r#"{{"type":"subscribe","data":{},"since":{since}}}"#,
                    quoted(channel)
                ),
            )
            .await;
            let text = next_text(&mut ws).await;
            assert!(
                !text.contains("\"offset\":"),
                "since {since} on {channel}: nothing replayed, got {text}"
            );
            assert_envelope(
                &text,
                &format!(
                    r#"{{"type":"error","channel":{},"data":"malformed message"}}"#,
                    quoted(channel)
                ),
            );
        }
    }
    assert_eq!(hub.channel_subscriber_count(NEWS), 0);
    assert_eq!(hub.channel_subscriber_count("plain"), 0);
    // Publications after the refusals do not arrive: the pong is next.
    publish_ticks(hub, NEWS, 4..=4, 0).await;
    hub.send_to_channel("plain", &Message::new("tick")).unwrap();
    sync(&mut ws).await;
    // The connection is still served, and a valid since works.
    let ack = subscribe_since(&mut ws, NEWS, Some((3, Some(&epoch)))).await;
    assert_recovery(&ack, true, &epoch, 4);
    expect_ticks(&mut ws, NEWS, 4..=4, &epoch).await;
}

/// Strict go-ws mode ignores `since`, even a malformed one: a plain subscribe, without an
/// acknowledgement or a replay, and frames without offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_go_ws_mode_ignores_since_and_leaves_offsets_out() {
    let config = HubConfig::builder()
        .channel_history(NEWS, policy(100, LONG))
        .channel_history("other", policy(100, LONG))
        .strict_go_ws(true)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = &server.hub;
    let epoch = publish_ticks(hub, NEWS, 1..=3, 0).await;
    let mut ws = server.connect().await;
    send_text(&mut ws, &subscribe_request(NEWS, Some((1, Some(&epoch))))).await;
    send_text(&mut ws, r#"{"type":"subscribe","data":"other","since":5}"#).await;
    // No ack, no replay, no error: the pong is next.
    sync(&mut ws).await;
    assert_eq!(hub.channel_subscriber_count(NEWS), 1);
    assert_eq!(hub.channel_subscriber_count("other"), 1);
    hub.send_to_channel(NEWS, &Message::new("tick").with_data(4))
        .unwrap();
    expect_plain(&mut ws, r#"{"type":"tick","channel":"news","data":4}"#).await;
    hub.send_to_channel("other", &Message::new("tick").with_data(1))
        .unwrap();
    expect_plain(&mut ws, r#"{"type":"tick","channel":"other","data":1}"#).await;
}

// ---------------------------------------------------------------------------------------------
// 6. Concurrency: four publishers, eight clients dropping and resuming at random
// ---------------------------------------------------------------------------------------------

const STREAM: &str = "stream";
const PUBLISHERS: u64 = 4;
const PER_PUBLISHER: u64 = 2_000;
const TOTAL: u64 = PUBLISHERS * PER_PUBLISHER;
const CHURNING_CLIENTS: u64 = 8;
const MIN_RECONNECTS: u64 = 1_000;
/// The whole scenario's time cap: past it, clients stop and the report says what they lack.
/// A few seconds in a healthy run; lost or repeated offsets fail it whatever the time, so the
/// cap is only there so that nothing hangs, and is wide for a busy machine.
const CHURN_CAP: Duration = Duration::from_secs(180);
const SEED: u64 = 0x5EED_0F41_570B_1E00;
const CHURN_PAD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The churn's seed: [`SEED`], or `WSHUB_HISTORY_SEED` (decimal or `0x` hex) to replay or vary
/// a run.
fn seed() -> u64 {
    std::env::var("WSHUB_HISTORY_SEED")
        .ok()
        .and_then(|s| match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        })
        .unwrap_or(SEED)
}

/// A xorshift64 generator: seeded, so that a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The number right after `key` in `text` (e.g. `"i":` in `{"p":1,"i":42}`).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
}

/// What the churn test's tasks share.
struct Churn {
    reconnects: AtomicU64,
    /// Tickets handed to publications, in the order publishers start them.
    tickets: AtomicU64,
    /// By offset: `(publisher << 32 | index) + 1` of the publication that has it, set by the
    /// first to learn it (a publisher from its returned position, or a client from a frame);
    /// 0 while unknown.
    origin: Vec<AtomicU64>,
    /// Offsets known to two different publications (by publishers or by clients).
    origin_conflicts: AtomicU64,
    epoch: OnceLock<String>,
    epoch_conflicts: AtomicU64,
    stop: AtomicBool,
}

impl Churn {
    fn record(&self, offset: u64, publisher: u64, index: u64) {
        let Some(slot) = self.origin.get(offset as usize) else {
            self.origin_conflicts.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let code = ((publisher << 32) | index) + 1;
        if let Err(known) = slot.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire) {
            if known != code {
                self.origin_conflicts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn check_epoch(&self, epoch: &str) {
        if self.epoch.get_or_init(|| epoch.to_owned()) != epoch {
            self.epoch_conflicts.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Publisher `p`: `PER_PUBLISHER` publications `{"p":p,"i":i}`, through `publish_async` (0 and
/// 1), `publish` (2) or `send_to_channel` (3), the last two retrying when the hub is
/// overloaded. Publication n (counting over all publishers) waits until
/// n × `MIN_RECONNECTS` / `TOTAL` reconnects have happened, so that the reconnects are spread
/// over the whole stream. Returns how many were refused as overloaded before a retry.
async fn churn_publisher(hub: Hub, churn: Arc<Churn>, p: u64) -> u64 {
    let mut retries = 0;
    let mut previous = 0;
    for i in 0..PER_PUBLISHER {
        let ticket = churn.tickets.fetch_add(1, Ordering::AcqRel);
        while churn.reconnects.load(Ordering::Acquire) < ticket * MIN_RECONNECTS / TOTAL
            && !churn.stop.load(Ordering::Acquire)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Padded to about 400 bytes: a replay of a few hundred is more than a small socket
        // buffer takes at once.
        let message = Message::new("tick").with_data(json!({"p": p, "i": i, "pad": CHURN_PAD}));
        let position = loop {
            let result = match p {
                0 | 1 => hub.publish_async(STREAM, &message).await,
                2 => hub.publish(STREAM, &message),
                _ => hub.send_to_channel(STREAM, &message).map(|()| None),
            };
            match result {
                Ok(position) => break position,
                Err(err) if err.is_overloaded() => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(err) => panic!("publisher {p}, publication {i}: {err}"),
            }
        };
        match position {
            Some(position) => {
                assert!(
                    position.offset > previous,
                    "publisher {p}: publication {i} got offset {} after {previous}",
                    position.offset
                );
                previous = position.offset;
                churn.check_epoch(&position.epoch);
                churn.record(position.offset, p, i);
            }
            None => assert_eq!(
                p, 3,
                "publisher {p}: publish on a history channel gave no position"
            ),
        }
    }
    retries
}

/// What one churning client saw.
struct ChurnReport {
    client: u64,
    connections: u64,
    /// How many times each offset arrived, by offset.
    counts: Vec<u32>,
    /// Frames that were not the next offset after the last one seen.
    out_of_order: u64,
    /// Acks that were missing, not recovered, or behind the client's position.
    bad_acks: u64,
    /// Up to 10 descriptions of the above.
    examples: Vec<String>,
    /// How the connections ended: reset, dropped (FIN), closed with a close frame.
    ends: [u64; 3],
    /// Resumes whose ack was past the client's position (something to replay).
    replays: u64,
    /// Connections that got live publications after a replay.
    crossings: u64,
}

impl ChurnReport {
    fn note(&mut self, what: String) {
        if self.examples.len() < 10 {
            self.examples.push(what);
        }
    }
}

/// The next text frame within `until`, skipping pings and pongs: `Ok(None)` when `until`
/// passes first, `Err` when the connection closes or fails.
async fn next_text_until(ws: &mut Ws, until: Instant) -> Result<Option<String>, String> {
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => return Ok(None),
            Ok(None) => return Err("the connection ended".into()),
            Ok(Some(Err(err))) => return Err(format!("the connection failed: {err}")),
            Ok(Some(Ok(WsMessage::Text(text)))) => return Ok(Some(text.to_string())),
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
            Ok(Some(Ok(other))) => return Err(format!("unexpected {other:?}")),
        }
    }
}

/// Client `c`: connects, subscribes since what it last saw (the first time since 0 without
/// an epoch), reads the ack and then a random number of messages for a random time, and drops
/// the connection, by a reset, a bare FIN or a close frame, or right after the subscribe
/// before the ack; again and again, until it has every offset and the reconnects are done, or
/// the cap passes.
async fn churn_client(addr: std::net::SocketAddr, churn: Arc<Churn>, c: u64) -> ChurnReport {
    let mut rng = XorShift::new(seed() ^ (c + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut report = ChurnReport {
        client: c,
        connections: 0,
        counts: vec![0; TOTAL as usize + 1],
        out_of_order: 0,
        bad_acks: 0,
        examples: Vec::new(),
        ends: [0; 3],
        replays: 0,
        crossings: 0,
    };
    let mut last = 0u64;
    let mut epoch: Option<String> = None;
    let cap = Instant::now() + CHURN_CAP;
    while !(last >= TOTAL && churn.reconnects.load(Ordering::Acquire) >= MIN_RECONNECTS) {
        if Instant::now() > cap || churn.stop.load(Ordering::Acquire) {
            churn.stop.store(true, Ordering::Release);
            break;
        }
        let mut ws = connect(addr).await;
        report.connections += 1;
        if report.connections > 1 {
            churn.reconnects.fetch_add(1, Ordering::AcqRel);
        }
        let since = match &epoch {
            None => (0, None),
            Some(epoch) => (last, Some(epoch.as_str())),
        };
        send_text(&mut ws, &subscribe_request(STREAM, Some(since))).await;
        let connection = report.connections;
        // A cut before the ack, one time in ten.
        if rng.below(10) != 0 {
            let text = match next_text_until(&mut ws, Instant::now() + DEADLINE).await {
                Ok(Some(text)) => text,
                Ok(None) => panic!("client {c}, connection {connection}: no ack in {DEADLINE:?}"),
                Err(err) => panic!("client {c}, connection {connection}: {err} before the ack"),
            };
            let ack = parse(&text);
            let acked = ack["data"]["offset"].as_u64();
            if ack["type"] != "subscribed"
                || ack["data"]["recovered"] != true
                || acked.is_none_or(|acked| acked < last)
                || ack["data"]["epoch"].as_str().is_none()
            {
                report.bad_acks += 1;
                report.note(format!(
                    "connection {connection}, since {last}: expected a recovered ack, got {text}"
                ));
            }
            let acked = acked.unwrap_or(0);
            let replay = acked > last;
            report.replays += u64::from(replay);
            let mut crossed = false;
            if let Some(acked_epoch) = ack["data"]["epoch"].as_str() {
                churn.check_epoch(acked_epoch);
                epoch.get_or_insert_with(|| acked_epoch.to_owned());
            }
            let budget = match rng.below(4) {
                0 => rng.below(5),
                1 | 2 => rng.below(50),
                _ => rng.below(1_000),
            };
            let until = Instant::now() + Duration::from_millis(1 + rng.below(40));
            for _ in 0..budget {
                if last >= TOTAL {
                    break;
                }
                let text = match next_text_until(&mut ws, until).await {
                    Ok(Some(text)) => text,
                    Ok(None) => break,
                    Err(err) => {
                        report.note(format!(
                            "connection {connection}: {err} after offset {last}"
                        ));
                        break;
                    }
                };
                let Some((offset, frame_epoch)) = tail_position(&text) else {
                    report.out_of_order += 1;
                    report.note(format!("connection {connection}: no position in {text}"));
                    continue;
                };
                churn.check_epoch(&frame_epoch);
                match (number_after(&text, "\"p\":"), number_after(&text, "\"i\":")) {
                    (Some(p), Some(i)) => churn.record(offset, p, i),
                    _ => report.note(format!("connection {connection}: no p and i in {text}")),
                }
                if let Some(count) = report.counts.get_mut(offset as usize) {
                    *count += 1;
                }
                if offset != last + 1 {
                    report.out_of_order += 1;
                    report.note(format!(
                        "connection {connection}: after offset {last} came {offset}"
                    ));
                }
                last = last.max(offset);
                if replay && !crossed && offset > acked {
                    crossed = true;
                    report.crossings += 1;
                }
            }
        }
        let end = rng.below(3) as usize;
        report.ends[end] += 1;
        match end {
            0 => {
                let _ = ws.get_ref().set_zero_linger();
                drop(ws);
            }
            1 => drop(ws),
            _ => close(&mut ws, 1000).await,
        }
    }
    report
}

/// A request of an in-place client, answered by an ack in request order.
enum Pending {
    /// A subscribe since this offset.
    Since(u64),
    /// A plain subscribe, sent while live.
    Plain,
    Unsubscribe,
}

/// In-place client `c`: one connection; subscribes since 0, then reads a random number of
/// messages for a random time and, at random, asks again since the last offset it saw (a
/// replay may still be running), or unsubscribes and asks again at once, or (when live: its
/// last since-ack's offset reached, nothing pending) sends a plain subscribe; until it has
/// every offset and the resumes are done, or the cap passes. Every frame must be the next
/// offset due: after a since-ack, the ack's `since` + 1; nothing between an `unsubscribed`
/// and the next `subscribed`; a plain subscribe's ack names the last offset received.
async fn resuming_client(addr: std::net::SocketAddr, churn: Arc<Churn>, c: u64) -> ChurnReport {
    let mut rng = XorShift::new(seed() ^ (c + 101).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut report = ChurnReport {
        client: c,
        connections: 1,
        counts: vec![0; TOTAL as usize + 1],
        out_of_order: 0,
        bad_acks: 0,
        examples: Vec::new(),
        ends: [0; 3],
        replays: 0,
        crossings: 0,
    };
    // Odd clients read through a 4 KiB receive buffer: their replays wait on the socket, so
    // that a resume can meet a replay still being written.
    let mut ws = if c % 2 == 1 {
        let stream = connect_with_recv_buffer(addr, 4096).await;
        within(
            "the handshake",
            tokio_tungstenite::client_async(request(addr, "/ws"), stream),
        )
        .await
        .expect("the handshake")
        .0
    } else {
        connect(addr).await
    };
    send_text(&mut ws, &subscribe_request(STREAM, Some((0, None)))).await;
    let mut pending = std::collections::VecDeque::from([Pending::Since(0)]);
    // The next offset due, whether between an unsubscribed ack and the next subscribed ack,
    // the last since-ack's offset (live past it), and whether this replay reached live.
    let (mut expected, mut left, mut live_from, mut crossed) = (1u64, false, 0u64, false);
    let mut epoch: Option<String> = None;
    let mut missing = TOTAL;
    let cap = Instant::now() + CHURN_CAP;
    let mut requests = 0u64;
    loop {
        let done = missing == 0 && pending.is_empty();
        if done && churn.reconnects.load(Ordering::Acquire) >= MIN_RECONNECTS {
            break;
        }
        if Instant::now() > cap || churn.stop.load(Ordering::Acquire) {
            churn.stop.store(true, Ordering::Release);
            break;
        }
        let budget = match rng.below(4) {
            0 => rng.below(5),
            1 | 2 => rng.below(50),
            _ => rng.below(1_000),
        };
        let until = Instant::now() + Duration::from_millis(1 + rng.below(40));
        for _ in 0..budget {
            let text = match next_text_until(&mut ws, until).await {
                Ok(Some(text)) => text,
                Ok(None) => break,
                Err(err) => panic!("client {c}: {err} after offset {}", expected - 1),
            };
            if let Some((offset, frame_epoch)) = tail_position(&text) {
                churn.check_epoch(&frame_epoch);
                match (number_after(&text, "\"p\":"), number_after(&text, "\"i\":")) {
                    (Some(p), Some(i)) => churn.record(offset, p, i),
                    _ => report.note(format!("no p and i in {text}")),
                }
                if let Some(count) = report.counts.get_mut(offset as usize) {
                    missing -= u64::from(*count == 0);
                    *count += 1;
                }
                if left || offset != expected {
                    report.out_of_order += 1;
                    report.note(format!(
                        "request {requests}: expected {}, got offset {offset}",
                        if left {
                            "nothing (unsubscribed)".to_owned()
                        } else {
                            expected.to_string()
                        }
                    ));
                }
                expected = expected.max(offset + 1);
                if offset > live_from && !crossed {
                    crossed = true;
                    report.crossings += 1;
                }
                continue;
            }
            let ack = parse(&text);
            match (ack["type"].as_str(), pending.pop_front()) {
                (Some("subscribed"), Some(Pending::Since(since))) => {
                    let acked = ack["data"]["offset"].as_u64().unwrap_or(0);
                    if ack["data"]["recovered"] != true || acked < since {
                        report.bad_acks += 1;
                        report.note(format!(
                            "since {since}: expected a recovered ack, got {text}"
                        ));
                    }
                    if let Some(acked_epoch) = ack["data"]["epoch"].as_str() {
                        churn.check_epoch(acked_epoch);
                        epoch.get_or_insert_with(|| acked_epoch.to_owned());
                    }
                    report.replays += u64::from(acked > since);
                    (expected, left, live_from, crossed) =
                        (since + 1, false, acked, acked == since);
                }
                (Some("subscribed"), Some(Pending::Plain)) => {
                    if ack["data"]["offset"].as_u64() != Some(expected - 1) {
                        report.bad_acks += 1;
                        report.note(format!(
                            "a plain subscribe after offset {}: got {text}",
                            expected - 1
                        ));
                    }
                }
                (Some("unsubscribed"), Some(Pending::Unsubscribe)) => left = true,
                (_, request) => {
                    report.bad_acks += 1;
                    report.note(format!(
                        "an ack for {:?}: got {text}",
                        request.map(|r| match r {
                            Pending::Since(since) => format!("since {since}"),
                            Pending::Plain => "a plain subscribe".into(),
                            Pending::Unsubscribe => "an unsubscribe".into(),
                        })
                    ));
                }
            }
        }
        let Some(epoch) = epoch.as_deref() else {
            continue;
        };
        let since = Some((expected - 1, Some(epoch)));
        match rng.below(4) {
            0 => {
                send_text(&mut ws, &subscribe_request(STREAM, since)).await;
                pending.push_back(Pending::Since(expected - 1));
            }
            1 => {
                send_json(&mut ws, &json!({"type": "unsubscribe", "data": STREAM})).await;
                send_text(&mut ws, &subscribe_request(STREAM, since)).await;
                pending.push_back(Pending::Unsubscribe);
                pending.push_back(Pending::Since(expected - 1));
            }
            2 if pending.is_empty() && !left && expected > live_from => {
                send_text(&mut ws, &subscribe_request(STREAM, None)).await;
                pending.push_back(Pending::Plain);
            }
            _ => continue,
        }
        requests += 1;
        churn.reconnects.fetch_add(1, Ordering::AcqRel);
    }
    report
}

/// Four publishers stream 8,000 publications to one channel while eight clients drop their
/// connections at random moments (reset, FIN, close frame, before or after the ack) and
/// resume since the last (offset, epoch) they saw, at least 1,000 times in all: every client
/// ends with every offset 1..=8,000 exactly once and in order, each offset the same
/// publication for every client and for the publisher that got it, in one epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_reconnect_at_random_get_every_offset_exactly_once_in_order() {
    churn_scenario(false).await;
}

/// The same with clients that keep their connection and, at random moments, ask again since
/// the last offset they saw (while a replay may still be running), or unsubscribe and ask
/// again at once, or send a plain subscribe once live, at least 1,000 times in all: from each
/// ack on, every client's offsets run on from the ack's `since` (a plain subscribe's ack names
/// the last offset received before it), and each ends with every offset 1..=8,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_resume_in_place_at_random_get_every_offset_in_order_from_each_ack() {
    churn_scenario(true).await;
}

/// Four publishers against eight clients that reconnect (or, `in_place`, resume on their
/// connection) at random; see the two tests above.
async fn churn_scenario(in_place: bool) {
    let _turn = one_at_a_time().await;
    let config = HubConfig::builder()
        .channel_history(STREAM, policy(TOTAL as usize, LONG))
        .history_memory_budget(64 << 20)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let started = Instant::now();
    let churn = Arc::new(Churn {
        reconnects: AtomicU64::new(0),
        tickets: AtomicU64::new(0),
        origin: (0..=TOTAL).map(|_| AtomicU64::new(0)).collect(),
        origin_conflicts: AtomicU64::new(0),
        epoch: OnceLock::new(),
        epoch_conflicts: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let clients: Vec<_> = (0..CHURNING_CLIENTS)
        .map(|c| {
            let churn = Arc::clone(&churn);
            if in_place {
                tokio::spawn(resuming_client(server.addr, churn, c))
            } else {
                tokio::spawn(churn_client(server.addr, churn, c))
            }
        })
        .collect();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| tokio::spawn(churn_publisher(server.hub.clone(), Arc::clone(&churn), p)))
        .collect();
    let mut retries = 0;
    for publisher in publishers {
        retries += within_stream_cap("a publisher", publisher).await.unwrap();
    }
    let published_in = started.elapsed();
    let mut reports = Vec::new();
    for client in clients {
        reports.push(
            within_stream_cap("a churning client", client)
                .await
                .unwrap(),
        );
    }
    let elapsed = started.elapsed();
    let reconnects = churn.reconnects.load(Ordering::Acquire);
    let mut ends = [0; 3];
    let replays: u64 = reports.iter().map(|r| r.replays).sum();
    let crossings: u64 = reports.iter().map(|r| r.crossings).sum();
    for report in &reports {
        for (total, n) in ends.iter_mut().zip(report.ends) {
            *total += n;
        }
    }
    let how = if in_place {
        "resumes in place".to_owned()
    } else {
        format!(
            "reconnects (ended by reset {}, FIN {}, close frame {})",
            ends[0], ends[1], ends[2]
        )
    };
    println!(
        "{TOTAL} publications by {PUBLISHERS} publishers in {published_in:?} ({retries} \
         overload retries); {CHURNING_CLIENTS} clients, {reconnects} {how}; {replays} resumes \
         with something to replay, {crossings} of them on to live publications; all done in \
         {elapsed:?}; seed {:#x}",
        seed()
    );

    let mut failures = Vec::new();
    for r in &reports {
        // In place, a resume replays offsets the client had: repeats are counted as out of
        // order only when they are not what the last ack announced.
        let duplicates: u64 = if in_place {
            0
        } else {
            r.counts[1..]
                .iter()
                .map(|&n| u64::from(n.saturating_sub(1)))
                .sum()
        };
        let missing: Vec<u64> = (1..=TOTAL).filter(|&o| r.counts[o as usize] == 0).collect();
        if duplicates > 0 || !missing.is_empty() || r.out_of_order > 0 || r.bad_acks > 0 {
            failures.push(format!(
                "client {} ({} connections): {duplicates} duplicates, {} missing (first: {:?}), \
                 {} out of order, {} bad acks; e.g. {:#?}",
                r.client,
                r.connections,
                missing.len(),
                &missing[..missing.len().min(10)],
                r.out_of_order,
                r.bad_acks,
                r.examples
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "seed {:#x}:\n{}",
        seed(),
        failures.join("\n")
    );
    assert_eq!(
        churn.origin_conflicts.load(Ordering::Acquire),
        0,
        "offsets that two clients, or a client and a publisher, saw as different publications"
    );
    assert_eq!(
        churn.epoch_conflicts.load(Ordering::Acquire),
        0,
        "epochs other than the first one seen"
    );
    assert!(
        reconnects >= MIN_RECONNECTS,
        "only {reconnects} reconnects or resumes (at least {MIN_RECONNECTS} wanted) before the \
         cap of {CHURN_CAP:?}"
    );
    let page = server
        .hub
        .history(STREAM, 0, TOTAL as _)
        .expect("the stream has a history");
    assert_eq!(
        (page.latest, page.publications.len() as u64),
        (TOTAL, TOTAL),
        "the history holds every publication"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Slow consumers on a history channel
// ---------------------------------------------------------------------------------------------

const FEED: &str = "feed";
/// Publications are about 1 KiB, so a bound of 64 KiB holds about 60.
const PAD: usize = 1000;
const BATCH: u64 = 50;
const MAX_PUBLISHED: u64 = 20_000;

/// A client that reads nothing after its ack (a receive buffer of 4 KiB) while publications of
/// 1 KiB stream to a history channel: it must be cut with 4000 `slow consumer` after a gapless
/// prefix of the stream, with nothing dropped; then it reconnects, resumes since its last
/// offset, and gets everything after it exactly once, in order, then live.
///
/// With `replayed` above 0, that many are published first and the client subscribes since 0:
/// it is cut for the live publications held behind its replay, not for the replay.
async fn cut_as_slow_then_recovered(config: HubConfig, replayed: u64) {
    let _turn = one_at_a_time().await;
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    if replayed > 0 {
        publish_ticks(&hub, FEED, 1..=replayed, PAD).await;
    }
    let mut stalled = slow_socket(&server).await;
    let since = (replayed > 0).then_some((0, None));
    stalled.send_text(&subscribe_request(FEED, since)).await;
    let ack = parse(&stalled.read_text().await);
    let (offset, epoch) = ack_position(&ack);
    assert_eq!(offset, replayed, "the ack {ack}");

    let mut published = replayed;
    while published < MAX_PUBLISHED {
        let stats = hub.stats();
        if stats.slow_consumer_disconnects > 0 || stats.dropped > 0 || hub.client_count() == 0 {
            break;
        }
        publish_ticks(&hub, FEED, published + 1..=published + BATCH, PAD).await;
        published += BATCH;
    }
    // (`stats.dropped` counts the queue discarded with a cut client too: what tells a silent
    // drop is a gap in what the client reads, below.)
    println!(
        "{published} published before the stalled client was cut: {:?}",
        hub.stats()
    );

    // What the stalled client got: a gapless prefix, then the close frame.
    let mut last = 0;
    let close = loop {
        let frame = tokio::time::timeout(PROGRESS, stalled.read_frame_unbounded())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the stalled client, after offset {last} of {published}: neither a frame \
                     nor its close for {PROGRESS:?} (it was not cut; {:?})",
                    hub.stats()
                )
            });
        match frame {
            RawFrame::Frame {
                opcode: OP_TEXT,
                payload,
            } => {
                let text = String::from_utf8(payload).unwrap();
                let (offset, frame_epoch) = position_of(&text);
                assert_eq!(frame_epoch, epoch);
                assert_eq!(
                    offset,
                    last + 1,
                    "the stalled client's stream has a gap or a repeat after {last} ({:?})",
                    hub.stats()
                );
                last = offset;
            }
            RawFrame::Frame {
                opcode: OP_CLOSE,
                payload,
            } => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                break (code, String::from_utf8_lossy(&payload[2..]).into_owned());
            }
            RawFrame::Frame { .. } => continue,
            RawFrame::End => panic!("the connection ended without a close frame after {last}"),
        }
    };
    assert_eq!(
        close,
        (4000, "slow consumer".to_owned()),
        "the stalled client's close, after offsets 1..={last} of {published}"
    );
    assert!(last < published, "the stalled client did fall behind");

    // Published while it is away, then it resumes.
    publish_ticks(&hub, FEED, published + 1..=published + BATCH, PAD).await;
    published += BATCH;
    let mut ws = server.connect().await;
    let ack = subscribe_since(&mut ws, FEED, Some((last, Some(&epoch)))).await;
    assert_recovery(&ack, true, &epoch, published);
    expect_ticks(&mut ws, FEED, last + 1..=published, &epoch).await;
    publish_ticks(&hub, FEED, published + 1..=published + 3, PAD).await;
    expect_ticks(&mut ws, FEED, published + 1..=published + 3, &epoch).await;
    sync(&mut ws).await;
}

/// Over a 64 KiB bound on a history channel, a client that stops reading is cut with 4000,
/// and recovers everything when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_on_a_history_channel_is_cut_and_recovers_everything() {
    let config = HubConfig::builder()
        .channel_history(FEED, policy(MAX_PUBLISHED as usize, LONG))
        .history_memory_budget(64 << 20)
        .outbound_queue_bytes(64 * 1024)
        // Long enough that only the queue bound can catch the stalled client.
        .write_timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    cut_as_slow_then_recovered(config, 0).await;
}

/// With `DropOldest`, a client over its bound on a history channel is still cut with 4000
/// rather than silently losing publications (its offsets never show a gap), and recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_never_drops_history_publications_it_cuts_the_client() {
    let config = HubConfig::builder()
        .channel_history(FEED, policy(MAX_PUBLISHED as usize, LONG))
        .history_memory_budget(64 << 20)
        .outbound_queue_bytes(64 * 1024)
        .slow_consumer_policy(SlowConsumerPolicy::DropOldest)
        .write_timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    cut_as_slow_then_recovered(config, 0).await;
}

/// Live publications held behind a replay count against the bound: a client replaying 10,000
/// publications that reads nothing while the channel keeps publishing is cut with 4000 once
/// they outgrow its 64 KiB bound (a gapless prefix first), and recovers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_publications_held_behind_a_replay_count_against_the_bound() {
    let config = HubConfig::builder()
        .channel_history(FEED, policy(MAX_PUBLISHED as usize, LONG))
        .history_memory_budget(64 << 20)
        .outbound_queue_bytes(64 * 1024)
        .write_timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    cut_as_slow_then_recovered(config, 10_000).await;
}

// ---------------------------------------------------------------------------------------------
// 8. A repeated subscribe while publications are queued
// ---------------------------------------------------------------------------------------------

/// A client with a 4 KiB receive buffer stops reading while 200 publications of 1 KiB queue
/// up for it, sends a repeated plain subscribe while 100 more are published, and reads again:
/// the ack's offset is the last offset received before it (at least 200), and 1..=300
/// arrive exactly once and in order around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_subscribe_acks_the_last_offset_already_queued() {
    let _turn = one_at_a_time().await;
    let server = news_server(10_000).await;
    let hub = server.hub.clone();
    let stream = connect_with_recv_buffer(server.addr, 4096).await;
    let (mut ws, _) = within(
        "the handshake",
        tokio_tungstenite::client_async(request(server.addr, "/ws"), stream),
    )
    .await
    .expect("the handshake");
    let (_, epoch) = ack_position(&subscribe_since(&mut ws, NEWS, None).await);
    assert_eq!(publish_ticks(&hub, NEWS, 1..=200, PAD).await, epoch);
    send_text(&mut ws, &subscribe_request(NEWS, None)).await;
    let publisher = {
        let hub = hub.clone();
        tokio::spawn(async move { publish_ticks(&hub, NEWS, 201..=300, PAD).await })
    };

    let mut last = 0;
    let mut progress = Progress::new("the queued publications and the ack");
    let acked = loop {
        let text = progress.wait(next_text(&mut ws)).await;
        progress.advanced();
        let message = parse(&text);
        if message["type"] == "subscribed" {
            assert_eq!(
                message["data"].get("recovered"),
                None,
                "a plain subscribe: {text}"
            );
            let (acked, ack_epoch) = ack_position(&message);
            assert_eq!(ack_epoch, epoch);
            break acked;
        }
        assert_eq!(
            position_of(&text),
            (last + 1, epoch.clone()),
            "before the ack, in order: {text}"
        );
        last += 1;
    };
    assert_eq!(
        acked, last,
        "the repeated subscribe's ack names the last offset sent before it"
    );
    assert!(
        acked >= 200,
        "the 200 published before the request were queued before its ack: acked {acked}"
    );
    expect_ticks(&mut ws, NEWS, last + 1..=300, &epoch).await;
    within("the publisher", publisher).await.unwrap();
    sync(&mut ws).await;
}

/// The same during a replay: a client replaying 5,000 of 1 KiB through a 4 KiB receive buffer
/// sends a plain subscribe after ten. The replay's frames not yet written are neither sent nor
/// queued, so the ack names the last offset received before it, and the replay goes on after
/// it from the next offset, exactly once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_subscribe_during_a_replay_acks_the_last_offset_sent() {
    const HELD: u64 = 5_000;
    let _turn = one_at_a_time().await;
    let server = news_server(HELD).await;
    let epoch = publish_ticks(&server.hub, NEWS, 1..=HELD, PAD).await;
    let mut raw = slow_socket(&server).await;
    raw.send_text(&subscribe_request(NEWS, Some((0, None))))
        .await;
    let ack = parse(&raw.read_text().await);
    assert_recovery(&ack, true, &epoch, HELD);
    expect_offsets(&mut raw, 1..=10, &epoch, "the replay").await;
    raw.send_text(&subscribe_request(NEWS, None)).await;
    let mut last = 10;
    let ack = parse(&offsets_until(&mut raw, "subscribed", &mut last, &epoch, "the replay").await);
    assert_eq!(
        ack["data"].get("recovered"),
        None,
        "a plain subscribe: {ack}"
    );
    let acked = ack_position(&ack).0;
    expect_offsets(
        &mut raw,
        last + 1..=HELD,
        &epoch,
        "the rest of the replay, after the ack",
    )
    .await;
    assert_eq!(
        acked,
        last,
        "the repeated subscribe's ack names the last offset sent before it (the replay's rest, \
         {}..={HELD}, followed it)",
        last + 1
    );
}

// ---------------------------------------------------------------------------------------------
// 9. A long replay
// ---------------------------------------------------------------------------------------------

/// 10,000 publications of 1 KiB held; a client replays them all from 0, reading steadily (a
/// second or more), on a one-shard hub (so that it shares a shard with the other client)
/// while a ticker client on another channel gets a tick every 5 ms: the replay is read whole
/// without a cut, and at least half the ticks sent while it lasts arrive while it lasts (a
/// replay that held up its shard would hold them all until it ended). Judged by counts, not
/// by a tick's lateness: a busy machine can stall the whole test process for half a second.
async fn long_replay_beside_a_live_channel(outbound_queue_bytes: Option<usize>) {
    let _turn = one_at_a_time().await;
    const HELD: u64 = 10_000;
    let mut builder = HubConfig::builder()
        .shards(1)
        .channel_history(NEWS, policy(HELD as usize, LONG))
        .history_memory_budget(64 << 20);
    if let Some(bytes) = outbound_queue_bytes {
        builder = builder.outbound_queue_bytes(bytes);
    }
    let server = Server::start(builder.build().unwrap()).await;
    let hub = server.hub.clone();
    let epoch = publish_ticks(&hub, NEWS, 1..=HELD, PAD).await;

    let mut ticker = server.connect().await;
    subscribe(&mut ticker, "ticker").await;
    let base = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let ticks = {
        let hub = hub.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(Ordering::Acquire) && base.elapsed() < STREAM_CAP {
                let ms = base.elapsed().as_millis() as u64;
                hub.send_to_channel("ticker", &Message::new("tick").with_data(json!({"ms": ms})))
                    .expect("a tick");
                sent += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            hub.send_to_channel("ticker", &Message::new("end")).unwrap();
            sent
        })
    };
    // Each tick's (sent, arrived), measured from `base`.
    let ticker_reader = tokio::spawn(async move {
        let mut ticks = Vec::new();
        let mut progress = Progress::new("the ticks");
        loop {
            let message = progress.wait(next_json(&mut ticker)).await;
            progress.advanced();
            if message["type"] == "end" {
                return ticks;
            }
            let sent_at = Duration::from_millis(message["data"]["ms"].as_u64().expect("ms"));
            ticks.push((sent_at, base.elapsed()));
        }
    });

    let mut ws = server.connect().await;
    let replay_started = Instant::now();
    let ack = subscribe_since(&mut ws, NEWS, Some((0, None))).await;
    assert_recovery(&ack, true, &epoch, HELD);
    let mut progress = Progress::new("the replay of 10,000");
    let mut expected = 1;
    while expected <= HELD {
        let text = match progress.wait(next_seen(&mut ws)).await {
            Seen::Text(text) => text,
            Seen::Ping(_) | Seen::Pong(_) => continue,
            other => panic!(
                "the replaying client, after {} of {HELD}: {other:?}",
                expected - 1
            ),
        };
        assert_eq!(
            position_of(&text),
            (expected, epoch.clone()),
            "the replay in order"
        );
        progress.advanced();
        // A steady reader, not a greedy one: about 10 MB/s at most, far above the hub's
        // minimum read rate, so that the replay lasts a second or more.
        if expected % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        expected += 1;
    }
    let replay_took = replay_started.elapsed();
    let replay = (replay_started - base)..(replay_started - base + replay_took);
    stop.store(true, Ordering::Release);
    let sent = within("the ticker", ticks).await.unwrap();
    let ticks = within("the ticker's reader", ticker_reader).await.unwrap();
    let sent_during = ticks
        .iter()
        .filter(|(sent, _)| replay.contains(sent))
        .count();
    let arrived_during = ticks
        .iter()
        .filter(|(_, arrived)| replay.contains(arrived))
        .count();
    let max_lag = ticks
        .iter()
        .map(|(sent, arrived)| arrived.saturating_sub(*sent))
        .max();
    println!(
        "replay of {HELD} × 1 KiB took {replay_took:?}; ticker: {} of {sent} ticks, \
         {sent_during} sent and {arrived_during} arrived during the replay, the slowest \
         {max_lag:?} late",
        ticks.len()
    );
    assert_eq!(ticks.len() as u64, sent, "every tick arrived");
    // The reader's pacing makes the replay last a second or more: some 200 ticks.
    assert!(
        sent_during >= 20,
        "too few ticks during the replay to judge: {sent_during}"
    );
    assert!(
        arrived_during * 2 >= sent_during,
        "the replay held up its shard: {arrived_during} ticks arrived during it, of \
         {sent_during} sent (the slowest {max_lag:?} late)"
    );
    sync(&mut ws).await;
    assert_eq!(hub.stats().slow_consumer_disconnects, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_replay_is_not_cut_and_does_not_hold_up_others() {
    long_replay_beside_a_live_channel(None).await;
}

/// The replay does not count against the outbound bound: 10 MB replayed through a 64 KiB
/// bound to a client that keeps reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_replay_is_not_counted_against_a_small_outbound_bound() {
    long_replay_beside_a_live_channel(Some(64 * 1024)).await;
}

/// A publish to a history channel is all or nothing: with a 16 KiB shard backlog and two
/// shards with subscribers, a tight loop of 1 KiB publications is partly refused as
/// overloaded; the accepted ones have offsets 1, 2, 3… without gaps, every subscriber gets
/// exactly them, and the history holds exactly them.
///
/// On one thread: the shards run only when the loop yields (every 100 attempts), so each
/// stretch of the loop fills their backlog and meets the bound. With worker threads of their
/// own the shards could keep up with the loop when the machine was busy, and a CI run saw
/// 3,000 accepted and none refused.
#[tokio::test(flavor = "current_thread")]
async fn a_refused_publish_takes_no_offset() {
    const ATTEMPTS: u64 = 3_000;
    let _turn = one_at_a_time().await;
    let config = HubConfig::builder()
        .shards(2)
        .shard_backlog_bytes(16 * 1024)
        .channel_history(NEWS, policy(10_000, LONG))
        .history_memory_budget(64 << 20)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    // Four clients: both shards have subscribers.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut ws = server.connect().await;
        let (offset, _) = ack_position(&subscribe_since(&mut ws, NEWS, None).await);
        assert_eq!(offset, 0);
        clients.push(ws);
    }
    let shard_clients = hub.stats().shard_clients;
    assert!(
        shard_clients.iter().all(|&n| n > 0),
        "both shards have subscribers: {shard_clients:?}"
    );
    let mut accepted = Vec::new();
    let mut refused = 0;
    for attempt in 0..ATTEMPTS {
        match hub.publish(NEWS, &tick(attempt, PAD)) {
            Ok(Some(position)) => accepted.push((attempt, position.offset)),
            Ok(None) => panic!("no position on a history channel"),
            Err(err) if err.is_overloaded() => refused += 1,
            Err(err) => panic!("publish {attempt}: {err}"),
        }
        if attempt % 100 == 99 {
            tokio::task::yield_now().await;
        }
    }
    println!(
        "{} accepted, {refused} refused as overloaded",
        accepted.len()
    );
    assert!(
        refused > 0 && !accepted.is_empty(),
        "the loop must meet the backlog bound to test anything: {} accepted, {refused} refused",
        accepted.len()
    );
    let offsets: Vec<u64> = accepted.iter().map(|&(_, offset)| offset).collect();
    let expected: Vec<u64> = (1..=accepted.len() as u64).collect();
    assert!(
        offsets == expected,
        "the accepted publications' offsets have gaps or repeats"
    );
    for (k, ws) in clients.iter_mut().enumerate() {
        let mut progress = Progress::new(format!("client {k}'s accepted publications"));
        for &(attempt, offset) in &accepted {
            let text = progress.wait(next_text(ws)).await;
            assert_eq!(position_of(&text).0, offset, "client {k}: {text}");
            assert_eq!(
                parse(&text)["data"]["seq"],
                attempt,
                "client {k}: offset {offset} is publication {attempt}"
            );
            progress.advanced();
        }
        sync(ws).await;
    }
    let page = hub.history(NEWS, 0, ATTEMPTS as usize).expect("a history");
    let held: Vec<(u64, u64)> = page
        .publications
        .iter()
        .map(|p| {
            let message: Value = serde_json::from_slice(&p.message).expect("JSON");
            (message["data"]["seq"].as_u64().expect("seq"), p.offset)
        })
        .collect();
    assert!(
        held == accepted,
        "the history holds exactly the accepted publications"
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Hub::publish and Hub::history
// ---------------------------------------------------------------------------------------------

/// `publish` and `publish_async` return 1, 2, 3… in the epoch the frames carry (and
/// `send_to_channel` takes the next offset too); `Ok(None)` without history; `history`
/// returns the page asked for, trimmed to what is held, and `None` without history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_returns_positions_and_history_returns_pages() {
    let config = HubConfig::builder()
        .channel_history(NEWS, policy(100, LONG))
        .channel_history("short", policy(5, LONG))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let hub = &server.hub;
    let mut ws = server.connect().await;
    let (_, epoch) = ack_position(&subscribe_since(&mut ws, NEWS, None).await);
    for seq in 1..=5 {
        let position = hub
            .publish(NEWS, &tick(seq, 0))
            .unwrap()
            .expect("a position");
        assert_eq!((position.offset, &*position.epoch), (seq, epoch.as_str()));
    }
    let position = hub
        .publish_async(NEWS, &tick(6, 0))
        .await
        .unwrap()
        .expect("a position");
    assert_eq!((position.offset, &*position.epoch), (6, epoch.as_str()));
    hub.send_to_channel(NEWS, &tick(7, 0)).unwrap();
    expect_ticks(&mut ws, NEWS, 1..=7, &epoch).await;

    assert!(hub.publish("plain", &tick(1, 0)).unwrap().is_none());
    assert!(hub
        .publish_async("plain", &tick(1, 0))
        .await
        .unwrap()
        .is_none());
    assert!(hub.history("plain", 0, 10).is_none());

    let page_of = |channel: &str, since: u64, limit: usize| {
        let page = hub.history(channel, since, limit).expect("a history");
        for publication in &page.publications {
            let message: Value = serde_json::from_slice(&publication.message)
                .unwrap_or_else(|e| panic!("publication {} is not JSON: {e}", publication.offset));
            assert_eq!(
                message["data"]["seq"], publication.offset,
                "publication {}: {message}",
                publication.offset
            );
        }
        let offsets: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
        (page.epoch.to_string(), page.latest, offsets)
    };
    assert_eq!(
        page_of(NEWS, 0, 100),
        (epoch.clone(), 7, vec![1, 2, 3, 4, 5, 6, 7])
    );
    assert_eq!(page_of(NEWS, 3, 2), (epoch.clone(), 7, vec![4, 5]));
    assert_eq!(page_of(NEWS, 6, 10), (epoch.clone(), 7, vec![7]));
    assert_eq!(page_of(NEWS, 7, 10), (epoch.clone(), 7, vec![]));
    assert_eq!(page_of(NEWS, 100, 10), (epoch.clone(), 7, vec![]));

    let short = publish_ticks(hub, "short", 1..=8, 0).await;
    assert_eq!(
        page_of("short", 0, 100),
        (short.clone(), 8, vec![4, 5, 6, 7, 8])
    );
    assert_eq!(page_of("short", 5, 2), (short, 8, vec![6, 7]));
    sync(&mut ws).await;
}
