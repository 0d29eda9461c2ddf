//! Channel histories in Redis (cargo feature `redis`): offsets, epochs and retained
//! publications that every node shares (PROTOCOL.md, "Several nodes").
//!
//! # In Redis
//!
//! For a history channel `NAME`, with the broker's `PREFIX`:
//!
//! - `PREFIX:history-meta:NAME`, a hash: `epoch` (the channel's epoch, a string) and `offset`
//!   (its counter, the latest offset given);
//! - `PREFIX:history:NAME`, a stream of the retained publications: entry id `OFFSET-0`,
//!   fields `m` (the message's JSON, with its `offset` and `epoch`) and `t` (when it was
//!   published, milliseconds since the Unix epoch, for the age limit). Trimmed to the
//!   channel's count at every publish.
//!
//! Both expire the channel's age after its last publication: then its counter is gone, and
//! the next publication starts a new epoch at offset 1 (as on one node, where an idle channel
//! forgets its counter; Redis does not know whether some node still has subscribers).
//!
//! # Publishing
//!
//! One Lua script ([`PUBLISH_SCRIPT`], sent with EVALSHA in the publisher's pipelines)
//! creates the epoch if there is none, takes the next offset, stores the publication and
//! PUBLISHes it in go-ws's payload with the position inside the message: one atomic step, so
//! the order of the pub/sub messages is the order of the offsets. No node delivers its own
//! publication before Redis has numbered it.
//!
//! # Delivering
//!
//! Every node delivers a channel's publications in offset order, into its local history
//! (which then serves `since` subscribes and `Hub::history` as a cache) and to its local
//! subscribers. A publication after a gap, or of another epoch, makes the node
//! [`catch_up`] from the stream first; so does every (re)subscription of the pub/sub
//! connection, for each of its history channels, so that what was published while the node
//! was away is delivered, the tail included.
//!
//! An epoch changes when Redis lost the counter (a flush, a restart without persistence,
//! expiry) and the next publish makes a new one; or when a node finds the counter below an
//! offset it already delivered in the same epoch (Redis came back older): the node then
//! removes the channel's keys, if nobody changed the epoch meanwhile ([`ROLLBACK_SCRIPT`]),
//! so that the next publish starts a new epoch rather than reuse offsets clients already hold.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::Script;

use super::{Inbound, Numbered};
use crate::history::EpochSource;

/// Publications read from a stream in one XRANGE while catching up: bounds what one read
/// holds (a page of 1 KiB publications is 1 MiB).
const CATCH_UP_PAGE: usize = 1000;

/// How long the subscriber retries a delivery refused by a full shard before it leaves it to
/// the next catch-up (the publication stays in Redis).
const REFUSED_RETRY: Duration = Duration::from_millis(1);
const REFUSED_TRIES: usize = 1000;

/// Numbers, stores and publishes one publication, atomically.
///
/// KEYS: the meta hash, the stream, the pub/sub channel. ARGV: the message's JSON (an object,
/// without position), the payload's head (`{"sourceId":…,"message":`), the most
/// publications kept, the age limit in ms, an epoch for a channel that has none, now in ms.
/// Returns `{offset, epoch}`.
pub(super) const PUBLISH_SCRIPT: &str = r#"
local function new_epoch()
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[5], 'offset', 0)
  return ARGV[5]
end
local function store(offset, epoch)
  local position = string.format(',"offset":%d,"epoch":"%s"}', offset, epoch)
  local message = string.sub(ARGV[1], 1, -2) .. position
  local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', ARGV[3],
    string.format('%d-0', offset), 'm', message, 't', ARGV[6])
  return message, not (type(added) == 'table' and added.err)
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = new_epoch()
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local message, stored = store(offset, epoch)
if not stored then
  -- The stream already holds this offset: the counter went back (Redis came back older).
  -- Offsets already given must not be given again: a new epoch.
  epoch = new_epoch()
  offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
  message, stored = store(offset, epoch)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', KEYS[3], ARGV[2] .. message .. '}')
return {offset, epoch}
"#;

/// Gives a channel that has no counter in Redis its epoch now, at offset 0 (expiring with
/// its age, as after a publication), so that a subscriber acknowledged before the first
/// publication is told the epoch that publication will carry. KEYS: the meta hash, the
/// stream. ARGV: an epoch, the age limit in ms. Returns the channel's epoch and counter.
pub(super) const ENSURE_EPOCH_SCRIPT: &str = r#"
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'offset', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'epoch', 'offset')
"#;

/// Forgets a channel's counter and history if its epoch is still ARGV[1]: a node found the
/// counter below an offset it delivered (Redis came back older), and the next publish must
/// start a new epoch. KEYS: the meta hash, the stream.
pub(super) const ROLLBACK_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"#;

/// The keys of one channel's history.
pub(super) struct HistoryKeys {
    pub(super) meta: Vec<u8>,
    pub(super) stream: Vec<u8>,
}

impl HistoryKeys {
    pub(super) fn new(prefix: &str, channel: &str) -> Self {
        let key = |kind: &str| {
            let mut key = Vec::with_capacity(prefix.len() + kind.len() + channel.len() + 2);
            key.extend_from_slice(prefix.as_bytes());
            key.push(b':');
            key.extend_from_slice(kind.as_bytes());
            key.push(b':');
            key.extend_from_slice(channel.as_bytes());
            key
        };
        HistoryKeys {
            meta: key("history-meta"),
            stream: key("history"),
        }
    }
}

/// Milliseconds since the Unix epoch: the `t` of a stored publication.
pub(super) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Delivers a numbered publication, retrying while a shard is over its backlog (bounded: see
/// [`REFUSED_TRIES`]).
pub(super) async fn deliver(inbound: &Inbound, channel: &str, json: &[u8]) -> Numbered {
    let mut tries = 0;
    loop {
        match inbound.deliver_numbered(channel, json) {
            Numbered::Refused if tries < REFUSED_TRIES => {
                tries += 1;
                tokio::time::sleep(REFUSED_RETRY).await;
            }
            outcome => return outcome,
        }
    }
}

/// One entry of an XRANGE answer: its id and its fields, flat.
type StreamEntry = (String, Vec<Vec<u8>>);

/// Brings `channel`'s local history up to Redis's: reads the stream after the local latest
/// offset (all of it, in pages of [`CATCH_UP_PAGE`], up to what Redis holds now) and delivers
/// it in order; on another epoch, starts the local history over at Redis's epoch and delivers
/// from the first offset Redis holds. Returns how many publications it delivered.
///
/// # Errors
///
/// A command failed: the connection is to be taken for lost.
pub(super) async fn catch_up(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    epochs: &EpochSource,
    inbound: &Inbound,
    channel: &str,
) -> redis::RedisResult<u64> {
    let Some(policy) = inbound.history_policy(channel) else {
        return Ok(0);
    };
    let keys = HistoryKeys::new(prefix, channel);
    // Nothing in Redis yet (never published, expired, flushed): the channel gets its epoch
    // now, so that this node's subscribers are acknowledged in it.
    let (epoch, top): (Option<String>, Option<u64>) = Script::new(ENSURE_EPOCH_SCRIPT)
        .key(&keys.meta)
        .key(&keys.stream)
        .arg(&*epochs.next())
        .arg((policy.max_age().as_millis() as u64).max(1))
        .invoke_async(conn)
        .await?;
    let Some(epoch) = epoch else {
        return Ok(0);
    };
    let top = top.unwrap_or(0);
    let mut after = match inbound.history_position(channel) {
        Some((local, latest)) if *local == *epoch && latest <= top => latest,
        Some((local, latest)) if *local == *epoch => {
            // Redis's counter is below what this node delivered: Redis came back older.
            tracing::warn!(
                channel,
                delivered = latest,
                redis = top,
                "redis history: the counter went back; starting a new epoch"
            );
            forget(conn, prefix, channel, &epoch).await?;
            return Ok(0);
        }
        _ => {
            // Another epoch (or none here yet): from the first offset Redis holds.
            let first: Vec<StreamEntry> = redis::cmd("XRANGE")
                .arg(&keys.stream)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(conn)
                .await?;
            let first = first
                .first()
                .and_then(|(id, _)| entry_offset(id))
                .unwrap_or(top + 1);
            let start = first.saturating_sub(1);
            inbound.reset_history(channel, &epoch, start);
            start
        }
    };
    let oldest_ms = now_unix_ms().saturating_sub(policy.max_age().as_millis() as u64);
    let mut delivered = 0;
    while after < top {
        let page: Vec<StreamEntry> = redis::cmd("XRANGE")
            .arg(&keys.stream)
            .arg(format!("{}-0", after + 1))
            .arg(format!("{top}-0"))
            .arg("COUNT")
            .arg(CATCH_UP_PAGE)
            .query_async(conn)
            .await?;
        if page.is_empty() {
            // Redis no longer holds what is left (trimmed, expired): skip to its counter.
            inbound.reset_history(channel, &epoch, top);
            break;
        }
        for (id, fields) in &page {
            let Some(offset) = entry_offset(id) else {
                continue;
            };
            let (message, published_ms) = entry_fields(fields);
            let Some(message) = message else {
                continue;
            };
            if offset > after + 1 || published_ms.is_some_and(|t| t < oldest_ms) {
                // Trimmed in Redis, or older than the channel's age: the local history
                // skips what it cannot have (a `since` before it is not recovered).
                if published_ms.is_some_and(|t| t < oldest_ms) {
                    after = offset;
                    inbound.reset_history(channel, &epoch, after);
                    continue;
                }
                inbound.reset_history(channel, &epoch, offset - 1);
            }
            match deliver(inbound, channel, message).await {
                Numbered::Delivered => delivered += 1,
                Numbered::Duplicate => {}
                Numbered::Conflict => {
                    forget(conn, prefix, channel, &epoch).await?;
                    return Ok(delivered);
                }
                // Another epoch came in meanwhile, or the hub is gone: the next arrival
                // brings the node back here.
                Numbered::OtherEpoch | Numbered::Invalid | Numbered::Gap { .. } => {
                    return Ok(delivered)
                }
                Numbered::Refused => return Ok(delivered),
            }
            after = offset;
        }
    }
    Ok(delivered)
}

/// Removes `channel`'s counter and history from Redis if its epoch is still `epoch`
/// ([`ROLLBACK_SCRIPT`]): its counter went back, and the next publish must start a new
/// epoch rather than give out offsets clients already hold.
pub(super) async fn forget(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    channel: &str,
    epoch: &str,
) -> redis::RedisResult<()> {
    let keys = HistoryKeys::new(prefix, channel);
    let _: i64 = Script::new(ROLLBACK_SCRIPT)
        .key(&keys.meta)
        .key(&keys.stream)
        .arg(epoch)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// The offset of stream entry id `OFFSET-0`.
fn entry_offset(id: &str) -> Option<u64> {
    id.split_once('-')?.0.parse().ok()
}

/// The message (`m`) and publication time (`t`) of a stream entry's flat fields.
fn entry_fields(fields: &[Vec<u8>]) -> (Option<&[u8]>, Option<u64>) {
    let mut message = None;
    let mut published = None;
    for pair in fields.chunks_exact(2) {
        match pair[0].as_slice() {
            b"m" => message = Some(pair[1].as_slice()),
            b"t" => {
                published = std::str::from_utf8(&pair[1])
                    .ok()
                    .and_then(|t| t.parse().ok())
            }
            _ => {}
        }
    }
    (message, published)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_channel_under_the_prefix() {
        let keys = HistoryKeys::new("ws", "room:1");
        assert_eq!(keys.meta, b"ws:history-meta:room:1");
        assert_eq!(keys.stream, b"ws:history:room:1");
    }

    #[test]
    fn entries_are_read_by_id_and_field() {
        assert_eq!(entry_offset("17-0"), Some(17));
        assert_eq!(entry_offset("x"), None);
        let fields = vec![b"m".to_vec(), b"{}".to_vec(), b"t".to_vec(), b"5".to_vec()];
        assert_eq!(entry_fields(&fields), (Some(&b"{}"[..]), Some(5)));
    }
}
