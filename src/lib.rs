//! # wshub
//!
//! A multi-threaded, sharded WebSocket hub for high fan-out, speaking the JSON protocol of
//! [go-ws](https://forge.lthn.ai/core/go-ws): channel subscriptions, broadcast, process-output
//! streaming, keep-alive, graceful shutdown, stats and authentication.
//!
//! ## Quick start
//!
//! ```no_run
//! use wshub::{Hub, Message};
//!
//! #[tokio::main]
//! async fn main() -> std::io::Result<()> {
//!     let hub = Hub::new();
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!
//!     let publisher = hub.clone();
//!     tokio::spawn(async move {
//!         for i in 0.. {
//!             let _ = publisher.send_process_output("build-1", &format!("line {i}"));
//!             tokio::time::sleep(std::time::Duration::from_secs(1)).await;
//!         }
//!     });
//!
//!     // Serves ws://127.0.0.1:8080/ws until Ctrl-C, then closes every client with 1001.
//!     wshub::serve(listener, hub, async { let _ = tokio::signal::ctrl_c().await; }).await;
//!     Ok(())
//! }
//! ```
//!
//! A browser subscribes with `{"type":"subscribe","data":"process:build-1"}` and then receives
//! `{"type":"process_output","channel":"process:build-1","processId":"build-1","data":"line 0",
//! "timestamp":"…"}`. The whole protocol is in `PROTOCOL.md`.
//!
//! ## How it works
//!
//! Clients are hashed by id across N shard actors (default: one per core). A shard owns its
//! clients' outbound queues and its part of the channel index, so publishing takes no global
//! lock. A publish is encoded once into a complete WebSocket frame (`Bytes`) and handed to the
//! shards that have subscribers; each shard stages the frame for every subscriber (an index,
//! not a copy) and writes all of a client's frames of a batch with one write.
//!
//! Layers, from the bottom (a layer uses those above it in this table, never those below):
//!
//! | module | what |
//! |---|---|
//! | `wire` | `protocol`: the JSON envelope, encoding, decoding; `frame`: WebSocket framing, the client frame decoder. No IO |
//! | `conn` | one connection: its outbound queue and write path (`send(2)`, or io_uring with the `io-uring` feature), the connection task that reads and answers it, the wake-up between them |
//! | `shard` | the shard actor (the hot path: batches of commands, staging, one write per client), the channel directory, the memory held by slow clients' queues |
//! | `hub` | the [`Hub`] handle: the public API, routing to the shards and their bounded inboxes; beside it `config` ([`HubConfig`]), `error` ([`Error`]), `stats` ([`HubStats`]), `client` |
//! | `http` | [`serve`], [`Hub::handler`], the upgrade; authenticators and origins |
//! | `broker` | several nodes: the [`Broker`] trait and, with feature `redis`, `RedisBroker` |
//!
//! One dependency still points upwards: `conn` and `shard` reach the counters and the
//! configuration through the hub's shared state rather than through handles of their own.

#![deny(missing_docs)]
#![warn(unreachable_pub)]

mod auth;
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub mod bench_support;
mod broker;
mod client;
mod config;
mod conn;
mod error;
mod http;
mod hub;
mod shard;
mod stats;
mod wire;

pub use auth::{
    bearer_token, query_param, ApiKeyAuth, AuthError, AuthRequest, Authenticator, BearerTokenAuth,
    Identity, QueryTokenAuth,
};
#[cfg(feature = "redis")]
pub use broker::redis::{RedisBroker, RedisConfig};
pub use broker::{Broker, BrokerStats, Inbound, Target};
pub use client::{ChannelSnapshot, ClientId, ClientInfo, ClientSnapshot};
pub use config::{
    ChannelPolicyFn, HubConfig, HubConfigBuilder, PublishPolicy, RateLimit, SlowConsumerPolicy,
    MAX_SHARDS,
};
pub use conn::sys::raise_fd_limit;
pub use error::{Error, Result};
pub use http::{serve, Body, HubService};
pub use hub::{Hub, SHARD_BACKLOG_BYTES};
pub use stats::HubStats;
pub use wire::frame::close_code;
pub use wire::protocol::{
    process_channel, ErrorReason, Message, PROCESS_CHANNEL_PREFIX, TYPE_ERROR, TYPE_EVENT,
    TYPE_MESSAGE, TYPE_PONG, TYPE_PROCESS_OUTPUT, TYPE_PROCESS_STATUS, TYPE_SUBSCRIBED,
    TYPE_UNSUBSCRIBED,
};
