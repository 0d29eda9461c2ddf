//! A `redis-server` of this run's own, on a free loopback port, for several embedded nodes
//! when no `--redis-url` is given. It keeps nothing on disk and is killed when dropped (and,
//! on Linux, when this process dies). `recover --restart-redis-at` kills it mid-run and starts
//! it again, empty, on the same port.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A running `redis-server` child.
pub(crate) struct RedisServer {
    /// Behind a lock so that a restart can replace it through a shared reference (the run
    /// holds the server by `&`).
    child: Mutex<Child>,
    port: u16,
}

impl RedisServer {
    /// Starts `redis-server` on 127.0.0.1 at a free port and waits (up to 5 s) until it
    /// answers PING. The port is free when chosen, but another process may bind it before
    /// redis-server does: then redis-server exits at once, and another port is tried (three
    /// in all).
    pub(crate) fn start() -> Result<RedisServer, String> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("cannot find a free port for redis-server: {e}"))?
                .port();
            match spawn_on(port) {
                Ok(child) => {
                    return Ok(RedisServer {
                        child: Mutex::new(child),
                        port,
                    })
                }
                Err(Failed::ExitedAtOnce(_)) if attempts < 3 => continue,
                Err(Failed::ExitedAtOnce(why) | Failed::Other(why)) => return Err(why),
            }
        }
    }

    /// Kills it (SIGKILL: nothing is saved, every connection is cut), waits `pause`, and
    /// starts it again on the same port, empty; returns once it answers PING, with how long
    /// it was away (from the kill to the first PONG). Call it from the thread that started
    /// it: on Linux the child dies with the thread that spawned it (PR_SET_PDEATHSIG).
    pub(crate) fn restart(&self, pause: Duration) -> Result<Duration, String> {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let t0 = Instant::now();
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(pause);
        *child =
            spawn_on(self.port).map_err(|e| format!("restarting redis-server: {}", e.why()))?;
        Ok(t0.elapsed())
    }

    /// Where it listens.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Its process id (for its CPU time).
    pub(crate) fn pid(&self) -> u32 {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .id()
    }

    fn stop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        stop(child);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stop(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Why `redis-server` could not be started.
enum Failed {
    /// It exited before answering: most likely, its port was taken.
    ExitedAtOnce(String),
    Other(String),
}

impl Failed {
    fn why(self) -> String {
        match self {
            Failed::ExitedAtOnce(why) | Failed::Other(why) => why,
        }
    }
}

/// Starts `redis-server` on 127.0.0.1:`port` and waits (up to 5 s) until it answers PING.
fn spawn_on(port: u16) -> Result<Child, Failed> {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: prctl is async-signal-safe, and the closure touches nothing else.
        unsafe {
            cmd.pre_exec(|| {
                // Killed with us, even if we are killed without a chance to clean up.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(|e| {
        Failed::Other(if e.kind() == std::io::ErrorKind::NotFound {
            "--nodes 2 needs Redis: redis-server is not on the PATH; install it \
             (e.g. `apt-get install redis-server`, or .ci/install-redis.sh) or pass \
             --redis-url redis://HOST:PORT/"
                .to_string()
        } else {
            format!("cannot start redis-server: {e}")
        })
    })?;
    let t0 = Instant::now();
    // Bounded: 5 s.
    while t0.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Failed::ExitedAtOnce(format!(
                "redis-server exited at once on port {port} ({status}); pass --redis-url to use a \
                 running one"
            )));
        }
        if ping(port) {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop(&mut child);
    Err(Failed::Other(format!(
        "redis-server did not answer on 127.0.0.1:{port} within 5 s; pass --redis-url to use a running one"
    )))
}

/// Whether Redis answers PING on 127.0.0.1:`port`.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
