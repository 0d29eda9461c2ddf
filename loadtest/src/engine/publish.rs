//! Publishing, done by the thread that holds each channel's first subscriber (its publisher):
//! the warm-up that proves subscriptions live, closed-loop rounds (a window of publishes, then
//! wait until every subscriber has them), broadcasts (one publish at a time, each timed to its
//! last receiver), and the open-loop clock (a fixed rate in 1 ms ticks, each message stamped
//! with its scheduled time). Every publish takes the channel's next sequence number.

use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shared::PH_WARMUP;
use super::worker::{sock, timed_write, Ctx, Lk};
use crate::ws;

/// Open loop: most publishes one channel sends per 1 ms tick; the rest count as behind schedule.
pub(super) const MAX_BATCH: u64 = 4096;
/// Open loop: lateness up to this is put down to the tick, not counted as latency (see
/// `open_loop`); beyond it, a message's latency counts from its scheduled time plus this.
pub(super) const SCHEDULE_SLACK_NS: u64 = 2_000_000;
/// A closed-loop round not complete after this long is counted as a round timeout.
pub(super) const ROUND_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes one message every 50 ms on each channel not yet live everywhere, until the first
/// step begins.
pub(super) async fn warmup(ctx: Arc<Ctx>, publishes: Vec<(u32, usize)>) {
    let mut frame = Vec::new();
    // Bounded by the live timeout of the plan.
    let deadline = Instant::now() + ctx.plan.live_timeout + Duration::from_secs(1);
    while ctx.shared.phase.load(Relaxed) == PH_WARMUP && Instant::now() < deadline {
        for &(ch, li) in &publishes {
            let c = &ctx.shared.chans[ch as usize];
            if c.live.load(Relaxed) >= c.subs.load(Relaxed) {
                continue;
            }
            let Some(s) = sock(&ctx, li) else { continue };
            frame.clear();
            let seq = c.next_seq.fetch_add(1, Relaxed);
            ws::publish_frame(
                &mut frame,
                &ctx.plan.channels[ch as usize],
                seq,
                ctx.shared.now_ns(),
                ctx.plan.payload,
            );
            if let Err(e) = timed_write(&s, &frame).await {
                ctx.local.lk().counts.error(e);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Closed loop on one channel: `window` publishes in one write, then wait for every subscriber.
pub(super) async fn rounds(ctx: Arc<Ctx>, ch: u32, li: usize, window: u32) {
    let c = &ctx.shared.chans[ch as usize];
    let name = &ctx.plan.channels[ch as usize];
    let mut batch = Vec::new();
    while !ctx.stop.load(Relaxed) {
        let Some(s) = sock(&ctx, li) else { return };
        let s0 = c.next_seq.load(Relaxed);
        c.got.store(0, Relaxed);
        c.round_start.store(s0, Relaxed);
        batch.clear();
        let now = ctx.shared.now_ns();
        for k in 0..u64::from(window) {
            ws::publish_frame(&mut batch, name, s0 + k, now, ctx.plan.payload);
        }
        c.next_seq.store(s0 + u64::from(window), Relaxed);
        if let Err(e) = timed_write(&s, &batch).await {
            ctx.local.lk().counts.error(e);
            return;
        }
        let deadline = tokio::time::Instant::now() + ROUND_TIMEOUT;
        loop {
            if ctx.stop.load(Relaxed)
                || c.got.load(Relaxed) >= u64::from(window) * c.subs.load(Relaxed)
            {
                break;
            }
            if tokio::time::timeout_at(deadline, c.notify.notified())
                .await
                .is_err()
            {
                ctx.local.lk().counts.error("round timeout");
                break;
            }
        }
        ctx.local.lk().counts.rounds += 1;
    }
}

/// Broadcasts: the pause before each, so that it starts on a quiet hub and generator (the
/// previous one's writes and reads are over) and is measured on its own.
pub(super) const BROADCAST_GAP: Duration = Duration::from_millis(100);

/// The longest `count` broadcasts can take, each waiting BROADCAST_GAP and then at most
/// ROUND_TIMEOUT for its last receiver, plus a second for the write and the step's ends: the
/// bound of a broadcasts step.
pub(crate) fn broadcasts_bound(count: u32) -> Duration {
    (BROADCAST_GAP + ROUND_TIMEOUT) * count + Duration::from_secs(1)
}

/// `count` publishes on one channel, one at a time: each waits until every subscriber has it
/// (or ROUND_TIMEOUT, counted as an error), and one that every subscriber got records the
/// latency of its last receiver. Then the publisher counts itself finished, so that the step
/// can end without waiting for its whole duration (the bound).
pub(super) async fn broadcasts(ctx: Arc<Ctx>, ch: u32, li: usize, count: u32) {
    let c = &ctx.shared.chans[ch as usize];
    let name = &ctx.plan.channels[ch as usize];
    let mut frame = Vec::new();
    for _ in 0..count {
        tokio::time::sleep(BROADCAST_GAP).await;
        if ctx.stop.load(Relaxed) {
            break;
        }
        let Some(s) = sock(&ctx, li) else { break };
        let seq = c.next_seq.load(Relaxed);
        c.got.store(0, Relaxed);
        c.round_max_ns.store(0, Relaxed);
        c.round_start.store(seq, Relaxed);
        frame.clear();
        ws::publish_frame(&mut frame, name, seq, ctx.shared.now_ns(), ctx.plan.payload);
        c.next_seq.store(seq + 1, Relaxed);
        if let Err(e) = timed_write(&s, &frame).await {
            ctx.local.lk().counts.error(e);
            break;
        }
        let deadline = tokio::time::Instant::now() + ROUND_TIMEOUT;
        let complete = loop {
            // Acquire: pairs with the receivers' Release on `got`, so `round_max_ns` is theirs.
            if c.got.load(Acquire) >= c.subs.load(Relaxed) {
                break true;
            }
            if ctx.stop.load(Relaxed) {
                break false;
            }
            if tokio::time::timeout_at(deadline, c.notify.notified())
                .await
                .is_err()
            {
                ctx.local.lk().counts.error("broadcast timeout");
                break false;
            }
        };
        let mut l = ctx.local.lk();
        l.counts.rounds += 1;
        if complete {
            l.counts
                .last_receiver_ns
                .push(c.round_max_ns.load(Relaxed).max(1));
        }
    }
    ctx.shared.finished.fetch_add(1, Relaxed);
}

/// Open loop over this thread's channels, each at `per_channel` publishes per second.
pub(super) async fn open_loop(ctx: Arc<Ctx>, publishes: Vec<(u32, usize)>, per_channel: f64) {
    let base = ctx.shared.now_ns();
    let mut sent = vec![0u64; publishes.len()];
    let mut batch = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let gap = 1e9 / per_channel.max(1e-9);
    while !ctx.stop.load(Relaxed) {
        tick.tick().await;
        for (i, &(ch, li)) in publishes.iter().enumerate() {
            if ctx.stop.load(Relaxed) {
                break;
            }
            let elapsed = ctx.shared.now_ns().saturating_sub(base) as f64;
            let due = (elapsed / gap) as u64 + 1;
            if due <= sent[i] {
                continue;
            }
            let mut n = due - sent[i];
            if n > MAX_BATCH {
                ctx.local.lk().counts.behind += n - MAX_BATCH;
                sent[i] += n - MAX_BATCH;
                n = MAX_BATCH;
            }
            let Some(s) = sock(&ctx, li) else { continue };
            let c = &ctx.shared.chans[ch as usize];
            let s0 = c.next_seq.load(Relaxed);
            batch.clear();
            let now = ctx.shared.now_ns();
            for k in 0..n {
                // The scheduled time, forgiving up to SCHEDULE_SLACK of lateness: that much is
                // the 1 ms tick's granularity, not a backlog, and would only blur the latency.
                let scheduled = base + ((sent[i] + k) as f64 * gap) as u64;
                let at = now.min(scheduled + SCHEDULE_SLACK_NS);
                ws::publish_frame(
                    &mut batch,
                    &ctx.plan.channels[ch as usize],
                    s0 + k,
                    at,
                    ctx.plan.payload,
                );
            }
            c.next_seq.store(s0 + n, Relaxed);
            sent[i] += n;
            if let Err(e) = timed_write(&s, &batch).await {
                ctx.local.lk().counts.error(e);
            }
        }
    }
}
