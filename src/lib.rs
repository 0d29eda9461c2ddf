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
//! Layers, from the bottom: a module uses only those in the rows above its own in this table
//! (never one in a row below, so there is no import cycle), and what it needs of a layer
//! above it is handed down as a narrow handle (the last column), never the hub's shared
//! state:
//!
//! | module | what | gets from above |
//! |---|---|---|
//! | `wire` | `protocol`: the JSON envelope, encoding, decoding; `frame`: WebSocket framing, the client frame decoder. No IO | nothing |
//! | `history` | channel histories: per channel a ring of the frames already encoded for delivery, its offsets and epoch, the per-channel lock publishers and subscribes take turns under, pinned replay ranges, trims by count, age and the hub-wide memory budget. No IO | nothing |
//! | `client`, `stats`, `error`, `auth` | plain data that every layer may name: client ids and info; the counters and [`HubStats`]; [`Error`]; authenticators and origins. They import nothing of the crate | nothing |
//! | `conn` | one connection (`Conn`, shared by its shard and its connection task): its outbound queue and write path (`send(2)`, or io_uring with the `io-uring` feature), the wake-up of its task, the keep-alive clock | `conn::Env`: its limits (`conn::Limits`, copied out of the configuration) and the counters it bumps |
//! | `shard` | the shard actor (the hot path: batches of commands, staging, one write per client), subscribers catching up on a channel with history (`shard/catch_up.rs`: replays, then the live stream), its inbox and backlog bound (`shard/inbox.rs`), the channel directory, the memory held by slow clients' queues | `shard::Context`: its part of the configuration, a `conn::Env`, the clock, the directory, the histories, the inboxes; the directory tells a `ChannelActivity` object the hub installs |
//! | `broker` | several nodes: the [`Broker`] trait, [`Inbound`] and, with feature `redis`, `RedisBroker` | `Inbound` reaches the hub through the `LocalNode` trait that `broker` defines and the hub implements |
//! | `hub`, `config` | the [`Hub`] handle: the public API, routing to the shards; beside it [`HubConfig`] (which holds a broker and an authenticator as inputs) | - |
//! | `process` | [`Hub::stream_process`] (an `impl Hub` of its own, like `http`'s): a child process's output to its `process:ID` channel, line by line, then its status | - |
//! | `http` | [`serve`], [`Hub::handler`] and [`Hub::handle_websocket`] (an `impl Hub` of its own: in `hub.rs` they would make `hub` name `http`), the upgrade, the connection tasks that read a client and call the hub (`http/session.rs` over the raw socket; `http/stream.rs` over any other stream), with feature `axum` the `axum` module (`http/axum.rs`), and with feature `tls` the `tls` module (`http/tls.rs`: [`serve`] over rustls) | - |
//! | `metrics` | with feature `metrics`: `Hub::metrics` and `Hub::register_metrics` (an `impl Hub` of its own, like `http`'s), a Prometheus collector computed from the hub's stats at scrape time | - |
//!
//! The test-only `bench_support` module sits above all of them.

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
mod history;
mod http;
mod hub;
#[cfg(feature = "metrics")]
mod metrics;
mod process;
mod shard;
mod stats;
mod wire;

pub use auth::{
    bearer_token, query_param, ApiKeyAuth, AuthError, AuthRequest, Authenticator, BearerTokenAuth,
    Identity, QueryTokenAuth,
};
#[cfg(feature = "redis")]
pub use broker::redis::{RedisBroker, RedisConfig};
pub use broker::{Broker, BrokerStats, HistoryReady, Inbound, PositionReply, Target};
pub use client::{ChannelSnapshot, ClientId, ClientInfo, ClientSnapshot};
pub use config::{
    ChannelPolicyFn, HubConfig, HubConfigBuilder, PublishPolicy, RateLimit, SlowConsumerPolicy,
    MAX_SHARDS, SHARD_BACKLOG_BYTES,
};
pub use conn::sys::raise_fd_limit;
pub use error::{Error, Result};
pub use history::{
    HistoryPage, HistoryPolicy, HistoryRules, Publication, StreamPosition, HISTORY_MEMORY_BUDGET,
};
#[cfg(feature = "axum")]
pub use http::axum;
#[cfg(feature = "tls")]
pub use http::tls;
pub use http::{serve, Body, HubService};
pub use hub::Hub;
#[cfg(feature = "metrics")]
pub use metrics::METRICS_CONTENT_TYPE;
pub use process::{ProcessExit, ProcessHandle, PROCESS_LINE_LIMIT};
/// The Prometheus client that [`Hub::register_metrics`] takes a registry of (cargo feature
/// `metrics`), re-exported so that an application uses the same version.
#[cfg(feature = "metrics")]
pub use prometheus_client;
pub use stats::{HistoryFigures, HubStats};
pub use wire::frame::close_code;
pub use wire::protocol::{
    process_channel, ErrorReason, Message, PROCESS_CHANNEL_PREFIX, TYPE_ERROR, TYPE_EVENT,
    TYPE_MESSAGE, TYPE_PONG, TYPE_PROCESS_OUTPUT, TYPE_PROCESS_STATUS, TYPE_SUBSCRIBED,
    TYPE_UNSUBSCRIBED,
};
