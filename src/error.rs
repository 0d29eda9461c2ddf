//! The crate's one error type.

use std::fmt;

/// Why a call into wshub did not do what was asked.
///
/// One opaque type for the whole crate, in the style of `hyper::Error`: ask what happened with
/// the `is_*` methods and show it with `Display`. Messages are lower-case, without a trailing
/// period, and the type is `Send + Sync + 'static`, so it fits in `Box<dyn std::error::Error>`.
///
/// ```
/// let err = wshub::HubConfig::builder().shards(0).build().unwrap_err();
/// assert!(err.is_config());
/// assert_eq!(err.to_string(), "invalid configuration: shards must be at least 1");
/// ```
pub struct Error {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// The hub was shut down (or every handle to it was dropped): nothing was sent.
    Closed,
    /// The message could not be encoded as JSON.
    Encode(serde_json::Error),
    /// A `HubConfig` setting, or a combination of them, is invalid.
    Config(String),
    /// An argument was invalid: an empty channel name, a close code a server may not send.
    InvalidArgument(String),
    /// A shard's inbox was over its bound: nothing was sent.
    Overloaded {
        /// The shard that refused, for a caller that waits for its room.
        shard: usize,
    },
    /// [`Hub::stream_process`](crate::Hub::stream_process) could not start the child.
    Spawn(std::io::Error),
    /// The broker that numbers a history channel's publications (Redis) could not take one.
    Unavailable(String),
}

impl Error {
    pub(crate) fn closed() -> Self {
        Error { kind: Kind::Closed }
    }

    pub(crate) fn encode(err: serde_json::Error) -> Self {
        Error {
            kind: Kind::Encode(err),
        }
    }

    pub(crate) fn config(why: impl Into<String>) -> Self {
        Error {
            kind: Kind::Config(why.into()),
        }
    }

    pub(crate) fn unavailable(why: impl Into<String>) -> Self {
        Error {
            kind: Kind::Unavailable(why.into()),
        }
    }

    pub(crate) fn invalid_argument(why: impl Into<String>) -> Self {
        Error {
            kind: Kind::InvalidArgument(why.into()),
        }
    }

    pub(crate) fn overloaded(shard: usize) -> Self {
        Error {
            kind: Kind::Overloaded { shard },
        }
    }

    pub(crate) fn spawn(err: std::io::Error) -> Self {
        Error {
            kind: Kind::Spawn(err),
        }
    }

    /// The shard that refused an overloaded call.
    pub(crate) fn refusing_shard(&self) -> Option<usize> {
        match self.kind {
            Kind::Overloaded { shard } => Some(shard),
            _ => None,
        }
    }

    /// The hub has shut down (or every [`Hub`](crate::Hub) handle was dropped), so nothing was
    /// sent.
    pub fn is_closed(&self) -> bool {
        matches!(self.kind, Kind::Closed)
    }

    /// The message's `data` could not be serialized to JSON, so nothing was sent.
    pub fn is_encode(&self) -> bool {
        matches!(self.kind, Kind::Encode(_))
    }

    /// A configuration was refused by [`HubConfigBuilder::build`](crate::HubConfigBuilder::build).
    pub fn is_config(&self) -> bool {
        matches!(self.kind, Kind::Config(_))
    }

    /// An argument was invalid, such as an empty channel name or a close code servers may not
    /// send.
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self.kind, Kind::InvalidArgument(_))
    }

    /// A shard that had to take the message was over its
    /// [backlog bound](crate::HubConfigBuilder::shard_backlog_bytes), so the call was refused
    /// and **nothing was sent to anyone**: a publish is all or nothing across shards, so
    /// retrying it later does not duplicate it for anybody. Counted in
    /// [`HubStats::backlog_refused`](crate::HubStats::backlog_refused).
    ///
    /// The publishing methods never wait; a producer that can wait for room instead calls the
    /// `*_async` variants ([`Hub::send_to_channel_async`](crate::Hub::send_to_channel_async)
    /// and the others).
    pub fn is_overloaded(&self) -> bool {
        matches!(self.kind, Kind::Overloaded { .. })
    }

    /// [`Hub::stream_process`](crate::Hub::stream_process) could not start the child (the
    /// program was not found, say); its `source` is the `std::io::Error`. The channel gets
    /// the status `failed` all the same.
    pub fn is_spawn(&self) -> bool {
        matches!(self.kind, Kind::Spawn(_))
    }

    /// A publish to a channel whose history lives in Redis (the `redis` feature) could not
    /// be numbered: Redis is unreachable, the queue to it is full, or the connection was
    /// lost before Redis answered. When the error says the answer was lost, the publication
    /// may still have been numbered and delivered; otherwise it was not, and nobody got it.
    pub fn is_unavailable(&self) -> bool {
        matches!(self.kind, Kind::Unavailable(_))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Closed => f.write_str("hub is shut down"),
            Kind::Encode(err) => write!(f, "message not encodable: {err}"),
            Kind::Config(why) => write!(f, "invalid configuration: {why}"),
            Kind::InvalidArgument(why) => write!(f, "invalid argument: {why}"),
            Kind::Overloaded { .. } => {
                f.write_str("hub overloaded: a shard's inbox is full, nothing was sent")
            }
            Kind::Spawn(err) => write!(f, "process could not be started: {err}"),
            Kind::Unavailable(why) => write!(f, "history unavailable: {why}"),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("wshub::Error").field(&self.kind).finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::Encode(err) => Some(err),
            Kind::Spawn(err) => Some(err),
            _ => None,
        }
    }
}

/// A `Result` whose error is wshub's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_sync_static() {
        fn assert_bounds<T: Send + Sync + 'static>() {}
        assert_bounds::<Error>();
    }

    #[test]
    fn display_is_lower_case_without_period() {
        for err in [
            Error::closed(),
            Error::config("x"),
            Error::invalid_argument("y"),
            Error::overloaded(0),
            Error::spawn(std::io::Error::other("x")),
        ] {
            let text = err.to_string();
            assert!(text.chars().next().unwrap().is_lowercase(), "{text}");
            assert!(!text.ends_with('.'), "{text}");
        }
    }
}
