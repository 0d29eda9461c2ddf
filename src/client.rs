//! What the hub knows of one connected client.

use std::fmt;
use std::net::SocketAddr;
use std::time::SystemTime;

use serde_json::Value;

/// A connected client's id: unique within one [`Hub`](crate::Hub) for the life of the process.
///
/// Ids are handed out in order; the hub hashes an id to the shard that owns the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub(crate) u64);

impl ClientId {
    /// The id as a number, e.g. for logs.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client-{}", self.0)
    }
}

/// A client as it connected: its id, where it came from, and who authentication said it is.
///
/// Callbacks and policies see this; [`Hub::clients`](crate::Hub::clients) adds each client's
/// subscriptions in a [`ClientSnapshot`].
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// The client's id.
    pub id: ClientId,
    /// The peer's address, when the connection is a TCP socket.
    pub remote_addr: Option<SocketAddr>,
    /// The user the authenticator named, if an authenticator is configured.
    pub user_id: Option<String>,
    /// The claims the authenticator attached (`Value::Null` without one).
    pub claims: Value,
    /// When the upgrade completed.
    pub connected_at: SystemTime,
}

#[cfg(test)]
impl ClientInfo {
    /// A client with id `id` and nothing else known: for unit tests of the layers below the
    /// connection task.
    pub(crate) fn anonymous(id: u64) -> Self {
        ClientInfo {
            id: ClientId(id),
            remote_addr: None,
            user_id: None,
            claims: Value::Null,
            connected_at: SystemTime::now(),
        }
    }
}

/// A client and its subscriptions at one moment, from [`Hub::clients`](crate::Hub::clients).
#[derive(Clone, Debug)]
pub struct ClientSnapshot {
    /// Who the client is.
    pub info: ClientInfo,
    /// The channels it is subscribed to, in no particular order.
    pub subscriptions: Vec<String>,
}

/// A channel and how many clients are subscribed to it, from
/// [`Hub::channels`](crate::Hub::channels).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelSnapshot {
    /// The channel's name.
    pub name: String,
    /// Its subscribers, over every shard.
    pub subscribers: usize,
}
