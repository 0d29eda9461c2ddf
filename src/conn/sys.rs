//! What wshub asks of the operating system itself, rather than through tokio: the limit on
//! open files a hub with many connections needs, and the shard's write to a socket.

use std::io::{self, IoSlice};
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

/// A helper for servers holding many connections: raises this process's soft limit on open
/// files (`RLIMIT_NOFILE`) to its hard limit, and returns the new soft limit.
///
/// Each connection is one file descriptor, and the common default soft limit is 1,024, so a
/// server expecting more clients than that calls this once at startup, before it serves (the
/// hub itself never changes the limit). Past the hard limit, the operating system's
/// configuration must change (`ulimit -Hn`, systemd's `LimitNOFILE=`).
///
/// ```
/// let limit = wshub::raise_fd_limit().unwrap();
/// assert!(limit >= 64);
/// ```
///
/// # Errors
///
/// The operating system refused to read or set the limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live, properly aligned one.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit only reads the `rlimit` it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Writes `buf` to `stream` without blocking, with one `send(2)` and nothing else: the write a
/// shard makes to a client with nothing queued, thousands of times per publish.
///
/// `TcpStream::try_write` would first load the socket's readiness from tokio's reactor, a
/// separate allocation per connection and so one more cache miss per delivery at 10,000
/// clients, only to learn what the kernel says anyway. The price is that tokio does not see
/// the `WouldBlock` this returns: the connection task that then takes over the write must
/// write through tokio (`TcpStream::try_write`) before it waits for writability, so that the
/// reactor clears its stale readiness (see `conn/mod.rs`).
#[cfg(target_os = "linux")]
pub(crate) fn send(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the descriptor is open while `stream` is borrowed, and `send` reads at most
    // `buf.len()` bytes from a live slice. MSG_NOSIGNAL: a peer that is gone is an error
    // here, not a SIGPIPE for the whole process.
    let sent = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    bytes_sent(sent)
}

/// [`send`] of several buffers in order, with one `sendmsg(2)`.
#[cfg(target_os = "linux")]
pub(crate) fn send_vectored(stream: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero `msghdr` is valid (no address, no control data).
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is guaranteed to be ABI-compatible with `iovec` on Unix.
    message.msg_iov = bufs.as_ptr().cast_mut().cast();
    message.msg_iovlen = bufs.len() as _;
    // SAFETY: as for `send`; `sendmsg` only reads the `iovec`s and the slices they point to.
    let sent = unsafe {
        libc::sendmsg(
            stream.as_raw_fd(),
            &message,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    bytes_sent(sent)
}

/// What `send` or `sendmsg` returned: the bytes sent, or the error in `errno`.
#[cfg(target_os = "linux")]
fn bytes_sent(returned: isize) -> io::Result<usize> {
    usize::try_from(returned).map_err(|_| io::Error::last_os_error())
}

/// Elsewhere the shard writes through tokio.
#[cfg(not(target_os = "linux"))]
pub(crate) fn send(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    stream.try_write(buf)
}

/// Elsewhere the shard writes through tokio.
#[cfg(not(target_os = "linux"))]
pub(crate) fn send_vectored(stream: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    stream.try_write_vectored(bufs)
}
