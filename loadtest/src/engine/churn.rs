//! Churn during a disturbed step: connections opened at a steady rate that subscribe, hold for
//! a while and leave, and togglers that flip a subscription on and off, all counted; none of
//! them is measured.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sock::Sock;

use super::plan::Churn;
use super::worker::{timed_write, Ctx, Lk};
use crate::conn::{self, ConnectOpts};
use crate::ws::{self, opcode, FrameParser};

/// Churn during a disturbed step: connections that come and go, and togglers.
pub(super) async fn churn_task(ctx: Arc<Ctx>, churn: Churn) {
    let channels = ctx.plan.channels.len().max(1);
    let targets = &ctx.plan.targets;
    // Togglers: connected at the start of the step, each flips its subscription in turn.
    let mut togglers: Vec<(Arc<Sock>, bool, usize)> = Vec::new();
    for i in 0..churn.togglers {
        match conn::connect(
            &targets[i % targets.len()],
            ConnectOpts::default(),
            Duration::from_secs(5),
        )
        .await
        {
            Ok(c) => {
                let s = Arc::new(c.stream);
                tokio::spawn(discard(ctx.clone(), s.clone()));
                togglers.push((s, false, i % channels));
            }
            Err(_) => ctx.churn.lk().connect_failures += 1,
        }
    }
    let start = Instant::now();
    let mut connects_done = 0u64;
    let mut toggles_done = 0u64;
    let mut next_toggler = 0usize;
    let mut frame = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !ctx.churn_stop.load(Relaxed) {
        tick.tick().await;
        let t = start.elapsed().as_secs_f64();
        let want = (t * churn.connects_per_s) as u64;
        // Bounded per tick so a slow server cannot make this spawn without limit.
        for _ in 0..(want.saturating_sub(connects_done)).min(64) {
            connects_done += 1;
            let ctx2 = ctx.clone();
            let ch = (connects_done as usize) % channels;
            let node = (connects_done as usize) % targets.len();
            tokio::spawn(async move {
                match conn::connect(
                    &ctx2.plan.targets[node],
                    ConnectOpts::default(),
                    Duration::from_secs(5),
                )
                .await
                {
                    Ok(c) => {
                        ctx2.churn.lk().connects += 1;
                        let s = Arc::new(c.stream);
                        let mut f = Vec::new();
                        ws::subscribe_frame(&mut f, &ctx2.plan.channels[ch], true);
                        let _ = timed_write(&s, &f).await;
                        let _ = tokio::time::timeout(churn.hold, discard(ctx2.clone(), s)).await;
                        ctx2.churn.lk().disconnects += 1;
                    }
                    Err(_) => ctx2.churn.lk().connect_failures += 1,
                }
            });
        }
        connects_done = connects_done.max(want.saturating_sub(64));
        if !togglers.is_empty() {
            let want = (t * churn.toggles_per_s) as u64;
            for _ in 0..(want.saturating_sub(toggles_done)).min(1024) {
                toggles_done += 1;
                let k = next_toggler % togglers.len();
                let (s, subscribed, ch) = &mut togglers[k];
                next_toggler += 1;
                *subscribed = !*subscribed;
                frame.clear();
                ws::subscribe_frame(&mut frame, &ctx.plan.channels[*ch], *subscribed);
                if timed_write(s, &frame).await.is_ok() {
                    let mut c = ctx.churn.lk();
                    if *subscribed {
                        c.subscribes += 1;
                    } else {
                        c.unsubscribes += 1;
                    }
                }
            }
            toggles_done = toggles_done.max(want.saturating_sub(1024));
        }
    }
    // Dropping the togglers' sockets here closes them (their discard tasks end on EOF or stop).
    drop(togglers);
}

/// Reads and throws away everything a connection gets, answering pings, until it closes or
/// the churn stops.
pub(super) async fn discard(ctx: Arc<Ctx>, s: Arc<Sock>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut parser = FrameParser::default();
    let mut pongs = Vec::new();
    while !ctx.churn_stop.load(Relaxed) {
        if tokio::time::timeout(Duration::from_millis(100), s.readable())
            .await
            .is_err()
        {
            continue;
        }
        match s.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => parser.feed(&buf[..n], &mut |f| {
                if f.op == opcode::PING {
                    ws::client_frame(&mut pongs, opcode::PONG, f.head);
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        if !pongs.is_empty() {
            let _ = timed_write(&s, &pongs).await;
            pongs.clear();
        }
    }
}
