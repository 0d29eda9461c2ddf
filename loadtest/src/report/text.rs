//! The text report: one step as the table printed after it, section by section.

use std::fmt::Write as _;

use super::{bytes, count, dur, rate, NodeReport, StepReport};
use crate::stats::Latency;

impl StepReport {
    /// The step as a readable table.
    pub(crate) fn text(&self, embedded: bool) -> String {
        let mut s = String::new();
        self.heading(&mut s);
        if self.load.mode != "idle" {
            self.deliveries(&mut s);
        }
        self.connections(&mut s);
        self.resources(&mut s, embedded);
        self.server(&mut s);
        for n in self.nodes.iter().flatten() {
            node(&mut s, n);
        }
        self.disturbance(&mut s);
        if self.load.mode != "idle" && self.published > 0 {
            self.in_short(&mut s);
        }
        s
    }

    /// The step's name, load and measured time.
    fn heading(&self, s: &mut String) {
        let load = match (self.load.window, self.load.rate, self.load.broadcasts) {
            (Some(w), _, _) => format!("closed loop, {w} in flight per channel"),
            (_, Some(r), _) => format!("open loop, {} publishes/s", count(r as u64)),
            (_, _, Some(b)) => format!("{b} broadcasts, one at a time"),
            _ => "idle".into(),
        };
        let _ = writeln!(
            s,
            "\n== {} ({load}), measured {:.1} s",
            self.label, self.seconds
        );
    }

    /// Publishes, deliveries, what was lost or duplicated or sent late, and latency.
    fn deliveries(&self, s: &mut String) {
        row(
            s,
            "published",
            format!(
                "{:>15}   {:>12}/s",
                count(self.published),
                rate(self.published_per_s)
            ),
        );
        row(
            s,
            "delivered",
            format!(
                "{:>15}   {:>12}/s",
                count(self.delivered),
                rate(self.delivered_per_s)
            ),
        );
        row(
            s,
            "expected",
            format!(
                "{:>15}   (each publish x its channel's subscribers)",
                count(self.expected_deliveries)
            ),
        );
        row(s, "lost", format!("{:>15}", count(self.lost)));
        row(s, "duplicated", format!("{:>15}", count(self.duplicated)));
        if self.behind_schedule > 0 {
            row(
                s,
                "behind schedule",
                format!(
                    "{:>15}   (publishes the generator could not send in time)",
                    count(self.behind_schedule)
                ),
            );
        }
        row(s, "latency", latency(&self.latency));
        if let Some(b) = &self.broadcasts {
            let us = |v: Option<f64>| v.map_or("-".into(), dur);
            row(
                s,
                "last receiver",
                format!(
                    "p50 {}  p99 {}  max {}   ({} of {} broadcasts received by all; each from its publish to its last receiver)",
                    us(b.p50_us),
                    us(b.p99_us),
                    us(b.max_us),
                    b.received_by_all,
                    b.asked
                ),
            );
        }
    }

    /// Connections still held at the end, and errors.
    fn connections(&self, s: &mut String) {
        row(
            s,
            "connections held",
            format!(
                "{} of {} subscribers",
                count(self.connections_held),
                count(self.subscribers)
            ),
        );
        if self.errors.is_empty() {
            row(s, "errors", "none".into());
        } else {
            let e: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            row(s, "errors", e.join(", "));
        }
    }

    /// CPU and memory of the generator and the hub.
    fn resources(&self, s: &mut String, embedded: bool) {
        row(
            s,
            "generator CPU",
            format!(
                "{:.1} s ({:.0}% of one core)",
                self.generator_cpu_seconds, self.generator_cpu_percent
            ),
        );
        if let (Some(c), Some(p)) = (self.hub_cpu_seconds, self.hub_cpu_percent) {
            row(s, "hub CPU", format!("{c:.1} s ({p:.0}% of one core)"));
        }
        if let Some(r) = self.rss_bytes {
            let note = if embedded {
                " (the whole process: hub and generator)"
            } else {
                " (the server process)"
            };
            row(s, "memory (RSS)", format!("{}{note}", bytes(r)));
        }
        if let Some(r) = self.generator_rss_bytes {
            row(s, "generator RSS", bytes(r));
        }
    }

    /// The hub's counters, and the CPU of the redis-server this run started.
    fn server(&self, s: &mut String) {
        if let Some(h) = &self.hub {
            row(
                s,
                "hub counters",
                format!(
                    "published {}, delivered {}, dropped {}, slow-consumer disconnects {}, clients {}",
                    count(h.published),
                    count(h.delivered),
                    count(h.dropped),
                    count(h.slow_consumer_disconnects),
                    count(h.clients)
                ),
            );
        }
        if let Some(c) = self.redis_cpu_seconds {
            row(
                s,
                "redis-server CPU",
                format!(
                    "{c:.1} s ({:.0}% of one core)",
                    c / self.seconds.max(1e-9) * 100.0
                ),
            );
        }
    }

    /// What the slow clients got, and what churn did (a disturbed step).
    fn disturbance(&self, s: &mut String) {
        if let Some(sl) = &self.slow {
            let codes: Vec<String> = sl
                .seen
                .close_codes
                .iter()
                .map(|(k, v)| format!("{v} with {k}"))
                .collect();
            row(
                s,
                "slow clients",
                format!(
                    "{}: {} closed by the server{}; they got {} of the step's messages, missed {}",
                    sl.seen.clients,
                    sl.seen.closed_by_server,
                    if codes.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", codes.join(", "))
                    },
                    count(sl.seen.received),
                    count(sl.lost)
                ),
            );
        }
        if let Some(c) = &self.churn {
            row(
                s,
                "churn",
                format!(
                    "{} connects ({} failed), {} disconnects, {} subscribes, {} unsubscribes",
                    count(c.connects),
                    count(c.connect_failures),
                    count(c.disconnects),
                    count(c.subscribes),
                    count(c.unsubscribes)
                ),
            );
        }
    }

    /// The step in one sentence.
    fn in_short(&self, s: &mut String) {
        let reach =
            if self.lost == 0 && self.expected_deliveries == self.published * self.subscribers {
                format!(
                    "every one reached all {} subscribers",
                    count(self.subscribers)
                )
            } else if self.lost == 0 {
                "every one reached every subscriber of its channel".to_string()
            } else {
                format!("{} deliveries never arrived", count(self.lost))
            };
        let _ = writeln!(
            s,
            "  in short: {} publishes in {:.0} s, {reach}: {} deliveries/s; half arrived within {}, 99% within {}",
            count(self.published),
            self.seconds,
            rate(self.delivered_per_s),
            dur(self.latency.p50_us),
            dur(self.latency.p99_us)
        );
    }
}

/// The subscribers of one node (several nodes): deliveries, latency, and its broker.
fn node(s: &mut String, n: &NodeReport) {
    let name = format!("node {}", char::from(b'A' + n.node.min(25) as u8));
    let what = if n.node == 0 {
        "local: the publishers' node"
    } else {
        "cross-node: through Redis"
    };
    row(
        s,
        &name,
        format!("{} subscribers ({what}), {}", count(n.subscribers), n.url),
    );
    row(
        s,
        "  delivered",
        format!(
            "{:>15}   {:>12}/s   lost {}, duplicated {}",
            count(n.delivered),
            rate(n.delivered_per_s),
            count(n.lost),
            count(n.duplicated)
        ),
    );
    row(s, "  latency", latency(&n.latency));
    if let Some(b) = n.hub.as_ref().and_then(|h| h.broker.as_ref()) {
        row(
            s,
            "  broker",
            format!(
                "sent {}, received {}, send_dropped {}, receive_dropped {}, reconnects {}{}",
                count(b.sent),
                count(b.received),
                count(b.send_dropped),
                count(b.receive_dropped),
                count(b.reconnects),
                if b.connected {
                    ""
                } else {
                    ", disconnected now"
                }
            ),
        );
    }
}

/// One line of the table: its name in a column of 18, then its value.
fn row(s: &mut String, k: &str, v: String) {
    let _ = writeln!(s, "  {k:<18}{v}");
}

/// Latency percentiles and the maximum, as one line.
fn latency(l: &Latency) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        dur(l.p50_us),
        dur(l.p90_us),
        dur(l.p99_us),
        dur(l.p999_us),
        dur(l.max_us)
    )
}
