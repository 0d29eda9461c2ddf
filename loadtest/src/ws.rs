//! The client side of the WebSocket wire protocol, as little of it as a load generator needs.
//!
//! No IO here: building masked client frames, a streaming parser for server frames that keeps
//! only a small prefix of each payload, and a scan that pulls the sequence number and the send
//! time out of a `message` frame without parsing the JSON.

/// What every delivered message frame starts with.
pub(crate) const MESSAGE_PREFIX: &[u8] = b"{\"type\":\"message\"";
/// Bytes of each payload the parser keeps when a frame arrives split over several reads: enough
/// for the envelope up to the sequence number and the send time, and for a whole ping payload.
pub(crate) const KEEP: usize = 160;

/// Opcodes of the frames the generator reacts to.
pub(crate) mod opcode {
    /// A text frame.
    pub(crate) const TEXT: u8 = 1;
    /// A binary frame.
    pub(crate) const BINARY: u8 = 2;
    /// A close frame.
    pub(crate) const CLOSE: u8 = 8;
    /// A ping frame: answered with a pong carrying the same payload.
    pub(crate) const PING: u8 = 9;
    /// A pong frame.
    pub(crate) const PONG: u8 = 10;
}

/// The mask key of every client frame. RFC 6455 wants an unpredictable key against cache
/// poisoning through proxies; a load generator on a network it owns does not need that, and a
/// fixed key lets a whole batch be built without drawing random numbers.
const MASK: [u8; 4] = [0x5a, 0x3c, 0xa5, 0xc3];

/// Appends one masked client frame (FIN set) with `payload` to `out`.
pub(crate) fn client_frame(out: &mut Vec<u8>, op: u8, payload: &[u8]) {
    let start = push_header(out, op, payload.len());
    out.extend_from_slice(payload);
    mask_in_place(&mut out[start..]);
}

/// Appends a frame header with the mask key for a payload of `len` bytes; returns where the
/// payload starts, for [`mask_in_place`] once the payload is written.
fn push_header(out: &mut Vec<u8>, op: u8, len: usize) -> usize {
    out.push(0x80 | op);
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.len()
}

fn mask_in_place(payload: &mut [u8]) {
    let key = u32::from_ne_bytes(MASK);
    let mut chunks = payload.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ key;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= MASK[i];
    }
}

/// Appends `{"type":"subscribe","data":"CHANNEL"}` (or unsubscribe) as a client frame.
pub(crate) fn subscribe_frame(out: &mut Vec<u8>, channel: &str, subscribe: bool) {
    let kind = if subscribe {
        "subscribe"
    } else {
        "unsubscribe"
    };
    let json = format!("{{\"type\":\"{kind}\",\"data\":\"{channel}\"}}");
    client_frame(out, opcode::TEXT, json.as_bytes());
}

/// Appends one publish frame whose `data` is the string `"SEQ:SENT_NANOS:xxx…"`, padded with
/// `x` to `size` bytes (longer when the two numbers alone need more).
pub(crate) fn publish_frame(
    out: &mut Vec<u8>,
    channel: &str,
    seq: u64,
    sent_nanos: u64,
    size: usize,
) {
    let mut nums = [0u8; 48];
    let mut n = write_u64(&mut nums, seq);
    nums[n] = b':';
    n += 1;
    n += write_u64(&mut nums[n..], sent_nanos);
    nums[n] = b':';
    n += 1;
    let data_len = size.max(n);
    let len = br#"{"type":"publish","channel":""#.len()
        + channel.len()
        + br#"","data":""#.len()
        + data_len
        + 2;
    let start = push_header(out, opcode::TEXT, len);
    out.extend_from_slice(br#"{"type":"publish","channel":""#);
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(br#"","data":""#);
    out.extend_from_slice(&nums[..n]);
    out.resize(out.len() + (data_len - n), b'x');
    out.extend_from_slice(b"\"}");
    mask_in_place(&mut out[start..]);
}

/// Writes `v` in decimal at the start of `out` (at least 20 bytes); returns the digit count.
fn write_u64(out: &mut [u8], mut v: u64) -> usize {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let n = tmp.len() - i;
    out[..n].copy_from_slice(&tmp[i..]);
    n
}

/// Reads the sequence number and send time from a server `message` frame's payload (or its
/// first [`KEEP`] bytes): the two numbers at the start of the `data` string. `None` for any other
/// frame, or a message this generator did not publish.
pub(crate) fn scan_message(payload: &[u8]) -> Option<(u64, u64)> {
    scan_message_at(payload, &mut 0)
}

/// [`scan_message`] with a hint: where the numbers started in the previous message of the same
/// connection. One server lays out one channel's messages alike, so the hint saves the search
/// for `"data":"` nearly always; when it misses, the search runs and updates it.
#[inline]
pub(crate) fn scan_message_at(payload: &[u8], hint: &mut u16) -> Option<(u64, u64)> {
    if !payload.starts_with(MESSAGE_PREFIX) {
        return None;
    }
    const KEY: &[u8] = b"\"data\":\"";
    let h = usize::from(*hint);
    let start = if h >= KEY.len() && payload.len() > h && &payload[h - KEY.len()..h] == KEY {
        h
    } else {
        let rest = &payload[MESSAGE_PREFIX.len()..];
        let at = MESSAGE_PREFIX.len() + rest.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
        *hint = u16::try_from(at).unwrap_or(0);
        at
    };
    let mut p = &payload[start..];
    let seq = read_u64(&mut p)?;
    let sent = read_u64(&mut p)?;
    Some((seq, sent))
}

/// Parses decimal digits up to a `:`, consuming both.
fn read_u64(p: &mut &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for (i, &b) in p.iter().enumerate().take(21) {
        if b == b':' {
            if i == 0 {
                return None;
            }
            *p = &p[i + 1..];
            return Some(v);
        }
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    None
}

/// One complete frame from the server, as the parser hands it over.
#[derive(Debug)]
pub(crate) struct Frame<'a> {
    /// The opcode (FIN and reserved bits stripped).
    pub(crate) op: u8,
    /// The payload, or only its first [`KEEP`] bytes when the frame came in pieces.
    pub(crate) head: &'a [u8],
}

/// A streaming parser of server frames: feed it whatever a read returned; it calls back once per
/// complete frame. Frames wholly inside one read are handed over in place, without a copy; only a
/// frame split across reads is assembled, and then only its first [`KEEP`] bytes.
#[derive(Debug)]
pub(crate) struct FrameParser {
    hdr: [u8; 14],
    hdr_len: u8,
    hdr_need: u8,
    op: u8,
    masked: bool,
    /// Payload bytes of the current frame still to come.
    left: u64,
    keep: [u8; KEEP],
    keep_len: u8,
}

impl Default for FrameParser {
    fn default() -> Self {
        FrameParser {
            hdr: [0; 14],
            hdr_len: 0,
            hdr_need: 2,
            op: 0,
            masked: false,
            left: 0,
            keep: [0; KEEP],
            keep_len: 0,
        }
    }
}

/// Parses a frame header at the start of `b`: (header length, payload length, opcode, masked),
/// or `None` when `b` holds less than the whole header.
#[inline]
pub(crate) fn header(b: &[u8]) -> Option<(usize, u64, u8, bool)> {
    if b.len() < 2 {
        return None;
    }
    let len7 = b[1] & 0x7f;
    let masked = b[1] & 0x80 != 0;
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let hl = 2 + ext + if masked { 4 } else { 0 };
    if b.len() < hl {
        return None;
    }
    let len = match len7 {
        126 => u64::from(u16::from_be_bytes([b[2], b[3]])),
        127 => u64::from_be_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]]),
        n => u64::from(n),
    };
    Some((hl, len, b[0] & 0x0f, masked))
}

impl FrameParser {
    /// True between frames: nothing of a partial frame is held.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> bool {
        self.hdr_len == 0 && self.left == 0 && self.keep_len == 0
    }

    /// Feeds received bytes; calls `f` for every frame they complete.
    pub(crate) fn feed(&mut self, mut data: &[u8], f: &mut impl FnMut(Frame<'_>)) {
        while !data.is_empty() {
            if self.hdr_len == 0 {
                // Fast path: a whole frame at the front of the buffer.
                if let Some((hl, len, op, masked)) = header(data) {
                    if !masked && (data.len() - hl) as u64 >= len {
                        let end = hl + len as usize;
                        f(Frame {
                            op,
                            head: &data[hl..end],
                        });
                        data = &data[end..];
                        continue;
                    }
                }
            }
            if self.hdr_len < self.hdr_need {
                self.hdr[self.hdr_len as usize] = data[0];
                self.hdr_len += 1;
                data = &data[1..];
                if self.hdr_len == 2 {
                    let len7 = self.hdr[1] & 0x7f;
                    let ext = match len7 {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    self.hdr_need = 2 + ext + if self.hdr[1] & 0x80 != 0 { 4 } else { 0 };
                }
                if self.hdr_len == self.hdr_need {
                    if let Some((_, len, op, masked)) = header(&self.hdr[..self.hdr_len as usize]) {
                        self.left = len;
                        self.op = op;
                        self.masked = masked;
                        self.keep_len = 0;
                        if len == 0 {
                            self.finish(f);
                        }
                    }
                }
                continue;
            }
            let take = (data.len() as u64).min(self.left) as usize;
            let room = KEEP - self.keep_len as usize;
            let k = take.min(room);
            self.keep[self.keep_len as usize..self.keep_len as usize + k]
                .copy_from_slice(&data[..k]);
            self.keep_len += k as u8;
            data = &data[take..];
            self.left -= take as u64;
            if self.left == 0 {
                self.finish(f);
            }
        }
    }

    fn finish(&mut self, f: &mut impl FnMut(Frame<'_>)) {
        let n = self.keep_len as usize;
        if self.masked {
            // Servers never mask; unmask anyway so a misbehaving one is still read right.
            let k0 = self.hdr_need as usize - 4;
            let key = [
                self.hdr[k0],
                self.hdr[k0 + 1],
                self.hdr[k0 + 2],
                self.hdr[k0 + 3],
            ];
            for (i, b) in self.keep[..n].iter_mut().enumerate() {
                *b ^= key[i & 3];
            }
        }
        f(Frame {
            op: self.op,
            head: &self.keep[..n],
        });
        self.hdr_len = 0;
        self.hdr_need = 2;
        self.keep_len = 0;
        self.left = 0;
    }
}

/// The close code in a close frame's payload, if it has one.
pub(crate) fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// The HTTP/1.1 upgrade request for `path` on `host` (the `Host` header value).
pub(crate) fn upgrade_request(host: &str, path: &str) -> String {
    // The key from RFC 6455's example: fanout.c uses it too, and floor.c answers only it.
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// The `Sec-WebSocket-Accept` value that answers [`upgrade_request`]'s key.
pub(crate) const EXPECTED_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

#[cfg(test)]
mod tests {
    use super::*;

    fn unmask(frame: &[u8]) -> (u8, Vec<u8>) {
        let (hl, len, op, masked) = header(frame).unwrap();
        assert!(masked);
        let key = &frame[hl - 4..hl];
        let p: Vec<u8> = frame[hl..hl + len as usize]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i & 3])
            .collect();
        (op, p)
    }

    #[test]
    fn publish_frame_round_trips() {
        for size in [0, 10, 100, 200, 70_000] {
            let mut out = Vec::new();
            publish_frame(&mut out, "bench", 42, 123_456_789, size);
            let (op, p) = unmask(&out);
            assert_eq!(op, opcode::TEXT);
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            assert_eq!(v["channel"], "bench");
            let data = v["data"].as_str().unwrap();
            assert!(data.starts_with("42:123456789:"));
            assert_eq!(data.len(), size.max("42:123456789:".len()));
        }
    }

    #[test]
    fn scan_reads_the_numbers() {
        let m = br#"{"type":"message","channel":"c-1","data":"7:99:xxxx","timestamp":"2026-01-01T00:00:00Z"}"#;
        assert_eq!(scan_message(m), Some((7, 99)));
        let mut hint = 0;
        assert_eq!(scan_message_at(m, &mut hint), Some((7, 99)));
        assert_eq!(&m[usize::from(hint) - 8..usize::from(hint)], b"\"data\":\"");
        assert_eq!(scan_message_at(m, &mut hint), Some((7, 99)));
        let other = br#"{"type":"message","channel":"c-12345","data":"8:100:","timestamp":"x"}"#;
        assert_eq!(scan_message_at(other, &mut hint), Some((8, 100)));
        hint = 5000;
        assert_eq!(scan_message_at(m, &mut hint), Some((7, 99)));
        // A history channel's frame: the position after the timestamp changes nothing.
        let h = br#"{"type":"message","channel":"c-1","data":"9:101:xx","timestamp":"2026-01-01T00:00:00Z","offset":9,"epoch":"a9f3c2"}"#;
        assert_eq!(scan_message_at(h, &mut hint), Some((9, 101)));
        assert_eq!(
            scan_message(br#"{"type":"message","channel":"c","data":{"a":1}}"#),
            None
        );
        assert_eq!(
            scan_message(br#"{"type":"subscribed","channel":"c"}"#),
            None
        );
        assert_eq!(scan_message(br#"{"type":"message","data":":1:"}"#), None);
        assert_eq!(
            scan_message(br#"{"type":"message","data":"99999999999999999999999:1:"}"#),
            None
        );
    }

    fn server_frame(op: u8, p: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80 | op];
        if p.len() < 126 {
            v.push(p.len() as u8);
        } else if p.len() < 65536 {
            v.push(126);
            v.extend_from_slice(&(p.len() as u16).to_be_bytes());
        } else {
            v.push(127);
            v.extend_from_slice(&(p.len() as u64).to_be_bytes());
        }
        v.extend_from_slice(p);
        v
    }

    #[test]
    fn parser_handles_any_split() {
        let big = format!(
            r#"{{"type":"message","channel":"c","data":"5:6:{}"}}"#,
            "x".repeat(70_000)
        );
        let mut stream = Vec::new();
        stream.extend(server_frame(
            1,
            br#"{"type":"message","channel":"c","data":"1:2:x"}"#,
        ));
        stream.extend(server_frame(9, b"ping!"));
        stream.extend(server_frame(1, big.as_bytes()));
        stream.extend(server_frame(1, &[b'y'; 300]));
        stream.extend(server_frame(8, &[0x0f, 0xa0]));
        for chunk in [1, 2, 3, 7, 64, 1000, stream.len()] {
            let mut p = FrameParser::default();
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                p.feed(c, &mut |f| {
                    got.push((
                        f.op,
                        f.head.len().min(KEEP),
                        scan_message(f.head),
                        f.head.to_vec(),
                    ))
                });
            }
            assert!(p.idle());
            assert_eq!(got.len(), 5, "chunk {chunk}");
            assert_eq!(got[0].2, Some((1, 2)));
            assert_eq!((got[1].0, got[1].3.as_slice()), (9, &b"ping!"[..]));
            assert_eq!(got[2].2, Some((5, 6)));
            assert_eq!(got[3].0, 1);
            assert_eq!(close_code(&got[4].3), Some(4000));
        }
    }
}
