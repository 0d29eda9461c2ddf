//! Sealed blocks of a channel's ring: the unit a replay pins.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::ledger::Ledger;

/// Publications per sealed block. A replay of n publications holds n / 64 `Arc`s (plus at
/// most 63 frames of the open tail) instead of n frames; a block is 64 × 40 = 2,560 bytes of
/// entries, so a channel's last, partly trimmed block wastes little.
pub(crate) const BLOCK_LEN: u64 = 64;

/// What one retained publication costs in the memory figures on top of its frame's bytes:
/// its [`Entry`] (a `Bytes`, 32 bytes, and the time, 8), its place in the publish-order queue
/// of the memory cap (an `Arc` and an offset, 16, up to twice over between compactions: 32),
/// its block's header spread over 64 entries (under 2). 40 + 32 + 2 = 74, rounded up to 80.
/// `entry_overhead_covers_its_parts` checks the sizes.
pub(crate) const ENTRY_OVERHEAD: usize = 80;

/// One publication: the frame exactly as it went to the subscribers (the same `Bytes`, so
/// keeping it costs a reference, not a copy), and when.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) frame: Bytes,
    pub(crate) published_ms: u64,
}

impl Entry {
    /// The bytes this publication counts for while it is retained.
    pub(crate) fn cost(&self) -> usize {
        self.frame.len() + ENTRY_OVERHEAD
    }
}

/// `BLOCK_LEN` consecutive publications ending at a multiple of `BLOCK_LEN` (fewer when the
/// first were trimmed before it was sealed), immutable once sealed except that, while nobody
/// else holds it, its ring frees the frames it trims.
///
/// A block trimmed from its ring while replays still hold it is *detached*: its bytes move
/// from the store's `memory` to its `detached` figure until the last replay lets it go.
pub(crate) struct Block {
    first_offset: u64,
    entries: Box<[Entry]>,
    /// Entries at the front whose frames were freed (trimmed while nobody else held this).
    freed: usize,
    /// Costs of the entries not freed.
    held_bytes: usize,
    /// Set (before the ring lets go of it) when it leaves its ring while a replay holds it:
    /// its `held_bytes` were then added to the ledger's detached memory, and its `Drop` takes
    /// them back.
    detached: AtomicBool,
    ledger: Arc<Ledger>,
}

impl Block {
    pub(crate) fn seal(first_offset: u64, entries: Box<[Entry]>, ledger: Arc<Ledger>) -> Self {
        Block {
            first_offset,
            held_bytes: entries.iter().map(Entry::cost).sum(),
            entries,
            freed: 0,
            detached: AtomicBool::new(false),
            ledger,
        }
    }

    pub(crate) fn first_offset(&self) -> u64 {
        self.first_offset
    }

    pub(crate) fn last_offset(&self) -> u64 {
        self.first_offset + self.entries.len() as u64 - 1
    }

    /// The entry of `offset`, which must be in this block.
    pub(crate) fn entry(&self, offset: u64) -> &Entry {
        &self.entries[(offset - self.first_offset) as usize]
    }

    /// Frees the frames of every entry up to `offset` (this ring's own trimmed entries; the
    /// caller checked that no replay holds the block).
    pub(crate) fn free_through(&mut self, offset: u64) {
        let end = (offset + 1 - self.first_offset) as usize;
        for entry in &mut self.entries[self.freed..end] {
            self.held_bytes -= entry.cost();
            entry.frame = Bytes::new();
        }
        self.freed = self.freed.max(end);
    }

    /// The ring trims its last entry and lets go of it: if a replay still holds it, its bytes
    /// count as detached until the replay drops it.
    pub(crate) fn leave_ring(mut block: Arc<Block>) {
        if Arc::get_mut(&mut block).is_none() {
            // Counted before the flag is set and before this reference goes, so that whichever
            // `Drop` runs (here, or in the replay's thread) finds both.
            block.ledger.add_detached(block.held_bytes);
            block.detached.store(true, Ordering::Release);
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if self.detached.load(Ordering::Acquire) {
            self.ledger.remove_detached(self.held_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::ledger::PublishOrder;

    #[test]
    fn entry_overhead_covers_its_parts() {
        let entry = size_of::<Entry>();
        let order_slot = size_of::<PublishOrder>();
        let block_header = size_of::<Block>() + 2 * size_of::<usize>() /* Arc counts */
            + size_of::<Arc<Block>>() /* its slot in the ring */;
        let per_entry = entry + 2 * order_slot + block_header.div_ceil(BLOCK_LEN as usize);
        assert!(
            per_entry <= ENTRY_OVERHEAD,
            "{per_entry} bytes per entry: entry {entry}, publish order {order_slot} × 2, \
             block {block_header} / {BLOCK_LEN}"
        );
        assert!(
            ENTRY_OVERHEAD - per_entry < 16,
            "{per_entry} is far under the constant"
        );
    }
}
