//! [`HubConfig`] and its builder. Every default is stated on its setter.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;

use crate::auth::{AuthError, Authenticator, Origin};
use crate::broker::Broker;
use crate::client::ClientInfo;
use crate::error::{Error, Result};
use crate::history::{HistoryPolicy, HistoryRules, HISTORY_MEMORY_BUDGET};

/// Defined with the write path that applies it (`conn/`), configured here.
pub use crate::conn::SlowConsumerPolicy;

/// The default of [`HubConfigBuilder::shard_backlog_bytes`]:
/// the most bytes of work waiting in one shard's inbox. Past it, calls that add work to that
/// shard are refused with an error that [`is_overloaded`](Error::is_overloaded), so a
/// publisher that outruns the shards never grows memory without bound and is never made to
/// wait (unless it asks to, with the `*_async` methods).
pub const SHARD_BACKLOG_BYTES: usize = 64 * 1024 * 1024;

/// The most shards a hub runs: a channel's shards are kept in a 64-bit mask.
pub const MAX_SHARDS: usize = 64;

/// A decision on one client and one channel: `true` allows.
pub type ChannelPolicyFn = dyn Fn(&ClientInfo, &str) -> bool + Send + Sync;

/// Who may `publish` from a client (a wshub extension to the go-ws protocol).
#[derive(Clone, Default)]
pub enum PublishPolicy {
    /// Every client publish is refused with `publish refused`. The default: go-ws clients
    /// cannot publish, and an open publish lets any browser write to any channel.
    #[default]
    Refuse,
    /// Any client may publish to any channel.
    AllowAll,
    /// The function decides per client and channel.
    Custom(Arc<ChannelPolicyFn>),
}

impl PublishPolicy {
    /// A policy decided by `allow(client, channel)`.
    pub fn custom(allow: impl Fn(&ClientInfo, &str) -> bool + Send + Sync + 'static) -> Self {
        PublishPolicy::Custom(Arc::new(allow))
    }

    pub(crate) fn allows(&self, client: &ClientInfo, channel: &str) -> bool {
        match self {
            PublishPolicy::Refuse => false,
            PublishPolicy::AllowAll => true,
            PublishPolicy::Custom(allow) => allow(client, channel),
        }
    }
}

impl fmt::Debug for PublishPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishPolicy::Refuse => f.write_str("Refuse"),
            PublishPolicy::AllowAll => f.write_str("AllowAll"),
            PublishPolicy::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// A limit on how fast one client may send messages: a token bucket of `burst` messages,
/// refilled at `per_second`. Set with [`HubConfigBuilder::message_rate_limit`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Messages per second, sustained.
    pub per_second: u32,
    /// Messages a client may send at once after a quiet spell.
    pub burst: u32,
}

pub(crate) type OnConnect = dyn Fn(&ClientInfo, &HeaderMap) + Send + Sync;
pub(crate) type OnDisconnect = dyn Fn(&ClientInfo) + Send + Sync;
pub(crate) type OnAuthFailure = dyn Fn(Option<std::net::SocketAddr>, &AuthError) + Send + Sync;

/// How a [`Hub`](crate::Hub) behaves. Build one with [`HubConfig::builder`]; `HubConfig::default()`
/// has every default.
///
/// ```
/// use std::time::Duration;
/// use wshub::{HubConfig, PublishPolicy, SlowConsumerPolicy};
///
/// let config = HubConfig::builder()
///     .heartbeat(Duration::from_secs(15))
///     .pong_timeout(Duration::from_secs(40))
///     .publish_policy(PublishPolicy::AllowAll)
///     .slow_consumer_policy(SlowConsumerPolicy::DropOldest)
///     .build()?;
/// assert_eq!(config.heartbeat(), Duration::from_secs(15));
/// # Ok::<(), wshub::Error>(())
/// ```
#[derive(Clone)]
pub struct HubConfig {
    pub(crate) heartbeat: Duration,
    pub(crate) pong_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) max_message_size: usize,
    pub(crate) shards: usize,
    pub(crate) outbound_queue_bytes: usize,
    pub(crate) queue_memory_budget: usize,
    pub(crate) min_read_rate: usize,
    pub(crate) shard_backlog_bytes: usize,
    pub(crate) slow_consumer: SlowConsumerPolicy,
    pub(crate) max_subscriptions: usize,
    pub(crate) max_channel_len: usize,
    pub(crate) max_connections: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) shutdown_drain: Duration,
    pub(crate) allowed_origins: Vec<Origin>,
    pub(crate) publish_policy: PublishPolicy,
    pub(crate) subscribe_policy: Option<Arc<ChannelPolicyFn>>,
    pub(crate) strict_go_ws: bool,
    pub(crate) io_uring: bool,
    pub(crate) rate_limit: Option<RateLimit>,
    pub(crate) echo: bool,
    pub(crate) path: String,
    pub(crate) authenticator: Option<Arc<dyn Authenticator>>,
    pub(crate) broker: Option<Arc<dyn Broker>>,
    pub(crate) history: HistoryRules,
    pub(crate) history_memory_budget: usize,
    pub(crate) on_connect: Option<Arc<OnConnect>>,
    pub(crate) on_disconnect: Option<Arc<OnDisconnect>>,
    pub(crate) on_auth_failure: Option<Arc<OnAuthFailure>>,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            heartbeat: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            max_message_size: 64 * 1024,
            shards: default_shards(),
            outbound_queue_bytes: 16 * 1024 * 1024,
            queue_memory_budget: 256 * 1024 * 1024,
            min_read_rate: 64 * 1024,
            shard_backlog_bytes: SHARD_BACKLOG_BYTES,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            max_subscriptions: 1024,
            max_channel_len: 256,
            max_connections: 100_000,
            handshake_timeout: Duration::from_secs(10),
            shutdown_drain: Duration::from_secs(5),
            allowed_origins: Vec::new(),
            publish_policy: PublishPolicy::Refuse,
            subscribe_policy: None,
            strict_go_ws: false,
            io_uring: true,
            rate_limit: None,
            echo: false,
            path: "/ws".to_owned(),
            authenticator: None,
            broker: None,
            history: HistoryRules::new(),
            history_memory_budget: HISTORY_MEMORY_BUDGET,
            on_connect: None,
            on_disconnect: None,
            on_auth_failure: None,
        }
    }
}

/// One shard per core this process may run on, at most [`MAX_SHARDS`].
fn default_shards() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_SHARDS)
}

impl HubConfig {
    /// A builder that starts from the defaults.
    pub fn builder() -> HubConfigBuilder {
        HubConfigBuilder {
            config: HubConfig::default(),
            origins: Vec::new(),
        }
    }

    /// How often the server pings each client.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// How long a client may stay silent (no pong, no frame) before it is closed.
    pub fn pong_timeout(&self) -> Duration {
        self.pong_timeout
    }

    /// How many shards the hub runs.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The path [`serve`](crate::serve) answers upgrades on.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the go-ws strict mode is on (no acknowledgements, no per-client errors).
    pub fn strict_go_ws(&self) -> bool {
        self.strict_go_ws
    }
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("heartbeat", &self.heartbeat)
            .field("pong_timeout", &self.pong_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("shards", &self.shards)
            .field("outbound_queue_bytes", &self.outbound_queue_bytes)
            .field("queue_memory_budget", &self.queue_memory_budget)
            .field("min_read_rate", &self.min_read_rate)
            .field("shard_backlog_bytes", &self.shard_backlog_bytes)
            .field("slow_consumer", &self.slow_consumer)
            .field("max_subscriptions", &self.max_subscriptions)
            .field("max_channel_len", &self.max_channel_len)
            .field("max_connections", &self.max_connections)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("shutdown_drain", &self.shutdown_drain)
            .field("allowed_origins", &self.allowed_origins)
            .field("publish_policy", &self.publish_policy)
            .field("strict_go_ws", &self.strict_go_ws)
            .field("io_uring", &self.io_uring)
            .field("rate_limit", &self.rate_limit)
            .field("path", &self.path)
            .field("authenticator", &self.authenticator.is_some())
            .field("broker", &self.broker.is_some())
            .field("history", &self.history)
            .field("history_memory_budget", &self.history_memory_budget)
            .finish_non_exhaustive()
    }
}

/// Builds a [`HubConfig`]; [`build`](HubConfigBuilder::build) refuses invalid combinations.
#[must_use]
pub struct HubConfigBuilder {
    config: HubConfig,
    origins: Vec<String>,
}

impl HubConfigBuilder {
    /// How often the server sends each client a ping frame. Default: 30 s.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.config.heartbeat = every;
        self
    }

    /// How long a client may go without answering (a pong or any other frame) before it is
    /// closed. Must be above the heartbeat. Default: 60 s.
    pub fn pong_timeout(mut self, timeout: Duration) -> Self {
        self.config.pong_timeout = timeout;
        self
    }

    /// How long a write may wait on a client that does not read before the client is treated as
    /// a slow consumer (closed with 4000). A client closed at once (slow consumer, protocol
    /// error) gets as long, and at least a second, to take its close frame. Default: 10 s.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_timeout = timeout;
        self
    }

    /// The largest message a client may send, counted over all its fragments; one byte more
    /// closes the connection with 1009. Default: 65,536 bytes.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.config.max_message_size = bytes;
        self
    }

    /// How many shard actors own the clients, from 1 to [`MAX_SHARDS`]. Default: the number of
    /// cores this process may run on.
    pub fn shards(mut self, shards: usize) -> Self {
        self.config.shards = shards;
        self
    }

    /// The most bytes one client may have queued for sending while it is behind; past it the
    /// [slow-consumer policy](Self::slow_consumer_policy) applies. Default: 16 MiB (as Bun's
    /// per-socket limit), so a client that keeps reading survives a burst of that size, such
    /// as a build log or a market open arriving at once. What the kernel's socket buffer
    /// already took (a few MB on loopback) is not counted. See [`Hub`](crate::Hub#slow-clients).
    pub fn outbound_queue_bytes(mut self, bytes: usize) -> Self {
        self.config.outbound_queue_bytes = bytes;
        self
    }

    /// The most memory that the frames queued for all slow clients together may hold, counted
    /// as real memory: a frame queued for a thousand clients is one buffer and counts once.
    /// When a frame queued on a shard takes the hub over it, that shard closes its clients
    /// with the largest queues first, with 4000 (counted in
    /// [`HubStats::budget_disconnects`](crate::HubStats::budget_disconnects)), until its
    /// share (the budget divided by the shards) holds. Default: 256 MiB.
    pub fn queue_memory_budget(mut self, bytes: usize) -> Self {
        self.config.queue_memory_budget = bytes;
        self
    }

    /// The slowest a client that is behind may read, in bytes per second, and still count as
    /// making progress. Each [write timeout](Self::write_timeout) while a client has frames
    /// queued, it must have taken either everything that was queued when that period began,
    /// or `bytes_per_second` times the period; otherwise it is closed with 4000 (counted in
    /// [`HubStats::stalled_disconnects`](crate::HubStats::stalled_disconnects)). One byte
    /// every few seconds is not a reader that keeps up. Default: 64 KiB/s.
    pub fn min_read_rate(mut self, bytes_per_second: usize) -> Self {
        self.config.min_read_rate = bytes_per_second;
        self
    }

    /// The most bytes of work waiting in one shard's inbox: published frames, per-client
    /// sends, server-side subscribes and the like, and clients' own requests. Past it, calls
    /// that would add work to that shard return an error that
    /// [`is_overloaded`](crate::Error::is_overloaded) (nothing is sent), and the hub stops
    /// reading requests from the shard's clients until there is room again, so a flooding
    /// client backs up into its own TCP socket. Connects, disconnects and shutdown are never
    /// refused. Default: [`SHARD_BACKLOG_BYTES`](crate::SHARD_BACKLOG_BYTES), 64 MiB.
    pub fn shard_backlog_bytes(mut self, bytes: usize) -> Self {
        self.config.shard_backlog_bytes = bytes;
        self
    }

    /// What happens to a client over its queue bound. Default:
    /// [`SlowConsumerPolicy::Disconnect`] (close 4000 at once).
    pub fn slow_consumer_policy(mut self, policy: SlowConsumerPolicy) -> Self {
        self.config.slow_consumer = policy;
        self
    }

    /// The most channels one client may be subscribed to; past it a subscribe gets
    /// `too many subscriptions`. Default: 1,024.
    pub fn max_subscriptions(mut self, max: usize) -> Self {
        self.config.max_subscriptions = max;
        self
    }

    /// The longest channel name, in bytes, a client may use; longer ones get
    /// `invalid channel`. Default: 256.
    pub fn max_channel_len(mut self, bytes: usize) -> Self {
        self.config.max_channel_len = bytes;
        self
    }

    /// The most clients connected at once; past it upgrades are answered 503. Default: 100,000.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.config.max_connections = max;
        self
    }

    /// How long [`serve`](crate::serve) waits for a connection's HTTP request headers before
    /// dropping it (slowloris protection). With feature `tls`, `tls::serve` gives the TLS
    /// handshake as long again, before the request. Default: 10 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.config.handshake_timeout = timeout;
        self
    }

    /// At shutdown, how long clients get to receive what was queued before their 1001, after
    /// which the rest is dropped and they are closed. Default: 5 s.
    pub fn shutdown_drain(mut self, deadline: Duration) -> Self {
        self.config.shutdown_drain = deadline;
        self
    }

    /// Origins a browser may connect from, as `scheme://host[:port]`. Default: empty, meaning
    /// every origin, as go-ws: unsafe for a hub that browsers reach with cookies, since any
    /// web page could then open a connection in its visitor's name (cross-site WebSocket
    /// hijacking). Requests without an `Origin` header (not browsers) are always allowed.
    pub fn allowed_origins<S: Into<String>>(
        mut self,
        origins: impl IntoIterator<Item = S>,
    ) -> Self {
        self.origins = origins.into_iter().map(Into::into).collect();
        self
    }

    /// Who may publish from a client. Default: [`PublishPolicy::Refuse`]. A
    /// [`PublishPolicy::Custom`] runs where the client's requests are read: for an idle TCP
    /// client, on its shard's runner, one task that reads every idle client of the shard in
    /// turn. Keep it quick and never blocking, or every client of the shard waits for it.
    pub fn publish_policy(mut self, policy: PublishPolicy) -> Self {
        self.config.publish_policy = policy;
        self
    }

    /// Decides each client subscribe: `false` answers `subscription refused`. Default: every
    /// subscribe is allowed. Server-side [`Hub::subscribe`](crate::Hub::subscribe) is not
    /// checked. Runs where the client's requests are read, as a custom publish policy does
    /// (see [`publish_policy`](Self::publish_policy)): keep it quick and never blocking. A
    /// panic in it ends that client's connection only.
    pub fn subscribe_policy(
        mut self,
        allow: impl Fn(&ClientInfo, &str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config.subscribe_policy = Some(Arc::new(allow));
        self
    }

    /// Limits each client to `per_second` messages per second with bursts of `burst`; a client
    /// over it is closed with 1008. Counts data messages (not pings or pongs). Default: off,
    /// so that a busy publisher is never cut off unasked.
    pub fn message_rate_limit(mut self, per_second: u32, burst: u32) -> Self {
        self.config.rate_limit = Some(RateLimit { per_second, burst });
        self
    }

    /// Keeps a history for the channel named `channel` (PROTOCOL.md, "History and recovery"):
    /// its publications get offsets, the last ones are kept as `policy` says, and a client
    /// that comes back subscribes with `since` and gets what it missed, once and in order.
    /// An exact name beats any prefix ([`prefix_history`](Self::prefix_history)); setting a
    /// name again replaces its policy. Default: no channel has a history.
    pub fn channel_history(mut self, channel: impl Into<Box<str>>, policy: HistoryPolicy) -> Self {
        self.config.history = self.config.history.channel(channel, policy);
        self
    }

    /// Keeps a history for every channel whose name starts with `prefix` (e.g. `process:`
    /// for build logs); the longest matching prefix wins. See
    /// [`channel_history`](Self::channel_history).
    ///
    /// ```
    /// use std::time::Duration;
    /// use wshub::{HistoryPolicy, Hub, HubConfig};
    ///
    /// fn hub_with_history() -> wshub::Result<Hub> {
    ///     let config = HubConfig::builder()
    ///         // Build logs: the last 10,000 lines of each process, for an hour.
    ///         .prefix_history("process:", HistoryPolicy::new(10_000, Duration::from_secs(3600))?)
    ///         // Chat rooms: the last 100 messages, for five minutes.
    ///         .prefix_history("room:", HistoryPolicy::new(100, Duration::from_secs(300))?)
    ///         .build()?;
    ///     Ok(Hub::with_config(config))
    /// }
    /// # hub_with_history().unwrap();
    /// ```
    pub fn prefix_history(mut self, prefix: impl Into<Box<str>>, policy: HistoryPolicy) -> Self {
        self.config.history = self.config.history.prefix(prefix, policy);
        self
    }

    /// The most bytes all channel histories together hold (frames plus 80 bytes each): past
    /// it, the oldest publications of the hub are trimmed as a count or age limit trims them
    /// (same epoch; a client that needed them recovers with `recovered: false`). Default:
    /// [`HISTORY_MEMORY_BUDGET`] (256 MiB).
    pub fn history_memory_budget(mut self, bytes: usize) -> Self {
        self.config.history_memory_budget = bytes;
        self
    }

    /// go-ws strict mode: no `subscribed`/`unsubscribed` acknowledgements and no per-client
    /// `error` messages, exactly what a go-ws client has seen. Default: off.
    pub fn strict_go_ws(mut self, strict: bool) -> Self {
        self.config.strict_go_ws = strict;
        self
    }

    /// Whether the shards write with io_uring (cargo feature `io-uring`, a default feature,
    /// Linux only): each shard submits its writes for many sockets with one `io_uring_enter`
    /// instead of one `send(2)` each. Default: on. Where the kernel refuses io_uring (old
    /// kernels, seccomp profiles of many container runtimes), or with `false`, the shards
    /// write with `send(2)`; clients see no difference. [`HubStats::io_uring_shards`] and the
    /// hub's startup log say which path runs. Without the feature, this has no effect.
    ///
    /// [`HubStats::io_uring_shards`]: crate::HubStats::io_uring_shards
    pub fn io_uring(mut self, enabled: bool) -> Self {
        self.config.io_uring = enabled;
        self
    }

    /// Echo mode, for `examples/autobahn_echo` only: every client message is sent back as it
    /// came (text or binary) instead of being read as the JSON protocol, so that the
    /// Autobahn conformance suite exercises the hub's own reader, writer, limits and close
    /// handshake. Not a feature for applications.
    #[doc(hidden)]
    pub fn echo_for_conformance_tests(mut self, echo: bool) -> Self {
        self.config.echo = echo;
        self
    }

    /// The path [`serve`](crate::serve) answers WebSocket upgrades on; others get 404.
    /// Default: `/ws`.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.config.path = path.into();
        self
    }

    /// Authenticates every upgrade request; a refusal is answered 401. Default: none (everyone
    /// connects, anonymous).
    pub fn authenticator(mut self, authenticator: impl Authenticator) -> Self {
        self.config.authenticator = Some(Arc::new(authenticator));
        self
    }

    /// Joins this hub to others through a broker (several nodes; see [`Broker`]). Default:
    /// none, a single node.
    pub fn broker(mut self, broker: impl Broker) -> Self {
        self.config.broker = Some(Arc::new(broker));
        self
    }

    /// Called once per client after the upgrade, with the request headers, before the client
    /// can receive anything. Runs on the upgrade's task: keep it quick. Default: none.
    pub fn on_connect(
        mut self,
        f: impl Fn(&ClientInfo, &HeaderMap) + Send + Sync + 'static,
    ) -> Self {
        self.config.on_connect = Some(Arc::new(f));
        self
    }

    /// Called once per client when it is gone and deregistered, whatever the reason. It runs
    /// where the session ends: for a plain TCP client whose peer went away, or that closed
    /// and was answered at once, on its shard's runner, between other clients' reads (keep
    /// it quick and never blocking, as the policies); otherwise on the connection's task.
    /// Default: none.
    pub fn on_disconnect(mut self, f: impl Fn(&ClientInfo) + Send + Sync + 'static) -> Self {
        self.config.on_disconnect = Some(Arc::new(f));
        self
    }

    /// Called when the authenticator refuses a request, with the peer address and the reason.
    /// Default: none.
    pub fn on_auth_failure(
        mut self,
        f: impl Fn(Option<std::net::SocketAddr>, &AuthError) + Send + Sync + 'static,
    ) -> Self {
        self.config.on_auth_failure = Some(Arc::new(f));
        self
    }

    /// Checks the settings and returns the configuration.
    ///
    /// # Errors
    ///
    /// An error that [`is_config`](Error::is_config) when: shards are 0 or over
    /// [`MAX_SHARDS`]; the heartbeat is zero or the pong timeout is not above it; the write
    /// timeout, handshake timeout, message size, queue bound, queue memory budget, shard
    /// backlog, subscription limit, channel length or connection limit is zero; the queue
    /// bound is over 2 GiB; the path does not start with `/`; an allowed
    /// origin is not `scheme://host[:port]`.
    pub fn build(self) -> Result<HubConfig> {
        let mut config = self.config;
        let c = &config;
        if c.shards == 0 {
            return Err(Error::config("shards must be at least 1"));
        }
        if c.shards > MAX_SHARDS {
            return Err(Error::config(format!(
                "shards must be at most {MAX_SHARDS}"
            )));
        }
        if c.heartbeat.is_zero() {
            return Err(Error::config("heartbeat must be above zero"));
        }
        if c.pong_timeout <= c.heartbeat {
            return Err(Error::config(format!(
                "pong timeout ({:?}) must be above the heartbeat ({:?})",
                c.pong_timeout, c.heartbeat
            )));
        }
        for (name, zero) in [
            ("write timeout", c.write_timeout.is_zero()),
            ("handshake timeout", c.handshake_timeout.is_zero()),
            ("max message size", c.max_message_size == 0),
            ("outbound queue bytes", c.outbound_queue_bytes == 0),
            ("queue memory budget", c.queue_memory_budget == 0),
            ("shard backlog bytes", c.shard_backlog_bytes == 0),
            ("history memory budget", c.history_memory_budget == 0),
            ("max subscriptions", c.max_subscriptions == 0),
            ("max channel length", c.max_channel_len == 0),
            ("max connections", c.max_connections == 0),
        ] {
            if zero {
                return Err(Error::config(format!("{name} must be above zero")));
            }
        }
        if c.outbound_queue_bytes > (u32::MAX / 2) as usize {
            return Err(Error::config("outbound queue bytes must be at most 2 GiB"));
        }
        if let Some(limit) = c.rate_limit {
            if limit.per_second == 0 || limit.burst == 0 {
                return Err(Error::config(
                    "message rate limit needs a rate and a burst above zero",
                ));
            }
        }
        if !c.path.starts_with('/') {
            return Err(Error::config(format!(
                "path {:?} must start with '/'",
                c.path
            )));
        }
        config.allowed_origins = self
            .origins
            .iter()
            .map(|o| {
                Origin::parse(o).ok_or_else(|| {
                    Error::config(format!("allowed origin {o:?} is not scheme://host[:port]"))
                })
            })
            .collect::<Result<_>>()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_go_ws_defaults() {
        let c = HubConfig::default();
        assert_eq!(c.heartbeat, Duration::from_secs(30));
        assert_eq!(c.pong_timeout, Duration::from_secs(60));
        assert_eq!(c.write_timeout, Duration::from_secs(10));
        assert_eq!(c.max_message_size, 65_536);
        assert!(c.shards >= 1 && c.shards <= MAX_SHARDS);
        assert!(matches!(c.publish_policy, PublishPolicy::Refuse));
        assert_eq!(c.slow_consumer, SlowConsumerPolicy::Disconnect);
        assert_eq!(c.path, "/ws");
        assert!(HubConfig::builder().build().is_ok());
    }

    #[test]
    fn invalid_combinations_are_refused_with_a_clear_error() {
        let err = |b: HubConfigBuilder| b.build().unwrap_err().to_string();
        assert_eq!(
            err(HubConfig::builder().shards(0)),
            "invalid configuration: shards must be at least 1"
        );
        assert!(err(HubConfig::builder().shards(65)).contains("at most 64"));
        assert!(err(HubConfig::builder()
            .heartbeat(Duration::from_secs(10))
            .pong_timeout(Duration::from_secs(10)))
        .contains("must be above the heartbeat"));
        assert!(err(HubConfig::builder().max_message_size(0)).contains("max message size"));
        assert!(err(HubConfig::builder().path("ws")).contains("must start with '/'"));
        assert!(err(HubConfig::builder().allowed_origins(["example.com"])).contains("origin"));
    }
}
