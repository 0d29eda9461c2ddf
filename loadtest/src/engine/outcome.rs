//! What a step measured, as the engine hands it to the report: the counts summed over the
//! generator threads, the interval series, publishes and expected deliveries, CPU, what the slow
//! connections saw and what churn did, and the same per node when there are several.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::stats::{Counts, NodeCounts};

/// What the slow connections saw, read once at the end of a disturbed step.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct SlowSeen {
    /// Slow connections.
    pub(crate) clients: u64,
    /// Of them, closed by the server (a close frame, end of stream or reset).
    pub(crate) closed_by_server: u64,
    /// Close codes the server sent them.
    pub(crate) close_codes: BTreeMap<String, u64>,
    /// Messages of the step they had received (what sat in their socket buffers).
    pub(crate) received: u64,
}

/// What churn did during a step.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct ChurnCounts {
    /// Connections opened.
    pub(crate) connects: u64,
    /// Connections that failed to open.
    pub(crate) connect_failures: u64,
    /// Connections closed after their hold time.
    pub(crate) disconnects: u64,
    /// Subscribe frames sent by togglers.
    pub(crate) subscribes: u64,
    /// Unsubscribe frames sent by togglers.
    pub(crate) unsubscribes: u64,
}

/// What the subscribers of one node measured in a step (several nodes only).
#[derive(Debug)]
pub(crate) struct NodeOutcome {
    /// Measured subscribers on the node.
    pub(crate) subscribers: u64,
    /// Their deliveries, losses and latencies.
    pub(crate) counts: NodeCounts,
    /// Their deliveries if nothing were lost.
    pub(crate) expected: u64,
}

/// What a step measured, summed over threads.
#[derive(Debug)]
pub(crate) struct StepOutcome {
    /// Counters and the whole latency histogram.
    pub(crate) counts: Counts,
    /// Per interval: seconds since the step began, and what it counted.
    pub(crate) intervals: Vec<(f64, Counts)>,
    /// Publishes of the step.
    pub(crate) published: u64,
    /// Deliveries expected if nothing was lost (publishes x measured subscribers, per channel).
    pub(crate) expected: u64,
    /// Measured seconds.
    pub(crate) seconds: f64,
    /// Generator CPU (its threads and the main thread) during the step.
    pub(crate) generator_cpu: Duration,
    /// Whole process CPU during the step.
    pub(crate) process_cpu: Duration,
    /// Connections open at the end.
    pub(crate) connections: u64,
    /// Slow connections, in a disturbed step.
    pub(crate) slow: SlowSeen,
    /// Churn, in a disturbed step.
    pub(crate) churn: ChurnCounts,
    /// Per node, with several nodes (empty with one).
    pub(crate) nodes: Vec<NodeOutcome>,
}

/// Called after every interval with (seconds into the step, the interval's counts).
pub(crate) type OnInterval<'a> = &'a mut dyn FnMut(f64, &Counts);
