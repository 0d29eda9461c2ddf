//! Close codes: 1007 for invalid UTF-8, 1009 for a message over the limit (across
//! fragments), 1002 for each protocol violation, 1008 over the message rate limit, the close
//! handshake a client starts, and `Hub::disconnect` with the application's code and reason.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use support::*;
use wshub::{HubConfig, HubConfigBuilder, Message};

const LIMIT: usize = 1024;

async fn small_limit_server() -> Server {
    Server::start(
        HubConfig::builder()
            .max_message_size(LIMIT)
            .build()
            .unwrap(),
    )
    .await
}

/// A `ping` request padded with spaces to exactly `len` bytes.
fn ping_of_len(len: usize) -> Vec<u8> {
    let base = br#"{"type":"ping"}"#;
    let mut out = base[..base.len() - 1].to_vec();
    out.resize(len - 1, b' ');
    out.push(b'}');
    assert_eq!(out.len(), len);
    out
}

/// Sends `frames` on a fresh connection and asserts the server closes with `code`, then
/// drops the connection.
async fn expect_close_after(server: &Server, frames: &[Vec<u8>], code: u16, what: &str) {
    let mut raw = Raw::connect(server.addr).await;
    for frame in frames {
        raw.send(frame).await;
    }
    let (got, reason) = raw.read_close().await;
    assert_eq!(got, code, "{what}: closed with {got} {reason:?}");
    // The server ends the connection after the close frame (it may wait briefly for ours).
    raw.send(&client_frame(FIN | OP_CLOSE, &code_payload(1000)))
        .await;
    raw.read_to_end().await;
}

fn code_payload(code: u16) -> Vec<u8> {
    code.to_be_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_text_message_closes_with_1007() {
    let server = Server::default_hub().await;
    expect_close_after(
        &server,
        &[client_frame(
            FIN | OP_TEXT,
            b"{\"type\":\"ping\",\"x\":\"\xff\"}",
        )],
        1007,
        "invalid byte",
    )
    .await;
    // Overlong encoding of '/'.
    expect_close_after(
        &server,
        &[client_frame(FIN | OP_TEXT, b"\xc0\xaf")],
        1007,
        "overlong",
    )
    .await;
    // A surrogate half.
    expect_close_after(
        &server,
        &[client_frame(FIN | OP_TEXT, b"\xed\xa0\x80")],
        1007,
        "surrogate",
    )
    .await;
    // Invalid only once the fragments are joined: é's first byte ends the first fragment and
    // a byte that cannot continue it starts the second.
    expect_close_after(
        &server,
        &[
            client_frame(OP_TEXT, b"\"\xc3"),
            client_frame(FIN | OP_CONT, b"(\""),
        ],
        1007,
        "split across fragments",
    )
    .await;
    // A character cut by the end of the message.
    expect_close_after(
        &server,
        &[
            client_frame(OP_TEXT, b"\"ab"),
            client_frame(FIN | OP_CONT, b"\xe2\x82"),
        ],
        1007,
        "truncated at the end",
    )
    .await;
    // A close frame whose reason is not UTF-8.
    let mut close = code_payload(1000);
    close.extend_from_slice(b"\xff");
    expect_close_after(
        &server,
        &[client_frame(FIN | OP_CLOSE, &close)],
        1007,
        "close reason",
    )
    .await;
    assert_eq!(server.hub.client_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_character_split_between_fragments_is_valid() {
    let server = Server::default_hub().await;
    let mut raw = Raw::connect(server.addr).await;
    // {"type":"subscribe","data":"é"} with é split between two fragments.
    raw.send_frame(OP_TEXT, b"{\"type\":\"subscribe\",\"data\":\"\xc3")
        .await;
    raw.send_frame(FIN | OP_CONT, b"\xa9\"}").await;
    let ack = raw.read_text().await;
    assert!(
        ack.starts_with("{\"type\":\"subscribed\",\"channel\":\"é\""),
        "{ack}"
    );
    // Binary frames are not text: bytes that are not UTF-8 are malformed JSON, not 1007.
    raw.send_frame(FIN | OP_BINARY, b"\xff\xfe").await;
    let error = raw.read_text().await;
    assert!(
        error.starts_with(r#"{"type":"error","data":"malformed message""#),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_up_to_the_limit_pass_across_fragments() {
    let server = small_limit_server().await;
    let mut raw = Raw::connect(server.addr).await;
    raw.send_frame(FIN | OP_TEXT, &ping_of_len(LIMIT)).await;
    assert!(raw.read_text().await.starts_with(r#"{"type":"pong""#));
    let whole = ping_of_len(LIMIT);
    raw.send_frame(OP_TEXT, &whole[..400]).await;
    // A control frame may come between fragments.
    raw.send_frame(FIN | OP_PING, b"mid").await;
    raw.send_frame(OP_CONT, &whole[400..1000]).await;
    raw.send_frame(FIN | OP_CONT, &whole[1000..]).await;
    assert_eq!(
        raw.read_frame().await,
        RawFrame::Frame {
            opcode: OP_PONG,
            payload: b"mid".to_vec()
        }
    );
    assert!(raw.read_text().await.starts_with(r#"{"type":"pong""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_over_the_limit_closes_with_1009() {
    let server = small_limit_server().await;
    expect_close_after(
        &server,
        &[client_frame(FIN | OP_TEXT, &ping_of_len(LIMIT + 1))],
        1009,
        "one frame",
    )
    .await;
    let over = ping_of_len(LIMIT + 1);
    expect_close_after(
        &server,
        &[
            client_frame(OP_TEXT, &over[..500]),
            client_frame(OP_CONT, &over[500..1000]),
            client_frame(FIN | OP_CONT, &over[1000..]),
        ],
        1009,
        "across fragments",
    )
    .await;
    // Binary messages count the same.
    expect_close_after(
        &server,
        &[
            client_frame(OP_BINARY, &over[..1000]),
            client_frame(FIN | OP_CONT, &over[1000..]),
        ],
        1009,
        "binary across fragments",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_limit_is_64_kib() {
    let server = Server::default_hub().await;
    let mut raw = Raw::connect(server.addr).await;
    raw.send_frame(FIN | OP_TEXT, &ping_of_len(65_536)).await;
    assert!(raw.read_text().await.starts_with(r#"{"type":"pong""#));
    expect_close_after(
        &server,
        &[client_frame(FIN | OP_TEXT, &ping_of_len(65_537))],
        1009,
        "65,537 bytes",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_protocol_violation_closes_with_1002() {
    let server = Server::default_hub().await;
    let big = vec![b'x'; 126];
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "ping over 125 bytes",
            vec![client_frame(FIN | OP_PING, &big)],
        ),
        (
            "pong over 125 bytes",
            vec![client_frame(FIN | OP_PONG, &big)],
        ),
        (
            "close over 125 bytes",
            vec![client_frame(FIN | OP_CLOSE, &{
                let mut p = code_payload(1000);
                p.extend_from_slice(&[b'r'; 124]);
                p
            })],
        ),
        ("fragmented ping", vec![client_frame(OP_PING, b"a")]),
        (
            "fragmented close",
            vec![client_frame(OP_CLOSE, &code_payload(1000))],
        ),
        (
            "RSV1",
            vec![client_frame(FIN | 0x40 | OP_TEXT, br#"{"type":"ping"}"#)],
        ),
        (
            "RSV2",
            vec![client_frame(FIN | 0x20 | OP_TEXT, br#"{"type":"ping"}"#)],
        ),
        (
            "RSV3",
            vec![client_frame(FIN | 0x10 | OP_TEXT, br#"{"type":"ping"}"#)],
        ),
        ("opcode 0x3", vec![client_frame(FIN | 0x3, b"")]),
        ("opcode 0xB", vec![client_frame(FIN | 0xB, b"")]),
        (
            "unmasked frame",
            vec![frame_bytes(FIN | OP_TEXT, br#"{"type":"ping"}"#, None)],
        ),
        (
            "continuation without a start",
            vec![client_frame(FIN | OP_CONT, br#"{"type":"ping"}"#)],
        ),
        (
            "new message inside a fragmented one",
            vec![
                client_frame(OP_TEXT, b"{"),
                client_frame(FIN | OP_TEXT, b"{}"),
            ],
        ),
        (
            "close with one byte",
            vec![client_frame(FIN | OP_CLOSE, &[3])],
        ),
        (
            "close code 1005",
            vec![client_frame(FIN | OP_CLOSE, &code_payload(1005))],
        ),
        (
            "close code 999",
            vec![client_frame(FIN | OP_CLOSE, &code_payload(999))],
        ),
    ];
    for (what, frames) in cases {
        expect_close_after(&server, &frames, 1002, what).await;
    }
    let hub = server.hub.clone();
    wait_until("every violator to be gone", move || {
        hub.client_count() == 0 && hub.stats().connection_tasks == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_violation_after_good_requests_still_closes_and_the_replies_before_it_may_arrive() {
    let server = Server::default_hub().await;
    let mut raw = Raw::connect(server.addr).await;
    raw.send_text(r#"{"type":"subscribe","data":"a"}"#).await;
    assert!(raw.read_text().await.starts_with(r#"{"type":"subscribed""#));
    raw.send_frame(FIN | 0x40 | OP_TEXT, b"{}").await;
    assert_eq!(raw.read_close().await.0, 1002);
    let hub = server.hub.clone();
    wait_until("the client and its subscription to be gone", move || {
        hub.client_count() == 0 && hub.channel_count() == 0
    })
    .await;
}

/// `builder`'s configuration with an `on_disconnect` that counts its calls, and the count.
fn counting_disconnects(builder: HubConfigBuilder) -> (HubConfig, Arc<AtomicUsize>) {
    let disconnects = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&disconnects);
    let config = builder
        .on_disconnect(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    (config, disconnects)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_echoed_and_the_client_removed() {
    let (config, disconnects) = counting_disconnects(HubConfig::builder());
    let server = Server::start(config).await;

    let mut raw = Raw::connect(server.addr).await;
    let mut payload = code_payload(4100);
    payload.extend_from_slice(b"done");
    raw.send_frame(FIN | OP_CLOSE, &payload).await;
    let (code, _) = raw.read_close().await;
    assert_eq!(code, 4100, "the server echoes the client's code");
    raw.read_to_end().await;

    // An empty close frame is answered with 1000.
    let mut raw = Raw::connect(server.addr).await;
    raw.send_frame(FIN | OP_CLOSE, b"").await;
    assert_eq!(raw.read_close().await.0, 1000);
    raw.read_to_end().await;

    // A real client's close handshake completes.
    let mut ws = server.connect().await;
    close(&mut ws, 1000).await;
    match next_seen(&mut ws).await {
        Seen::Close(Some((1000, _))) | Seen::End(None) => {}
        other => panic!("expected the close handshake to complete, got {other:?}"),
    }

    let hub = server.hub.clone();
    wait_until("the clients to be removed", move || {
        hub.client_count() == 0 && hub.stats().connection_tasks == 0
    })
    .await;
    assert_eq!(disconnects.load(Ordering::SeqCst), 3);
}

/// Clients that vanish without a close frame (a FIN, a RST) are removed with their
/// subscriptions, stop counting as connections, and get `on_disconnect` once each, while a
/// client beside them on the same shard goes on receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_vanish_are_removed_and_told_once() {
    let (config, disconnects) = counting_disconnects(HubConfig::builder().shards(1));
    let server = Server::start(config).await;
    let mut staying = Raw::connect(server.addr).await;
    staying.subscribe("c").await;
    let mut vanishing = Vec::new();
    for _ in 0..6 {
        let mut raw = Raw::connect(server.addr).await;
        raw.subscribe("c").await;
        vanishing.push(raw);
    }
    for (i, raw) in vanishing.into_iter().enumerate() {
        if i % 2 == 0 {
            drop(raw);
        } else {
            reset(raw.stream);
        }
    }
    let hub = server.hub.clone();
    wait_until("the vanished clients to be removed", move || {
        let stats = hub.stats();
        stats.clients == 1 && stats.connection_tasks == 1
    })
    .await;
    let counted = Arc::clone(&disconnects);
    wait_until("on_disconnect for each", move || {
        counted.load(Ordering::SeqCst) == 6
    })
    .await;
    assert_eq!(server.hub.channel_subscriber_count("c"), 1);
    server
        .hub
        .send_to_channel("c", &Message::new("still here"))
        .unwrap();
    assert!(staying.read_text().await.contains("still here"));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(disconnects.load(Ordering::SeqCst), 6, "told once each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_with_the_code_and_reason_after_what_was_sent() {
    let (config, disconnects) = counting_disconnects(HubConfig::builder());
    let server = Server::start(config).await;
    let mut ws = server.connect().await;
    let id = server.newest_client().await;
    let mut other = server.connect().await;
    subscribe(&mut ws, "c").await;
    subscribe(&mut other, "c").await;

    for i in 0..20 {
        server
            .hub
            .send_to_channel("c", &Message::new("m").with_data(i))
            .unwrap();
    }
    server.hub.disconnect(id, 4321, "go away").unwrap();
    for i in 0..20 {
        let message = next_json(&mut ws).await;
        assert_eq!(message["data"], i, "sent before the disconnect: {message}");
    }
    assert_eq!(
        read_until_close(&mut ws).await,
        (4321, "go away".to_owned())
    );
    let hub = server.hub.clone();
    wait_until("the client to be removed", move || hub.client_count() == 1).await;
    // on_disconnect runs once the connection task has finished the close handshake.
    let counted = Arc::clone(&disconnects);
    wait_until("on_disconnect", move || counted.load(Ordering::SeqCst) == 1).await;
    assert_eq!(server.hub.channel_subscriber_count("c"), 1);
    // The other client is untouched.
    for i in 0..20 {
        assert_eq!(next_json(&mut other).await["data"], i);
    }
    sync(&mut other).await;

    // Disconnecting a client that is gone is not an error, and does nothing.
    server.hub.disconnect(id, 1000, "").unwrap();

    // Codes a server may not send are refused.
    let other_id = server.newest_client().await;
    for code in [0, 999, 1004, 1005, 1006, 1015, 2999, 5000] {
        let err = server.hub.disconnect(other_id, code, "").unwrap_err();
        assert!(err.is_invalid_argument(), "code {code}: {err}");
    }

    // A long reason is cut to fit a close frame, at a character boundary.
    let long = "é".repeat(100);
    server.hub.disconnect(other_id, 1000, &long).unwrap();
    let (code, reason) = read_until_close(&mut other).await;
    assert_eq!(code, 1000);
    assert!(
        reason.len() <= 123 && !reason.is_empty(),
        "{} bytes",
        reason.len()
    );
    assert!(long.starts_with(&reason));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_the_message_rate_is_closed_with_1008() {
    let config = HubConfig::builder()
        .message_rate_limit(2, 5)
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let mut raw = Raw::connect(server.addr).await;
    // 40 requests in one write: far over a burst of 5 at 2 per second.
    let mut burst = Vec::new();
    for _ in 0..40 {
        burst.extend_from_slice(&client_frame(FIN | OP_TEXT, br#"{"type":"ping"}"#));
    }
    raw.send(&burst).await;
    let mut pongs = 0;
    let code = loop {
        match raw.read_frame().await {
            RawFrame::Frame {
                opcode: OP_TEXT, ..
            } => pongs += 1,
            RawFrame::Frame {
                opcode: OP_CLOSE,
                payload,
            } => break u16::from_be_bytes([payload[0], payload[1]]),
            RawFrame::Frame { .. } => {}
            RawFrame::End => panic!("the connection ended without a close frame"),
        }
    };
    assert_eq!(code, 1008, "over the rate limit");
    assert!(
        pongs < 40,
        "requests over the limit were not served ({pongs} pongs)"
    );
    raw.read_to_end().await;
    let hub = server.hub.clone();
    wait_until("the client to be removed", move || hub.client_count() == 0).await;

    // A client within the limit is served and kept.
    let mut raw = Raw::connect(server.addr).await;
    for _ in 0..3 {
        raw.send_text(r#"{"type":"ping"}"#).await;
        assert!(raw.read_text().await.starts_with(r#"{"type":"pong""#));
    }
    assert_eq!(server.hub.client_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn there_is_no_message_rate_limit_by_default() {
    let server = Server::default_hub().await;
    let mut raw = Raw::connect(server.addr).await;
    let mut burst = Vec::new();
    for _ in 0..500 {
        burst.extend_from_slice(&client_frame(FIN | OP_TEXT, br#"{"type":"ping"}"#));
    }
    raw.send(&burst).await;
    for i in 0..500 {
        let reply = raw.read_text().await;
        assert!(reply.starts_with(r#"{"type":"pong""#), "reply {i}: {reply}");
    }
    assert_eq!(server.hub.client_count(), 1);
}
