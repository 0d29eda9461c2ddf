//! Internals opened to the benchmarks (`benches/`) and fuzz targets (`fuzz/`), only with the
//! non-default `test-support` feature. Hidden from the docs and outside any semver promise:
//! applications must not use it.
//!
//! Clients here are "null" clients: their socket takes every frame at once and counts it, so
//! a benchmark measures the hub's own work (routing, staging, the write path) without the
//! kernel's.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::client::{ClientId, ClientInfo};
use crate::config::HubConfig;
use crate::conn::{Conn, Socket};
use crate::history::{
    ChannelLock, HistoryPolicy, HistoryRules, HistoryStore, HISTORY_MEMORY_BUDGET,
};
use crate::http::session::Reader;
use crate::hub::{Hub, Shared};
use crate::shard::{Command, Shard};
use crate::wire::frame::{Decoder, Event};
use crate::wire::protocol::{self, Envelope, Message};

/// Encodes `message` into a complete frame, as every publish does once.
pub fn encode(message: &Message) -> Bytes {
    protocol::encode_frame(&Envelope::of(message, None), SystemTime::now())
        .expect("a Message always encodes")
}

/// [`encode`] for a publication to a history channel: `offset` and `epoch` follow the
/// timestamp.
pub fn encode_at(message: &Message, offset: u64, epoch: &str) -> Bytes {
    let position = protocol::Position { offset, epoch };
    protocol::encode_frame_at(
        &Envelope::of(message, None),
        SystemTime::now(),
        Some(position),
    )
    .expect("a Message always encodes")
}

/// Decodes client frames from `input` with a limit of `max_message` bytes, as a connection
/// does; returns the number of events, or the close code of the violation. For fuzzing.
pub fn decode_frames(input: &mut [u8], max_message: usize) -> Result<usize, u16> {
    let mut decoder = Decoder::new(max_message);
    let mut events = 0;
    decoder
        .decode(input, |event| {
            events += 1;
            if matches!(event, Event::Close(_)) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .map(|_| events)
        .map_err(|v| v.code)
}

/// An event of the client frame decoder, owned, so that decodes can be compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameEvent {
    /// A whole message, reassembled if it came in fragments.
    Message {
        /// A text message (then valid UTF-8) rather than binary.
        text: bool,
        /// The unmasked payload.
        payload: Vec<u8>,
    },
    /// A ping with its payload.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// A close, with its code if it had one.
    Close(Option<u16>),
}

/// What a connection made of a byte stream: see [`decode_frames_in_chunks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedDecode {
    /// The events, in order, up to a Close or a violation.
    pub events: Vec<FrameEvent>,
    /// The close code of the violation, if the client broke the protocol.
    pub violation: Option<u16>,
    /// The most bytes the reader held between reads (the tail of a frame still arriving).
    pub max_pending: usize,
}

/// Feeds `input` to a connection's reader (the decoder plus the tail it keeps between reads)
/// as reads that end at each of `cuts` (offsets into `input`, in any order; those past the end
/// are ignored), with a limit of `max_message` bytes, and stops at a Close or a violation as
/// a connection does. However the input is cut, the result should be the same. For fuzzing.
pub fn decode_frames_in_chunks(input: &[u8], cuts: &[usize], max_message: usize) -> ChunkedDecode {
    let mut ends: Vec<usize> = cuts.iter().copied().filter(|&c| c < input.len()).collect();
    ends.push(input.len());
    ends.sort_unstable();
    ends.dedup();
    let mut reader = Reader::new(max_message);
    let mut result = ChunkedDecode {
        events: Vec::new(),
        violation: None,
        max_pending: 0,
    };
    let mut start = 0;
    for end in ends {
        let mut chunk = input[start..end].to_vec();
        start = end;
        let mut closed = false;
        let fed = reader.feed(&mut chunk, |event| {
            result.events.push(match event {
                Event::Message { text, payload } => FrameEvent::Message {
                    text,
                    payload: payload.to_vec(),
                },
                Event::Ping(payload) => FrameEvent::Ping(payload.to_vec()),
                Event::Pong => FrameEvent::Pong,
                Event::Close(code) => {
                    closed = true;
                    FrameEvent::Close(code)
                }
            });
            if closed {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        if let Err(violation) = fed {
            result.violation = Some(violation.code);
            break;
        }
        if closed {
            break;
        }
        result.max_pending = result.max_pending.max(reader.pending_len());
    }
    result
}

/// Decodes one client request, as a connection does (`strict`: in go-ws mode); `Ok` with its
/// kind or `Err` with the reason the client would be told. For fuzzing.
pub fn decode_request(payload: &[u8], strict: bool) -> Result<&'static str, &'static str> {
    use protocol::ClientRequest;
    match protocol::decode_request(payload, strict) {
        Ok(ClientRequest::Subscribe { .. }) => Ok("subscribe"),
        Ok(ClientRequest::Unsubscribe(_)) => Ok("unsubscribe"),
        Ok(ClientRequest::Ping) => Ok("ping"),
        Ok(ClientRequest::Publish { .. }) => Ok("publish"),
        Err(err) => Err(err.reason.as_str()),
    }
}

/// A subscribe's `since` as a connection decodes it (not in strict mode): `Ok(None)` for a
/// request that is not a subscribe or has no `since`, `Ok(Some((offset, epoch)))`, or `Err`
/// with the reason the client would be told. For fuzzing.
pub fn decode_since(payload: &[u8]) -> Result<Option<(u64, Option<String>)>, &'static str> {
    use protocol::ClientRequest;
    match protocol::decode_request(payload, false) {
        Ok(ClientRequest::Subscribe {
            since: Some(since), ..
        }) => Ok(Some((since.offset, since.epoch.map(String::from)))),
        Ok(_) => Ok(None),
        Err(err) => Err(err.reason.as_str()),
    }
}

fn null_conn(shared: &Shared) -> Arc<Conn> {
    let info = ClientInfo {
        id: shared.next_client_id(),
        remote_addr: None,
        user_id: None,
        claims: serde_json::Value::Null,
        connected_at: SystemTime::now(),
    };
    Arc::new(Conn::new(
        info,
        Socket::Null(AtomicU64::new(0)),
        shared.now_ms(),
    ))
}

/// Frames a null client has been given.
fn frames_of(conn: &Conn) -> u64 {
    match &conn.socket {
        Socket::Null(frames) => frames.load(Ordering::Relaxed),
        Socket::Tcp(_) | Socket::Stream => 0,
    }
}

/// One shard driven synchronously, without a runtime: for benchmarking the channel index
/// and fuzzing it against a model.
pub struct ShardHarness {
    hub: Hub,
    shard: Shard,
    conns: Vec<Arc<Conn>>,
}

impl ShardHarness {
    /// A harness whose shard 0 runs under `config` (use `shards(1)`).
    pub fn new(config: HubConfig) -> Self {
        let hub = Hub::with_config(config);
        let shard = hub.shared().new_shard(0);
        ShardHarness {
            hub,
            shard,
            conns: Vec::new(),
        }
    }

    fn run(&mut self, command: Command) {
        let _ = self.shard.handle(command);
    }

    /// Connects a null client.
    pub fn connect(&mut self) -> ClientId {
        let conn = null_conn(self.hub.shared());
        let id = conn.info.id;
        self.conns.push(Arc::clone(&conn));
        self.run(Command::Register(conn));
        id
    }

    /// Subscribes a client as its own request would.
    pub fn subscribe(&mut self, client: ClientId, channel: &str) {
        self.run(Command::Subscribe {
            client,
            channel: channel.into(),
            from_client: true,
            since: None,
        });
    }

    /// Unsubscribes a client.
    pub fn unsubscribe(&mut self, client: ClientId, channel: &str) {
        self.run(Command::Unsubscribe {
            client,
            channel: channel.into(),
        });
    }

    /// Disconnects a client, as when its connection ends.
    pub fn disconnect(&mut self, client: ClientId) {
        self.run(Command::Remove { client, done: None });
    }

    /// Publishes `frame` to `channel` through the directory, as the hub does; returns whether
    /// the channel had subscribers on this shard.
    pub fn publish(&mut self, channel: &str, frame: Bytes) -> bool {
        let Some(entry) = self.hub.shared().channels.get(channel) else {
            return false;
        };
        if entry.shard_mask() & 1 == 0 {
            return false;
        }
        self.run(Command::Publish {
            channel: entry,
            frame,
            offset: 0,
            stamp: crate::shard::Stamp::now(),
        });
        true
    }

    /// Writes every staged frame, as the end of a batch does.
    pub fn flush(&mut self) {
        self.shard.flush();
    }

    /// Frames client `client` has been given (acknowledgements included).
    pub fn frames_received(&self, client: ClientId) -> u64 {
        self.conns
            .iter()
            .find(|c| c.info.id == client)
            .map_or(0, |c| frames_of(c))
    }

    /// The hub's view: subscribers of `channel`.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.hub.channel_subscriber_count(channel)
    }

    /// The hub's view: channels with subscribers.
    pub fn channel_count(&self) -> usize {
        self.hub.channel_count()
    }

    /// The hub's view: clients connected.
    pub fn client_count(&self) -> usize {
        self.hub.client_count()
    }
}

/// Connects a null client to a running `hub` (its shards started) and subscribes it to
/// `channel` from the server side; the client counts the frames it is given.
pub fn attach_null_client(hub: &Hub, channel: &str) -> ClientId {
    hub.ensure_started();
    let shared = hub.shared();
    let conn = null_conn(shared);
    let id = conn.info.id;
    let _ = shared.enqueue(shared.shard_index(id), Command::Register(conn));
    let _ = hub.subscribe(id, channel);
    id
}

/// Frames the hub has handed to clients so far (its `delivered` counter), without building a
/// whole stats snapshot.
pub fn delivered(hub: &Hub) -> u64 {
    hub.shared().counters.delivered.load(Ordering::Relaxed)
}

pub use crate::history::model::{HistoryModelCheck, HistoryModelConfig, HistoryOp};

/// One channel's history in a store of its own, for benchmarking the publish path's append
/// and the subscribe path's pin. The clock stands still: only `max_publications` trims.
pub struct HistoryBench {
    store: HistoryStore,
    channel: Arc<ChannelLock>,
}

impl HistoryBench {
    /// A channel keeping `max_publications`, under the default memory budget.
    pub fn new(max_publications: usize) -> Self {
        let policy = HistoryPolicy::new(max_publications, Duration::from_secs(3600))
            .expect("a valid policy");
        let store = HistoryStore::new(
            HistoryRules::new().channel("bench", policy),
            HISTORY_MEMORY_BUDGET,
        );
        let channel = store.channel("bench", 0).expect("a channel with history");
        HistoryBench { store, channel }
    }

    /// What the publish path does: under the channel's lock, reads the next offset and
    /// appends (trimming by count), then enforces the budget. Returns the offset.
    pub fn append(&self, frame: Bytes) -> u64 {
        let offset = {
            let mut history = self.channel.lock();
            let offset = history.next_offset();
            history.append(frame, 0);
            offset
        };
        self.store.enforce_budget();
        offset
    }

    /// What the subscribe path does: pins the publications after `since` under the lock;
    /// then drops the replay. Returns how many it held.
    pub fn pin_after(&self, since: u64) -> usize {
        let replay = self.channel.lock().pin_after(since, 0);
        replay.len()
    }

    /// Pins after `since`, then walks the replay as a shard writing it would (each frame
    /// cloned, then dropped). Returns the bytes walked.
    pub fn replay_after(&self, since: u64) -> usize {
        let replay = self.channel.lock().pin_after(since, 0);
        replay.map(|(_, frame)| frame.len()).sum()
    }

    /// Bytes the history counts for.
    pub fn memory(&self) -> usize {
        self.store.memory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::client_frame;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    /// The fuzz target `frames` checks this for arbitrary input; here, a fragmented message
    /// with a ping between its fragments, cut at every byte.
    #[test]
    fn reads_cut_anywhere_give_the_same_events() {
        let mut input = client_frame(0x01, "κα".as_bytes(), MASK);
        input.extend(client_frame(0x89, b"p", MASK));
        input.extend(client_frame(0x80, "λό".as_bytes(), MASK));
        input.extend(client_frame(0x88, &1000u16.to_be_bytes(), MASK));
        input.extend(client_frame(0x81, b"after the close", MASK));
        let whole = decode_frames_in_chunks(&input, &[], 64);
        assert_eq!(
            whole.events,
            [
                FrameEvent::Ping(b"p".to_vec()),
                FrameEvent::Message {
                    text: true,
                    payload: "καλό".as_bytes().to_vec()
                },
                FrameEvent::Close(Some(1000)),
            ]
        );
        let every_byte: Vec<usize> = (0..input.len()).collect();
        let cut = decode_frames_in_chunks(&input, &every_byte, 64);
        assert_eq!(cut.events, whole.events);
        assert_eq!(cut.violation, None);
    }
}
