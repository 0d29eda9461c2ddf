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
    /// A subscribe with `since` to a channel whose history lives in Redis, while Redis was
    /// unreachable for longer than the bounded wait: no subscription was made.
    HistoryUnavailable,
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
            ErrorReason::HistoryUnavailable => "history unavailable",
        }
    }
}

/// One decoded client request, borrowing from the frame's payload where it can.
#[derive(Debug)]
pub(crate) enum ClientRequest<'a> {
    Subscribe {
        channel: Cow<'a, str>,
        /// Where the client wants to resume from; always `None` in strict go-ws mode.
        // TODO(history): read by the connection once the shard takes it; remove the allow then.
        #[allow(dead_code)]
        since: Option<Since<'a>>,
    },
    Unsubscribe(Cow<'a, str>),
    Ping,
    Publish {
        channel: Cow<'a, str>,
        data: Option<&'a RawValue>,
    },
}

/// The position a client resumes from: `since` in a subscribe (see "History and recovery" in
/// `PROTOCOL.md`). Borrowed from the payload like the channel; an epoch with escapes in it is
/// the one case that allocates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Since<'a> {
    /// The last offset the client has; it wants every one after it.
    pub(crate) offset: u64,
    /// The epoch that offset belongs to. `None` (left out, or `null`) means "in whatever the
    /// current epoch is".
    pub(crate) epoch: Option<Cow<'a, str>>,
}

impl Since<'_> {
    /// An owned copy, for a command that outlives the frame's payload.
    // TODO(history): used once the shard and hub are wired to history; remove the allow then.
    #[allow(dead_code)]
    pub(crate) fn into_owned(self) -> Since<'static> {
        Since {
            offset: self.offset,
            epoch: self.epoch.map(|e| Cow::Owned(e.into_owned())),
        }
    }
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
    /// Kept raw so that strict go-ws mode can ignore it unread, and so that a bad `since` is
    /// reported with the subscribe's channel.
    #[serde(default, borrow)]
    since: Option<&'a RawValue>,
}

/// `since` as the client sent it. `offset` as `u64` refuses floats (`17.0`, `1e3`), negatives,
/// strings and anything past `u64::MAX`; unknown keys are ignored (a later client may send
/// more than this server reads); `"epoch": null` is the same as no epoch.
#[derive(Deserialize)]
struct RawSince<'a> {
    offset: u64,
    #[serde(default, borrow)]
    epoch: Option<BorrowedStr<'a>>,
}

/// A string borrowed from the input unless it has escapes. serde borrows a `Cow<str>` only
/// when it is a field's own type: inside an `Option`, or parsed on its own, a `Cow` is always
/// an owned copy. This newtype makes it a field again.
#[derive(Deserialize)]
struct BorrowedStr<'a>(#[serde(borrow)] Cow<'a, str>);

/// Decodes one client frame's payload (text or binary: both are read as JSON).
///
/// With `strict` (go-ws mode) a subscribe's `since` is not even looked at, so a go-ws client
/// that happens to send one, well-formed or not, gets the plain subscribe go-ws would give it.
///
/// Nesting deeper than serde_json's recursion limit (128) is malformed, so hostile input
/// cannot overflow the stack.
pub(crate) fn decode_request(
    payload: &[u8],
    strict: bool,
) -> Result<ClientRequest<'_>, RequestError<'_>> {
    let raw: RawRequest<'_> =
        serde_json::from_slice(payload).map_err(|_| RequestError::new(ErrorReason::Malformed))?;
    // A client's `"data": null` counts as absent.
    let data = raw.data.filter(|d| d.get() != "null");
    if data.is_some_and(|d| too_deep(d.get())) {
        return Err(RequestError::new(ErrorReason::Malformed));
    }
    match raw.kind.as_ref() {
        "subscribe" => {
            let channel = channel_from(data);
            let since = match raw.since {
                Some(since) if !strict => since_from(since),
                _ => Ok(None),
            };
            match (channel, since) {
                (Ok(channel), Ok(since)) => Ok(ClientRequest::Subscribe { channel, since }),
                // A bad `since` makes the whole request malformed, even with a bad channel
                // too; the channel is echoed when there is one to echo.
                (channel, Err(())) => Err(RequestError {
                    reason: ErrorReason::Malformed,
                    channel: channel.ok(),
                }),
                (Err(err), Ok(_)) => Err(err),
            }
        }
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

/// A subscribe's `since`: `null` is absent; otherwise an object with a `u64` `offset` and
/// maybe a string `epoch`, else `Err` (the request is malformed).
fn since_from(raw: &RawValue) -> Result<Option<Since<'_>>, ()> {
    let json = raw.get();
    if json == "null" {
        return Ok(None);
    }
    // serde would also take an array for a struct (`[17, "a9f3c2"]`): only an object is one.
    // The raw value starts at its first byte (serde_json skips the whitespace before it).
    if !json.starts_with('{') {
        return Err(());
    }
    // Unknown keys are skipped without recursion, so deep junk in them cannot overflow the
    // stack; a duplicate `offset` or `epoch` is an error.
    let since: RawSince<'_> = serde_json::from_str(json).map_err(|_| ())?;
    Ok(Some(Since {
        offset: since.offset,
        epoch: since.epoch.map(|e| e.0),
    }))
}

/// A channel name from a raw JSON value: it must be a non-empty string.
fn channel_from(raw: Option<&RawValue>) -> Result<Cow<'_, str>, RequestError<'_>> {
    let raw = raw.ok_or(RequestError::new(ErrorReason::InvalidChannel))?;
    let BorrowedStr(channel) = serde_json::from_str(raw.get())
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

/// Where a publication sits in its channel's history: `offset` and `epoch` of a frame (after
/// `timestamp`) or of a `subscribed` acknowledgement (in its `data`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position<'a> {
    /// 1 for the channel's first publication in this epoch, then one more for each.
    pub(crate) offset: u64,
    /// The epoch: opaque, but still escaped when written (it may come from Redis).
    pub(crate) epoch: &'a str,
}

/// [`encode_frame`] for a publication to a history channel: `"offset"` and `"epoch"` follow
/// `"timestamp"`, in the same single buffer as the frame header. `None` is [`encode_frame`].
// TODO(history): used once the shard and hub are wired to history; remove the allow then.
#[allow(dead_code)]
pub(crate) fn encode_frame_at<D: Serialize + ?Sized>(
    envelope: &Envelope<'_, D>,
    time: SystemTime,
    position: Option<Position<'_>>,
) -> Result<Bytes, serde_json::Error> {
    encode_frame_with(envelope, Stamp::At(time), position)
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
    encode_frame_with(envelope, stamp, None)
}

/// The one encoder behind the others: the envelope, then the timestamp, then the position.
fn encode_frame_with<D: Serialize + ?Sized>(
    envelope: &Envelope<'_, D>,
    stamp: Stamp<'_>,
    position: Option<Position<'_>>,
) -> Result<Bytes, serde_json::Error> {
    // `,"offset":` + 20 digits + `,"epoch":""`: 41 bytes, plus the epoch (more if escaped).
    let position_hint = position.map_or(0, |p| 41 + p.epoch.len());
    let mut buf = Vec::with_capacity(MAX_HEADER_LEN + 96 + envelope.size_hint() + position_hint);
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
            buf.push(b'"');
        }
        Stamp::Raw(raw) => {
            buf.extend_from_slice(b",\"timestamp\":");
            buf.extend_from_slice(raw.get().as_bytes());
        }
    }
    if let Some(position) = position {
        buf.extend_from_slice(b",\"offset\":");
        write_u64(&mut buf, position.offset);
        buf.extend_from_slice(b",\"epoch\":");
        write_str(&mut buf, position.epoch);
    }
    buf.push(b'}');
    Ok(finish_frame(buf))
}

/// An acknowledgement's `data` (see "History and recovery" in `PROTOCOL.md`).
///
/// | case | `recovered` | `position` | `data` |
/// |---|---|---|---|
/// | subscribe, no history (and every unsubscribe) | `None` | `None` | left out |
/// | subscribe on a history channel | `None` | `Some` | `{"epoch":E,"offset":N}` |
/// | subscribe with `since`, history channel | `Some(r)` | `Some` | `{"recovered":r,"epoch":E,"offset":N}` |
/// | subscribe with `since`, no history | `Some(false)` | `None` | `{"recovered":false}` |
// TODO(history): used once the shard and hub are wired to history; remove the allow then.
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ack<'a> {
    /// Whether the replay holds every offset after `since.offset`; `Some` only when the
    /// client sent `since`.
    pub(crate) recovered: Option<bool>,
    /// The channel's position when the subscription took effect; `Some` only on a history
    /// channel.
    pub(crate) position: Option<Position<'a>>,
}

/// An [`Ack`] as JSON, keys in the protocol's order: recovered, epoch, offset.
// TODO(history): used once the shard and hub are wired to history; remove the allow then.
#[allow(dead_code)]
#[derive(Serialize)]
struct AckData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

/// Encodes the acknowledgement `kind` ([`TYPE_SUBSCRIBED`] or [`TYPE_UNSUBSCRIBED`]) of
/// `channel`, stamped with `time`. With `Ack::default()` it is the bare acknowledgement that
/// go-ws-era clients already know, byte for byte.
// TODO(history): used once the shard and hub are wired to history; remove the allow then.
#[allow(dead_code)]
pub(crate) fn encode_ack(kind: &str, channel: &str, ack: Ack<'_>, time: SystemTime) -> Bytes {
    let data = AckData {
        recovered: ack.recovered,
        epoch: ack.position.map(|p| p.epoch),
        offset: ack.position.map(|p| p.offset),
    };
    let has_data = ack.recovered.is_some() || ack.position.is_some();
    let envelope = Envelope {
        kind,
        channel: Some(channel),
        process_id: None,
        data: has_data.then_some(&data),
    };
    // Only a map of a bool, a string and an integer: serializing it cannot fail.
    encode_frame(&envelope, time).unwrap_or_default()
}

/// Reads `offset` and `epoch` back from the JSON payload of a frame [`encode_frame_at`]
/// wrote: for the history (which stores frames as encoded) and for tests.
///
/// Cheap whatever the payload's size: it reads from the end, where the encoder put them, and
/// looks at nothing before `,"offset":`. It recognises that layout only (`,"offset":N,"epoch":
/// "E"}` closing the object, as this module writes it); anything else, including a frame
/// without a position, is `None`. The epoch is borrowed unless it has escapes.
// TODO(history): used once the shard and hub are wired to history; remove the allow then.
#[allow(dead_code)]
pub(crate) fn read_position(payload: &[u8]) -> Option<(u64, Cow<'_, str>)> {
    let body = payload.strip_suffix(b"\"}")?;
    // The epoch's opening quote: the last `"` before the closing one that is not escaped (an
    // escaped quote has an odd run of backslashes in front of it).
    let mut open = body.len();
    loop {
        open = body[..open].iter().rposition(|&b| b == b'"')?;
        let backslashes = body[..open]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count();
        if backslashes % 2 == 0 {
            break;
        }
    }
    let epoch_json = std::str::from_utf8(&payload[open..payload.len() - 1]).ok()?;
    let before_epoch = body[..open].strip_suffix(b",\"epoch\":")?;
    let digits_start = before_epoch
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let digits = &before_epoch[digits_start..];
    before_epoch[..digits_start].strip_suffix(b",\"offset\":")?;
    let offset = parse_u64(digits)?;
    let BorrowedStr(epoch) = serde_json::from_str(epoch_json).ok()?;
    Some((offset, epoch))
}

/// Decimal digits as a `u64`: at least one, no sign, `None` on overflow.
// TODO(history): used once the shard and hub are wired to history; remove the allow then.
#[allow(dead_code)]
fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        value.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Writes `value` in decimal.
fn write_u64(buf: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[start..]);
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
    /// Set by Redis on a publication to a history channel (`broker/redis_history.rs`);
    /// raw, so that odd values do not make a message from another node unreadable.
    #[serde(default, borrow)]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    offset: Option<&'a RawValue>,
    #[serde(default, borrow)]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    epoch: Option<&'a RawValue>,
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
    message.encode_for(channel, None)
}

/// A publication to history channel `channel` as Redis numbered it: its offset, its epoch
/// and its frame. The JSON is framed as it came when it names `channel` and the frame is to
/// carry the position; otherwise (another `channel`, or `strict` go-ws mode, whose clients
/// never see positions) it is encoded again, keeping the sender's timestamp. `None` when it
/// is not a JSON object with a string `type`, a non-negative integer `offset` and a string
/// `epoch`.
#[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
pub(crate) fn frame_numbered(
    channel: &str,
    json: &[u8],
    strict: bool,
) -> Option<(u64, Box<str>, Bytes)> {
    let message: RemoteMessage<'_> = serde_json::from_slice(json).ok()?;
    let offset: u64 = serde_json::from_str(message.offset?.get()).ok()?;
    let epoch: Cow<'_, str> = serde_json::from_str(message.epoch?.get()).ok()?;
    if !strict && message.channel.as_deref() == Some(channel) {
        return Some((offset, epoch.into(), frame_json(json)));
    }
    let position = (!strict).then_some(Position {
        offset,
        epoch: &epoch,
    });
    let frame = message.encode_for(channel, position)?;
    Some((offset, epoch.into(), frame))
}

impl RemoteMessage<'_> {
    /// The message encoded again for `channel` (with `position`, if any), keeping the
    /// sender's timestamp (or stamped now, if it sent none).
    fn encode_for(&self, channel: &str, position: Option<Position<'_>>) -> Option<Bytes> {
        let envelope = Envelope {
            kind: &self.kind,
            channel: Some(channel),
            process_id: self.process_id.as_deref(),
            data: self.data,
        };
        let stamp = match self.timestamp {
            Some(raw) => Stamp::Raw(raw),
            None => Stamp::At(SystemTime::now()),
        };
        encode_frame_with(&envelope, stamp, position).ok()
    }
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
            decode_request(br#"{"type":"subscribe","data":"room:1"}"#, false),
            Ok(ClientRequest::Subscribe { channel, since: None }) if channel == "room:1"
        ));
        assert!(matches!(
            decode_request(br#"{"type":"unsubscribe","data":"a\"b"}"#, false),
            Ok(ClientRequest::Unsubscribe(c)) if c == "a\"b"
        ));
        assert!(matches!(
            decode_request(br#"{"type":"ping","data":null}"#, false),
            Ok(ClientRequest::Ping)
        ));
        match decode_request(
            br#"{"type":"publish","channel":"c","data":{"x":[1,2]}}"#,
            false,
        ) {
            Ok(ClientRequest::Publish { channel, data }) => {
                assert_eq!(channel, "c");
                assert_eq!(data.unwrap().get(), r#"{"x":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
        match decode_request(br#"{"type":"publish","channel":"c","data":null}"#, false) {
            Ok(ClientRequest::Publish { data, .. }) => assert!(data.is_none()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_and_refused_requests_have_their_reasons() {
        let reason = |input: &[u8]| decode_request(input, false).unwrap_err().reason;
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
            decode_request(deep.as_bytes(), false).unwrap_err().reason,
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

    /// The `since` of a subscribe, decoded as a connection outside strict mode does.
    fn since_of(input: &str) -> Result<Option<Since<'_>>, RequestError<'_>> {
        match decode_request(input.as_bytes(), false)? {
            ClientRequest::Subscribe { since, .. } => Ok(since),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn since_is_read_with_and_without_an_epoch() {
        assert_eq!(
            since_of(
                r#"{"type":"subscribe","data":"news","since":{"offset":17,"epoch":"a9f3c2"}}"#
            )
            .unwrap(),
            Some(Since {
                offset: 17,
                epoch: Some("a9f3c2".into())
            })
        );
        // Key order is free, the epoch may be left out or null, and 0 and u64::MAX are
        // offsets.
        for (input, offset, epoch) in [
            (
                r#"{"since":{"epoch":"e","offset":3},"type":"subscribe","data":"c"}"#,
                3,
                Some("e"),
            ),
            (
                r#"{"type":"subscribe","data":"c","since":{"offset":0}}"#,
                0,
                None,
            ),
            (
                r#"{"type":"subscribe","data":"c","since":{"offset":5,"epoch":null}}"#,
                5,
                None,
            ),
            (
                r#"{"type":"subscribe","data":"c","since":{"offset":18446744073709551615}}"#,
                u64::MAX,
                None,
            ),
            // Unknown keys, however deep, are skipped.
            (
                r#"{"type":"subscribe","data":"c","since":{"offset":1,"x":[{"y":null}],"epoch":"e"}}"#,
                1,
                Some("e"),
            ),
        ] {
            let since = since_of(input).unwrap().unwrap();
            assert_eq!(since.offset, offset, "{input}");
            assert_eq!(since.epoch.as_deref(), epoch, "{input}");
        }
        let deep = format!(
            r#"{{"type":"subscribe","data":"c","since":{{"offset":2,"junk":{}{}}}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(since_of(&deep).unwrap().unwrap().offset, 2);
    }

    #[test]
    fn since_epochs_are_borrowed_unless_escaped() {
        let plain =
            since_of(r#"{"type":"subscribe","data":"c","since":{"offset":1,"epoch":"ab"}}"#)
                .unwrap()
                .unwrap();
        assert!(matches!(plain.epoch, Some(Cow::Borrowed("ab"))));
        let escaped =
            since_of(r#"{"type":"subscribe","data":"c","since":{"offset":1,"epoch":"a\"b"}}"#)
                .unwrap()
                .unwrap();
        assert_eq!(escaped.epoch.as_deref(), Some("a\"b"));
        assert_eq!(
            escaped.clone().into_owned(),
            Since {
                offset: 1,
                epoch: Some(Cow::Owned("a\"b".into()))
            }
        );
        // The channel borrows too.
        assert!(matches!(
            decode_request(br#"{"type":"subscribe","data":"room"}"#, false),
            Ok(ClientRequest::Subscribe {
                channel: Cow::Borrowed("room"),
                ..
            })
        ));
    }

    #[test]
    fn absent_and_null_since_are_a_plain_subscribe() {
        assert_eq!(
            since_of(r#"{"type":"subscribe","data":"c"}"#).unwrap(),
            None
        );
        assert_eq!(
            since_of(r#"{"type":"subscribe","data":"c","since":null}"#).unwrap(),
            None
        );
        assert_eq!(
            since_of(r#"{"type":"subscribe","data":"c","since" : null }"#).unwrap(),
            None
        );
    }

    #[test]
    fn a_bad_since_is_malformed_and_echoes_the_channel() {
        for since in [
            r#"17"#,
            r#""17""#,
            r#"true"#,
            r#"[17,"e"]"#,
            r#"{}"#,
            r#"{"epoch":"e"}"#,
            r#"{"offset":null}"#,
            r#"{"offset":-1}"#,
            r#"{"offset":17.0}"#,
            r#"{"offset":17.5}"#,
            r#"{"offset":1e3}"#,
            r#"{"offset":"17"}"#,
            r#"{"offset":18446744073709551616}"#,
            r#"{"offset":1,"epoch":7}"#,
            r#"{"offset":1,"epoch":["e"]}"#,
            r#"{"offset":1,"epoch":{}}"#,
            r#"{"offset":1,"offset":2}"#,
            r#"{"offset":1,"epoch":"a","epoch":"b"}"#,
        ] {
            let input = format!(r#"{{"type":"subscribe","data":"news","since":{since}}}"#);
            let err = since_of(&input).unwrap_err();
            assert_eq!(err.reason, ErrorReason::Malformed, "{since}");
            assert_eq!(err.channel.as_deref(), Some("news"), "{since}");
        }
        // Without a channel to echo, still malformed (a bad since is the worse fault).
        let err = since_of(r#"{"type":"subscribe","data":7,"since":{"offset":-1}}"#).unwrap_err();
        assert_eq!(err, RequestError::new(ErrorReason::Malformed));
        let err = since_of(r#"{"type":"subscribe","since":[]}"#).unwrap_err();
        assert_eq!(err, RequestError::new(ErrorReason::Malformed));
        // A good since does not hide a bad channel.
        let err = since_of(r#"{"type":"subscribe","data":"","since":{"offset":1}}"#).unwrap_err();
        assert_eq!(err.reason, ErrorReason::InvalidChannel);
    }

    #[test]
    fn since_outside_a_subscribe_is_ignored() {
        assert!(matches!(
            decode_request(br#"{"type":"unsubscribe","data":"c","since":{"offset":-1}}"#, false),
            Ok(ClientRequest::Unsubscribe(c)) if c == "c"
        ));
        assert!(matches!(
            decode_request(br#"{"type":"ping","since":"x"}"#, false),
            Ok(ClientRequest::Ping)
        ));
    }

    #[test]
    fn strict_mode_ignores_since_even_a_bad_one() {
        for since in [
            r#"{"offset":17,"epoch":"a9f3c2"}"#,
            r#"{"offset":-1}"#,
            r#""x""#,
            "null",
        ] {
            let input = format!(r#"{{"type":"subscribe","data":"news","since":{since}}}"#);
            match decode_request(input.as_bytes(), true) {
                Ok(ClientRequest::Subscribe {
                    channel,
                    since: None,
                }) => assert_eq!(channel, "news"),
                other => panic!("{since}: {other:?}"),
            }
        }
        // Still JSON, and the channel is still checked.
        let reason = |input: &[u8]| decode_request(input, true).unwrap_err().reason;
        assert_eq!(
            reason(br#"{"type":"subscribe","data":"c","since":{"offset":}}"#),
            ErrorReason::Malformed
        );
        assert_eq!(
            reason(br#"{"type":"subscribe","data":5,"since":{"offset":-1}}"#),
            ErrorReason::InvalidChannel
        );
    }

    /// The frame's header is right for its payload, and the payload is returned.
    fn checked_payload(frame: &Bytes) -> &str {
        assert_eq!(frame[0], 0x81, "FIN + text");
        let (len, skip) = match frame[1] {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert!(frame[1] & 0x80 == 0, "server frames are not masked");
        assert_eq!(len, frame.len() - skip);
        // The shortest length encoding, as RFC 6455 requires.
        assert_eq!(
            skip,
            if len < 126 {
                2
            } else if len <= 0xffff {
                4
            } else {
                10
            }
        );
        std::str::from_utf8(&frame[skip..]).unwrap()
    }

    const NEWS: Position<'static> = Position {
        offset: 17,
        epoch: "a9f3c2",
    };

    #[test]
    fn history_frames_carry_offset_and_epoch_after_the_timestamp() {
        let msg = Message::new(TYPE_MESSAGE).with_data(Value::from("hi"));
        let frame =
            encode_frame_at(&Envelope::of(&msg, Some("news")), at(0, 0), Some(NEWS)).unwrap();
        assert_eq!(
            checked_payload(&frame),
            r#"{"type":"message","channel":"news","data":"hi","timestamp":"1970-01-01T00:00:00.000000000Z","offset":17,"epoch":"a9f3c2"}"#
        );
        let status = Message::process_status("b1", "exited", 0);
        let frame = encode_frame_at(
            &Envelope::of(&status, None),
            at(0, 0),
            Some(Position {
                offset: 0,
                epoch: "",
            }),
        )
        .unwrap();
        assert_eq!(
            checked_payload(&frame),
            r#"{"type":"process_status","channel":"process:b1","processId":"b1","data":{"status":"exited","exitCode":0},"timestamp":"1970-01-01T00:00:00.000000000Z","offset":0,"epoch":""}"#
        );
        // Without a position, byte for byte what encode_frame writes.
        assert_eq!(
            encode_frame_at(&Envelope::of(&msg, Some("news")), at(0, 0), None).unwrap(),
            encode_frame(&Envelope::of(&msg, Some("news")), at(0, 0)).unwrap()
        );
    }

    #[test]
    fn history_frame_epochs_are_escaped_and_offsets_exact() {
        let msg = Message::new("t");
        let epoch = "a\"b\\c\n\u{1}é";
        let frame = encode_frame_at(
            &Envelope::of(&msg, None),
            at(0, 0),
            Some(Position {
                offset: u64::MAX,
                epoch,
            }),
        )
        .unwrap();
        let text = checked_payload(&frame);
        assert!(
            text.ends_with(r#","offset":18446744073709551615,"epoch":"a\"b\\c\n\u0001é"}"#),
            "{text}"
        );
        let parsed: Value = serde_json::from_str(text).unwrap();
        assert_eq!(parsed["offset"], Value::from(u64::MAX));
        assert_eq!(parsed["epoch"], Value::from(epoch));
        for offset in [0, 1, 9, 10, 99, 100, 1_000_000_007] {
            let mut buf = Vec::new();
            write_u64(&mut buf, offset);
            assert_eq!(buf, offset.to_string().as_bytes());
        }
    }

    #[test]
    fn history_frames_of_every_length_class_are_framed_right() {
        // Under 126 bytes, then the 16-bit and the 64-bit extended lengths.
        for size in [0, 10, 100, 125, 126, 300, 65_535, 65_536, 70_000] {
            let data = "x".repeat(size);
            let msg = Message::new("m").with_data(Value::from(data.clone()));
            let frame =
                encode_frame_at(&Envelope::of(&msg, Some("news")), at(0, 0), Some(NEWS)).unwrap();
            let text = checked_payload(&frame);
            let parsed: Value = serde_json::from_str(text).unwrap();
            assert_eq!(parsed["data"], Value::from(data));
            assert_eq!(parsed["offset"], Value::from(17));
            assert_eq!(parsed["epoch"], Value::from("a9f3c2"));
            assert_eq!(read_position(text.as_bytes()), Some((17, "a9f3c2".into())));
            assert_eq!(&frame_payload(&frame)[..], text.as_bytes());
        }
        // The boundaries themselves: a payload of exactly 125 and exactly 126 bytes.
        let overhead = checked_payload(
            &encode_frame_at(
                &Envelope::of(&Message::new("m").with_data(Value::from("")), None),
                at(0, 0),
                Some(NEWS),
            )
            .unwrap(),
        )
        .len();
        for len in [125, 126, 65_535, 65_536] {
            let msg = Message::new("m").with_data(Value::from("y".repeat(len - overhead)));
            let frame = encode_frame_at(&Envelope::of(&msg, None), at(0, 0), Some(NEWS)).unwrap();
            assert_eq!(checked_payload(&frame).len(), len);
        }
    }

    #[test]
    fn acknowledgements_carry_the_position_only_on_history_channels() {
        let ack = |kind, recovered, position| {
            let frame = encode_ack(
                kind,
                "news",
                Ack {
                    recovered,
                    position,
                },
                at(0, 0),
            );
            checked_payload(&frame).to_owned()
        };
        const T: &str = r#""timestamp":"1970-01-01T00:00:00.000000000Z""#;
        let at20 = Some(Position {
            offset: 20,
            epoch: "a9f3c2",
        });
        assert_eq!(
            ack(TYPE_SUBSCRIBED, None, None),
            format!(r#"{{"type":"subscribed","channel":"news",{T}}}"#)
        );
        assert_eq!(
            ack(TYPE_SUBSCRIBED, None, at20),
            format!(
                r#"{{"type":"subscribed","channel":"news","data":{{"epoch":"a9f3c2","offset":20}},{T}}}"#
            )
        );
        assert_eq!(
            ack(TYPE_SUBSCRIBED, Some(true), at20),
            format!(
                r#"{{"type":"subscribed","channel":"news","data":{{"recovered":true,"epoch":"a9f3c2","offset":20}},{T}}}"#
            )
        );
        assert_eq!(
            ack(TYPE_SUBSCRIBED, Some(false), at20),
            format!(
                r#"{{"type":"subscribed","channel":"news","data":{{"recovered":false,"epoch":"a9f3c2","offset":20}},{T}}}"#
            )
        );
        assert_eq!(
            ack(TYPE_SUBSCRIBED, Some(false), None),
            format!(r#"{{"type":"subscribed","channel":"news","data":{{"recovered":false}},{T}}}"#)
        );
        assert_eq!(
            ack(TYPE_UNSUBSCRIBED, None, None),
            format!(r#"{{"type":"unsubscribed","channel":"news",{T}}}"#)
        );
        // The bare acknowledgement is what it always was.
        assert_eq!(
            encode_ack(TYPE_SUBSCRIBED, "news", Ack::default(), at(0, 0)),
            encode_frame(&Envelope::bare(TYPE_SUBSCRIBED, Some("news")), at(0, 0)).unwrap()
        );
        // An epoch is escaped here too, and the acknowledgement carries no top-level offset.
        let odd = ack(
            TYPE_SUBSCRIBED,
            None,
            Some(Position {
                offset: 0,
                epoch: "\"}",
            }),
        );
        let parsed: Value = serde_json::from_str(&odd).unwrap();
        assert_eq!(parsed["data"]["epoch"], Value::from("\"}"));
        assert_eq!(read_position(odd.as_bytes()), None);
    }

    #[test]
    fn positions_are_read_back_from_the_end() {
        let read = |json: &str| read_position(json.as_bytes()).map(|(o, e)| (o, e.into_owned()));
        assert_eq!(
            read(
                r#"{"type":"message","channel":"news","data":"hi","timestamp":"T","offset":17,"epoch":"a9f3c2"}"#
            ),
            Some((17, "a9f3c2".to_owned()))
        );
        // Borrowed when it can be.
        assert!(matches!(
            read_position(br#"{"type":"m","timestamp":"T","offset":1,"epoch":"e"}"#),
            Some((1, Cow::Borrowed("e")))
        ));
        // Escaped epochs, a quote and a backslash just before the closing quote included.
        for epoch in ["", "a\"", "a\\", "\\\"\\", "\",\"epoch\":\"x", "é\u{1}"] {
            let msg = Message::new("m").with_data(Value::from("d"));
            let frame = encode_frame_at(
                &Envelope::of(&msg, None),
                at(0, 0),
                Some(Position { offset: 42, epoch }),
            )
            .unwrap();
            assert_eq!(
                read_position(&frame_payload(&frame)),
                Some((42, Cow::Borrowed(epoch))),
                "{epoch:?}"
            );
        }
        // Frames without a position, and look-alikes that are not the encoder's layout.
        for json in [
            r#"{"type":"message","channel":"news","data":"hi","timestamp":"T"}"#,
            r#"{"type":"m","data":{"offset":1,"epoch":"e"},"timestamp":"T"}"#,
            r#"{"type":"m","timestamp":{"offset":1,"epoch":"e"}}"#,
            r#"{"type":"m","timestamp":"T","epoch":"e","offset":1}"#,
            r#"{"type":"m","timestamp":"T","offset":,"epoch":"e"}"#,
            r#"{"type":"m","timestamp":"T","offset":-1,"epoch":"e"}"#,
            r#"{"type":"m","timestamp":"T","offset":1.5,"epoch":"e"}"#,
            r#"{"type":"m","timestamp":"T","offset":18446744073709551616,"epoch":"e"}"#,
            r#"{"type":"m","timestamp":"T","offset":1,"epoch":"e\"}"#,
            r#"{"type":"m","timestamp":"T","offset":1,"epoch":7}"#,
            r#","offset":1,"epoch":"#,
            r#""}"#,
            "",
        ] {
            assert_eq!(read(json), None, "{json}");
        }
        assert_eq!(read_position(b"\"offset\":1,\"epoch\":\"\xff\"}"), None);
        assert_eq!(
            read(r#","offset":18446744073709551615,"epoch":"e"}"#),
            Some((u64::MAX, "e".to_owned()))
        );
    }

    #[test]
    fn numbered_messages_are_framed_with_their_position() {
        let json = br#"{"type":"message","channel":"news","data":1,"timestamp":"T","offset":17,"epoch":"a9f3c2"}"#;
        let (offset, epoch, frame) = frame_numbered("news", json, false).unwrap();
        assert_eq!((offset, &*epoch), (17, "a9f3c2"));
        assert_eq!(&frame_payload(&frame)[..], &json[..]);
        // Strict go-ws mode: encoded again without the position.
        let (_, _, frame) = frame_numbered("news", json, true).unwrap();
        assert_eq!(
            payload(&frame),
            r#"{"type":"message","channel":"news","data":1,"timestamp":"T"}"#
        );
        // Another channel named: encoded again, position kept.
        let (_, _, frame) = frame_numbered("other", json, false).unwrap();
        assert_eq!(
            payload(&frame),
            r#"{"type":"message","channel":"other","data":1,"timestamp":"T","offset":17,"epoch":"a9f3c2"}"#
        );
        // No position (a go-ws node's message), or an odd one: not numbered.
        assert!(frame_numbered("news", br#"{"type":"message","timestamp":"T"}"#, false).is_none());
        let odd = br#"{"type":"message","timestamp":"T","offset":-1,"epoch":"e"}"#;
        assert!(frame_numbered("news", odd, false).is_none());
    }

    #[test]
    fn remote_messages_with_a_position_are_still_taken() {
        // Framed as it came: the position stays, byte for byte.
        let json = br#"{"type":"message","channel":"news","data":1,"timestamp":"T","offset":17,"epoch":"a9f3c2"}"#;
        let frame = frame_remote(Some("news"), json).unwrap();
        assert_eq!(&frame_payload(&frame)[..], &json[..]);
        assert_eq!(
            read_position(&frame_payload(&frame)),
            Some((17, "a9f3c2".into()))
        );
        // Encoded again (another channel, or none named): the position is dropped for now.
        let json = br#"{"type":"message","data":1,"timestamp":"T","offset":17,"epoch":"a9f3c2"}"#;
        let frame = frame_remote(Some("news"), json).unwrap();
        assert_eq!(
            payload(&frame),
            r#"{"type":"message","channel":"news","data":1,"timestamp":"T"}"#
        );
        // Odd position fields do not make a message unreadable.
        let json = br#"{"type":"message","channel":"x","timestamp":"T","offset":"?","epoch":[1]}"#;
        assert!(frame_remote(Some("news"), json).is_some());
        assert!(frame_remote(None, json).is_some());
    }
}
