//! Helpers shared by the integration tests: a hub served on 127.0.0.1:0, a real WebSocket
//! client (tokio-tungstenite), and a raw TCP client for what a real client refuses to send.
//!
//! Every wait here is bounded by a generous deadline ([`DEADLINE`]); a test that would hang
//! fails with a message saying what it was waiting for. A whole stream of messages is bounded
//! by progress instead ([`Progress`]): how long a stream takes grows with the machine's load
//! and the build, but a stream that stops is a failure after [`PROGRESS`].

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::http::Request;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;
use wshub::{Hub, HubConfig};

/// How long any single wait may take before the test fails. Generous: the machine is noisy.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A WebSocket client connection.
pub type Ws = WebSocketStream<TcpStream>;

/// Awaits `future`, failing the test with `what` if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// How long a stream may go without a new message before the test fails. A stall of this
/// long is a lost message or a stuck hub, not a slow machine: in a healthy stream the next
/// message is milliseconds away, even in a debug build on two loaded cores.
pub const PROGRESS: Duration = Duration::from_secs(20);

/// The hard cap on a whole stream however it progresses, so that nothing can hang: six times
/// [`DEADLINE`], several times what the longest stream here takes on a loaded 2-core machine.
pub const STREAM_CAP: Duration = Duration::from_secs(120);

/// A progress deadline for reading a stream: each wait fails when no new message has arrived
/// for [`PROGRESS`] (however many frames that are not progress, such as pings, came between),
/// or when the whole stream has taken longer than [`STREAM_CAP`].
pub struct Progress {
    what: String,
    started: tokio::time::Instant,
    last: tokio::time::Instant,
    messages: u64,
}

impl Progress {
    /// Starts the clocks: the stream's first message must come within [`PROGRESS`] from now.
    pub fn new(what: impl Into<String>) -> Progress {
        let now = tokio::time::Instant::now();
        Progress {
            what: what.into(),
            started: now,
            last: now,
            messages: 0,
        }
    }

    /// Records a new message: the progress deadline starts again from now.
    pub fn advanced(&mut self) {
        self.last = tokio::time::Instant::now();
        self.messages += 1;
    }

    /// Awaits `future` (one read from the stream), failing the test if the progress deadline
    /// or the stream's hard cap passes first.
    pub async fn wait<T>(&self, future: impl Future<Output = T>) -> T {
        let stalled_at = self.last + PROGRESS;
        let capped_at = self.started + STREAM_CAP;
        match tokio::time::timeout_at(stalled_at.min(capped_at), future).await {
            Ok(value) => value,
            Err(_) if stalled_at <= capped_at => panic!(
                "{}: no new message for {PROGRESS:?} (after {} messages in {:?})",
                self.what,
                self.messages,
                self.started.elapsed()
            ),
            Err(_) => panic!(
                "{}: still streaming after the hard cap of {STREAM_CAP:?} ({} messages, the \
                 last {:?} ago)",
                self.what,
                self.messages,
                self.last.elapsed()
            ),
        }
    }
}

/// Awaits `future`, a task that reads a whole stream under its own [`Progress`] deadline,
/// failing the test only if it outlasts the hard cap (plus the progress deadline, so that the
/// task's own, more telling failure comes first).
pub async fn within_stream_cap<T>(what: &str, future: impl Future<Output = T>) -> T {
    let cap = STREAM_CAP + PROGRESS;
    match tokio::time::timeout(cap, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {cap:?} waiting for {what}"),
    }
}

/// Polls `condition` every 10 ms until it holds, failing after [`DEADLINE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// A hub served by [`wshub::serve`] on 127.0.0.1 with an ephemeral port.
pub struct Server {
    pub hub: Hub,
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts `wshub::serve` with `config`; it runs until [`Server::shutdown`] (or drop).
    pub async fn start(config: HubConfig) -> Server {
        let hub = Hub::with_config(config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(wshub::serve(listener, hub.clone(), async move {
            let _ = rx.await;
        }));
        Server {
            hub,
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Starts a hub with the default configuration.
    pub async fn default_hub() -> Server {
        Server::start(HubConfig::default()).await
    }

    /// `ws://ADDR/ws`
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Connects a WebSocket client to `/ws` and waits until the hub counts one more client
    /// (the upgrade is answered before the hub registers the client, so a test that
    /// publishes right after connecting could otherwise miss it).
    pub async fn connect(&self) -> Ws {
        let before = self.hub.client_count();
        let ws = connect(self.addr).await;
        let hub = self.hub.clone();
        wait_until("the client to be registered", move || {
            hub.client_count() > before
        })
        .await;
        ws
    }

    /// The id of the only client, or of the newest one.
    pub async fn newest_client(&self) -> wshub::ClientId {
        let clients = self.hub.clients().await;
        clients.last().expect("a connected client").info.id
    }

    /// Triggers the shutdown future and waits for `serve` to return.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            within("serve to return after shutdown", task)
                .await
                .expect("serve task panicked");
        }
    }

    /// Triggers the shutdown without waiting for `serve`.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for `serve` to return (after [`Server::begin_shutdown`]).
    pub async fn wait_stopped(&mut self) {
        self.shutdown().await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Connects a WebSocket client to `ws://addr/ws`.
pub async fn connect(addr: SocketAddr) -> Ws {
    let request = format!("ws://{addr}/ws")
        .into_client_request()
        .expect("a valid request");
    let (ws, _) = try_connect(addr, request)
        .await
        .expect("the WebSocket handshake to succeed");
    ws
}

/// Connects a WebSocket client with `request` (its own headers, path, query).
pub async fn try_connect(
    addr: SocketAddr,
    request: Request<()>,
) -> Result<(Ws, Response), tungstenite::Error> {
    within("the WebSocket handshake", async {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        stream.set_nodelay(true).expect("nodelay");
        tokio_tungstenite::client_async(request, stream).await
    })
    .await
}

/// A request to `ws://addr{path}` to which headers can be added.
pub fn request(addr: SocketAddr, path: &str) -> Request<()> {
    format!("ws://{addr}{path}")
        .into_client_request()
        .expect("a valid request")
}

/// The HTTP status of a refused handshake, or panics if it succeeded or failed otherwise.
pub fn refused_status(result: Result<(Ws, Response), tungstenite::Error>) -> u16 {
    match result {
        Ok(_) => panic!("the handshake succeeded; expected a refusal"),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(err) => panic!("the handshake failed without an HTTP answer: {err}"),
    }
}

/// What a client can see next on a connection.
#[derive(Debug)]
pub enum Seen {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
    /// The stream ended (or failed) without a close frame.
    End(Option<String>),
}

/// The next thing the server sends, pings and pongs included.
pub async fn next_seen(ws: &mut Ws) -> Seen {
    let next = within("the next frame from the server", ws.next()).await;
    match next {
        None => Seen::End(None),
        Some(Err(err)) => Seen::End(Some(err.to_string())),
        Some(Ok(message)) => match message {
            WsMessage::Text(text) => Seen::Text(text.to_string()),
            WsMessage::Binary(data) => Seen::Binary(data.to_vec()),
            WsMessage::Ping(data) => Seen::Ping(data.to_vec()),
            WsMessage::Pong(data) => Seen::Pong(data.to_vec()),
            WsMessage::Close(frame) => {
                Seen::Close(frame.map(|f| (f.code.into(), f.reason.to_string())))
            }
            WsMessage::Frame(_) => unreachable!("not produced when reading"),
        },
    }
}

/// The next text message, raw, skipping keep-alive pings and pongs. Panics on anything else.
pub async fn next_text(ws: &mut Ws) -> String {
    loop {
        match next_seen(ws).await {
            Seen::Text(text) => return text,
            Seen::Ping(_) | Seen::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// The next text message as JSON, skipping pings and pongs.
pub async fn next_json(ws: &mut Ws) -> Value {
    let text = next_text(ws).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Reads messages until one of type `kind` arrives, and returns it; at most `limit` others
/// are skipped.
pub async fn read_until_type(ws: &mut Ws, kind: &str) -> Value {
    for _ in 0..10_000 {
        let message = next_json(ws).await;
        if message["type"] == kind {
            return message;
        }
    }
    panic!("no {kind:?} message in 10,000 messages")
}

/// Reads until the close frame and returns its code and reason, skipping every message.
/// Panics if the stream ends without one.
pub async fn read_until_close(ws: &mut Ws) -> (u16, String) {
    for _ in 0..1_000_000 {
        match next_seen(ws).await {
            Seen::Close(Some(close)) => return close,
            Seen::Close(None) => panic!("close frame without a code"),
            Seen::End(err) => panic!("the connection ended without a close frame ({err:?})"),
            _ => continue,
        }
    }
    panic!("no close frame in 1,000,000 frames")
}

/// Sends a text frame.
pub async fn send_text(ws: &mut Ws, text: &str) {
    within("a send", ws.send(WsMessage::text(text.to_owned())))
        .await
        .expect("send a text frame");
}

/// Sends a JSON value as a text frame.
pub async fn send_json(ws: &mut Ws, value: &Value) {
    send_text(ws, &value.to_string()).await
}

/// Subscribes to `channel` and waits for the `subscribed` acknowledgement.
pub async fn subscribe(ws: &mut Ws, channel: &str) {
    send_json(
        ws,
        &serde_json::json!({"type": "subscribe", "data": channel}),
    )
    .await;
    let ack = next_json(ws).await;
    assert_eq!(
        ack["type"], "subscribed",
        "ack of subscribe {channel}: {ack}"
    );
    assert_eq!(ack["channel"], channel);
}

/// Sends a `ping` request and waits for the `pong`: every request sent before it has been
/// handled by then (replies go through the client's shard in order).
pub async fn sync(ws: &mut Ws) {
    send_text(ws, r#"{"type":"ping"}"#).await;
    let pong = next_json(ws).await;
    assert_eq!(pong["type"], "pong", "expected the pong, got {pong}");
}

/// Sends a close frame with `code` (the client's side of the handshake).
pub async fn close(ws: &mut Ws, code: u16) {
    let frame = CloseFrame {
        code: code.into(),
        reason: "".into(),
    };
    let _ = within("a close", ws.close(Some(frame))).await;
}

/// Asserts `text` is exactly `expected_without_timestamp` with `,"timestamp":"…"` added as
/// the last key, and that the timestamp is RFC 3339 UTC near now. Returns the timestamp.
pub fn assert_envelope(text: &str, expected_without_timestamp: &str) -> String {
    let prefix = expected_without_timestamp
        .strip_suffix('}')
        .expect("expected JSON ends with }");
    let separator = if prefix.ends_with('{') { "" } else { "," };
    let start = format!("{prefix}{separator}\"timestamp\":\"");
    let Some(rest) = text.strip_prefix(&start) else {
        panic!("message\n  {text}\nis not\n  {expected_without_timestamp} + timestamp");
    };
    let Some(timestamp) = rest.strip_suffix("\"}") else {
        panic!("timestamp is not the last key: {text}");
    };
    assert_timestamp(timestamp);
    timestamp.to_owned()
}

/// Asserts `timestamp` is RFC 3339 in UTC (`Z`) with 1 to 9 fractional digits, and within
/// five minutes of this machine's clock (so it is UTC, not local time, and stamped now).
pub fn assert_timestamp(timestamp: &str) {
    let seconds = parse_rfc3339_utc(timestamp)
        .unwrap_or_else(|| panic!("not an RFC 3339 UTC timestamp: {timestamp:?}"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    assert!(
        (seconds - now).abs() < 300.0,
        "timestamp {timestamp} is not near now ({now} s since the epoch)"
    );
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS.fffffffffZ`, if it has that form.
fn parse_rfc3339_utc(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let rest = &text[19..];
    let rest = rest.strip_suffix('Z')?;
    let fraction = if rest.is_empty() {
        0.0
    } else {
        let digits = rest.strip_prefix('.')?;
        if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        format!("0.{digits}").parse::<f64>().ok()?
    };
    // Days from civil (Howard Hinnant).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hour * 3600 + minute * 60 + second) as f64 + fraction)
}

// ---------------------------------------------------------------------------------------------
// Raw TCP: plain HTTP requests, and WebSocket frames a real client would never send.
// ---------------------------------------------------------------------------------------------

/// Sends `request` (a whole HTTP/1.1 request) and returns the status and the whole answer as
/// text (the server closes the connection after a refusal or the answer is read to its end).
pub async fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    within("an HTTP answer", async {
        let mut stream = TcpStream::connect(addr).await.expect("tcp connect");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            // An upgrade answer has no body and the connection stays open: stop at its end.
            if answer.starts_with(b"HTTP/1.1 101") && answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
        (status, text)
    })
    .await
}

/// The lines of an upgrade request for `path` on `addr`, without the final blank line.
pub fn upgrade_request(addr: SocketAddr, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
}

/// A masked client frame: `first` is the first byte (FIN, RSV and opcode).
pub fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    frame_bytes(first, payload, Some([0x12, 0x34, 0x56, 0x78]))
}

/// A client frame, masked with `mask` or unmasked when `None`.
pub fn frame_bytes(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = out.len() + if mask.is_some() { 4 } else { 0 };
    if let Some(mask) = mask {
        out.extend_from_slice(&mask);
    }
    out.extend_from_slice(payload);
    if let Some(mask) = mask {
        apply_mask(&mut out[start..], mask);
    }
    out
}

/// Masks (or unmasks) `payload` with `mask`, as a client does (RFC 6455, 5.3).
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    for (byte, key) in payload.iter_mut().zip(mask.iter().cycle()) {
        *byte ^= key;
    }
}

pub const FIN: u8 = 0x80;
pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A server frame as the raw client read it.
#[derive(Debug, PartialEq, Eq)]
pub enum RawFrame {
    Frame {
        opcode: u8,
        payload: Vec<u8>,
    },
    /// The connection ended (EOF or reset) before a whole frame.
    End,
}

/// A WebSocket connection driven byte by byte.
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Opens a TCP connection and completes the upgrade on `/ws`.
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Raw::handshake(stream, addr).await
    }

    /// Completes the upgrade on `stream` (already connected to `addr`).
    pub async fn handshake(mut stream: TcpStream, addr: SocketAddr) -> Raw {
        stream.set_nodelay(true).expect("nodelay");
        let request = format!("{}\r\n", upgrade_request(addr, "/ws"));
        within("the raw handshake", async {
            stream
                .write_all(request.as_bytes())
                .await
                .expect("write upgrade");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            let end = loop {
                let n = stream.read(&mut chunk).await.expect("read upgrade answer");
                assert!(n > 0, "connection closed during the handshake");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
            Raw {
                stream,
                buf: buf[end..].to_vec(),
            }
        })
        .await
    }

    /// Writes bytes as they are.
    pub async fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed: later reads tell the test what happened.
        let _ = self.stream.write_all(bytes).await;
    }

    /// Writes a masked frame.
    pub async fn send_frame(&mut self, first: u8, payload: &[u8]) {
        self.send(&client_frame(first, payload)).await
    }

    /// Writes a masked, final text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(FIN | OP_TEXT, text.as_bytes()).await
    }

    /// The next whole server frame, or `End`.
    pub async fn read_frame(&mut self) -> RawFrame {
        within("a frame from the server", self.read_frame_unbounded()).await
    }

    /// The next frame without a deadline of its own (for callers that bound it themselves).
    pub async fn read_frame_unbounded(&mut self) -> RawFrame {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return RawFrame::End,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next text frame's payload, skipping pings and pongs; panics on anything else.
    pub async fn read_text(&mut self) -> String {
        loop {
            match self.read_frame().await {
                RawFrame::Frame {
                    opcode: OP_TEXT,
                    payload,
                } => return String::from_utf8(payload).expect("server text is UTF-8"),
                RawFrame::Frame {
                    opcode: OP_PING | OP_PONG,
                    ..
                } => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads until the server's close frame and returns its code and reason (text frames and
    /// pings before it are skipped). Panics if the connection ends without one.
    pub async fn read_close(&mut self) -> (u16, String) {
        for _ in 0..1_000_000 {
            match self.read_frame().await {
                RawFrame::Frame {
                    opcode: OP_CLOSE,
                    payload,
                } => {
                    assert!(payload.len() >= 2, "close frame without a code");
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let reason = String::from_utf8(payload[2..].to_vec()).expect("UTF-8 reason");
                    return (code, reason);
                }
                RawFrame::Frame { .. } => continue,
                RawFrame::End => panic!("the connection ended without a close frame"),
            }
        }
        panic!("no close frame in 1,000,000 frames")
    }

    /// Reads until the connection ends (EOF or reset); panics after [`DEADLINE`].
    pub async fn read_to_end(&mut self) {
        within("the server to drop the connection", async {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
    }
}

/// Parses one unmasked server frame at the front of `buf`: the frame and the bytes it used.
/// Server frames are never fragmented by wshub; RSV bits must be clear and no mask is set.
pub fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    let [first, second, ..] = *buf else {
        return None;
    };
    assert_eq!(
        first & 0x80,
        0x80,
        "server frames are final (FIN set): {first:#x}"
    );
    assert_eq!(
        first & 0x70,
        0,
        "server frames set no reserved bits: {first:#x}"
    );
    assert_eq!(second & 0x80, 0, "server frames are not masked");
    let (len, header) = match second & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(header..header + len)?;
    Some((
        RawFrame::Frame {
            opcode: first & 0x0F,
            payload: payload.to_vec(),
        },
        header + len,
    ))
}

// ---------------------------------------------------------------------------------------------
// Abuse and fault tests (tests/abuse.rs, tests/faults.rs, tests/scale.rs): many raw clients,
// small receive buffers, resets, counts back to baseline, the process's memory.
// ---------------------------------------------------------------------------------------------

/// Opens a TCP connection to `addr` whose receive buffer is set to `bytes` before connecting
/// (so the window it advertises is small from the start): a client that reads slowly or not
/// at all fills up after a few kilobytes.
pub async fn connect_with_recv_buffer(addr: SocketAddr, bytes: u32) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
    within("tcp connect", socket.connect(addr))
        .await
        .expect("tcp connect")
}

/// Drops `stream` with `SO_LINGER` 0, so that the kernel sends a RST instead of a FIN.
pub fn reset(stream: TcpStream) {
    stream.set_zero_linger().expect("SO_LINGER 0");
    drop(stream);
}

/// This process's resident set size in KiB (`VmRSS` in /proc/self/status), 0 if unknown.
pub fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// The resident memory of process `pid` (a number, or `self`), in KiB; 0 if it cannot be read.
pub fn rss_kib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Waits until the hub counts exactly `clients` clients, `channels` channels, `clients`
/// connection tasks and no queued bytes: the baseline after clients have gone. Fails with
/// the last stats seen.
pub async fn wait_for_baseline(hub: &Hub, clients: usize, channels: usize) {
    let matches = |s: &wshub::HubStats| {
        s.clients == clients
            && s.channels == channels
            && s.connection_tasks == clients
            && s.queued_bytes == 0
            && hub.client_count() == clients
            && hub.channel_count() == channels
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let stats = hub.stats();
        if matches(&stats) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "counts did not return to {clients} clients (and tasks), {channels} channels, \
                 0 queued bytes within {DEADLINE:?}: {stats:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Raw {
    /// Like [`Raw::read_frame_unbounded`], reading into the caller's `scratch` buffer rather
    /// than a fresh 64 KiB one per read: for tests that read with a thousand clients at once.
    pub async fn read_frame_into(&mut self, scratch: &mut [u8]) -> RawFrame {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            match self.stream.read(scratch).await {
                Ok(0) | Err(_) => return RawFrame::End,
                Ok(n) => self.buf.extend_from_slice(&scratch[..n]),
            }
        }
    }

    /// Sends a masked close frame with `code` (the client's side of the close handshake).
    pub async fn send_close(&mut self, code: u16) {
        self.send_frame(FIN | OP_CLOSE, &code.to_be_bytes()).await
    }
}

/// The `"seq"` number in a message's payload without parsing the whole JSON (cheap enough
/// for a thousand readers in a debug build). `None` when there is none.
pub fn seq_of(payload: &[u8]) -> Option<u64> {
    let at = payload.windows(6).position(|w| w == b"\"seq\":")? + 6;
    let digits = payload[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Counts panics anywhere in this test process (hub tasks included, whose panics tokio
/// would otherwise only print) after [`count_panics`] was first called.
static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Installs (once) a panic hook that counts panics before printing them as usual, and returns
/// how many there have been.
pub fn count_panics() -> usize {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            previous(info);
        }));
    });
    PANICS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Reads a stream of messages whose `data.seq` counts up from 0, until one of type `end`,
/// asserting each is the next in sequence (none lost, none out of order); adds one to
/// `received` per message, so several readers may share a counter. Returns the connection
/// and how many messages it got.
pub fn spawn_sequence_reader(
    mut ws: Ws,
    name: String,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> JoinHandle<(Ws, u64)> {
    tokio::spawn(async move {
        let mut expected = 0u64;
        loop {
            let message = next_json(&mut ws).await;
            if message["type"] == "end" {
                return (ws, expected);
            }
            assert_eq!(
                message["data"]["seq"], expected,
                "{name} lost a message or got one out of order"
            );
            expected += 1;
            received.fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    })
}

// ---------------------------------------------------------------------------------------------
// History and recovery (tests/history.rs): subscribing with `since`, and the position
// (`offset`, `epoch`) that a history channel's frames carry as their last two keys.
// ---------------------------------------------------------------------------------------------

/// The subscribe request for `channel`: plain when `since` is `None`, otherwise with
/// `"since":{"offset":N}` and, when given, `"epoch":E`.
pub fn subscribe_request(channel: &str, since: Option<(u64, Option<&str>)>) -> String {
    let mut request = serde_json::json!({"type": "subscribe", "data": channel});
    if let Some((offset, epoch)) = since {
        let mut position = serde_json::json!({"offset": offset});
        if let Some(epoch) = epoch {
            position["epoch"] = epoch.into();
        }
        request["since"] = position;
    }
    request.to_string()
}

/// Subscribes to `channel` (with `since` as in [`subscribe_request`]) and returns the
/// `subscribed` acknowledgement, which must be the next message.
pub async fn subscribe_since(
    ws: &mut Ws,
    channel: &str,
    since: Option<(u64, Option<&str>)>,
) -> Value {
    send_text(ws, &subscribe_request(channel, since)).await;
    let ack = next_json(ws).await;
    assert_eq!(
        ack["type"], "subscribed",
        "the ack of subscribe {channel} since {since:?}: {ack}"
    );
    assert_eq!(ack["channel"], channel, "the ack's channel: {ack}");
    ack
}

/// The position in a history channel's acknowledgement: `data.offset` and `data.epoch`.
pub fn ack_position(ack: &Value) -> (u64, String) {
    let offset = ack["data"]["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer data.offset in the ack {ack}"));
    let epoch = ack["data"]["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("no string data.epoch in the ack {ack}"));
    (offset, epoch.to_owned())
}

/// The `(offset, epoch)` a frame's raw text ends with: `…,"offset":N,"epoch":"E"}`, the two
/// last keys. `None` when the text does not end that way. Cheap (no JSON parse), for readers
/// of long streams.
pub fn tail_position(text: &str) -> Option<(u64, String)> {
    let at = text.rfind(",\"offset\":")?;
    let rest = &text[at + ",\"offset\":".len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let offset = rest[..digits].parse().ok()?;
    let epoch = rest[digits..]
        .strip_prefix(",\"epoch\":")?
        .strip_suffix('}')?;
    let epoch: String = serde_json::from_str(epoch).ok()?;
    Some((offset, epoch))
}

/// [`tail_position`], failing the test when the frame has none.
pub fn position_of(text: &str) -> (u64, String) {
    tail_position(text)
        .unwrap_or_else(|| panic!("no \"offset\" and \"epoch\" as the last two keys: {text}"))
}

impl Raw {
    /// Subscribes to `channel` and reads the acknowledgement, which must come next.
    pub async fn subscribe(&mut self, channel: &str) {
        self.send_text(&subscribe_request(channel, None)).await;
        let ack = self.read_text().await;
        assert!(ack.starts_with(r#"{"type":"subscribed""#), "{ack}");
    }

    /// Sends a `ping` and asserts that the `pong` is the next text message: nothing else was
    /// sent or queued before it.
    pub async fn sync(&mut self) {
        self.send_text(r#"{"type":"ping"}"#).await;
        let next = self.read_text().await;
        assert!(
            next.starts_with(r#"{"type":"pong""#),
            "expected the pong, got {next}"
        );
    }
}

/// A TCP stream that no downcast sees through (as a TLS stream would be), for the hub's
/// generic path; counts the bytes the server writes through it.
pub struct Wrapped {
    inner: TcpStream,
    written: Arc<AtomicU64>,
}

impl Wrapped {
    pub fn new(inner: TcpStream, written: Arc<AtomicU64>) -> Wrapped {
        Wrapped { inner, written }
    }
}

impl AsyncRead for Wrapped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Wrapped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads a client's messages in a task of its own and keeps what `keep` makes of each text
/// frame (given the text and its JSON; `None` skips it, e.g. an acknowledgement). Stops when
/// the connection ends or the recorder is dropped.
pub struct Recorder<T> {
    got: Arc<std::sync::Mutex<Vec<T>>>,
    task: JoinHandle<()>,
}

impl<T: Clone + Send + 'static> Recorder<T> {
    pub fn keeping(mut ws: Ws, keep: impl Fn(&str, Value) -> Option<T> + Send + 'static) -> Self {
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        let task = tokio::spawn(async move {
            while let Some(Ok(frame)) = ws.next().await {
                let WsMessage::Text(text) = frame else {
                    continue;
                };
                let json: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
                if let Some(kept) = keep(&text, json) {
                    sink.lock().unwrap().push(kept);
                }
            }
        });
        Recorder { got, task }
    }

    pub fn len(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    pub fn snapshot(&self) -> Vec<T> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `count` are kept.
    pub async fn wait_for(&self, what: &str, count: usize) {
        self.wait_until_kept(what, move |got| got.len() >= count)
            .await
    }

    /// Waits until what is kept so far meets `condition`.
    pub async fn wait_until_kept(&self, what: &str, condition: impl Fn(&[T]) -> bool) {
        let got = Arc::clone(&self.got);
        wait_until(what, move || condition(&got.lock().unwrap())).await
    }
}

impl<T> Drop for Recorder<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `redis-server` of the test's own (the Redis broker's tests).
#[cfg(feature = "redis")]
pub mod redis_server;
