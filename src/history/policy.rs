//! Which channels keep a history, and how much of it: [`HistoryPolicy`] and [`HistoryRules`].

use std::time::Duration;

use crate::error::{Error, Result};

/// How much history one channel keeps: at most `max_publications`, none older than `max_age`.
///
/// Both bounds apply at once, and the hub-wide memory cap
/// ([`HISTORY_MEMORY_BUDGET`](crate::HISTORY_MEMORY_BUDGET) by default) comes on top: when the
/// histories together hold more, the oldest publications of all channels go first.
///
/// `max_age` also decides how long an idle channel keeps its offset counter (and so its epoch):
/// a channel with neither subscribers nor publications for longer than `max_age` forgets it,
/// and its next history starts at offset 1 in a new epoch.
///
/// ```
/// use std::time::Duration;
/// use wshub::HistoryPolicy;
///
/// let policy = HistoryPolicy::new(1_000, Duration::from_secs(600)).unwrap();
/// assert_eq!(policy.max_publications(), 1_000);
/// assert!(HistoryPolicy::new(0, Duration::from_secs(600)).unwrap_err().is_config());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    max_publications: usize,
    max_age: Duration,
}

impl HistoryPolicy {
    /// A policy keeping at most `max_publications` (at least 1) for at most `max_age` (more
    /// than zero; counted in whole milliseconds, so at least 1 ms).
    ///
    /// Refused with an error for which [`Error::is_config`] holds otherwise.
    pub fn new(max_publications: usize, max_age: Duration) -> Result<Self> {
        if max_publications == 0 {
            return Err(Error::config("history max_publications must be at least 1"));
        }
        if max_age.as_millis() == 0 {
            return Err(Error::config("history max_age must be at least 1 ms"));
        }
        Ok(HistoryPolicy {
            max_publications,
            max_age,
        })
    }

    /// The most publications the channel keeps.
    pub fn max_publications(&self) -> usize {
        self.max_publications
    }

    /// The oldest a kept publication may be; also how long an idle channel keeps its counter.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// `max_age` in the milliseconds of the store's clock (saturating: a century is forever).
    pub(crate) fn max_age_ms(&self) -> u64 {
        u64::try_from(self.max_age.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Which channels have a history: exact channel names and name prefixes, each with its
/// [`HistoryPolicy`]. Channels that match no rule have none (the default).
///
/// An exact name beats every prefix; among prefixes, the longest that matches wins. Adding a
/// rule for a name or prefix already present replaces its policy.
///
/// ```
/// use std::time::Duration;
/// use wshub::{HistoryPolicy, HistoryRules};
///
/// let hour = Duration::from_secs(3600);
/// let rules = HistoryRules::new()
///     .prefix("process:", HistoryPolicy::new(10_000, hour).unwrap())
///     .prefix("process:ci-", HistoryPolicy::new(50_000, hour).unwrap())
///     .channel("process:ci-7", HistoryPolicy::new(5, hour).unwrap());
///
/// assert_eq!(rules.policy_for("process:build-1").unwrap().max_publications(), 10_000);
/// assert_eq!(rules.policy_for("process:ci-8").unwrap().max_publications(), 50_000);
/// assert_eq!(rules.policy_for("process:ci-7").unwrap().max_publications(), 5);
/// assert!(rules.policy_for("news").is_none());
/// ```
#[derive(Debug, Clone, Default)]
pub struct HistoryRules {
    exact: ahash::HashMap<Box<str>, HistoryPolicy>,
    /// Longest prefix first, so the first match is the one that wins. A handful of rules in
    /// practice: a scan is cheaper than a trie, and it runs once per channel history created,
    /// not per publication.
    prefixes: Vec<(Box<str>, HistoryPolicy)>,
}

impl HistoryRules {
    /// No channel has a history.
    pub fn new() -> Self {
        HistoryRules::default()
    }

    /// Gives the channel named exactly `name` a history under `policy`.
    pub fn channel(mut self, name: impl Into<Box<str>>, policy: HistoryPolicy) -> Self {
        self.exact.insert(name.into(), policy);
        self
    }

    /// Gives every channel whose name starts with `prefix` a history under `policy` (unless an
    /// exact rule or a longer prefix names it). An empty prefix matches every channel.
    pub fn prefix(mut self, prefix: impl Into<Box<str>>, policy: HistoryPolicy) -> Self {
        let prefix = prefix.into();
        self.prefixes.retain(|(p, _)| *p != prefix);
        // After every prefix at least as long: the list stays longest first. Among equal
        // lengths order does not matter (two different prefixes of one length never both match).
        let at = self
            .prefixes
            .partition_point(|(p, _)| p.len() >= prefix.len());
        self.prefixes.insert(at, (prefix, policy));
        self
    }

    /// The policy of `channel`'s history, or `None` when it has none.
    pub fn policy_for(&self, channel: &str) -> Option<HistoryPolicy> {
        if let Some(policy) = self.exact.get(channel) {
            return Some(*policy);
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| channel.starts_with(&**prefix))
            .map(|(_, policy)| *policy)
    }

    /// No channel has a history: the hub need not look any channel up.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}
