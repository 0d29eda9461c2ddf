//! Decoding a client's request (the JSON of a text or binary message) never panics, whatever
//! the bytes, and strict go-ws mode only ever ignores `since`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wshub::bench_support::{decode_request, decode_since};

fuzz_target!(|data: &[u8]| {
    check(data);
    // Random bytes rarely make a subscribe: also try them as its `since`, where the offset
    // and epoch rules are exercised.
    let mut wrapped = br#"{"type":"subscribe","data":"c","since":"#.to_vec();
    wrapped.extend_from_slice(data);
    wrapped.push(b'}');
    check(&wrapped);
});

fn check(payload: &[u8]) {
    let lenient = decode_request(payload, false);
    let strict = decode_request(payload, true);
    let since = decode_since(payload);
    if lenient.is_ok() {
        // A request taken with its `since` is taken the same without it.
        assert_eq!(strict, lenient);
    } else if strict.is_ok() {
        // Only a bad `since` can make the difference, and it is malformed.
        assert_eq!(strict, Ok("subscribe"));
        assert_eq!(lenient, Err("malformed message"));
    }
    assert_eq!(since.is_ok(), lenient.is_ok());
    if let Ok(Some(_)) = since {
        assert_eq!(lenient, Ok("subscribe"));
    }
}
