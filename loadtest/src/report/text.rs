//! The text report: one step as the table printed after it, section by section.

use std::fmt::Write as _;

use super::{bytes, count, dur, rate, StepReport};

impl StepReport {
    /// The step as a readable table.
    pub(crate) fn text(&self, embedded: bool) -> String {
        let mut s = String::new();
        let load = match (self.load.window, self.load.rate) {
            (Some(w), _) => format!("closed loop, {w} in flight per channel"),
            (_, Some(r)) => format!("open loop, {} publishes/s", count(r as u64)),
            _ => "idle".into(),
        };
        let _ = writeln!(
            s,
            "\n== {} ({load}), measured {:.1} s",
            self.label, self.seconds
        );
        let row = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "  {k:<18}{v}");
        };
        if self.load.mode != "idle" {
            row(
                &mut s,
                "published",
                format!(
                    "{:>15}   {:>12}/s",
                    count(self.published),
                    rate(self.published_per_s)
                ),
            );
            row(
                &mut s,
                "delivered",
                format!(
                    "{:>15}   {:>12}/s",
                    count(self.delivered),
                    rate(self.delivered_per_s)
                ),
            );
            row(
                &mut s,
                "expected",
                format!(
                    "{:>15}   (each publish x its channel's subscribers)",
                    count(self.expected_deliveries)
                ),
            );
            row(&mut s, "lost", format!("{:>15}", count(self.lost)));
            row(
                &mut s,
                "duplicated",
                format!("{:>15}", count(self.duplicated)),
            );
            if self.behind_schedule > 0 {
                row(
                    &mut s,
                    "behind schedule",
                    format!(
                        "{:>15}   (publishes the generator could not send in time)",
                        count(self.behind_schedule)
                    ),
                );
            }
            let l = &self.latency;
            row(
                &mut s,
                "latency",
                format!(
                    "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                    dur(l.p50_us),
                    dur(l.p90_us),
                    dur(l.p99_us),
                    dur(l.p999_us),
                    dur(l.max_us)
                ),
            );
        }
        row(
            &mut s,
            "connections held",
            format!(
                "{} of {} subscribers",
                count(self.connections_held),
                count(self.subscribers)
            ),
        );
        if self.errors.is_empty() {
            row(&mut s, "errors", "none".into());
        } else {
            let e: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            row(&mut s, "errors", e.join(", "));
        }
        row(
            &mut s,
            "generator CPU",
            format!(
                "{:.1} s ({:.0}% of one core)",
                self.generator_cpu_seconds, self.generator_cpu_percent
            ),
        );
        if let (Some(c), Some(p)) = (self.hub_cpu_seconds, self.hub_cpu_percent) {
            row(&mut s, "hub CPU", format!("{c:.1} s ({p:.0}% of one core)"));
        }
        if let Some(r) = self.rss_bytes {
            let note = if embedded {
                " (the whole process: hub and generator)"
            } else {
                " (the server process)"
            };
            row(&mut s, "memory (RSS)", format!("{}{note}", bytes(r)));
        }
        if let Some(r) = self.generator_rss_bytes {
            row(&mut s, "generator RSS", bytes(r));
        }
        if let Some(h) = &self.hub {
            row(
                &mut s,
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
                &mut s,
                "redis-server CPU",
                format!(
                    "{c:.1} s ({:.0}% of one core)",
                    c / self.seconds.max(1e-9) * 100.0
                ),
            );
        }
        for n in self.nodes.iter().flatten() {
            let name = format!("node {}", char::from(b'A' + n.node.min(25) as u8));
            let what = if n.node == 0 {
                "local: the publishers' node"
            } else {
                "cross-node: through Redis"
            };
            let l = &n.latency;
            row(
                &mut s,
                &name,
                format!("{} subscribers ({what}), {}", count(n.subscribers), n.url),
            );
            row(
                &mut s,
                "  delivered",
                format!(
                    "{:>15}   {:>12}/s   lost {}, duplicated {}",
                    count(n.delivered),
                    rate(n.delivered_per_s),
                    count(n.lost),
                    count(n.duplicated)
                ),
            );
            row(
                &mut s,
                "  latency",
                format!(
                    "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                    dur(l.p50_us),
                    dur(l.p90_us),
                    dur(l.p99_us),
                    dur(l.p999_us),
                    dur(l.max_us)
                ),
            );
            if let Some(b) = n.hub.as_ref().and_then(|h| h.broker.as_ref()) {
                row(
                    &mut s,
                    "  broker",
                    format!(
                        "sent {}, received {}, send_dropped {}, receive_dropped {}, reconnects {}{}",
                        count(b.sent),
                        count(b.received),
                        count(b.send_dropped),
                        count(b.receive_dropped),
                        count(b.reconnects),
                        if b.connected { "" } else { ", disconnected now" }
                    ),
                );
            }
        }
        if let Some(sl) = &self.slow {
            let codes: Vec<String> = sl
                .seen
                .close_codes
                .iter()
                .map(|(k, v)| format!("{v} with {k}"))
                .collect();
            row(
                &mut s,
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
                &mut s,
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
        if self.load.mode != "idle" && self.published > 0 {
            let reach = if self.lost == 0
                && self.expected_deliveries == self.published * self.subscribers
            {
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
        s
    }
}
