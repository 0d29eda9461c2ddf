//! Counters and latency histograms, per interval and per step, and how they add up.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in nanoseconds, from 1 ns to 10 minutes, to 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    // Constant bounds, valid for hdrhistogram (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid constant histogram bounds")
}

/// What one generator thread counted since it was last asked.
#[derive(Debug, Clone)]
pub(crate) struct Counts {
    /// Measured deliveries: a message of the current step, first time seen by a subscriber.
    pub(crate) delivered: u64,
    /// Messages a subscriber never got (gaps in its sequence, and what was missing at the end).
    pub(crate) lost: u64,
    /// Messages a subscriber got again (or out of order).
    pub(crate) duplicated: u64,
    /// `message` frames that this generator did not publish (or a past step's, arriving late).
    pub(crate) other: u64,
    /// Closed-loop rounds completed.
    pub(crate) rounds: u64,
    /// Broadcasts (one publish at a time) that every subscriber received: for each, in the
    /// order they were published, the latency of its last receiver (ns).
    pub(crate) last_receiver_ns: Vec<u64>,
    /// Open loop: publishes the generator could not send on schedule.
    pub(crate) behind: u64,
    /// Bytes read from sockets.
    pub(crate) bytes_in: u64,
    /// Publish-to-receive latency of each delivery.
    pub(crate) hist: Histogram<u64>,
    /// Errors by kind.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Several nodes: the deliveries, losses and latencies above split by the node the
    /// subscriber is connected to (empty with one node, so that it costs nothing there).
    pub(crate) nodes: Vec<NodeCounts>,
}

/// The part of [`Counts`] of the subscribers on one node.
#[derive(Debug, Clone)]
pub(crate) struct NodeCounts {
    /// Measured deliveries.
    pub(crate) delivered: u64,
    /// Messages never received.
    pub(crate) lost: u64,
    /// Messages received again (or out of order).
    pub(crate) duplicated: u64,
    /// Publish-to-receive latency of each delivery.
    pub(crate) hist: Histogram<u64>,
}

impl Default for NodeCounts {
    fn default() -> Self {
        NodeCounts {
            delivered: 0,
            lost: 0,
            duplicated: 0,
            hist: new_histogram(),
        }
    }
}

impl NodeCounts {
    /// Adds `o` into `self`.
    pub(crate) fn merge(&mut self, o: &NodeCounts) {
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        // Same bounds on both sides; add fails only on a mismatch.
        let _ = self.hist.add(&o.hist);
    }
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            delivered: 0,
            lost: 0,
            duplicated: 0,
            other: 0,
            rounds: 0,
            last_receiver_ns: Vec::new(),
            behind: 0,
            bytes_in: 0,
            hist: new_histogram(),
            errors: BTreeMap::new(),
            nodes: Vec::new(),
        }
    }
}

impl Counts {
    /// Counts split over `nodes` nodes (none with one node).
    pub(crate) fn for_nodes(nodes: usize) -> Counts {
        Counts {
            nodes: if nodes > 1 {
                (0..nodes).map(|_| NodeCounts::default()).collect()
            } else {
                Vec::new()
            },
            ..Counts::default()
        }
    }

    /// Adds `o` into `self`.
    pub(crate) fn merge(&mut self, o: &Counts) {
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.other += o.other;
        self.rounds += o.rounds;
        self.last_receiver_ns.extend(&o.last_receiver_ns);
        self.behind += o.behind;
        self.bytes_in += o.bytes_in;
        // Both histograms have the same bounds; add fails only on a mismatch.
        let _ = self.hist.add(&o.hist);
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        if self.nodes.len() < o.nodes.len() {
            self.nodes.resize_with(o.nodes.len(), NodeCounts::default);
        }
        for (a, b) in self.nodes.iter_mut().zip(&o.nodes) {
            a.merge(b);
        }
    }

    /// Counts one error of `kind`.
    pub(crate) fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    /// Takes everything counted so far, leaving zeros.
    pub(crate) fn take(&mut self) -> Counts {
        let out = Counts {
            delivered: self.delivered,
            lost: self.lost,
            duplicated: self.duplicated,
            other: self.other,
            rounds: self.rounds,
            last_receiver_ns: std::mem::take(&mut self.last_receiver_ns),
            behind: self.behind,
            bytes_in: self.bytes_in,
            hist: self.hist.clone(),
            errors: std::mem::take(&mut self.errors),
            nodes: self.nodes.clone(),
        };
        for n in &mut self.nodes {
            n.delivered = 0;
            n.lost = 0;
            n.duplicated = 0;
            n.hist.reset();
        }
        self.delivered = 0;
        self.lost = 0;
        self.duplicated = 0;
        self.other = 0;
        self.rounds = 0;
        self.behind = 0;
        self.bytes_in = 0;
        self.hist.reset();
        out
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Latency {
    /// Deliveries measured.
    pub(crate) count: u64,
    /// Median.
    pub(crate) p50_us: f64,
    /// 90th percentile.
    pub(crate) p90_us: f64,
    /// 99th percentile.
    pub(crate) p99_us: f64,
    /// 99.9th percentile.
    pub(crate) p999_us: f64,
    /// Largest.
    pub(crate) max_us: f64,
    /// Mean.
    pub(crate) mean_us: f64,
}

impl Latency {
    /// Percentiles of `h` (nanoseconds).
    pub(crate) fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// The `q` quantile (0 to 1) of a few exact values, by nearest rank: the smallest value with at
/// least a share `q` of them at or below it (so of 20 values, p50 is the 10th smallest and p99
/// the largest). None when there are none.
pub(crate) fn nearest_rank(values: &[u64], q: f64) -> Option<u64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).max(1);
    v.get(rank - 1).copied()
}

/// A whole histogram in JSON: every recorded bucket as `[value_ns, count]` (the value is the
/// highest equivalent value of the bucket), with the bounds it was made with, so it can be
/// rebuilt exactly with `Histogram::new_with_bounds(lowest, highest, sigfig)` and `record_n`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HistogramJson {
    /// Lowest discernible value (ns).
    pub(crate) lowest_ns: u64,
    /// Highest trackable value (ns).
    pub(crate) highest_ns: u64,
    /// Significant decimal digits.
    pub(crate) significant_digits: u8,
    /// Values recorded.
    pub(crate) total_count: u64,
    /// `[value_ns, count]` for every non-empty bucket, in increasing value.
    pub(crate) buckets: Vec<[u64; 2]>,
}

impl HistogramJson {
    /// Serializes `h`.
    pub(crate) fn of(h: &Histogram<u64>) -> HistogramJson {
        HistogramJson {
            lowest_ns: h.low(),
            highest_ns: h.high(),
            significant_digits: h.sigfig(),
            total_count: h.len(),
            buckets: h
                .iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::nearest_rank;

    #[test]
    fn nearest_rank_of_a_few_values() {
        let v: Vec<u64> = (1..=20).rev().collect();
        assert_eq!(nearest_rank(&v, 0.5), Some(10));
        assert_eq!(nearest_rank(&v, 0.99), Some(20));
        assert_eq!(nearest_rank(&v, 1.0), Some(20));
        assert_eq!(nearest_rank(&v, 0.0), Some(1));
        assert_eq!(nearest_rank(&[7], 0.5), Some(7));
        assert_eq!(nearest_rank(&[], 0.5), None);
    }
}
