//! Several nodes: the [`Broker`] trait that carries messages between hubs.
//!
//! A hub without a broker is a single node and pays nothing for this. With one, every
//! `send_to_channel`, `broadcast` and helper built on them is delivered locally first, then
//! handed to the broker for the other nodes; and the broker is told when this node gains its
//! first subscriber to a channel and loses its last, so that it listens only to channels that
//! have local subscribers. Messages from other nodes come back in through [`Inbound`].
//!
//! Channels with history are the exception when the broker numbers their publications
//! ([`Broker::numbers_history`]; the Redis broker does): a publication to one goes to the
//! broker only, and every node, the publisher's own included, delivers it when it comes back
//! with its offset, in offset order, so that every node sends the same offsets in the same
//! order and a client recovers on whichever node it reaches.
//!
//! The Redis backend ([`RedisBroker`](crate::RedisBroker), cargo feature `redis`) speaks
//! go-ws's own bridge format, so Go and Rust nodes can serve one cluster.

use std::fmt;
use std::sync::Weak;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::history::{HistoryPolicy, StreamPosition};
use crate::wire::protocol;

#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(feature = "redis")]
mod redis_history;

/// What [`Broker::prepare_history`] returns while the node is not in step with the store.
pub type HistoryReady = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// Where a broker that numbers a history channel's publications
/// ([`Broker::publish_numbered`]) tells the publisher the position it gave, or why it gave
/// none.
pub type PositionReply = tokio::sync::oneshot::Sender<Result<StreamPosition>>;

/// Where a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// The subscribers of one channel.
    Channel(&'a str),
    /// Every client.
    Broadcast,
}

/// Defined with the hub's other counters (`stats.rs`), which it is part of.
pub use crate::stats::BrokerStats;

/// Carries messages between the hubs of several nodes.
///
/// Every method is called from the hub's hot paths (publishers, shards) and must return at
/// once: queue the work for a task of the broker's own, and count what cannot be queued
/// rather than wait or grow without bound.
pub trait Broker: Send + Sync + 'static {
    /// Starts the broker, on the hub's tokio runtime: messages from other nodes are to be
    /// handed to `inbound`. Called once, when the hub starts.
    fn start(&self, inbound: Inbound);

    /// Sends a message published on this node to the other nodes. `message` is the
    /// envelope's JSON, already encoded (the same bytes local clients get).
    fn publish(&self, target: Target<'_>, message: Bytes);

    /// This node has its first subscriber to `channel`.
    ///
    /// # Ordering
    ///
    /// Called without any of the hub's locks held, so a broker may call back into
    /// [`Inbound`] from here. The price is that, when subscribers come and go concurrently,
    /// the calls for one channel may arrive out of order: a `channel_active` after the
    /// [`channel_inactive`](Self::channel_inactive) that followed it (the last word is then
    /// "active" for a channel without subscribers), or a `channel_inactive` after the
    /// `channel_active` of the channel's next first subscriber (the last word is then
    /// "inactive" for a channel with subscribers). A broker must therefore take both calls
    /// as hints and reconcile with [`Inbound::has_subscribers`] before it acts on them; a
    /// change after that check comes with a call of its own. The Redis broker checks when
    /// it applies either change, from its own task.
    fn channel_active(&self, channel: &str);

    /// This node's last subscriber to `channel` has gone.
    ///
    /// Called without any of the hub's locks held, and possibly out of order with
    /// [`channel_active`](Self::channel_active): see its "Ordering" section. Before leaving
    /// a channel, check [`Inbound::has_subscribers`].
    fn channel_inactive(&self, channel: &str);

    /// Whether this broker numbers the publications of channels with history itself, in a
    /// store every node shares (the Redis broker does). Then the hub hands such a publication
    /// to [`publish_numbered`](Self::publish_numbered) instead of numbering and delivering it
    /// locally, and delivers it when it comes back, numbered, like every other node. Default
    /// `false`: the hub numbers locally and sends other nodes the message without a position.
    fn numbers_history(&self) -> bool {
        false
    }

    /// Numbers and publishes `message` (the envelope's JSON, without a position) to
    /// `channel`, whose history keeps `policy`; the position goes to `reply` when there is
    /// one. Called only when [`numbers_history`](Self::numbers_history) is true.
    ///
    /// # Errors
    ///
    /// The message cannot be queued now (the store is unreachable, the queue is full):
    /// [`Error::is_unavailable`]. Nothing was published then.
    fn publish_numbered(
        &self,
        channel: &str,
        message: Bytes,
        policy: &HistoryPolicy,
        reply: Option<PositionReply>,
    ) -> Result<()> {
        let _ = (channel, message, policy, reply);
        Err(Error::unavailable(
            "this broker does not number publications",
        ))
    }

    /// For a channel whose publications this broker numbers: `None` when this node is in
    /// step with the shared store for `channel` now (its local history holds what the store
    /// holds, and it receives what comes next), so a subscribe can be answered from the
    /// local history; otherwise a future that resolves to `true` once it is, or to `false`
    /// when the broker's bounded wait ran out first (the store is unreachable). `behind`:
    /// the client has seen an offset this node's history has not reached yet (another node
    /// delivered it first), so the node must read the store again even if it is in step.
    /// Default: `None`.
    fn prepare_history(&self, channel: &str, behind: bool) -> Option<HistoryReady> {
        let _ = (channel, behind);
        None
    }

    /// The broker's counters.
    fn stats(&self) -> BrokerStats;

    /// The hub has shut down: stop, dropping what is queued. Must not block.
    fn shutdown(&self);
}

/// What [`Inbound`] reaches of the local hub: the hub implements it. Defined here so that
/// the broker layer never names the hub.
pub(crate) trait LocalNode: Send + Sync {
    /// Hands `frame` to the local subscribers of `channel`, all or nothing; false if a shard
    /// with subscribers is over its backlog.
    fn fan_out_to_channel(&self, channel: &str, frame: Bytes) -> bool;
    /// Hands `frame` to every local client, all or nothing; false as above.
    fn fan_out_to_all(&self, frame: Bytes) -> bool;
    /// Whether this node has subscribers to `channel` now.
    fn has_subscribers(&self, channel: &str) -> bool;
    /// Every channel this node has subscribers to now.
    fn active_channels(&self) -> Vec<String>;
    /// The history policy of `channel`, if the configuration gives it one.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    fn history_policy(&self, channel: &str) -> Option<HistoryPolicy>;
    /// The epoch and latest offset of `channel`'s local history, if it has one now.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    fn history_position(&self, channel: &str) -> Option<(std::sync::Arc<str>, u64)>;
    /// Makes `channel`'s local history start over at `epoch`, after offset `latest`.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    fn reset_history(&self, channel: &str, epoch: &str, latest: u64);
    /// Delivers a publication that the broker numbered (`json` carries its offset and epoch)
    /// to the local subscribers of history channel `channel`, and keeps it, if it is the next
    /// one of the local history.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    fn deliver_numbered(&self, channel: &str, json: &[u8]) -> Numbered;
}

/// What became of a numbered publication handed to [`Inbound::deliver_numbered`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
pub(crate) enum Numbered {
    /// Delivered and kept: it was the next offset.
    Delivered,
    /// At or below the local history's latest offset, in its epoch: already delivered.
    Duplicate,
    /// At or below the local history's latest offset, in its epoch, but not what was
    /// delivered at that offset: the store's counter went back (it came back older).
    Conflict,
    /// Offsets between the local latest (`after`) and it are missing: read them first.
    Gap { after: u64 },
    /// Of another epoch than the local history's: catch up from the store.
    OtherEpoch,
    /// A shard with subscribers was over its backlog: nothing delivered, try again.
    Refused,
    /// Not a message with an offset and epoch, the channel has no history, or the hub is
    /// gone.
    Invalid,
}

/// Delivers messages from other nodes to this hub's clients: the broker's way in.
#[derive(Clone)]
pub struct Inbound {
    node: Weak<dyn LocalNode>,
}

impl fmt::Debug for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Inbound")
    }
}

impl Inbound {
    /// A way in to `node`, which it does not keep alive.
    pub(crate) fn new(node: Weak<dyn LocalNode>) -> Self {
        Inbound { node }
    }

    /// Delivers `message` (the envelope's JSON, as another node encoded it) to this node's
    /// subscribers of the target, without sending it back to the broker. The JSON is framed
    /// as it came when it already names the channel; otherwise it is encoded again with the
    /// channel set, keeping its timestamp.
    ///
    /// Returns false when the message is not a JSON object with a string `type`, the hub is
    /// gone, or a shard with subscribers is over its backlog (counted in
    /// [`HubStats::backlog_refused`](crate::HubStats::backlog_refused)); nothing is delivered
    /// then.
    pub fn deliver(&self, target: Target<'_>, message: &[u8]) -> bool {
        let Some(node) = self.node.upgrade() else {
            return false;
        };
        let channel = match target {
            Target::Channel(channel) => Some(channel),
            Target::Broadcast => None,
        };
        let Some(frame) = protocol::frame_remote(channel, message) else {
            return false;
        };
        match channel {
            Some(channel) => node.fan_out_to_channel(channel, frame),
            None => node.fan_out_to_all(frame),
        }
    }

    /// See [`LocalNode::deliver_numbered`].
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    pub(crate) fn deliver_numbered(&self, channel: &str, json: &[u8]) -> Numbered {
        match self.node.upgrade() {
            Some(node) => node.deliver_numbered(channel, json),
            None => Numbered::Invalid,
        }
    }

    /// See [`LocalNode::history_policy`].
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    pub(crate) fn history_policy(&self, channel: &str) -> Option<HistoryPolicy> {
        self.node.upgrade()?.history_policy(channel)
    }

    /// See [`LocalNode::history_position`].
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    pub(crate) fn history_position(&self, channel: &str) -> Option<(std::sync::Arc<str>, u64)> {
        self.node.upgrade()?.history_position(channel)
    }

    /// See [`LocalNode::reset_history`].
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the Redis broker's
    pub(crate) fn reset_history(&self, channel: &str, epoch: &str, latest: u64) {
        if let Some(node) = self.node.upgrade() {
            node.reset_history(channel, epoch, latest);
        }
    }

    /// Whether this node has subscribers to `channel` now.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.node
            .upgrade()
            .is_some_and(|node| node.has_subscribers(channel))
    }

    /// Every channel this node has subscribers to now: what a broker listens to again after
    /// it reconnects.
    pub fn active_channels(&self) -> Vec<String> {
        self.node
            .upgrade()
            .map_or_else(Vec::new, |node| node.active_channels())
    }
}
