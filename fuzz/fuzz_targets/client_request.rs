//! Decoding a client's request (the JSON of a text or binary message) never panics, whatever
//! the bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wshub::bench_support::decode_request;

fuzz_target!(|data: &[u8]| {
    let _ = decode_request(data);
});
