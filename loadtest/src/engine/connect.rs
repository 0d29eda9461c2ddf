//! Opening a generator thread's connections: at most CONNECT_CONCURRENCY handshakes at once,
//! each measured subscriber subscribed as soon as it is open and handed to its reader, and
//! failures counted by kind so the run can refuse to start on a partial set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::plan::Kind;
use super::receive::{process, reader, READ_BUF};
use super::worker::{Ctx, Lk, WRITE_TIMEOUT};
use crate::conn::{self, ConnectOpts};
use crate::ws;

/// Connections each generator thread opens at once.
pub(super) const CONNECT_CONCURRENCY: usize = 128;

pub(super) async fn connect_all(ctx: &Arc<Ctx>, mine: &[usize]) -> BTreeMap<String, u64> {
    let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let failed: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut handles = Vec::new();
    for (li, &g) in mine.iter().enumerate() {
        let (ctx, sem, failed) = (ctx.clone(), sem.clone(), failed.clone());
        handles.push(tokio::spawn(async move {
            let Ok(_permit) = sem.acquire().await else {
                return;
            };
            let spec = ctx.plan.conns[g];
            let opts = ConnectOpts {
                recv_buffer: if spec.kind == Kind::Slow {
                    ctx.plan.slow_recv_buffer
                } else {
                    ctx.plan.recv_buffer
                },
                source: (ctx.plan.sources > 1).then(|| (g % ctx.plan.sources as usize) as u8),
            };
            let target = &ctx.plan.targets[usize::from(spec.node) % ctx.plan.targets.len()];
            match conn::connect(target, opts, Duration::from_secs(10)).await {
                Ok(c) => {
                    let sock = Arc::new(c.stream);
                    if spec.kind == Kind::Subscriber {
                        let mut frame = Vec::new();
                        ws::subscribe_frame(
                            &mut frame,
                            &ctx.plan.channels[spec.channel as usize],
                            true,
                        );
                        if let Err(e) = tokio::time::timeout(WRITE_TIMEOUT, sock.write_all(&frame))
                            .await
                            .unwrap_or(Err(std::io::ErrorKind::TimedOut.into()))
                        {
                            *failed
                                .lk()
                                .entry(format!("subscribe write: {e}"))
                                .or_default() += 1;
                            return;
                        }
                    }
                    ctx.local.lk().conns[li].open = true;
                    ctx.socks.lk()[li] = Some(sock.clone());
                    if spec.kind == Kind::Subscriber {
                        if !c.leftover.is_empty() {
                            let mut l = ctx.local.lk();
                            let n = c.leftover.len().min(READ_BUF);
                            l.buf[..n].copy_from_slice(&c.leftover[..n]);
                            let mut pongs = Vec::new();
                            process(&ctx, &mut l, li, n, &mut pongs);
                        }
                        tokio::spawn(reader(ctx.clone(), li, sock));
                    }
                }
                Err(e) => *failed.lk().entry(e.kind().to_string()).or_default() += 1,
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    Arc::try_unwrap(failed)
        .map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner))
        .unwrap_or_default()
}
