//! io_uring for a shard's writes (cargo feature `io-uring`, Linux only).
//!
//! Without it a shard makes one `send(2)` per client per batch. With it, the shard gathers up
//! to [`Uring::MAX_SENDS`] clients' frames into one buffer and submits all their sends
//! (`IORING_OP_SEND`, `MSG_DONTWAIT`) with one `io_uring_enter`, which returns once every
//! send is done: a socket that cannot take everything at once returns what it took (or
//! `EAGAIN`) rather than waiting, exactly as `send(2)` does, and the rest is queued for the
//! connection task as before. The clients' locks are held from the decision to write until
//! the results are settled (`conn::HeldOpen`), so to the rest of the hub a batched write is
//! the same single write.
//!
//! Why: at the floor (`benches/uring_floor`), one submission per round took 14 to 19% less
//! server CPU per delivered message than one `write(2)` per socket on this project's machine,
//! more than the syscall entries alone. In the hub, `compare.sh` medians over three runs were
//! 1.10, 1.21 and 1.19 times Bun (1000 x 1, 1000 x 16, 10000 x 16; the README has the runs).
//!
//! What a slow client gets does not change; what changes for the others is that a client's
//! lock may be held for one submission (up to 256 sends, about a millisecond on loopback), so
//! its own connection task, answering a ping or closing, can wait that long for it.

use std::io;
use std::os::fd::RawFd;

use bytes::Bytes;
use io_uring::{opcode, types, IoUring};

/// One submission of a shard's writes.
pub(crate) struct Uring {
    ring: IoUring,
    /// Every client's frames of this submission, end to end.
    gathered: Vec<u8>,
    /// Each send's socket and where its bytes are in `gathered`.
    sends: Vec<(RawFd, usize, usize)>,
    /// Each send's result, once its completion is in.
    results: Vec<Option<io::Result<usize>>>,
    /// The ring itself failed once; the shard goes back to `send(2)`.
    failed: bool,
}

impl Uring {
    /// Sends per submission: also how many clients' locks a shard holds at once, for about
    /// as long as that many sends take (a millisecond or so on loopback).
    pub(crate) const MAX_SENDS: usize = 256;
    /// Bytes gathered per submission, at most (plus one client's batch): also what the buffer
    /// a shard keeps between batches grows to, about 1 MiB per shard.
    const MAX_BYTES: usize = 1 << 20;
    /// A client's batch larger than this is written on its own, not copied into `gathered`.
    pub(crate) const MAX_CLIENT_BYTES: usize = 64 * 1024;

    /// A ring, or `None` where the kernel refuses io_uring (then the shard uses `send(2)`).
    pub(crate) fn new() -> Option<Uring> {
        match IoUring::new(Self::MAX_SENDS as u32) {
            Ok(ring) => Some(Uring {
                ring,
                gathered: Vec::new(),
                sends: Vec::with_capacity(Self::MAX_SENDS),
                results: Vec::with_capacity(Self::MAX_SENDS),
                failed: false,
            }),
            Err(err) => {
                tracing::info!(%err, "io_uring unavailable; shards write with send(2)");
                None
            }
        }
    }

    /// No room for another send in this submission.
    pub(crate) fn is_full(&self) -> bool {
        self.sends.len() == Self::MAX_SENDS || self.gathered.len() >= Self::MAX_BYTES
    }

    /// Adds a send of `frames`, gathered, to `fd`.
    pub(crate) fn push<'a>(&mut self, fd: RawFd, frames: impl Iterator<Item = &'a Bytes>) {
        let start = self.gathered.len();
        for frame in frames {
            self.gathered.extend_from_slice(frame);
        }
        self.sends.push((fd, start, self.gathered.len() - start));
    }

    /// Submits every send added since the last call with one `io_uring_enter` and waits for
    /// them all; returns their results in the order they were added, and starts a new
    /// submission.
    pub(crate) fn submit(&mut self) -> impl Iterator<Item = io::Result<usize>> + '_ {
        self.results.clear();
        self.results.resize_with(self.sends.len(), || None);
        if let Err(err) = self.submit_all() {
            tracing::warn!(%err, "io_uring failed; shards write with send(2) from now on");
            self.failed = true;
        }
        self.sends.clear();
        self.gathered.clear();
        // The ring itself failed (not one socket; not seen in practice): a send without a
        // completion may or may not have gone out, so its client cannot be continued
        // safely. The error closes it rather than risk a corrupt or repeated stream.
        self.results.drain(..).map(|result| {
            result.unwrap_or_else(|| Err(io::Error::other("io_uring failed before this send")))
        })
    }

    /// The ring failed; it must not be used again (it may still hold this submission's work).
    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    fn submit_all(&mut self) -> io::Result<()> {
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        {
            let mut queue = self.ring.submission();
            for (k, &(fd, start, len)) in self.sends.iter().enumerate() {
                let send =
                    opcode::Send::new(types::Fd(fd), self.gathered[start..].as_ptr(), len as u32)
                        .flags(flags)
                        .build()
                        .user_data(k as u64);
                // SAFETY: the buffer (`gathered`) and the socket outlive the send: this
                // function waits below for every completion before returning, and the caller
                // holds each client's `Conn` (so its socket is open) until then.
                unsafe { queue.push(&send) }
                    .map_err(|_| io::Error::other("submission queue full"))?;
            }
        }
        let mut done = 0;
        while done < self.sends.len() {
            match self.ring.submit_and_wait(self.sends.len() - done) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
            for completion in self.ring.completion() {
                let result = completion.result();
                self.results[completion.user_data() as usize] = Some(if result < 0 {
                    Err(io::Error::from_raw_os_error(-result))
                } else {
                    Ok(result as usize)
                });
                done += 1;
            }
        }
        Ok(())
    }
}
