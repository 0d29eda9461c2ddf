//! A range of a channel's history pinned for one subscriber: [`Replay`]; and a bounded read
//! of it: [`Page`].

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::block::Block;

/// The publications after a subscriber's `since`, as the history held them when pinned
/// (`ChannelHistory::pin_after`): a trim afterwards does not cut it. Yields `(offset, frame)`
/// in order, from [`first_offset`](Self::first_offset) to [`latest`](Self::latest).
///
/// Memory: the `Arc`s of the sealed blocks in the range (one per 64 publications) and clones
/// of at most 63 frames of the open tail, so a replay of 10,000 publications holds 157
/// `Arc`s and 63 `Bytes`, not 10,000 `Bytes`. Blocks are let go as the replay passes them.
/// Blocks trimmed from the history while a replay holds them count in
/// `HistoryStore::detached_memory` until then.
pub(crate) struct Replay {
    epoch: Arc<str>,
    latest: u64,
    recovered: bool,
    /// The offset the next item has.
    next: u64,
    /// Sealed blocks from the one holding `next` on; each is dropped once passed.
    blocks: VecDeque<Arc<Block>>,
    /// The frames after the last block, up to `latest`.
    tail: VecDeque<Bytes>,
}

impl Replay {
    pub(super) fn new(
        epoch: Arc<str>,
        latest: u64,
        recovered: bool,
        first_offset: u64,
        blocks: VecDeque<Arc<Block>>,
        tail: VecDeque<Bytes>,
    ) -> Self {
        debug_assert_eq!(
            latest + 1 - first_offset,
            blocks
                .iter()
                .map(|b| b.last_offset() + 1 - first_offset.max(b.first_offset()))
                .sum::<u64>()
                + tail.len() as u64
        );
        Replay {
            epoch,
            latest,
            recovered,
            next: first_offset,
            blocks,
            tail,
        }
    }

    /// `since` was beyond the latest offset: nothing to replay, not recovered.
    pub(super) fn nothing(epoch: Arc<str>, latest: u64) -> Self {
        Replay {
            epoch,
            latest,
            recovered: false,
            next: latest + 1,
            blocks: VecDeque::new(),
            tail: VecDeque::new(),
        }
    }

    /// The history's epoch when pinned.
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// The channel's latest offset when pinned: the acknowledgement's `offset`; live
    /// publications go on from the next.
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn latest(&self) -> u64 {
        self.latest
    }

    /// Every offset in (`since`, `latest`] is in the replay.
    pub(crate) fn recovered(&self) -> bool {
        self.recovered
    }

    /// The offset of the next item (`latest + 1` when none is left).
    pub(crate) fn first_offset(&self) -> u64 {
        self.next
    }

    /// Publications left to replay.
    pub(crate) fn remaining(&self) -> usize {
        (self.latest + 1 - self.next) as usize
    }
}

impl Iterator for Replay {
    type Item = (u64, Bytes);

    fn next(&mut self) -> Option<(u64, Bytes)> {
        if self.next > self.latest {
            return None;
        }
        let offset = self.next;
        let frame = match self.blocks.front() {
            Some(block) => {
                let frame = block.entry(offset).frame.clone();
                if offset == block.last_offset() {
                    self.blocks.pop_front();
                }
                frame
            }
            None => self.tail.pop_front()?,
        };
        self.next += 1;
        Some((offset, frame))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining(), Some(self.remaining()))
    }
}

impl ExactSizeIterator for Replay {}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("epoch", &self.epoch)
            .field("next", &self.next)
            .field("latest", &self.latest)
            .field("recovered", &self.recovered)
            .field("pinned_blocks", &self.blocks.len())
            .finish()
    }
}

/// What `ChannelHistory::read` found: up to `limit` publications after `since`.
#[derive(Debug, Clone)]
pub(crate) struct Page {
    pub(crate) epoch: Arc<str>,
    /// The channel's latest offset.
    pub(crate) latest: u64,
    /// Every offset after `since` still held (as for [`Replay::recovered`]); `publications`
    /// may stop before `latest` at `limit`.
    pub(crate) recovered: bool,
    pub(crate) publications: Vec<(u64, Bytes)>,
}
