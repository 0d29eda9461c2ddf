//! What a run is asked to do: the plan of connections it opens once and keeps (targets,
//! channels, each connection's channel, role and node, churn), and the steps it then measures,
//! each with its load (closed-loop rounds, an open-loop rate, a count of broadcasts one at a
//! time, or idle). Nothing here runs; the engine reads it.

use std::time::Duration;

use crate::conn::Target;

/// What a connection does in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Subscribes to its channel, reads everything, is measured.
    Subscriber,
    /// Subscribes when a disturbed step starts and never reads (small receive buffer).
    Slow,
}

/// One connection of the plan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnSpec {
    /// Index into [`Plan::channels`].
    pub(crate) channel: u32,
    /// Its role.
    pub(crate) kind: Kind,
    /// Index into [`Plan::targets`]: the node it connects to.
    pub(crate) node: u8,
}

/// Connections that come and go during a disturbed step (the churn scenario).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Churn {
    /// New connections per second, each subscribing and leaving after `hold`.
    pub(crate) connects_per_s: f64,
    /// How long each churning connection stays.
    pub(crate) hold: Duration,
    /// Connections that toggle subscribe/unsubscribe.
    pub(crate) togglers: usize,
    /// Subscribe plus unsubscribe operations per second over all togglers.
    pub(crate) toggles_per_s: f64,
}

/// Everything a run connects: fixed for its whole life.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Where to connect: one target per node (several nodes share channels through a broker).
    pub(crate) targets: Vec<Target>,
    /// Channel names.
    pub(crate) channels: Vec<String>,
    /// The connections; the first subscriber of each channel is its publisher.
    pub(crate) conns: Vec<ConnSpec>,
    /// Data bytes per publish.
    pub(crate) payload: usize,
    /// Generator threads.
    pub(crate) threads: usize,
    /// CPUs for the generator threads (empty: any).
    pub(crate) cpus: Vec<usize>,
    /// How long subscriptions may take to prove live.
    pub(crate) live_timeout: Duration,
    /// SO_RCVBUF of the connections that read (0: the system's).
    pub(crate) recv_buffer: u32,
    /// SO_RCVBUF of slow connections.
    pub(crate) slow_recv_buffer: u32,
    /// Churn during disturbed steps.
    pub(crate) churn: Option<Churn>,
    /// Loopback source addresses to spread connections over (1 = 127.0.0.1 only).
    pub(crate) sources: u8,
}

/// How a step publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Load {
    /// Each channel's publisher sends `window` messages, then waits until every subscriber of the
    /// channel has them all (fanout.c's rounds).
    Closed {
        /// Messages in flight per channel.
        window: u32,
    },
    /// Publishes at a fixed total rate (per second) spread evenly over the channels, in 1 ms
    /// ticks; each message carries its scheduled send time (less up to 2 ms of tick lateness),
    /// so a generator or server that falls behind shows as latency rather than hiding it (no
    /// coordinated omission).
    Open {
        /// Publishes per second over all channels.
        rate: f64,
    },
    /// `count` publishes on each channel, one at a time: each is sent when every subscriber has
    /// the one before and BROADCAST_GAP has passed, so each is measured on its own, from its
    /// publish to its last receiver. The step ends when they are done (or at its duration, the
    /// bound).
    Broadcasts {
        /// Publishes per channel.
        count: u32,
    },
    /// Nothing is published: connections are only held.
    Idle,
}

/// One measured period.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    /// Name in the report.
    pub(crate) label: String,
    /// The load.
    pub(crate) load: Load,
    /// How long it is measured.
    pub(crate) duration: Duration,
    /// Slow clients subscribe / churn runs during this step.
    pub(crate) disturb: bool,
}
