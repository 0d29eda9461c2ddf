//! The slow clients of a disturbed step: subscribed when it starts and never read, then read
//! once at its end (bounded in bytes and time) to find what they had received and whether the
//! server closed them.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use super::outcome::SlowSeen;
use super::plan::Kind;
use super::receive::READ_BUF;
use super::worker::{sock, timed_write, Ctx, Lk};
use crate::ws::{self, opcode, FrameParser};

/// Subscribes every slow connection of this thread (they never read afterwards).
pub(super) async fn subscribe_slow(ctx: &Arc<Ctx>) {
    let slow: Vec<(usize, u32)> = ctx
        .local
        .lk()
        .conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.kind == Kind::Slow && c.open)
        .map(|(i, c)| (i, c.ch))
        .collect();
    let mut frame = Vec::new();
    for (li, ch) in slow {
        let Some(s) = sock(ctx, li) else { continue };
        frame.clear();
        ws::subscribe_frame(&mut frame, &ctx.plan.channels[ch as usize], true);
        if timed_write(&s, &frame).await.is_err() {
            ctx.local.lk().counts.error("slow client subscribe failed");
        }
    }
}

/// Reads what the slow connections were sent (bounded in bytes and time): the messages they
/// hold, and whether the server closed them.
pub(super) async fn read_slow(ctx: &Arc<Ctx>) -> SlowSeen {
    let mut seen = SlowSeen::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let idx: Vec<usize> = ctx
        .local
        .lk()
        .conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.kind == Kind::Slow)
        .map(|(i, _)| i)
        .collect();
    let mut buf = vec![0u8; READ_BUF];
    for li in idx {
        seen.clients += 1;
        let Some(s) = sock(ctx, li) else { continue };
        let ch = ctx.local.lk().conns[li].ch;
        let ms = ctx.shared.chans[ch as usize].measure_start.load(Relaxed);
        let mut parser = FrameParser::default();
        let mut code = None;
        let mut eof = false;
        let mut received = 0;
        // At most 64 MiB per connection; a connection still sending after that is left open.
        for _ in 0..1024 {
            let r = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(200)),
                s.readable(),
            )
            .await;
            if r.is_err() {
                break;
            }
            match s.try_read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => parser.feed(&buf[..n], &mut |f| match f.op {
                    opcode::CLOSE => code = Some(ws::close_code(f.head).unwrap_or(1005)),
                    _ => {
                        if let Some((seq, _)) = ws::scan_message(f.head) {
                            if seq >= ms {
                                received += 1;
                            }
                        }
                    }
                }),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        seen.received += received;
        if let Some(c) = code {
            *seen.close_codes.entry(c.to_string()).or_default() += 1;
        }
        if code.is_some() || eof {
            seen.closed_by_server += 1;
        }
    }
    seen
}
