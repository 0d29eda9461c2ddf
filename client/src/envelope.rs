//! The protocol's message envelope and a position in a channel's history.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One protocol message (PROTOCOL.md, "The message envelope"), in either direction.
///
/// Server messages on a channel with history also carry their `offset` and `epoch`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The message type: `message`, `process_output`, `event`, an application's own, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The channel it was sent to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The process id of `process_output` and `process_status` messages.
    #[serde(default, rename = "processId", skip_serializing_if = "Option::is_none")]
    pub process_id: Option<String>,
    /// The payload (absent and `null` are the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// When the server published it (RFC 3339, UTC); the server overwrites what a client sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Its offset in the channel's history (channels with history only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The channel's epoch, in which `offset` counts (channels with history only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

impl Envelope {
    /// An envelope of type `kind` and nothing else.
    pub fn new(kind: impl Into<String>) -> Self {
        Envelope {
            kind: kind.into(),
            ..Envelope::default()
        }
    }

    /// With `channel` set.
    pub fn with_channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }

    /// With `data` set.
    pub fn with_data(mut self, data: impl Into<Value>) -> Self {
        self.data = Some(data.into());
        self
    }

    /// Its position in its channel's history, when it has one.
    pub fn position(&self) -> Option<Position> {
        Some(Position {
            offset: self.offset?,
            epoch: Some(self.epoch.clone()?),
        })
    }
}

/// A position in a channel's history: the offset of a publication within an epoch.
///
/// Offsets are only comparable within one epoch. A position without an epoch, given to
/// [`Client::subscribe_since`](crate::Client::subscribe_since), means "in whatever the
/// channel's current epoch is" (e.g. offset 0: everything the history holds).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Position {
    /// 1 for the channel's first publication in the epoch, then one more for each.
    pub offset: u64,
    /// The channel's epoch, an opaque string; always set on positions the client reports.
    pub epoch: Option<String>,
}

impl Position {
    /// `offset` in `epoch`.
    pub fn new(offset: u64, epoch: impl Into<String>) -> Self {
        Position {
            offset,
            epoch: Some(epoch.into()),
        }
    }
}
