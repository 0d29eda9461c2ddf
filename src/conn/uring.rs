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

//!
//! If the ring itself fails (an `io_uring_enter` error other than `EINTR`, not seen in
//! practice), the kernel may still hold sends of that submission and read the buffer they
//! point into, and nothing can tell us when it is done. So the ring and that buffer are leaked
//! ([`Uring::submit`]), never freed or written again: one gathered buffer (at most about
//! 1 MiB), the ring's mappings (about 30 KiB) and its descriptor, once per shard, since the
//! shard writes with `send(2)` from then on.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use io_uring::{opcode, types, IoUring};

/// Every send's flags: never wait (as `send(2)` on the shard's path), and a peer that is gone
/// is an error here, not a SIGPIPE for the whole process.
const SEND_FLAGS: i32 = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;

/// One submission of a shard's writes.
pub(crate) struct Uring {
    /// `None` once the ring failed: it was leaked with the buffer its sends read, and the
    /// sends still pushed go out with `send(2)`.
    ring: Option<IoUring>,
    /// Every client's frames of this submission, end to end.
    gathered: Vec<u8>,
    /// Each send's socket and where its bytes are in `gathered`.
    sends: Vec<(RawFd, usize, usize)>,
    /// Each send's result, once its completion is in.
    results: Vec<Option<io::Result<usize>>>,
    /// The hub's count of shards writing with io_uring (`HubStats::io_uring_shards`): this
    /// one counts from `for_shard` until its ring fails or it is dropped.
    in_use: Arc<AtomicUsize>,
    /// Tests: the next submission fails after the kernel took it.
    #[cfg(test)]
    fail_next: bool,
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

    /// Shard `shard`'s ring, counted in `in_use`; or `None` where the kernel refuses
    /// io_uring, and then the shard writes with `send(2)`. Says which in the log.
    pub(crate) fn for_shard(shard: usize, in_use: &Arc<AtomicUsize>) -> Option<Uring> {
        match IoUring::new(Self::MAX_SENDS as u32) {
            Ok(ring) => {
                tracing::debug!(shard, "shard writes with io_uring");
                in_use.fetch_add(1, Ordering::Relaxed);
                Some(Uring {
                    ring: Some(ring),
                    gathered: Vec::new(),
                    sends: Vec::with_capacity(Self::MAX_SENDS),
                    results: Vec::with_capacity(Self::MAX_SENDS),
                    in_use: Arc::clone(in_use),
                    #[cfg(test)]
                    fail_next: false,
                })
            }
            Err(err) => {
                tracing::warn!(shard, %err, "io_uring refused; shard writes with send(2)");
                None
            }
        }
    }

    /// No room for another send in this submission.
    pub(crate) fn is_full(&self) -> bool {
        self.sends.len() == Self::MAX_SENDS || self.gathered.len() >= Self::MAX_BYTES
    }

    /// Adds a send of `frames`, gathered, to `fd`. The caller keeps `fd` open until
    /// [`submit`](Self::submit) has returned.
    pub(crate) fn push<'a>(&mut self, fd: RawFd, frames: impl Iterator<Item = &'a Bytes>) {
        let start = self.gathered.len();
        for frame in frames {
            self.gathered.extend_from_slice(frame);
        }
        self.sends.push((fd, start, self.gathered.len() - start));
    }

    /// Submits every send added since the last call with one `io_uring_enter` and waits for
    /// them all; returns their results in the order they were added, and starts a new
    /// submission. Once the ring has failed, the sends go out one `send(2)` each.
    pub(crate) fn submit(&mut self) -> impl Iterator<Item = io::Result<usize>> + '_ {
        self.results.clear();
        self.results.resize_with(self.sends.len(), || None);
        if self.ring.is_some() {
            if let Err(err) = self.submit_all() {
                tracing::warn!(%err, "io_uring failed; this shard writes with send(2) from now on");
                self.abandon_ring();
            }
        } else {
            self.send_each();
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

    /// The ring failed: this shard is to write with `send(2)` from now on.
    pub(crate) fn failed(&self) -> bool {
        self.ring.is_none()
    }

    fn submit_all(&mut self) -> io::Result<()> {
        let Some(ring) = self.ring.as_mut() else {
            return Err(io::Error::other("io_uring already failed"));
        };
        {
            let mut queue = ring.submission();
            for (k, &(fd, start, len)) in self.sends.iter().enumerate() {
                let send =
                    opcode::Send::new(types::Fd(fd), self.gathered[start..].as_ptr(), len as u32)
                        .flags(SEND_FLAGS)
                        .build()
                        .user_data(k as u64);
                // SAFETY: the kernel may read `gathered[start..start + len]` and use `fd` until
                // the send's completion is reaped. The buffer: on success this function reaps
                // every completion before it returns; on any error (from here on) `submit`
                // leaks the ring and the buffer (`abandon_ring`), so the buffer is never freed
                // or written again. The socket: the caller keeps `fd` open until `submit`
                // returns (it holds the client's `Conn`), and the kernel takes its own
                // reference to the file when it takes the entry; an entry it has not taken is
                // never taken, as no one enters an abandoned ring.
                unsafe { queue.push(&send) }
                    .map_err(|_| io::Error::other("submission queue full"))?;
            }
        }
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next) {
            // As if `io_uring_enter` took the sends and then failed while waiting for them:
            // the kernel has them, and nothing is reaped.
            ring.submit()?;
            return Err(io::Error::other("injected io_uring failure"));
        }
        let mut done = 0;
        while done < self.sends.len() {
            match ring.submit_and_wait(self.sends.len() - done) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
            for completion in ring.completion() {
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

    /// Leaks the ring and the buffer its sends read, after the ring failed: see the module
    /// docs. What is pushed from now on is gathered into a new buffer and sent with `send(2)`.
    fn abandon_ring(&mut self) {
        let Some(ring) = self.ring.take() else {
            return;
        };
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        std::mem::forget(std::mem::take(&mut self.gathered));
        std::mem::forget(ring);
        #[cfg(test)]
        tests::ABANDONED.with(|n| n.set(n.get() + 1));
    }

    /// The sends with one `send(2)` each, for those pushed after the ring failed.
    fn send_each(&mut self) {
        for (k, &(fd, start, len)) in self.sends.iter().enumerate() {
            let bytes = &self.gathered[start..start + len];
            // SAFETY: `send` reads at most `bytes.len()` bytes from a live slice, and returns
            // before this function does; the caller keeps `fd` open until `submit` returns.
            let sent = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), SEND_FLAGS) };
            self.results[k] = Some(usize::try_from(sent).map_err(|_| io::Error::last_os_error()));
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The shard is gone; an abandoned ring stopped counting when it failed.
        if self.ring.is_some() {
            self.in_use.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    thread_local! {
        /// Rings this thread leaked after a failure (a test and its `Uring` share a thread).
        pub(super) static ABANDONED: Cell<usize> = const { Cell::new(0) };
    }

    fn read_available(stream: &mut UnixStream) -> Vec<u8> {
        stream.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0; 64];
        while let Ok(n @ 1..) = stream.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// A ring, or `None` (and the test passes, saying so) where the kernel refuses io_uring;
    /// `every_shard_writes_with_io_uring_when_required` is the one that insists.
    fn ring(in_use: &Arc<AtomicUsize>) -> Option<Uring> {
        let uring = Uring::for_shard(0, in_use);
        if uring.is_none() {
            eprintln!("io_uring refused by this kernel: nothing to test");
        }
        uring
    }

    #[test]
    fn one_submission_sends_to_every_socket() {
        let in_use = Arc::new(AtomicUsize::new(0));
        let Some(mut uring) = ring(&in_use) else {
            return;
        };
        assert_eq!(in_use.load(Ordering::Relaxed), 1);
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        let (b, mut b_peer) = UnixStream::pair().unwrap();
        let (one, two) = (Bytes::from_static(b"one"), Bytes::from_static(b"two"));
        uring.push(a.as_raw_fd(), [&one, &two].into_iter());
        uring.push(b.as_raw_fd(), [&two].into_iter());
        let results: Vec<usize> = uring.submit().map(Result::unwrap).collect();
        assert_eq!(results, [6, 3]);
        assert_eq!(read_available(&mut a_peer), b"onetwo");
        assert_eq!(read_available(&mut b_peer), b"two");
        assert!(!uring.failed());
        drop(uring);
        assert_eq!(in_use.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_failed_ring_is_leaked_and_its_sends_fail() {
        let in_use = Arc::new(AtomicUsize::new(0));
        let Some(mut uring) = ring(&in_use) else {
            return;
        };
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        let (b, _b_peer) = UnixStream::pair().unwrap();
        let frame = Bytes::from_static(b"frame");
        uring.push(a.as_raw_fd(), [&frame].into_iter());
        uring.push(b.as_raw_fd(), [&frame, &frame].into_iter());
        uring.fail_next = true;
        let results: Vec<_> = uring.submit().collect();
        assert_eq!(results.len(), 2);
        assert!(results.iter().all(Result::is_err), "{results:?}");
        // The shard goes back to send(2) and stops counting as an io_uring shard ...
        assert!(uring.failed());
        assert_eq!(in_use.load(Ordering::Relaxed), 0);
        // ... and the ring and the buffer the kernel may still read were leaked, not freed.
        assert_eq!(ABANDONED.with(Cell::get), 1);

        // The rest of that flush goes out with send(2), from a buffer of its own.
        let after = Bytes::from_static(b"after");
        uring.push(a.as_raw_fd(), [&after].into_iter());
        let results: Vec<usize> = uring.submit().map(Result::unwrap).collect();
        assert_eq!(results, [5]);
        // The kernel had taken the failed submission's send too, so "frame" may come first.
        let got = read_available(&mut a_peer);
        assert!(got == b"after" || got == b"frameafter", "{got:?}");
        drop(uring);
        assert_eq!(in_use.load(Ordering::Relaxed), 0);
        assert_eq!(ABANDONED.with(Cell::get), 1);
    }

    /// CI runs the tests with `WSHUB_REQUIRE_IO_URING=1`, so that the io-uring feature's tests
    /// cannot pass on a machine that refused every ring (they would have tested `send(2)`).
    #[tokio::test]
    async fn every_shard_writes_with_io_uring_when_required() {
        let shards = 2;
        let config = crate::HubConfig::builder().shards(shards).build().unwrap();
        let hub = crate::Hub::with_config(config);
        hub.ensure_started();
        let found = hub.stats().io_uring_shards;
        if std::env::var_os("WSHUB_REQUIRE_IO_URING").is_some_and(|v| v == "1") {
            assert_eq!(found, shards, "shards writing with io_uring");
        } else {
            eprintln!("{found} of {shards} shards write with io_uring");
        }
        hub.run(async {}).await;
        assert_eq!(hub.stats().io_uring_shards, 0, "after shutdown");
    }
}
