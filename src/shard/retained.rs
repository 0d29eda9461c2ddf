//! The memory that slow clients' queues hold, counted once per frame.
//!
//! A frame published to a channel is one buffer, shared by every queue it waits in: a
//! thousand clients behind on the same channel hold one copy of each frame, not a thousand.
//! Summing queue lengths (`HubStats::queued_bytes`) would count it a thousand times and cut
//! healthy readers of a burst long before memory is short; so the hub-wide budget
//! ([`HubConfigBuilder::queue_memory_budget`]) is checked against this instead.
//!
//! A shard keeps a reference to each frame of its batches that a queue took (a frame copy
//! is per shard, so shards never share one), and forgets it once it holds the only
//! reference left ([`Bytes::is_unique`]): the last queue has written or dropped it. Queues
//! drain oldest first, so looking from the front finds most of them; a full look, on the
//! keep-alive tick and before cutting anyone, finds the rest.
//!
//! [`HubConfigBuilder::queue_memory_budget`]: crate::HubConfigBuilder::queue_memory_budget

use std::collections::VecDeque;

use bytes::Bytes;

use crate::wire::frame;

/// The frames of one shard that queues may still hold, and their bytes.
#[derive(Default)]
pub(crate) struct Retained {
    frames: VecDeque<Bytes>,
    bytes: u64,
}

impl Retained {
    /// Keeps the frames of a batch that some queue took, just before the batch forgets them.
    pub(crate) fn keep_queued(&mut self, batch: &[Bytes]) {
        for frame in batch {
            // The batch's own reference is one; another is a queue's (or, for an instant,
            // the publisher's, which the next look forgets). A ping is static memory.
            if !frame.is_unique() && !frame::is_ping(frame) {
                self.bytes += frame.len() as u64;
                self.frames.push_back(frame.clone());
            }
        }
    }

    /// Forgets the frames no queue holds any more: from the front until one is still held,
    /// or every one when `all`.
    pub(crate) fn release(&mut self, all: bool) {
        if all {
            let bytes = &mut self.bytes;
            self.frames.retain(|frame| {
                let held = !frame.is_unique();
                if !held {
                    *bytes -= frame.len() as u64;
                }
                held
            });
        } else {
            while let Some(frame) = self.frames.front() {
                if !frame.is_unique() {
                    break;
                }
                self.bytes -= frame.len() as u64;
                self.frames.pop_front();
            }
        }
        if self.frames.is_empty() {
            // Free the ring's memory once nobody is behind.
            self.frames = VecDeque::new();
        }
    }

    /// Memory the queues hold, as far as the last look saw.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_shared_by_many_queues_counts_once_until_the_last_lets_go() {
        let frame = Bytes::from(vec![7u8; 1000]);
        let queues: Vec<Bytes> = (0..100).map(|_| frame.clone()).collect();
        let unqueued = Bytes::from(vec![1u8; 500]);
        let mut retained = Retained::default();
        retained.keep_queued(&[frame, unqueued, frame::ping_frame()]);
        assert_eq!(retained.bytes(), 1000, "one buffer, whatever the queues");
        let mut queues = queues;
        queues.truncate(1);
        retained.release(true);
        assert_eq!(retained.bytes(), 1000, "one queue still holds it");
        queues.clear();
        retained.release(false);
        assert_eq!(retained.bytes(), 0);
        assert!(retained.is_empty());
    }

    #[test]
    fn a_look_from_the_front_stops_at_a_frame_still_held_and_a_full_look_does_not() {
        let old = Bytes::from(vec![0u8; 100]);
        let new = Bytes::from(vec![0u8; 10]);
        let held_old = old.clone();
        let held_new = new.clone();
        let mut retained = Retained::default();
        retained.keep_queued(&[old, new]);
        drop(held_new);
        retained.release(false);
        assert_eq!(retained.bytes(), 110, "the front is still held");
        retained.release(true);
        assert_eq!(retained.bytes(), 100);
        drop(held_old);
        retained.release(false);
        assert_eq!(retained.bytes(), 0);
    }
}
