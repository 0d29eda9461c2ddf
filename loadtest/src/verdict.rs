//! The run's verdict: whether measured subscribers lost or got duplicated messages, or errors
//! happened, and the exit status that tells scripts and CI.
//!
//! Only what the run measures counts. Losses a scenario causes on purpose do not: the slow
//! scenario's never-reading clients are counted apart (`StepReport::slow`), and a sweep looks
//! for the load at which the hub starts to fail, so its steps past the knee are expected to.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::Scenario;
use crate::report::{self, StepReport};
use crate::scenarios::SweepPoint;

/// Nothing measured was lost or duplicated, and no error happened.
pub(crate) const EXIT_CLEAN: u8 = 0;
/// The run could not be done or was cut short: nothing to judge (a connection or subscription
/// that could not be set up, a generator thread that stopped answering, a file not written).
pub(crate) const EXIT_FAILED: u8 = 1;
/// Bad arguments (clap's own status for them too).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Measured subscribers lost messages or got duplicates (whether or not errors happened too).
pub(crate) const EXIT_LOST: u8 = 3;
/// Errors happened (connections closed by the server, write errors or timeouts, `error`
/// frames, closed-loop rounds that timed out), but nothing measured was lost or duplicated.
pub(crate) const EXIT_ERRORS: u8 = 4;

/// The exit statuses, for `--help`.
pub(crate) const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  clean: no measured message lost or duplicated, no errors
  1  the run could not be done or was cut short (setup failed, a generator thread stopped
     answering, the report could not be written): nothing was judged
  2  bad arguments
  3  measured subscribers lost messages or got duplicates (errors may have happened too)
  4  errors happened (connections closed by the server, write errors or timeouts, error
     frames, round timeouts), but nothing measured was lost or duplicated

What counts: every measured subscriber of every step; not the slow scenario's never-reading
clients, not a ramp's failures (they are where it stops), and in a sweep only the steps of
each subscriber count up to and including its knee (the step past it is expected to fail; if
no step is within the bounds, the lowest-load step counts).";

/// What one step contributes to the verdict.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepTally {
    /// The step's name.
    pub(crate) label: String,
    /// Messages measured subscribers never received.
    pub(crate) lost: u64,
    /// Messages measured subscribers received more than once (or out of order).
    pub(crate) duplicated: u64,
    /// Errors by kind.
    pub(crate) errors: BTreeMap<String, u64>,
}

impl From<&StepReport> for StepTally {
    fn from(s: &StepReport) -> Self {
        // `lost` and `duplicated` are the measured subscribers' only; what the slow clients
        // missed is in `s.slow` and is left out on purpose.
        StepTally {
            label: s.label.clone(),
            lost: s.lost,
            duplicated: s.duplicated,
            errors: s.errors.clone(),
        }
    }
}

/// The verdict on a whole run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Verdict {
    /// The process's exit status.
    pub(crate) exit_code: u8,
    /// Messages measured subscribers lost, over the steps that count.
    pub(crate) lost: u64,
    /// Duplicates, over the steps that count.
    pub(crate) duplicated: u64,
    /// Errors by kind, over the steps that count.
    pub(crate) errors: BTreeMap<String, u64>,
    /// The steps that count.
    pub(crate) counted_steps: Vec<String>,
    /// The steps that do not (sweep steps past the knee).
    pub(crate) uncounted_steps: Vec<String>,
}

/// Judges a run of `scenario` from its steps (and, for a sweep, its points, one per step in
/// the same order).
pub(crate) fn judge(scenario: Scenario, steps: &[StepTally], sweep: &[SweepPoint]) -> Verdict {
    let counts: Vec<bool> = match scenario {
        // One point per step; should they ever disagree, every step counts.
        Scenario::Sweep if sweep.len() == steps.len() => sweep_counted(sweep),
        _ => vec![true; steps.len()],
    };
    let mut v = Verdict {
        exit_code: EXIT_CLEAN,
        lost: 0,
        duplicated: 0,
        errors: BTreeMap::new(),
        counted_steps: Vec::new(),
        uncounted_steps: Vec::new(),
    };
    for (s, counted) in steps.iter().zip(counts) {
        if !counted {
            v.uncounted_steps.push(s.label.clone());
            continue;
        }
        v.counted_steps.push(s.label.clone());
        v.lost += s.lost;
        v.duplicated += s.duplicated;
        for (k, n) in &s.errors {
            *v.errors.entry(k.clone()).or_default() += n;
        }
    }
    v.exit_code = if v.lost + v.duplicated > 0 {
        EXIT_LOST
    } else if v.errors.values().any(|&n| n > 0) {
        EXIT_ERRORS
    } else {
        EXIT_CLEAN
    };
    v
}

/// Which sweep points count. Points come in series, one per subscriber count, at increasing
/// rates; in each, the points up to and including the last within the knee's bounds (that
/// count's knee) count, and the ones from the first outside them on do not: the sweep runs
/// that step to find the knee, and failing there is its answer, not a defect. If no point of
/// the whole sweep is within the bounds there is no knee at all, and the lowest load asked
/// for counts, so that a hub losing messages at every load does not pass.
pub(crate) fn sweep_counted(points: &[SweepPoint]) -> Vec<bool> {
    let mut counted = vec![false; points.len()];
    let mut past_knee = false;
    for (i, p) in points.iter().enumerate() {
        let new_series =
            i == 0 || points[i - 1].subscribers != p.subscribers || points[i - 1].rate >= p.rate;
        if new_series {
            past_knee = false;
        }
        past_knee |= !p.ok;
        counted[i] = !past_knee;
    }
    if !counted.contains(&true) {
        let lowest = points
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| a.offered_per_s.total_cmp(&b.offered_per_s));
        if let Some((i, _)) = lowest {
            counted[i] = true;
        }
    }
    counted
}

impl Verdict {
    /// One line for the end of the report.
    pub(crate) fn text(&self) -> String {
        let mut s = String::from("\nverdict: ");
        let errors: u64 = self.errors.values().sum();
        if self.exit_code == EXIT_CLEAN {
            s.push_str("clean: no measured message lost or duplicated, no errors");
        } else {
            if self.lost + self.duplicated > 0 {
                let _ = write!(
                    s,
                    "measured subscribers lost {} messages and got {} duplicates",
                    report::count(self.lost),
                    report::count(self.duplicated)
                );
            }
            if errors > 0 {
                if self.lost + self.duplicated > 0 {
                    s.push_str("; ");
                }
                let kinds: Vec<String> = self
                    .errors
                    .iter()
                    .map(|(k, n)| format!("{n} {k}"))
                    .collect();
                let _ = write!(s, "errors: {}", kinds.join(", "));
            }
        }
        let _ = write!(s, " (exit status {})", self.exit_code);
        if !self.uncounted_steps.is_empty() {
            let _ = write!(
                s,
                "\n  not counted (past the knee): {}",
                self.uncounted_steps.join("; ")
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(label: &str, lost: u64, duplicated: u64, errors: &[(&str, u64)]) -> StepTally {
        StepTally {
            label: label.into(),
            lost,
            duplicated,
            errors: errors.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
        }
    }

    fn point(subscribers: usize, rate: f64, lost: u64, ok: bool) -> SweepPoint {
        SweepPoint {
            subscribers,
            rate,
            offered_per_s: rate * subscribers as f64,
            delivered_per_s: rate * subscribers as f64,
            p99_ms: if ok { 1.0 } else { 100.0 },
            lost,
            ok,
        }
    }

    #[test]
    fn a_clean_run_exits_0() {
        let v = judge(Scenario::Fanout, &[step("fanout", 0, 0, &[])], &[]);
        assert_eq!(v.exit_code, EXIT_CLEAN);
        assert!(v.text().contains("clean"));
    }

    #[test]
    fn losses_and_duplicates_exit_3_even_with_errors() {
        let lost = judge(Scenario::Fanout, &[step("a", 5, 0, &[])], &[]);
        assert_eq!((lost.exit_code, lost.lost), (EXIT_LOST, 5));
        let dup = judge(Scenario::Channels, &[step("a", 0, 2, &[])], &[]);
        assert_eq!(dup.exit_code, EXIT_LOST);
        let both = judge(
            Scenario::Fanout,
            &[step("a", 1, 0, &[("round timeout", 3)])],
            &[],
        );
        assert_eq!(both.exit_code, EXIT_LOST);
        assert!(both.text().contains("lost 1") && both.text().contains("3 round timeout"));
    }

    #[test]
    fn errors_alone_exit_4() {
        let v = judge(
            Scenario::Idle,
            &[step("idle", 0, 0, &[("closed by server (4000)", 1)])],
            &[],
        );
        assert_eq!(v.exit_code, EXIT_ERRORS);
    }

    #[test]
    fn every_step_of_slow_and_churn_counts() {
        // The slow clients' misses are not in a step's `lost`; the healthy clients' are, in
        // either half.
        for sc in [Scenario::Slow, Scenario::Churn] {
            let v = judge(
                sc,
                &[step("baseline", 0, 0, &[]), step("disturbed", 7, 0, &[])],
                &[],
            );
            assert_eq!((v.exit_code, v.lost), (EXIT_LOST, 7));
        }
    }

    #[test]
    fn a_ramp_has_no_steps_and_passes() {
        assert_eq!(judge(Scenario::Ramp, &[], &[]).exit_code, EXIT_CLEAN);
    }

    #[test]
    fn sweep_steps_past_the_knee_do_not_count() {
        // 100 subscribers: ok, ok, then losses (past the knee); 1000: the first rate already
        // fails with losses and an error: past that count's knee too.
        let points = [
            point(100, 100.0, 0, true),
            point(100, 300.0, 0, true),
            point(100, 1000.0, 50, false),
            point(1000, 100.0, 9, false),
        ];
        assert_eq!(sweep_counted(&points), [true, true, false, false]);
        let steps = [
            step("100x100", 0, 0, &[]),
            step("100x300", 0, 0, &[]),
            step("100x1000", 50, 0, &[]),
            step("1000x100", 9, 0, &[("closed by server (4000)", 2)]),
        ];
        let v = judge(Scenario::Sweep, &steps, &points);
        assert_eq!(v.exit_code, EXIT_CLEAN, "{v:?}");
        assert_eq!(v.uncounted_steps, ["100x1000", "1000x100"]);
        assert!(v.text().contains("not counted"));
    }

    #[test]
    fn the_knee_itself_must_be_clean() {
        let points = [point(100, 100.0, 0, true), point(100, 300.0, 0, false)];
        // Duplicates or errors at the knee (within the latency bound, nothing lost) fail.
        let dup = [step("knee", 0, 3, &[]), step("past", 0, 0, &[])];
        assert_eq!(judge(Scenario::Sweep, &dup, &points).exit_code, EXIT_LOST);
        let err = [
            step("knee", 0, 0, &[("publish write error", 1)]),
            step("past", 0, 0, &[]),
        ];
        assert_eq!(judge(Scenario::Sweep, &err, &points).exit_code, EXIT_ERRORS);
        // And its losses count, even if a future `ok` forgot to require none.
        let lost = [step("knee", 4, 0, &[]), step("past", 0, 0, &[])];
        assert_eq!(judge(Scenario::Sweep, &lost, &points).exit_code, EXIT_LOST);
    }

    #[test]
    fn a_sweep_without_a_knee_is_judged_at_its_lowest_load() {
        let points = [point(1000, 100.0, 5, false), point(100, 100.0, 2, false)];
        assert_eq!(sweep_counted(&points), [false, true]);
        let steps = [step("1000x100", 5, 0, &[]), step("100x100", 2, 0, &[])];
        let v = judge(Scenario::Sweep, &steps, &points);
        assert_eq!((v.exit_code, v.lost), (EXIT_LOST, 2));
        // Over the latency bound but losing nothing: clean.
        let slow_only = [point(100, 100.0, 0, false)];
        let v = judge(Scenario::Sweep, &[step("100x100", 0, 0, &[])], &slow_only);
        assert_eq!(v.exit_code, EXIT_CLEAN);
    }

    #[test]
    fn the_same_count_twice_is_two_series() {
        let points = [
            point(100, 100.0, 0, true),
            point(100, 300.0, 1, false),
            point(100, 100.0, 0, true),
        ];
        assert_eq!(sweep_counted(&points), [true, false, true]);
    }

    #[test]
    fn the_help_lists_every_status() {
        for code in [EXIT_CLEAN, EXIT_FAILED, EXIT_USAGE, EXIT_LOST, EXIT_ERRORS] {
            assert!(
                EXIT_STATUS_HELP.contains(&format!("\n  {code}  ")),
                "exit status {code} is not in --help"
            );
        }
    }
}
