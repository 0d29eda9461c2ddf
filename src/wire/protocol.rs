//! The JSON protocol: message types, encoding, and decoding of client requests. No IO.
//!
//! Everything here is a pure function of its input, so it is unit-tested and fuzzed without a
//! runtime. The server side encodes a message exactly once, straight into a complete WebSocket
//! frame ([`encode_frame`]); every subscriber is then handed the same `Bytes`.
//!
//! The envelope, with keys always in this order (see `PROTOCOL.md`):
//!
//! ```text
//! {"type": STRING, "channel": STRING?, "processId": STRING?, "data": ANY?, "timestamp": RFC3339}
//! ```

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::wire::frame::{self, MAX_HEADER_LEN, OPCODE_TEXT};

/// Message type of a line of process output, sent by
/// [`Hub::send_process_output`](crate::Hub::send_process_output).
pub const TYPE_PROCESS_OUTPUT: &str = "process_output";
/// Message type of a process status change, sent by
/// [`Hub::send_process_status`](crate::Hub::send_process_status).
pub const TYPE_PROCESS_STATUS: &str = "process_status";
/// Message type of an application event, sent to every client by
/// [`Hub::send_event`](crate::Hub::send_event).
pub const TYPE_EVENT: &str = "event";
/// Message type of an error: broadcast by [`Hub::send_error`](crate::Hub::send_error), or sent
/// to one client whose request was refused or malformed.
pub const TYPE_ERROR: &str = "error";
/// Message type of the answer to a client's `ping`.
pub const TYPE_PONG: &str = "pong";
/// Message type of a client `publish` delivered to a channel's subscribers (wshub extension).
pub const TYPE_MESSAGE: &str = "message";
/// Acknowledgement of a subscribe (wshub extension).
pub const TYPE_SUBSCRIBED: &str = "subscribed";
/// Acknowledgement of an unsubscribe (wshub extension).
pub const TYPE_UNSUBSCRIBED: &str = "unsubscribed";

/// The prefix of a process's channel: the output of process `id` goes to `"process:" + id`.
pub const PROCESS_CHANNEL_PREFIX: &str = "process:";

/// One message of the protocol's envelope.
///
/// Build one with [`Message::new`] and the `with_*` setters, or with a helper for the common
/// kinds; the hub stamps `timestamp` when it sends, overwriting whatever is set here. Decoding a
/// server message (in a client or a test) gives the same type back.
///
/// ```
/// use wshub::Message;
/// use serde_json::json;
///
/// let msg = Message::new("price").with_channel("ticker:BTC").with_data(json!({"last": 101.5}));
/// assert_eq!(msg.kind, "price");
///
/// let decoded: Message = serde_json::from_str(
///     r#"{"type":"message","channel":"room:1","data":"hi","timestamp":"2026-11-27T06:12:03.1Z"}"#,
/// ).unwrap();
/// assert_eq!(decoded.channel.as_deref(), Some("room:1"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The message type (`"type"` on the wire): one of the `TYPE_*` constants or the
    /// application's own.
    #[serde(rename = "type")]
    pub kind: String,
    /// The channel it belongs to. Left out of the JSON when `None` or empty.
    #[serde(default, skip_serializing_if = "is_none_or_empty")]
    pub channel: Option<String>,
    /// The process it concerns (`"processId"`). Left out when `None` or empty.
    #[serde(
        default,
        rename = "processId",
        skip_serializing_if = "is_none_or_empty"
    )]
    pub process_id: Option<String>,
    /// The payload: any JSON. Left out when `None`; a JSON `null` decodes as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// RFC 3339 UTC time the server sent it. Ignored when sending: the hub stamps its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

fn is_none_or_empty(value: &Option<String>) -> bool {
    value.as_deref().is_none_or(str::is_empty)
}

impl Message {
    /// A message of type `kind` with no channel, process id or data.
    pub fn new(kind: impl Into<String>) -> Self {
        Message {
            kind: kind.into(),
            ..Message::default()
        }
    }

    /// Sets the channel. [`Hub::send_to_channel`](crate::Hub::send_to_channel) sets it anyway.
    pub fn with_channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }

    /// Sets the process id (`"processId"`).
    pub fn with_process_id(mut self, process_id: impl Into<String>) -> Self {
        self.process_id = Some(process_id.into());
        self
    }

    /// Sets the data. `Value::Null` is sent as no data, as a client's `null` is read.
    pub fn with_data(mut self, data: impl Into<Value>) -> Self {
        let data = data.into();
        self.data = (!data.is_null()).then_some(data);
        self
    }

    /// A line of output of process `process_id`, for channel `process:ID`.
    pub fn process_output(process_id: &str, line: impl Into<String>) -> Self {
        Message::new(TYPE_PROCESS_OUTPUT)
            .with_channel(process_channel(process_id))
            .with_process_id(process_id)
            .with_data(Value::String(line.into()))
    }

    /// A status change of process `process_id`: `data` is `{"status": ..., "exitCode": ...}`.
    pub fn process_status(process_id: &str, status: &str, exit_code: i32) -> Self {
        Message::new(TYPE_PROCESS_STATUS)
            .with_channel(process_channel(process_id))
            .with_process_id(process_id)
            .with_data(serde_json::json!({ "status": status, "exitCode": exit_code }))
    }

    /// An application event: `data` is `{"event": name, "data": payload}`.
    pub fn event(name: &str, payload: Value) -> Self {
        Message::new(TYPE_EVENT).with_data(serde_json::json!({ "event": name, "data": payload }))
    }

    /// An error message whose data is `text`.
    pub fn error(text: impl Into<String>) -> Self {
        Message::new(TYPE_ERROR).with_data(Value::String(text.into()))
    }
}

/// The channel that carries process `process_id`'s output and status: `"process:" + id`.
pub fn process_channel(process_id: &str) -> String {
    let mut channel = String::with_capacity(PROCESS_CHANNEL_PREFIX.len() + process_id.len());
    channel.push_str(PROCESS_CHANNEL_PREFIX);
    channel.push_str(process_id);
    channel
}

/// Why the hub refused one client's request: the `data` of the per-client `error` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorReason {
    /// The frame was not a JSON object with a string `type`.
    Malformed,
    /// The `type` is none the hub knows.
    UnknownType,
    /// The channel is missing, not a string, empty, or over the configured length.
    InvalidChannel,
    /// The subscription policy refused the channel.
    SubscriptionRefused,
    /// The client is at its configured maximum of subscriptions.
    TooManySubscriptions,
    /// The publish policy refused the client's publish.
    PublishRefused,
}

impl ErrorReason {
    /// The reason as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorReason::Malformed => "malformed message",
            ErrorReason::UnknownType => "unknown type",
            ErrorReason::InvalidChannel => "invalid channel",
            ErrorReason::SubscriptionRefused => "subscription refused",
            ErrorReason::TooManySubscriptions => "too many subscriptions",
            ErrorReason::PublishRefused => "publish refused",
        }
    }
}

/// One decoded client request, borrowing from the frame's payload where it can.
#[derive(Debug)]
pub(crate) enum ClientRequest<'a> {
    Subscribe(Cow<'a, str>),
    Unsubscribe(Cow<'a, str>),
    Ping,
    Publish {
        channel: Cow<'a, str>,
        data: Option<&'a RawValue>,
    },
}

/// A request the hub could not take, with the channel to echo where one applies.
#[derive(Debug, PartialEq)]
pub(crate) struct RequestError<'a> {
    pub(crate) reason: ErrorReason,
    pub(crate) channel: Option<Cow<'a, str>>,
}

impl RequestError<'_> {
    fn new(reason: ErrorReason) -> Self {
        RequestError {
            reason,
            channel: None,
        }
    }
}

/// The fields of a client request. `channel` and `data` stay raw so that a field of the wrong
/// type is reported as an invalid channel rather than as malformed JSON, and so that a
/// `publish`'s data is copied to the outgoing frame without being parsed into a tree.
#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// Decodes one client frame's payload (text or binary: both are read as JSON).
///
/// Nesting deeper than serde_json's recursion limit (128) is malformed, so hostile input
/// cannot overflow the stack.
pub(crate) fn decode_request(payload: &[u8]) -> Result<ClientRequest<'_>, RequestError<'_>> {
    let raw: RawRequest<'_> =
        serde_json::from_slice(payload).map_err(|_| RequestError::new(ErrorReason::Malformed))?;
    // A client's `"data": null` counts as absent.
    let data = raw.data.filter(|d| d.get() != "null");
    if data.is_some_and(|d| too_deep(d.get())) {
        return Err(RequestError::new(ErrorReason::Malformed));
    }
    match raw.kind.as_ref() {
        "subscribe" => Ok(ClientRequest::Subscribe(channel_from(data)?)),
        "unsubscribe" => Ok(ClientRequest::Unsubscribe(channel_from(data)?)),
        "ping" => Ok(ClientRequest::Ping),
        "publish" => Ok(ClientRequest::Publish {
            channel: channel_from(raw.channel)?,
            data,
        }),
        _ => Err(RequestError::new(ErrorReason::UnknownType)),
    }
}

/// The deepest nesting of arrays and objects a client's `data` may have: serde_json's own
/// recursion limit, which the raw value (copied, never parsed into a tree) does not enforce.
/// Deeper data would be relayed to every subscriber's parser.
const MAX_DEPTH: usize = 128;

/// Whether raw JSON nests deeper than [`MAX_DEPTH`]: one pass over the bytes, skipping strings.
fn too_deep(json: &str) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for byte in json.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// A channel name from a raw JSON value: it must be a non-empty string.
fn channel_from(raw: Option<&RawValue>) -> Result<Cow<'_, str>, RequestError<'_>> {
    let raw = raw.ok_or(RequestError::new(ErrorReason::InvalidChannel))?;
    let channel: Cow<'_, str> = serde_json::from_str(raw.get())
        .map_err(|_| RequestError::new(ErrorReason::InvalidChannel))?;
    if channel.is_empty() {
        return Err(RequestError::new(ErrorReason::InvalidChannel));
    }
    Ok(channel)
}

/// The length of an RFC 3339 UTC timestamp with nanoseconds: `2026-11-27T06:12:03.123456789Z`.
pub(crate) const TIMESTAMP_LEN: usize = 30;

/// Formats `time` as RFC 3339 in UTC with nine fractional digits.
pub(crate) fn format_timestamp(time: SystemTime) -> [u8; TIMESTAMP_LEN] {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let secs_of_day = secs % 86_400;
    let mut out = *b"0000-00-00T00:00:00.000000000Z";
    write_digits(&mut out[0..4], year as u64);
    write_digits(&mut out[5..7], month as u64);
    write_digits(&mut out[8..10], day as u64);
    write_digits(&mut out[11..13], secs_of_day / 3600);
    write_digits(&mut out[14..16], secs_of_day / 60 % 60);
    write_digits(&mut out[17..19], secs_of_day % 60);
    write_digits(&mut out[20..29], since_epoch.subsec_nanos() as u64);
    out
}

fn write_digits(out: &mut [u8], mut value: u64) {
    for byte in out.iter_mut().rev() {
        *byte = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The envelope's fields, borrowed, ready to encode.
pub(crate) struct Envelope<'a, D: ?Sized> {
    pub(crate) kind: &'a str,
    pub(crate) channel: Option<&'a str>,
    pub(crate) process_id: Option<&'a str>,
    pub(crate) data: Option<&'a D>,
}

impl<'a> Envelope<'a, Value> {
    /// The envelope of `message`, with `channel` (when given) in place of the message's own.
    pub(crate) fn of(message: &'a Message, channel: Option<&'a str>) -> Self {
        Envelope {
            kind: &message.kind,
            channel: channel.or(message.channel.as_deref()),
            process_id: message.process_id.as_deref(),
            data: message.data.as_ref(),
        }
    }

    /// An envelope with only a type and maybe a channel (acknowledgements, pong).
    pub(crate) fn bare(kind: &'a str, channel: Option<&'a str>) -> Self {
        Envelope {
            kind,
            channel,
            process_id: None,
            data: None,
        }
    }
}

/// Encodes `envelope`, stamped with `time`, into one complete unmasked text frame.
///
/// One allocation: the JSON is written after room for the largest frame header, then the
/// header is written just in front of it and the unused room is skipped. This is the
/// encode-once step: the returned `Bytes` is shared by every subscriber.
pub(crate) fn encode_frame<D: Serialize + ?Sized>(
    envelope: &Envelope<'_, D>,
    time: SystemTime,
) -> Result<Bytes, serde_json::Error> {
    encode_frame_stamped(envelope, Stamp::At(time))
}

/// The `timestamp` a frame gets.
pub(crate) enum Stamp<'a> {
    /// This time, formatted.
    At(SystemTime),
    /// A JSON value as another node sent it (kept, not stamped again).
    Raw(&'a RawValue),
}

/// [`encode_frame`] with the timestamp given.
pub(crate) fn encode_frame_stamped<D: Serialize + ?Sized>(
    envelope: &Envelope<'_, D>,
    stamp: Stamp<'_>,
) -> Result<Bytes, serde_json::Error> {
    let mut buf = Vec::with_capacity(MAX_HEADER_LEN + 96 + envelope.size_hint());
    buf.resize(MAX_HEADER_LEN, 0);
    buf.extend_from_slice(b"{\"type\":");
    write_str(&mut buf, envelope.kind);
    if let Some(channel) = envelope.channel.filter(|c| !c.is_empty()) {
        buf.extend_from_slice(b",\"channel\":");
        write_str(&mut buf, channel);
    }
    if let Some(process_id) = envelope.process_id.filter(|p| !p.is_empty()) {
        buf.extend_from_slice(b",\"processId\":");
        write_str(&mut buf, process_id);
    }
    if let Some(data) = envelope.data {
        buf.extend_from_slice(b",\"data\":");
        serde_json::to_writer(&mut buf, data)?;
    }
    match stamp {
        Stamp::At(time) => {
            buf.extend_from_slice(b",\"timestamp\":\"");
            buf.extend_from_slice(&format_timestamp(time));
            buf.extend_from_slice(b"\"}");
        }
        Stamp::Raw(raw) => {
            buf.extend_from_slice(b",\"timestamp\":");
            buf.extend_from_slice(raw.get().as_bytes());
            buf.push(b'}');
        }
    }
    Ok(finish_frame(buf))
}

/// Writes the header in front of the JSON in `buf` (which starts with `MAX_HEADER_LEN` bytes
/// of room) and returns the frame.
fn finish_frame(mut buf: Vec<u8>) -> Bytes {
    let (header, header_len) = frame::server_header(OPCODE_TEXT, buf.len() - MAX_HEADER_LEN);
    let start = MAX_HEADER_LEN - header_len;
    buf[start..MAX_HEADER_LEN].copy_from_slice(&header[..header_len]);
    let mut frame = Bytes::from(buf);
    frame.advance(start);
    frame
}

/// A text frame carrying `json` as it is: for a message another node encoded already.
pub(crate) fn frame_json(json: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(MAX_HEADER_LEN + json.len());
    buf.resize(MAX_HEADER_LEN, 0);
    buf.extend_from_slice(json);
    finish_frame(buf)
}

/// The JSON payload of a frame this module encoded: the same bytes, without the header.
pub(crate) fn frame_payload(frame: &Bytes) -> Bytes {
    let header_len = match frame.get(1) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.slice(header_len.min(frame.len())..)
}

/// A message as another node sent it, borrowed: checked and framed without a full parse.
#[derive(Deserialize)]
struct RemoteMessage<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(default, rename = "processId", borrow)]
    process_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    timestamp: Option<&'a RawValue>,
}

/// Frames a message another node published to `channel` (or to everyone, when `None`).
///
/// When the message already names `channel` (or is a broadcast), its JSON is framed as it
/// came, byte for byte: the encode-once property holds across nodes. Otherwise (a go-ws node
/// may leave `channel` out) it is encoded again with `channel` set, keeping the sender's
/// timestamp. `None` when it is not a JSON object with a string `type`.
pub(crate) fn frame_remote(channel: Option<&str>, json: &[u8]) -> Option<Bytes> {
    let message: RemoteMessage<'_> = serde_json::from_slice(json).ok()?;
    let Some(channel) = channel else {
        return Some(frame_json(json));
    };
    if message.channel.as_deref() == Some(channel) {
        return Some(frame_json(json));
    }
    let envelope = Envelope {
        kind: &message.kind,
        channel: Some(channel),
        process_id: message.process_id.as_deref(),
        data: message.data,
    };
    let stamp = match message.timestamp {
        Some(raw) => Stamp::Raw(raw),
        None => Stamp::At(SystemTime::now()),
    };
    encode_frame_stamped(&envelope, stamp).ok()
}

impl<D: ?Sized> Envelope<'_, D> {
    fn size_hint(&self) -> usize {
        self.kind.len() + self.channel.map_or(0, str::len) + self.process_id.map_or(0, str::len)
    }
}

fn write_str(buf: &mut Vec<u8>, text: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn payload(frame: &Bytes) -> &str {
        let skip = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        std::str::from_utf8(&frame[skip..]).unwrap()
    }

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_nanoseconds() {
        assert_eq!(
            &format_timestamp(at(0, 0)),
            b"1970-01-01T00:00:00.000000000Z"
        );
        // 2026-11-27T06:12:03.123456789Z
        assert_eq!(
            &format_timestamp(at(1_795_759_923, 123_456_789)),
            b"2026-11-27T06:12:03.123456789Z"
        );
        // A leap day and the last second of a year.
        assert_eq!(
            &format_timestamp(at(951_782_400, 5)),
            b"2000-02-29T00:00:00.000000005Z"
        );
        assert_eq!(
            &format_timestamp(at(1_735_689_599, 0)),
            b"2024-12-31T23:59:59.000000000Z"
        );
    }

    #[test]
    fn envelope_keys_in_protocol_order_and_empty_fields_left_out() {
        let msg = Message::new("process_output")
            .with_channel("process:b1")
            .with_process_id("b1")
            .with_data(Value::from("Compiling..."));
        let frame = encode_frame(&Envelope::of(&msg, None), at(0, 0)).unwrap();
        assert_eq!(frame[0], 0x81, "FIN + text");
        assert_eq!(
            payload(&frame),
            r#"{"type":"process_output","channel":"process:b1","processId":"b1","data":"Compiling...","timestamp":"1970-01-01T00:00:00.000000000Z"}"#
        );

        let msg = Message::new("event").with_channel("").with_process_id("");
        let frame = encode_frame(&Envelope::of(&msg, None), at(0, 0)).unwrap();
        assert_eq!(
            payload(&frame),
            r#"{"type":"event","timestamp":"1970-01-01T00:00:00.000000000Z"}"#
        );
    }

    #[test]
    fn channel_argument_overrides_the_message_channel() {
        let msg = Message::new("x").with_channel("wrong");
        let frame = encode_frame(&Envelope::of(&msg, Some("right")), at(0, 0)).unwrap();
        assert!(payload(&frame).starts_with(r#"{"type":"x","channel":"right","#));
    }

    #[test]
    fn strings_are_escaped() {
        let msg = Message::new("a\"b").with_data(Value::from("line\n\u{1}"));
        let frame = encode_frame(&Envelope::of(&msg, None), at(0, 0)).unwrap();
        let parsed: Message = serde_json::from_str(payload(&frame)).unwrap();
        assert_eq!(parsed.kind, "a\"b");
        assert_eq!(parsed.data, Some(Value::from("line\n\u{1}")));
    }

    #[test]
    fn large_frames_get_the_extended_length_header() {
        let big = "x".repeat(70_000);
        let msg = Message::new("t").with_data(Value::from(big.clone()));
        let frame = encode_frame(&Envelope::of(&msg, None), at(0, 0)).unwrap();
        assert_eq!(frame[0], 0x81);
        assert_eq!(frame[1], 127);
        let len = u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 10);
        let parsed: Message = serde_json::from_slice(&frame[10..]).unwrap();
        assert_eq!(parsed.data, Some(Value::from(big)));

        let msg = Message::new("t").with_data(Value::from("y".repeat(300)));
        let frame = encode_frame(&Envelope::of(&msg, None), at(0, 0)).unwrap();
        assert_eq!(frame[1], 126);
        assert_eq!(
            u16::from_be_bytes([frame[2], frame[3]]) as usize,
            frame.len() - 4
        );
    }

    #[test]
    fn helpers_build_the_go_ws_shapes() {
        let out = Message::process_output("build-1", "ok");
        assert_eq!(out.channel.as_deref(), Some("process:build-1"));
        assert_eq!(out.process_id.as_deref(), Some("build-1"));
        let status = Message::process_status("build-1", "exited", 2);
        assert_eq!(
            status.data,
            Some(serde_json::json!({"status": "exited", "exitCode": 2}))
        );
        let event = Message::event("user_joined", serde_json::json!({"id": 7}));
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"type":"event","data":{"event":"user_joined","data":{"id":7}}}"#
        );
        assert_eq!(Message::error("boom").data, Some(Value::from("boom")));
        assert_eq!(Message::new("x").with_data(Value::Null).data, None);
    }

    #[test]
    fn decodes_every_client_request() {
        assert!(matches!(
            decode_request(br#"{"type":"subscribe","data":"room:1"}"#),
            Ok(ClientRequest::Subscribe(c)) if c == "room:1"
        ));
        assert!(matches!(
            decode_request(br#"{"type":"unsubscribe","data":"a\"b"}"#),
            Ok(ClientRequest::Unsubscribe(c)) if c == "a\"b"
        ));
        assert!(matches!(
            decode_request(br#"{"type":"ping","data":null}"#),
            Ok(ClientRequest::Ping)
        ));
        match decode_request(br#"{"type":"publish","channel":"c","data":{"x":[1,2]}}"#) {
            Ok(ClientRequest::Publish { channel, data }) => {
                assert_eq!(channel, "c");
                assert_eq!(data.unwrap().get(), r#"{"x":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
        match decode_request(br#"{"type":"publish","channel":"c","data":null}"#) {
            Ok(ClientRequest::Publish { data, .. }) => assert!(data.is_none()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_and_refused_requests_have_their_reasons() {
        let reason = |input: &[u8]| decode_request(input).unwrap_err().reason;
        assert_eq!(reason(b"not json"), ErrorReason::Malformed);
        assert_eq!(reason(b"[1,2]"), ErrorReason::Malformed);
        assert_eq!(reason(br#"{"data":"x"}"#), ErrorReason::Malformed);
        assert_eq!(reason(br#"{"type":5}"#), ErrorReason::Malformed);
        assert_eq!(reason(&[0xff, 0xfe]), ErrorReason::Malformed);
        assert_eq!(reason(br#"{"type":"dance"}"#), ErrorReason::UnknownType);
        assert_eq!(
            reason(br#"{"type":"subscribe"}"#),
            ErrorReason::InvalidChannel
        );
        assert_eq!(
            reason(br#"{"type":"subscribe","data":7}"#),
            ErrorReason::InvalidChannel
        );
        assert_eq!(
            reason(br#"{"type":"subscribe","data":""}"#),
            ErrorReason::InvalidChannel
        );
        assert_eq!(
            reason(br#"{"type":"subscribe","data":null}"#),
            ErrorReason::InvalidChannel
        );
        assert_eq!(
            reason(br#"{"type":"publish","data":"x"}"#),
            ErrorReason::InvalidChannel
        );
        assert_eq!(
            reason(br#"{"type":"publish","channel":["x"],"data":"x"}"#),
            ErrorReason::InvalidChannel
        );
    }

    #[test]
    fn deep_nesting_is_malformed_not_a_stack_overflow() {
        let deep = format!(
            r#"{{"type":"publish","channel":"c","data":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            decode_request(deep.as_bytes()).unwrap_err().reason,
            ErrorReason::Malformed
        );
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted_and_strings_do_not_count() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(!too_deep(&ok));
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(too_deep(&deep));
        let string = format!("\"{}\\\"\"", "[".repeat(1000));
        assert!(!too_deep(&string));
    }

    #[test]
    fn remote_messages_with_the_right_channel_are_framed_as_they_came() {
        let json = br#"{"type":"message","channel":"room","data":{"b":1, "a":2},"timestamp":"T"}"#;
        let frame = frame_remote(Some("room"), json).unwrap();
        assert_eq!(&frame[2..], &json[..]);
        assert_eq!(&frame_payload(&frame)[..], &json[..]);
        let broadcast = frame_remote(None, br#"{"type":"event"}"#).unwrap();
        assert_eq!(payload(&broadcast), r#"{"type":"event"}"#);
    }

    #[test]
    fn remote_messages_without_the_channel_are_encoded_again_keeping_their_timestamp() {
        let json = br#"{"type":"process_output","processId":"b1","data":"x","timestamp":"2026-01-01T00:00:00Z"}"#;
        let frame = frame_remote(Some("process:b1"), json).unwrap();
        assert_eq!(
            payload(&frame),
            r#"{"type":"process_output","channel":"process:b1","processId":"b1","data":"x","timestamp":"2026-01-01T00:00:00Z"}"#
        );
        assert!(frame_remote(Some("c"), b"not json").is_none());
        assert!(frame_remote(Some("c"), br#"{"data":1}"#).is_none());
    }

    #[test]
    fn every_reason_has_its_wire_text() {
        let all = [
            (ErrorReason::Malformed, "malformed message"),
            (ErrorReason::UnknownType, "unknown type"),
            (ErrorReason::InvalidChannel, "invalid channel"),
            (ErrorReason::SubscriptionRefused, "subscription refused"),
            (ErrorReason::TooManySubscriptions, "too many subscriptions"),
            (ErrorReason::PublishRefused, "publish refused"),
        ];
        for (reason, text) in all {
            assert_eq!(reason.as_str(), text);
        }
    }
}
