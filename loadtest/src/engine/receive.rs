//! Reading the measured connections: one reader task per subscriber, reading into its thread's
//! buffer, and the hot path that parses what was read, answers pings, notes close codes, and
//! counts each delivery: its latency, and from its sequence number whether messages before it
//! were lost or it was seen already.

use std::sync::atomic::Ordering::{Relaxed, Release};
use std::sync::Arc;

use tokio::io::Interest;

use super::loss;
use super::plan::Kind;
use super::worker::{Ctx, Lk, Local, WRITE_TIMEOUT};
use crate::sock::Sock;
use crate::ws::{self, opcode};

/// Bytes per read. 64 KiB holds several hundred frames; a larger buffer gained nothing.
pub(super) const READ_BUF: usize = 64 * 1024;
/// Reads per wake-up of one connection before it yields to the others (fairness).
pub(super) const READS_PER_WAKE: usize = 8;

/// Reads one measured connection until it closes.
pub(super) async fn reader(ctx: Arc<Ctx>, li: usize, sock: Arc<Sock>) {
    let mut pongs = Vec::new();
    let why: String = 'outer: loop {
        if let Err(e) = sock.readable().await {
            break format!("read error: {e}");
        }
        let mut drained = false;
        for _ in 0..READS_PER_WAKE {
            let mut l = ctx.local.lk();
            let l = &mut *l;
            let r = if sock.is_tls() {
                // TLS: decrypted bytes, into the same buffer (the session reads the socket).
                sock.try_read(&mut l.buf[..])
            } else {
                read_plain(&ctx, l, li, sock.tcp(), &mut pongs)
            };
            match r {
                Ok(0) => break 'outer "closed by server".to_string(),
                Ok(n) => process(&ctx, l, li, n, &mut pongs),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => drained = true,
                Err(e) => break 'outer format!("read error: {}", e.kind()),
            }
            if drained || !pongs.is_empty() {
                break;
            }
        }
        if !pongs.is_empty() {
            let out = std::mem::take(&mut pongs);
            if tokio::time::timeout(WRITE_TIMEOUT, sock.write_all(&out))
                .await
                .is_err()
            {
                break "pong write timeout".to_string();
            }
        } else if !drained {
            // READS_PER_WAKE full buffers: let the other connections have a turn.
            tokio::task::yield_now().await;
        }
    };
    let mut l = ctx.local.lk();
    let code = l.conns[li].close_code;
    let kind = match code {
        Some(c) => format!("closed by server ({c})"),
        None => why,
    };
    l.counts.error(kind);
    l.conns[li].open = false;
    ctx.socks.lk()[li] = None;
    if l.conns[li].kind == Kind::Subscriber {
        let ch = &ctx.shared.chans[l.conns[li].ch as usize];
        ch.subs.fetch_sub(1, Relaxed);
        ch.notify.notify_one();
    }
}

/// Parses `n` bytes just read into the thread buffer for connection `li`, and counts.
#[inline]
pub(super) fn process(ctx: &Ctx, l: &mut Local, li: usize, n: usize, pongs: &mut Vec<u8>) {
    let now = ctx.shared.now_ns();
    let Local { buf, conns, counts } = l;
    counts.bytes_in += n as u64;
    let c = &mut conns[li];
    let node = usize::from(c.node);
    let ch = &ctx.shared.chans[c.ch as usize];
    let closed_loop = ctx.shared.closed_loop.load(Relaxed);
    let mut in_round = 0u64;
    let mut round_max = 0u64;
    let mut became_live = false;
    let next = &mut c.next;
    let live = &mut c.live;
    let close_code = &mut c.close_code;
    let hint = &mut c.hint;
    c.parser.feed(&buf[..n], &mut |f| match f.op {
        opcode::TEXT | opcode::BINARY => {
            let Some((seq, sent)) = ws::scan_message_at(f.head, hint) else {
                if f.head.starts_with(b"{\"type\":\"error\"") {
                    counts.error("error message from server");
                } else if f.head.starts_with(ws::MESSAGE_PREFIX) {
                    counts.other += 1;
                }
                return;
            };
            if !*live {
                *live = true;
                became_live = true;
            }
            let ms = ch.measure_start.load(Relaxed);
            let latency = now.saturating_sub(sent).max(1);
            if loss::delivery(counts, node, next, ms, seq, latency)
                && closed_loop
                && seq >= ch.round_start.load(Relaxed)
            {
                in_round += 1;
                round_max = round_max.max(latency);
            }
        }
        opcode::PING => ws::client_frame(pongs, opcode::PONG, f.head),
        opcode::CLOSE => *close_code = Some(ws::close_code(f.head).unwrap_or(1005)),
        _ => {}
    });
    if became_live {
        ch.live.fetch_add(1, Relaxed);
    }
    if in_round > 0 {
        // Before `got`, which releases it: whoever sees the round complete (an Acquire load of
        // `got`) sees its last receiver's latency too, whichever thread read it.
        ch.round_max_ns.fetch_max(round_max, Relaxed);
        let prev = ch.got.fetch_add(in_round, Release);
        let target = ctx.shared.window.load(Relaxed) * ch.subs.load(Relaxed);
        if prev + in_round >= target {
            ch.notify.notify_one();
        }
    }
}

/// The plain socket's read: straight into the thread's buffer, one syscall. A read shorter
/// than the buffer emptied the socket: the closure then processes it and reports WouldBlock so
/// that tokio clears the readiness, and the next wake-up is a new event rather than one more
/// read that finds nothing (fanout.c saves the same syscall). Tokio clears only if no new
/// event arrived meanwhile, so nothing is missed.
fn read_plain(
    ctx: &Ctx,
    l: &mut Local,
    li: usize,
    tcp: &tokio::net::TcpStream,
    pongs: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let cap = l.buf.len();
    tcp.try_io(Interest::READABLE, || {
        // SAFETY: reads into the thread's buffer, which we hold mutably, at most its length.
        let n = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(tcp),
                l.buf.as_mut_ptr().cast(),
                cap,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        if n > 0 && n < cap {
            process(ctx, l, li, n, pongs);
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    })
}
