//! The client frame decoder (frame reading, unmasking, fragment reassembly, UTF-8 checks and
//! the size limits), as a connection runs it: it never panics, and the same bytes give the
//! same events and the same verdict however the reads split them.
//!
//! The input is either raw bytes or a list of frames built from their fields (so that the
//! fuzzer reaches fragmentation, control frames and the limits without guessing lengths and
//! masks).

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wshub::bench_support::{decode_frames, decode_frames_in_chunks, FrameEvent};

/// The largest client frame header: 2 bytes, a 64-bit length and the mask.
const MAX_CLIENT_HEADER: usize = 14;
/// The largest control frame payload.
const MAX_CONTROL: usize = 125;

#[derive(Arbitrary, Debug)]
struct Input {
    /// The message limit; small, so that the fuzzer reaches it.
    max_message: u16,
    /// Two ways of splitting the stream into reads.
    cuts_a: Vec<u16>,
    cuts_b: Vec<u16>,
    stream: Stream,
}

#[derive(Arbitrary, Debug)]
enum Stream {
    Raw(Vec<u8>),
    Frames(Vec<Frame>),
}

#[derive(Arbitrary, Debug)]
struct Frame {
    /// FIN, RSV1-3 and the opcode, as the first byte.
    first: u8,
    /// Unset the mask bit now and then (a protocol violation).
    unmasked: bool,
    /// Claim a different length than the payload has, now and then.
    length: Option<u64>,
    mask: [u8; 4],
    payload: Vec<u8>,
}

fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        out.push(frame.first);
        let mask_bit = if frame.unmasked { 0 } else { 0x80 };
        let len = frame.length.unwrap_or(frame.payload.len() as u64);
        if len < 126 {
            out.push(mask_bit | len as u8);
        } else if len <= u64::from(u16::MAX) {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
        if !frame.unmasked {
            out.extend_from_slice(&frame.mask);
        }
        out.extend(
            frame
                .payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ frame.mask[i % 4]),
        );
    }
    out
}

fuzz_target!(|input: Input| {
    let max_message = usize::from(input.max_message);
    let bytes = match &input.stream {
        Stream::Raw(bytes) => bytes.clone(),
        Stream::Frames(frames) => encode(frames),
    };

    // The plain decoder, on one buffer.
    let _ = decode_frames(&mut bytes.clone(), max_message);

    // One read, then two arbitrary splits: the same result each time.
    let cuts = |cuts: &[u16]| cuts.iter().map(|&c| usize::from(c)).collect::<Vec<_>>();
    let whole = decode_frames_in_chunks(&bytes, &[], max_message);
    let a = decode_frames_in_chunks(&bytes, &cuts(&input.cuts_a), max_message);
    let b = decode_frames_in_chunks(&bytes, &cuts(&input.cuts_b), max_message);
    assert_eq!(
        whole.events, a.events,
        "events differ when split at {:?}",
        input.cuts_a
    );
    assert_eq!(
        whole.violation, a.violation,
        "verdict differs when split at {:?}",
        input.cuts_a
    );
    assert_eq!(
        whole.events, b.events,
        "events differ when split at {:?}",
        input.cuts_b
    );
    assert_eq!(
        whole.violation, b.violation,
        "verdict differs when split at {:?}",
        input.cuts_b
    );

    for result in [&whole, &a, &b] {
        // A reader holds at most one frame still arriving, and that frame is within the limit
        // (a bigger one is refused from its header); a control frame may be up to 125 bytes.
        assert!(
            result.max_pending <= MAX_CLIENT_HEADER + max_message.max(MAX_CONTROL),
            "held {} bytes with a limit of {max_message}",
            result.max_pending
        );
        for event in &result.events {
            match event {
                FrameEvent::Message { text, payload } => {
                    assert!(payload.len() <= max_message, "a message over the limit");
                    assert!(
                        !text || std::str::from_utf8(payload).is_ok(),
                        "a text message that is not UTF-8"
                    );
                }
                FrameEvent::Ping(payload) => {
                    assert!(payload.len() <= MAX_CONTROL, "a ping over 125 bytes")
                }
                FrameEvent::Pong | FrameEvent::Close(_) => {}
            }
        }
        if let Some(code) = result.violation {
            assert!(
                matches!(code, 1002 | 1007 | 1009),
                "unexpected close code {code}"
            );
        }
    }
});
