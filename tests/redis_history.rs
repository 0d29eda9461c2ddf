//! Channel histories across nodes (PROTOCOL.md, "Several nodes"): hubs on one `redis-server`
//! (started by each test on a free loopback port) share offsets, epochs and histories that
//! live in Redis.
//!
//! `redis-server` must be on the PATH (`.ci/install-redis.sh` installs it).

#![cfg(feature = "redis")]

mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use wshub::{HistoryPolicy, Hub, HubConfig, Message, RedisBroker, RedisConfig};

// ---------------------------------------------------------------------------------------------
// A redis-server of the test's own (as in tests/redis_broker.rs)
// ---------------------------------------------------------------------------------------------

/// A `redis-server` child process on 127.0.0.1, killed when dropped.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    async fn start() -> RedisServer {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            listener.local_addr().expect("local addr").port()
        };
        let mut server = RedisServer { port, child: None };
        server.restart().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server (again, empty: no persistence) on its port.
    async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? see .ci/install-redis.sh)");
        self.child = Some(child);
        let port = self.port;
        within("redis-server to answer PING", async move {
            while !ping(port).await {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// SIGKILL: no goodbye to any client.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn client(&self) -> redis::aio::MultiplexedConnection {
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

async fn ping(port: u16) -> bool {
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

/// Polls until Redis counts `expected` subscribers on `key`.
async fn wait_numsub(redis: &RedisServer, key: &str, expected: i64) {
    let mut conn = redis.client().await;
    within(&format!("{expected} subscribers on {key}"), async {
        loop {
            let (_, count): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(key)
                .query_async(&mut conn)
                .await
                .expect("PUBSUB NUMSUB");
            if count == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Nodes and clients
// ---------------------------------------------------------------------------------------------

const CHANNEL: &str = "room:1";
const KEY: &str = "ws:channel:room:1";

/// A hub joined to `redis` that keeps a history of `room:` channels (10,000 publications,
/// an hour), its broker connected.
async fn node(redis: &RedisServer, id: &str) -> Server {
    let broker = RedisBroker::new(
        RedisConfig::new(redis.url())
            .node_id(id)
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200)),
    )
    .expect("a valid redis config");
    let config = HubConfig::builder()
        .shards(2)
        .outbound_queue_bytes(64 * 1024 * 1024)
        .prefix_history(
            "room:",
            HistoryPolicy::new(10_000, Duration::from_secs(3600)).unwrap(),
        )
        .broker(broker)
        .build()
        .expect("a valid hub config");
    let server = Server::start(config).await;
    let hub = server.hub.clone();
    wait_until("the broker to connect", move || {
        hub.stats().broker.is_some_and(|b| b.connected)
    })
    .await;
    server
}

fn seq_message(source: &str, seq: u64) -> Message {
    Message::new("event").with_data(json!({"source": source, "seq": seq}))
}

/// A publication a client got: its offset, epoch, source and seq.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Got {
    offset: u64,
    epoch: String,
    source: String,
    seq: u64,
}

/// Reads a client's publications in a task of its own (acknowledgements skipped).
struct Recorder {
    got: Arc<Mutex<Vec<Got>>>,
    task: JoinHandle<()>,
}

impl Recorder {
    fn spawn(mut ws: Ws) -> Recorder {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        let task = tokio::spawn(async move {
            while let Some(Ok(frame)) = ws.next().await {
                let WsMessage::Text(text) = frame else {
                    continue;
                };
                let json: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
                if json["type"] != "event" {
                    continue;
                }
                let (offset, epoch) = position_of(&text);
                sink.lock().unwrap().push(Got {
                    offset,
                    epoch,
                    source: json["data"]["source"].as_str().unwrap_or("").to_owned(),
                    seq: json["data"]["seq"].as_u64().expect("a seq"),
                });
            }
        });
        Recorder { got, task }
    }

    fn snapshot(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, count: usize) {
        let got = Arc::clone(&self.got);
        wait_until(what, move || got.lock().unwrap().len() >= count).await
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client of `server` subscribed to `channel` (plain), recording.
async fn subscriber(server: &Server, channel: &str) -> Recorder {
    let mut ws = server.connect().await;
    subscribe_since(&mut ws, channel, None).await;
    Recorder::spawn(ws)
}

/// Offsets `from..=to`, each once, in order, all in one epoch: the epoch.
fn assert_offsets(got: &[Got], from: u64, to: u64, who: &str) -> String {
    let offsets: Vec<u64> = got.iter().map(|g| g.offset).collect();
    let expected: Vec<u64> = (from..=to).collect();
    assert_eq!(offsets, expected, "{who}: offsets");
    let epoch = got.first().map(|g| g.epoch.clone()).unwrap_or_default();
    assert!(got.iter().all(|g| g.epoch == epoch), "{who}: one epoch");
    epoch
}

/// Publishes `count` messages from `source` with `publish_async`, returning their positions.
fn publisher(hub: Hub, source: &'static str, count: u64) -> JoinHandle<Vec<(u64, u64, String)>> {
    tokio::spawn(async move {
        let mut positions = Vec::new();
        for seq in 0..count {
            let position = hub
                .publish_async(CHANNEL, &seq_message(source, seq))
                .await
                .expect("publish")
                .expect("a position on a history channel");
            positions.push((seq, position.offset, position.epoch.to_string()));
        }
        positions
    })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Four publishers on two nodes, one channel: both nodes' clients get every publication
/// once, with the same offsets (1, 2, … without gaps), the same epoch and in the same order;
/// and `publish_async` returned exactly the position the clients saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_deliver_one_order_with_the_same_offsets() {
    const EACH: u64 = 500;
    let redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    let b = node(&redis, "b").await;
    let on_a = subscriber(&a, CHANNEL).await;
    let on_b = subscriber(&b, CHANNEL).await;
    wait_numsub(&redis, KEY, 2).await;

    let publishers = vec![
        publisher(a.hub.clone(), "a1", EACH),
        publisher(a.hub.clone(), "a2", EACH),
        publisher(b.hub.clone(), "b1", EACH),
        publisher(b.hub.clone(), "b2", EACH),
    ];
    let mut returned = HashMap::new();
    for (publisher, source) in publishers.into_iter().zip(["a1", "a2", "b1", "b2"]) {
        for (seq, offset, epoch) in within("the publishers", publisher).await.unwrap() {
            returned.insert((source.to_owned(), seq), (offset, epoch));
        }
    }
    let total = 4 * EACH;
    on_a.wait_for("every publication on a", total as usize)
        .await;
    on_b.wait_for("every publication on b", total as usize)
        .await;
    let (got_a, got_b) = (on_a.snapshot(), on_b.snapshot());
    let epoch = assert_offsets(&got_a, 1, total, "a");
    assert_offsets(&got_b, 1, total, "b");
    assert_eq!(got_a, got_b, "one order on both nodes");
    for g in &got_a {
        assert_eq!(
            returned[&(g.source.clone(), g.seq)],
            (g.offset, epoch.clone()),
            "publish_async returned the position the clients saw"
        );
    }
    // Each publisher's own messages in its order.
    for source in ["a1", "a2", "b1", "b2"] {
        let seqs: Vec<u64> = got_a
            .iter()
            .filter(|g| g.source == source)
            .map(|g| g.seq)
            .collect();
        assert_eq!(seqs, (0..EACH).collect::<Vec<_>>(), "{source} in order");
    }
    // The local histories hold the same as Redis numbered.
    let page = b.hub.history(CHANNEL, 0, 10).expect("a history channel");
    assert_eq!((&*page.epoch, page.latest), (&*epoch, total));
}
