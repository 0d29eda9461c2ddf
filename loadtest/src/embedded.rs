//! A wshub hub in this process, on its own tokio runtime and threads, so that the load
//! generator's threads and the hub's never share a scheduler.

use std::net::SocketAddr;
use std::time::Duration;

use crate::report::{BrokerSnapshot, HubSnapshot};
use crate::sys;

/// Options of the embedded hub.
#[derive(Debug, Clone, Default)]
pub(crate) struct HubOptions {
    /// Worker threads of its runtime (None: available cores).
    pub(crate) threads: Option<usize>,
    /// Shards (None: the hub's default).
    pub(crate) shards: Option<usize>,
    /// CPUs its threads are pinned to (empty: any).
    pub(crate) cpus: Vec<usize>,
    /// Most bytes queued per client (None: the hub's default).
    pub(crate) queue_bytes: Option<usize>,
    /// What to do with a client over its queue bound (None: the hub's default).
    pub(crate) slow_consumer: Option<crate::cli::SlowConsumer>,
    /// A history for every channel whose name starts with `.0`, keeping `.1` publications
    /// for an hour (None: no history, the hub's default).
    pub(crate) history: Option<(String, usize)>,
}

/// How old a kept publication may be, with --history: longer than any run.
pub(crate) const HISTORY_AGE: Duration = Duration::from_secs(3600);

/// Joins an embedded hub to others through Redis.
#[derive(Debug, Clone)]
pub(crate) struct Join {
    /// The Redis server.
    pub(crate) url: String,
    /// This node's id (each node needs its own).
    pub(crate) node_id: String,
}

/// A running embedded hub.
pub(crate) struct Embedded {
    rt: Option<tokio::runtime::Runtime>,
    hub: wshub::Hub,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// The history it keeps, as the report's first line says it.
    history: Option<String>,
}

impl Embedded {
    /// Starts a hub that lets clients publish, serving `/ws` on 127.0.0.1 at a free port.
    /// With `join`, the hub has a Redis broker, and this returns once it is connected.
    ///
    /// With `tls`, the hub serves `wss://` through it (`wshub::tls::serve`).
    pub(crate) fn start(
        opts: &HubOptions,
        join: Option<&Join>,
        tls: Option<&wshub::tls::TlsAcceptor>,
    ) -> Result<Embedded, String> {
        let cpus = opts.cpus.clone();
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.enable_all()
            .thread_name(match join {
                Some(j) => format!("wshub-{}", j.node_id),
                None => "wshub-hub".into(),
            })
            .on_thread_start(move || {
                // Threads the hub starts from here (shards on OS threads, if any) inherit the pinning.
                let _ = sys::pin_current_thread(&cpus);
            });
        if let Some(n) = opts.threads {
            b.worker_threads(n);
        }
        let rt = b
            .build()
            .map_err(|e| format!("cannot start the hub's runtime: {e}"))?;
        let mut builder =
            wshub::HubConfig::builder().publish_policy(wshub::PublishPolicy::AllowAll);
        if let Some(n) = opts.shards {
            builder = builder.shards(n);
        }
        if let Some(n) = opts.queue_bytes {
            builder = builder.outbound_queue_bytes(n);
        }
        if let Some(p) = opts.slow_consumer {
            builder = builder.slow_consumer_policy(match p {
                crate::cli::SlowConsumer::Disconnect => wshub::SlowConsumerPolicy::Disconnect,
                crate::cli::SlowConsumer::DropOldest => wshub::SlowConsumerPolicy::DropOldest,
            });
        }
        if let Some((prefix, size)) = &opts.history {
            let policy = wshub::HistoryPolicy::new(*size, HISTORY_AGE)
                .map_err(|e| format!("bad history policy: {e}"))?;
            builder = builder.prefix_history(prefix.as_str(), policy);
        }
        if let Some(j) = join {
            let broker =
                wshub::RedisBroker::new(wshub::RedisConfig::new(&j.url).node_id(&j.node_id))
                    .map_err(|e| format!("bad Redis configuration: {e}"))?;
            builder = builder.broker(broker);
        }
        let config = builder
            .build()
            .map_err(|e| format!("bad hub configuration: {e}"))?;
        // Created on a hub thread, so that whatever threads it starts are pinned like it.
        let (hub, listener) = rt
            .block_on(async {
                tokio::spawn(async move {
                    let hub = wshub::Hub::with_config(config);
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await;
                    (hub, listener)
                })
                .await
            })
            .map_err(|e| format!("the hub's runtime failed: {e}"))?;
        let listener = listener.map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("no local address: {e}"))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stopped = async move {
            let _ = rx.await;
        };
        let served = match tls {
            None => rt.spawn(wshub::serve(listener, hub.clone(), stopped)),
            Some(acceptor) => rt.spawn(wshub::tls::serve(
                listener,
                acceptor.clone(),
                hub.clone(),
                stopped,
            )),
        };
        let e = Embedded {
            rt: Some(rt),
            hub,
            shutdown: Some(tx),
            served: Some(served),
            addr,
            history: opts.history.as_ref().map(|(prefix, size)| {
                format!(
                    "; history on {prefix}*: {size} publications, {} s",
                    HISTORY_AGE.as_secs()
                )
            }),
        };
        if let Some(j) = join {
            // Bounded: 50 polls of 100 ms.
            let mut up = false;
            for _ in 0..50 {
                if e.hub.stats().broker.is_some_and(|b| b.connected) {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !up {
                return Err(format!(
                    "node {}: the Redis broker could not connect to {} within 5 s (is Redis running there?)",
                    j.node_id,
                    crate::cli::redact(&j.url)
                ));
            }
        }
        Ok(e)
    }

    /// The hub's shape, for the report's first line.
    pub(crate) fn describe(&self) -> String {
        let threads = self.rt.as_ref().map_or(0, |rt| rt.metrics().num_workers());
        format!(
            "{} shards, {threads} runtime threads{}",
            self.hub.config().shards(),
            self.history.as_deref().unwrap_or("")
        )
    }

    /// The hub's counters now.
    pub(crate) fn snapshot(&self) -> HubSnapshot {
        let s = self.hub.stats();
        HubSnapshot {
            clients: s.clients as u64,
            channels: s.channels as u64,
            published: s.published,
            delivered: s.delivered,
            dropped: s.dropped,
            slow_consumer_disconnects: s.slow_consumer_disconnects,
            queued_bytes: s.queued_bytes,
            shard_clients: s.shard_clients.iter().map(|&n| n as u64).collect(),
            broker: s.broker.map(|b| BrokerSnapshot {
                connected: b.connected,
                reconnects: b.reconnects,
                sent: b.sent,
                received: b.received,
                send_dropped: b.send_dropped,
                receive_dropped: b.receive_dropped,
                channels: b.channels as u64,
            }),
        }
    }

    /// Shuts the hub down gracefully (within a few seconds) and stops its threads.
    pub(crate) fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let (Some(rt), Some(served)) = (self.rt.as_ref(), self.served.take()) {
            let _ =
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), served).await });
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
