//! WebSocket framing (RFC 6455): server frame headers, control frames, and the decoder of
//! client frames with message reassembly and limits. No IO, so it is unit-tested and fuzzed
//! on byte slices.
//!
//! The decoder works in place on whatever bytes a connection has read: it unmasks payloads
//! where they lie and hands out borrowed slices, so a message that arrives in one frame is
//! never copied. Only a fragmented message is gathered into a buffer of its own, which is
//! freed when the message is complete.

use std::ops::ControlFlow;

use bytes::Bytes;

/// The largest server frame header: 2 bytes plus a 64-bit length.
pub(crate) const MAX_HEADER_LEN: usize = 10;

pub(crate) const OPCODE_CONTINUATION: u8 = 0x0;
pub(crate) const OPCODE_TEXT: u8 = 0x1;
pub(crate) const OPCODE_BINARY: u8 = 0x2;
pub(crate) const OPCODE_CLOSE: u8 = 0x8;
pub(crate) const OPCODE_PING: u8 = 0x9;
pub(crate) const OPCODE_PONG: u8 = 0xA;

/// Control frames carry at most 125 bytes of payload (RFC 6455 section 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Close codes wshub sends; see the table in `PROTOCOL.md`.
pub mod close_code {
    /// Normal closure: the client asked to close, or the application disconnected it.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The client broke a policy, such as the message rate limit.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message was over the configured size limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The client did not read fast enough: its outbound queue went over its bound, or a write
    /// timed out.
    pub const SLOW_CONSUMER: u16 = 4000;
}

/// Whether a peer may put `code` in a Close frame (RFC 6455 section 7.4; 1012 to 1014 were
/// registered later with IANA).
pub(crate) fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The header of an unmasked server frame with FIN set: the bytes and how many of them are
/// used.
pub(crate) fn server_header(opcode: u8, payload_len: usize) -> ([u8; MAX_HEADER_LEN], usize) {
    let mut header = [0u8; MAX_HEADER_LEN];
    header[0] = 0x80 | opcode;
    if payload_len < 126 {
        header[1] = payload_len as u8;
        (header, 2)
    } else if payload_len <= usize::from(u16::MAX) {
        header[1] = 126;
        header[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        (header, 4)
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        (header, 10)
    }
}

/// A control frame (ping, pong, close) with `payload` cut to the 125 bytes allowed.
pub(crate) fn control_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let mut frame = Vec::with_capacity(2 + payload.len());
    frame.push(0x80 | opcode);
    frame.push(payload.len() as u8);
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

/// A Close frame with `code` and `reason`, the reason cut at a character boundary to fit the
/// 125-byte control frame limit.
pub(crate) fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    control_frame(OPCODE_CLOSE, &payload)
}

/// The server's keep-alive ping, with an empty payload.
pub(crate) fn ping_frame() -> Bytes {
    Bytes::from_static(&PING)
}

/// The bytes of every [`ping_frame`]: one static buffer, which no queue's memory owns.
static PING: [u8; 2] = [0x80 | OPCODE_PING, 0];

/// Whether `frame` is a [`ping_frame`] (its memory is static, not a buffer queues hold).
pub(crate) fn is_ping(frame: &Bytes) -> bool {
    std::ptr::eq(frame.as_ptr(), PING.as_ptr())
}

/// Unmasks (or masks: the operation is its own inverse) `payload` with `mask`, eight bytes at
/// a time.
pub(crate) fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // Chunks of 8 keep the 4-byte mask aligned, so the tail starts at mask[0].
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// What the decoder found in the client's byte stream.
#[derive(Debug, PartialEq)]
pub(crate) enum Event<'a> {
    /// A whole message, text (valid UTF-8) or binary: wshub reads both as JSON.
    Message { text: bool, payload: &'a [u8] },
    /// A ping, to be answered with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong (an answer to the server's keep-alive ping).
    Pong,
    /// The client closed, with its code if it sent one. Nothing after it is decoded.
    Close(Option<u16>),
}

/// A violation that ends the connection with the given close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Violation {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
}

impl Violation {
    const fn protocol(reason: &'static str) -> Self {
        Violation {
            code: close_code::PROTOCOL_ERROR,
            reason,
        }
    }
    const TOO_BIG: Violation = Violation {
        code: close_code::MESSAGE_TOO_BIG,
        reason: "message too big",
    };
    const INVALID_UTF8: Violation = Violation {
        code: close_code::INVALID_PAYLOAD,
        reason: "invalid utf-8",
    };
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

/// A message arriving in several frames.
struct Fragmented {
    text: bool,
    data: Vec<u8>,
    /// How much of `data` is known to be valid UTF-8, so each fragment is checked once and an
    /// invalid text message fails at the fragment that breaks it.
    utf8_valid: usize,
}

/// Decodes client frames into [`Event`]s, reassembling fragmented messages and enforcing the
/// protocol and the message size limit.
pub(crate) struct Decoder {
    max_message: usize,
    fragmented: Option<Box<Fragmented>>,
}

impl Decoder {
    /// A decoder that refuses messages over `max_message` bytes, counted over all fragments.
    pub(crate) fn new(max_message: usize) -> Self {
        Decoder {
            max_message,
            fragmented: None,
        }
    }

    /// Decodes the whole frames at the front of `buf` (unmasking them in place), calls
    /// `on_event` for each event, and returns how many bytes it consumed; the rest is the start
    /// of a frame still arriving. Stops after a Close, or when `on_event` breaks.
    ///
    /// A frame is refused from its header alone when its payload would go over the limit, so
    /// a caller never needs to hold more than `max_message` plus a header of unread input.
    pub(crate) fn decode(
        &mut self,
        buf: &mut [u8],
        mut on_event: impl FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<usize, Violation> {
        let mut pos = 0;
        while let Some(header) = self.parse_header(&buf[pos..])? {
            let end = pos + header.header_len + header.payload_len;
            if buf.len() < end {
                break;
            }
            let payload = &mut buf[pos + header.header_len..end];
            apply_mask(payload, header.mask);
            pos = end;
            let flow = match header.opcode {
                OPCODE_TEXT | OPCODE_BINARY | OPCODE_CONTINUATION => {
                    match self.data_frame(&header, payload)? {
                        Some(message) => on_event(Event::Message {
                            text: header.opcode == OPCODE_TEXT,
                            payload: message,
                        }),
                        // A final continuation: the fragmented message is whole.
                        None if header.fin => match self.fragmented.take() {
                            Some(done) => on_event(Event::Message {
                                text: done.text,
                                payload: &done.data,
                            }),
                            None => ControlFlow::Continue(()),
                        },
                        None => ControlFlow::Continue(()),
                    }
                }
                OPCODE_PING => on_event(Event::Ping(payload)),
                OPCODE_PONG => on_event(Event::Pong),
                _ => {
                    let code = close_payload(payload)?;
                    let _ = on_event(Event::Close(code));
                    ControlFlow::Break(())
                }
            };
            if flow.is_break() {
                break;
            }
        }
        Ok(pos)
    }

    /// Handles a data frame. Returns the message when the frame is a whole message by itself;
    /// `None` when it started or continued a fragmented message (which is whole once `fin`).
    fn data_frame<'a>(
        &mut self,
        header: &Header,
        payload: &'a [u8],
    ) -> Result<Option<&'a [u8]>, Violation> {
        match (header.opcode, self.fragmented.as_mut()) {
            (OPCODE_CONTINUATION, None) => Err(Violation::protocol("continuation without a start")),
            (OPCODE_CONTINUATION, Some(fragmented)) => {
                fragmented.data.extend_from_slice(payload);
                if fragmented.text {
                    fragmented.utf8_valid =
                        check_utf8(&fragmented.data, fragmented.utf8_valid, header.fin)?;
                }
                Ok(None)
            }
            (_, Some(_)) => Err(Violation::protocol("new message inside a fragmented one")),
            (opcode, None) => {
                let text = opcode == OPCODE_TEXT;
                if header.fin {
                    if text {
                        check_utf8(payload, 0, true)?;
                    }
                    return Ok(Some(payload));
                }
                let utf8_valid = if text {
                    check_utf8(payload, 0, false)?
                } else {
                    0
                };
                self.fragmented = Some(Box::new(Fragmented {
                    text,
                    data: payload.to_vec(),
                    utf8_valid,
                }));
                Ok(None)
            }
        }
    }

    /// Parses and checks the frame header at the front of `buf`; `None` if it is not all there.
    fn parse_header(&self, buf: &[u8]) -> Result<Option<Header>, Violation> {
        let [first, second, ..] = *buf else {
            return Ok(None);
        };
        let fin = first & 0x80 != 0;
        if first & 0x70 != 0 {
            return Err(Violation::protocol("reserved bits set"));
        }
        let opcode = first & 0x0F;
        let control = opcode & 0x08 != 0;
        match opcode {
            OPCODE_CONTINUATION | OPCODE_TEXT | OPCODE_BINARY => {}
            OPCODE_CLOSE | OPCODE_PING | OPCODE_PONG => {
                if !fin {
                    return Err(Violation::protocol("fragmented control frame"));
                }
            }
            _ => return Err(Violation::protocol("unknown opcode")),
        }
        if second & 0x80 == 0 {
            return Err(Violation::protocol("unmasked client frame"));
        }
        let (payload_len, len_bytes) = match second & 0x7F {
            126 => match buf.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => {
                    let len = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                    if len >> 63 != 0 {
                        return Err(Violation::protocol("frame length over 63 bits"));
                    }
                    (len, 8)
                }
                None => return Ok(None),
            },
            len => (u64::from(len), 0),
        };
        if control && payload_len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(Violation::protocol("control frame over 125 bytes"));
        }
        let so_far = self.fragmented.as_ref().map_or(0, |f| f.data.len()) as u64;
        if !control && so_far + payload_len > self.max_message as u64 {
            return Err(Violation::TOO_BIG);
        }
        let header_len = 2 + len_bytes + 4;
        let Some(mask) = buf.get(header_len - 4..header_len) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode,
            mask: mask.try_into().expect("4 bytes"),
            header_len,
            // At most max_message here, so it fits in usize.
            payload_len: payload_len as usize,
        }))
    }
}

/// Checks `data[from..]` is UTF-8 and returns how far it is valid. An incomplete character at
/// the end is allowed unless the message is final.
fn check_utf8(data: &[u8], from: usize, fin: bool) -> Result<usize, Violation> {
    match std::str::from_utf8(&data[from..]) {
        Ok(_) => Ok(data.len()),
        Err(err) if err.error_len().is_none() && !fin => Ok(from + err.valid_up_to()),
        Err(_) => Err(Violation::INVALID_UTF8),
    }
}

/// The code in a Close frame's payload, checked: none, or a valid code and a UTF-8 reason.
fn close_payload(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::protocol("close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(Violation::protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(Violation::INVALID_UTF8);
            }
            Ok(Some(code))
        }
    }
}

/// Builds masked client frames, for tests and fuzzing of the decoder.
#[cfg(test)]
pub(crate) fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn decode_all(decoder: &mut Decoder, input: &[u8]) -> (Vec<String>, Result<usize, Violation>) {
        let mut buf = input.to_vec();
        let mut events = Vec::new();
        let result = decoder.decode(&mut buf, |event| {
            events.push(match event {
                Event::Message { payload, .. } => {
                    format!("msg:{}", String::from_utf8_lossy(payload))
                }
                Event::Ping(p) => format!("ping:{}", String::from_utf8_lossy(p)),
                Event::Pong => "pong".to_string(),
                Event::Close(code) => format!("close:{code:?}"),
            });
            ControlFlow::Continue(())
        });
        (events, result)
    }

    fn violation(input: &[u8]) -> u16 {
        decode_all(&mut Decoder::new(64), input).1.unwrap_err().code
    }

    #[test]
    fn mask_round_trips_at_every_length() {
        for len in 0..40 {
            let original: Vec<u8> = (0..len as u8).collect();
            let mut data = original.clone();
            apply_mask(&mut data, MASK);
            let expected: Vec<u8> = original
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(data, expected);
            apply_mask(&mut data, MASK);
            assert_eq!(data, original);
        }
    }

    #[test]
    fn whole_frames_and_a_partial_tail() {
        let mut input = client_frame(0x81, b"hello", MASK);
        input.extend(client_frame(0x89, b"p", MASK));
        input.extend(client_frame(0x8A, b"", MASK));
        let whole = input.len();
        input.extend(&client_frame(0x82, b"later", MASK)[..4]);
        let (events, consumed) = decode_all(&mut Decoder::new(64), &input);
        assert_eq!(events, ["msg:hello", "ping:p", "pong"]);
        assert_eq!(consumed, Ok(whole));
    }

    #[test]
    fn fragments_are_reassembled_with_control_frames_between() {
        let mut input = client_frame(0x01, b"hel", MASK);
        input.extend(client_frame(0x89, b"", MASK));
        input.extend(client_frame(0x00, b"lo ", MASK));
        input.extend(client_frame(0x80, b"world", MASK));
        let (events, consumed) = decode_all(&mut Decoder::new(64), &input);
        assert_eq!(events, ["ping:", "msg:hello world"]);
        assert_eq!(consumed, Ok(input.len()));
    }

    #[test]
    fn size_limit_counts_all_fragments() {
        let exactly = vec![b'x'; 64];
        let (events, _) = decode_all(&mut Decoder::new(64), &client_frame(0x82, &exactly, MASK));
        assert_eq!(events.len(), 1, "64 bytes are allowed");
        assert_eq!(violation(&client_frame(0x82, &[b'x'; 65], MASK)), 1009);

        let mut input = client_frame(0x02, &[b'x'; 40], MASK);
        input.extend(client_frame(0x80, &[b'x'; 25], MASK));
        assert_eq!(violation(&input), 1009);
    }

    #[test]
    fn too_big_is_refused_from_the_header_before_the_payload_arrives() {
        let frame = client_frame(0x82, &[0; 1000], MASK);
        let (_, result) = decode_all(&mut Decoder::new(64), &frame[..8]);
        assert_eq!(result.unwrap_err().code, 1009);
    }

    #[test]
    fn protocol_violations_close_with_1002() {
        assert_eq!(
            violation(&client_frame(0x89, &[0; 126], MASK)),
            1002,
            "big ping"
        );
        let mut big_close = vec![b'x'; 126];
        big_close[..2].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(
            violation(&client_frame(0x88, &big_close, MASK)),
            1002,
            "big close"
        );
        assert_eq!(
            violation(&client_frame(0x8A, &[0; 126], MASK)),
            1002,
            "big pong"
        );
        assert_eq!(
            violation(&client_frame(0x09, b"", MASK)),
            1002,
            "fragmented ping"
        );
        assert_eq!(violation(&client_frame(0xC1, b"x", MASK)), 1002, "rsv1");
        assert_eq!(violation(&client_frame(0x83, b"x", MASK)), 1002, "opcode 3");
        assert_eq!(
            violation(&client_frame(0x8B, b"x", MASK)),
            1002,
            "opcode 11"
        );
        assert_eq!(
            violation(&client_frame(0x80, b"x", MASK)),
            1002,
            "lone continuation"
        );
        assert_eq!(violation(&[0x81, 0x01, b'x']), 1002, "unmasked");
        let mut input = client_frame(0x01, b"a", MASK);
        input.extend(client_frame(0x81, b"b", MASK));
        assert_eq!(
            violation(&input),
            1002,
            "new message inside a fragmented one"
        );
    }

    #[test]
    fn invalid_utf8_closes_with_1007_and_fails_fast_when_fragmented() {
        assert_eq!(
            violation(&client_frame(0x81, &[0xce, 0xba, 0xff], MASK)),
            1007
        );
        // A character split across fragments is fine.
        let mut input = client_frame(0x01, &[0xce], MASK);
        input.extend(client_frame(0x80, &[0xba], MASK));
        assert_eq!(decode_all(&mut Decoder::new(64), &input).0, ["msg:κ"]);
        // An invalid byte fails at its fragment, before the message ends.
        let input = client_frame(0x01, &[b'a', 0xff], MASK);
        assert_eq!(violation(&input), 1007);
        // Binary messages are not checked.
        assert_eq!(
            decode_all(&mut Decoder::new(64), &client_frame(0x82, &[0xff], MASK))
                .0
                .len(),
            1
        );
    }

    #[test]
    fn close_frames_are_checked_and_stop_decoding() {
        let mut input = client_frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e'], MASK);
        input.extend(client_frame(0x81, b"after", MASK));
        let (events, _) = decode_all(&mut Decoder::new(64), &input);
        assert_eq!(events, ["close:Some(1000)"]);
        assert_eq!(
            decode_all(&mut Decoder::new(64), &client_frame(0x88, b"", MASK)).0,
            ["close:None"]
        );
        assert_eq!(violation(&client_frame(0x88, &[0x03], MASK)), 1002);
        assert_eq!(
            violation(&client_frame(0x88, &1005u16.to_be_bytes(), MASK)),
            1002
        );
        assert_eq!(
            violation(&client_frame(0x88, &999u16.to_be_bytes(), MASK)),
            1002
        );
        assert_eq!(
            violation(&client_frame(0x88, &[0x03, 0xe8, 0xff], MASK)),
            1007
        );
    }

    #[test]
    fn server_frames() {
        assert_eq!(
            &close_frame(1001, "bye")[..],
            &[0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']
        );
        let long = "é".repeat(100);
        let frame = close_frame(4000, &long);
        assert!(frame.len() <= 127);
        assert!(
            std::str::from_utf8(&frame[4..]).is_ok(),
            "cut at a char boundary"
        );
        assert_eq!(&ping_frame()[..], &[0x89, 0]);
        assert_eq!(server_header(OPCODE_TEXT, 125).1, 2);
        assert_eq!(server_header(OPCODE_TEXT, 126).1, 4);
        assert_eq!(server_header(OPCODE_TEXT, 65_535).1, 4);
        assert_eq!(server_header(OPCODE_TEXT, 65_536).1, 10);
    }
}
