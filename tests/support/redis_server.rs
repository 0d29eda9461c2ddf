//! A `redis-server` of a test's own, on a free loopback port, for the tests of the Redis
//! broker (tests/redis_broker.rs) and of histories in Redis (tests/redis_history.rs): each
//! test that must kill or restart its broker starts its own rather than share one.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wshub::{HubConfig, Message};

use super::{wait_until, within, Server};

/// A `redis-server` child process on 127.0.0.1, killed when dropped.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers. The port is free when chosen,
    /// but another process may bind it first: then redis-server exits at once, and another
    /// port is tried (three in all).
    pub async fn start() -> RedisServer {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let port = {
                let listener =
                    std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
                listener.local_addr().expect("local addr").port()
            };
            let mut server = RedisServer { port, child: None };
            match server.try_start().await {
                Ok(()) => return server,
                Err(why) if attempts < 3 => eprintln!("{why}; trying another port"),
                Err(why) => panic!("{why}"),
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server again on its port, and waits until it answers PING.
    pub async fn restart(&mut self) {
        if let Err(why) = self.try_start().await {
            panic!("{why}");
        }
    }

    /// Starts the server on its port and waits until it answers PING; an error if it exits
    /// first (its port was taken).
    async fn try_start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "redis-server is already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? see .ci/install-redis.sh)");
        // Held by `self` while waiting, so that a timeout's panic still kills it (Drop).
        let child = self.child.insert(child);
        let port = self.port;
        let exited = within("redis-server to answer PING", async {
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(status);
                }
                if ping(port).await {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        match exited {
            None => Ok(()),
            Some(status) => {
                self.child = None;
                Err(format!(
                    "redis-server exited at once on port {port} ({status})"
                ))
            }
        }
    }

    /// SIGKILL: no goodbye to any client.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A plain client, as another program would use.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("a redis url");
        within(
            "a plain redis connection",
            client.get_multiplexed_async_connection(),
        )
        .await
        .expect("connect to redis-server")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis server answers PING on 127.0.0.1:`port`.
pub async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).await.ok()?;
        (&buf == b"+PONG\r\n").then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(()))
    )
}

/// How many subscribers Redis counts on `key`.
pub async fn numsub(redis: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(key)
        .query_async(redis)
        .await
        .expect("PUBSUB NUMSUB");
    count
}

/// Polls until Redis counts `expected` subscribers on `key`.
pub async fn wait_numsub(redis: &RedisServer, key: &str, expected: i64) {
    let mut conn = redis.client().await;
    within(&format!("{expected} subscribers on {key}"), async {
        while numsub(&mut conn, key).await != expected {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// `PUBSUB CHANNELS pattern`.
pub async fn pubsub_channels(
    redis: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> usize {
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(pattern)
        .query_async(redis)
        .await
        .expect("PUBSUB CHANNELS");
    channels.len()
}

/// How many times Redis ran `command` (from INFO commandstats).
pub async fn command_calls(redis: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .expect("INFO commandstats");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("a number of calls"))
}

/// A hub with `config` (which holds a broker) served on 127.0.0.1, once its broker is
/// connected.
pub async fn start_node(config: HubConfig) -> Server {
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    wait_until("the broker to connect", move || {
        hub.stats().broker.is_some_and(|b| b.connected)
    })
    .await;
    server
}

/// A sequenced message from `source`: `{"source": …, "seq": …}` in `data`.
pub fn seq_message(source: &str, seq: u64) -> Message {
    Message::new("event").with_data(json!({"source": source, "seq": seq}))
}
