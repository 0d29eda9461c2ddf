//! The client's error type.

use std::fmt;

/// What can go wrong; every variant carries text rather than a dependency's error type, so
/// that the API does not change with the WebSocket library.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A send while no connection is up (connecting, or waiting to reconnect). Nothing was
    /// queued: as with go-ws, the application decides whether to send again later.
    NotConnected,
    /// The client has stopped: [`Client::close`](crate::Client::close) was called, or it gave
    /// up.
    Closed,
    /// An invalid configuration (from [`ClientConfigBuilder::build`](crate::ClientConfigBuilder::build)).
    Config(String),
    /// One connection attempt failed (TCP, the upgrade, or the connect timeout).
    Connect(String),
    /// Writing to the connection failed; the connection is being replaced.
    Write(String),
    /// A message could not be encoded as JSON.
    Encode(String),
    /// The server sent a frame that is not a protocol envelope; it was skipped.
    Malformed(String),
    /// `max_retries` consecutive attempts failed; the client has stopped.
    GaveUp {
        /// How many attempts were made in a row.
        attempts: u32,
        /// The last attempt's error.
        last: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotConnected => f.write_str("not connected"),
            Error::Closed => f.write_str("the client is closed"),
            Error::Config(e) => write!(f, "invalid configuration: {e}"),
            Error::Connect(e) => write!(f, "connection failed: {e}"),
            Error::Write(e) => write!(f, "write failed: {e}"),
            Error::Encode(e) => write!(f, "cannot encode the message: {e}"),
            Error::Malformed(e) => write!(f, "malformed server message: {e}"),
            Error::GaveUp { attempts, last } => {
                write!(
                    f,
                    "gave up after {attempts} failed attempts; the last: {last}"
                )
            }
        }
    }
}

impl std::error::Error for Error {}
