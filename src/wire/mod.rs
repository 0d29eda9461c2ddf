//! The wire: the protocol's JSON messages and WebSocket framing. No IO, so both can be tested
//! and fuzzed without a runtime.

pub(crate) mod frame;
pub(crate) mod protocol;
