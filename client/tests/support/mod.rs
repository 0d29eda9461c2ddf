//! Helpers for the client's tests: a hub served on a loopback port (as the hub's own
//! `tests/support/mod.rs` does), a TCP proxy whose connections a test can kill, and bounded
//! waits for the client's events. Every wait fails with a message after [`DEADLINE`].

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wshub::{Hub, HubConfig};
use wshub_client::{Event, Events};

/// How long any single wait may take before the test fails. Generous: the machine is noisy.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Awaits `future`, failing the test with `what` if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Polls `condition` every 10 ms until it holds, failing after [`DEADLINE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// The next event, failing if none comes within [`DEADLINE`] or the stream has ended.
pub async fn next_event(events: &mut Events, what: &str) -> Event {
    within(what, events.recv())
        .await
        .unwrap_or_else(|| panic!("the events ended while waiting for {what}"))
}

/// Reads events until one matches `wanted` (at most 10,000, within [`DEADLINE`] in all);
/// returns it and the events read before it.
pub async fn wait_for_event(
    events: &mut Events,
    what: &str,
    mut wanted: impl FnMut(&Event) -> bool,
) -> (Event, Vec<Event>) {
    within(what, async {
        let mut before = Vec::new();
        for _ in 0..10_000 {
            let event = events
                .recv()
                .await
                .unwrap_or_else(|| panic!("the events ended while waiting for {what}: {before:?}"));
            if wanted(&event) {
                return (event, before);
            }
            before.push(event);
        }
        panic!("no {what} in 10,000 events: {before:?}")
    })
    .await
}

/// A hub served by [`wshub::serve`] on a loopback port.
pub struct TestHub {
    pub hub: Hub,
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestHub {
    /// A hub with `config` on 127.0.0.1 and an ephemeral port.
    pub async fn start(config: HubConfig) -> TestHub {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        TestHub::serve(config, listener)
    }

    /// A hub with `config` on `addr` (a port a previous hub had: retried for a while, as the
    /// port may take a moment to be free).
    pub async fn start_on(config: HubConfig, addr: SocketAddr) -> TestHub {
        let listener = within(&format!("binding {addr} again"), async {
            loop {
                match TcpListener::bind(addr).await {
                    Ok(listener) => return listener,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await;
        TestHub::serve(config, listener)
    }

    fn serve(config: HubConfig, listener: TcpListener) -> TestHub {
        let hub = Hub::with_config(config);
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(wshub::serve(listener, hub.clone(), async move {
            let _ = rx.await;
        }));
        TestHub {
            hub,
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// `ws://ADDR/ws`
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Shuts the hub down (every client gets 1001) and waits until its listener is closed.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            within("serve to return after shutdown", task)
                .await
                .expect("serve task panicked");
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`: the client connects through it, and
/// [`Proxy::cut`] kills its connections (a reset towards the client, as a network failure).
pub struct Proxy {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tasks = Arc::clone(&connections);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let forward = tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    // Dropped (when cut) with SO_LINGER 0: the client sees a reset.
                    let _ = inbound.set_zero_linger();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                tasks.lock().unwrap().push(forward);
            }
        });
        Proxy {
            addr,
            connections,
            accept,
        }
    }

    /// `ws://PROXY/ws`
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Kills every connection through the proxy; returns how many were still open.
    pub fn cut(&self) -> usize {
        let tasks: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        let open = tasks.iter().filter(|task| !task.is_finished()).count();
        for task in tasks {
            task.abort();
        }
        open
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
