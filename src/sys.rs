//! Process limits a hub with many connections needs.

use std::io;

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its hard limit, and
/// returns the new soft limit. Each connection is one file descriptor, so a hub or a load
/// generator holding many needs this; the common default soft limit is 1,024.
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
