//! A `redis-server` of this run's own, on a free loopback port, for several embedded nodes
//! when no `--redis-url` is given. It keeps nothing on disk and is killed when dropped (and,
//! on Linux, when this process dies).

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` child.
pub(crate) struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts `redis-server` on 127.0.0.1 at a free port and waits (up to 5 s) until it
    /// answers PING.
    pub(crate) fn start() -> Result<RedisServer, String> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port for redis-server: {e}"))?
            .port();
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
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "--nodes 2 needs Redis: redis-server is not on the PATH; install it \
                 (e.g. `apt-get install redis-server`, or .ci/install-redis.sh) or pass \
                 --redis-url redis://HOST:PORT/"
                    .to_string()
            } else {
                format!("cannot start redis-server: {e}")
            }
        })?;
        let mut server = RedisServer { child, port };
        let t0 = Instant::now();
        // Bounded: 5 s.
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "redis-server exited at once ({status}); pass --redis-url to use a running one"
                ));
            }
            if ping(port) {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        server.stop();
        Err(format!(
            "redis-server did not answer on 127.0.0.1:{port} within 5 s; pass --redis-url to use a running one"
        ))
    }

    /// Where it listens.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Its process id (for its CPU time).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
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
