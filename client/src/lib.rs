#![doc = include_str!("../README.md")]

mod client;
mod config;
mod envelope;
mod error;
mod event;

pub use client::{Client, ClientStats, State};
pub use config::{ClientConfig, ClientConfigBuilder, Jitter};
pub use envelope::{Envelope, Position};
pub use error::Error;
pub use event::{DisconnectReason, Event, Events};
/// Feature `tls`: the rustls crate [`ClientConfigBuilder::tls_roots`] and `tls_config` take
/// (its `RootCertStore`, `ClientConfig`), re-exported so that the versions match.
#[cfg(feature = "tls")]
pub use rustls;
