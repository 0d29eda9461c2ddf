//! One generator thread: the commands the main thread sends it and the replies it sends back,
//! the state its tasks share (its connections, buffer and counts), and its command loop, which
//! connects its share of the connections and then starts and ends the publishers, slow clients
//! and churn of each step and answers with what it counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::sock::Sock;
use tokio::sync::mpsc as tmpsc;

use super::churn::churn_task;
use super::connect::connect_all;
use super::loss;
use super::outcome::{ChurnCounts, SlowSeen};
use super::plan::{Kind, Load, Plan};
use super::publish::{broadcasts, open_loop, rounds, warmup};
use super::receive::READ_BUF;
use super::shared::Shared;
use super::slow::{read_slow, subscribe_slow};
use crate::mailbox::Tagged;
use crate::stats::Counts;
use crate::sys;
use crate::ws::FrameParser;

/// A write that does not finish in this long is counted as an error.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Commands from the main thread to a generator thread.
#[derive(Debug)]
pub(super) enum Cmd {
    Warmup,
    StartStep(Load, bool),
    EndStep,
    Collect,
    Pending,
    Final(bool),
    Stop,
}

/// Replies from generator threads.
#[derive(Debug)]
pub(super) enum Reply {
    Connected {
        failed: BTreeMap<String, u64>,
    },
    Ack,
    Counts {
        counts: Box<Counts>,
        cpu: Duration,
        open: u64,
    },
    Pending(u64),
    Final {
        counts: Box<Counts>,
        slow: SlowSeen,
        churn: ChurnCounts,
    },
}

/// Locks a mutex, whatever a panicking holder left in it (counters stay usable).
pub(super) trait Lk<T> {
    fn lk(&self) -> MutexGuard<'_, T>;
}

impl<T> Lk<T> for Mutex<T> {
    fn lk(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection as its generator thread keeps it.
#[derive(Debug)]
pub(super) struct LConn {
    pub(super) parser: FrameParser,
    pub(super) ch: u32,
    pub(super) kind: Kind,
    /// The node it is connected to.
    pub(super) node: u8,
    /// Next sequence number expected (0: none seen in the current step yet).
    pub(super) next: u64,
    pub(super) live: bool,
    pub(super) open: bool,
    pub(super) close_code: Option<u16>,
    /// Where the numbers started in this connection's last message (see `scan_message_at`).
    pub(super) hint: u16,
}

/// Everything a generator thread's tasks share.
pub(super) struct Local {
    pub(super) buf: Vec<u8>,
    pub(super) conns: Vec<LConn>,
    pub(super) counts: Counts,
}

pub(super) struct Ctx {
    pub(super) shared: Arc<Shared>,
    pub(super) plan: Arc<Plan>,
    pub(super) local: Mutex<Local>,
    pub(super) socks: Mutex<Vec<Option<Arc<Sock>>>>,
    /// Set when the current step ends: publishers stop after their current write.
    pub(super) stop: AtomicBool,
    pub(super) churn: Mutex<ChurnCounts>,
    pub(super) churn_stop: AtomicBool,
}

pub(super) fn thread_main(
    t: usize,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    mut cmds: tmpsc::UnboundedReceiver<Tagged<Cmd>>,
    replies: mpsc::Sender<Tagged<Reply>>,
) {
    if let Err(e) = sys::pin_current_thread(&plan.cpus) {
        eprintln!("warning: cannot pin generator thread {t}: {e}");
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start a generator runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let mine: Vec<usize> = (0..plan.conns.len())
            .filter(|g| g % plan.threads == t)
            .collect();
        let ctx = Arc::new(Ctx::new(plan.clone(), shared, &mine));
        let publishes = publishes(&plan, t);
        let failed = connect_all(&ctx, &mine).await;
        let _ = replies.send(Tagged {
            seq: 0,
            msg: Reply::Connected { failed },
        });
        let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        while let Some(Tagged { seq, msg: cmd }) = cmds.recv().await {
            // Every answer carries the number of the command it answers.
            let reply = |msg: Reply| {
                let _ = replies.send(Tagged { seq, msg });
            };
            match cmd {
                Cmd::Warmup => {
                    tokio::spawn(warmup(ctx.clone(), publishes.clone()));
                }
                Cmd::StartStep(load, disturb) => {
                    start_step(&ctx, t, &publishes, load, disturb, &mut tasks).await;
                    reply(Reply::Ack);
                }
                Cmd::EndStep => {
                    ctx.stop.store(true, Relaxed);
                    ctx.churn_stop.store(true, Relaxed);
                    for &(ch, _) in &publishes {
                        ctx.shared.chans[ch as usize].notify.notify_one();
                    }
                    for task in tasks.drain(..) {
                        let _ = task.await;
                    }
                    reply(Reply::Ack);
                }
                Cmd::Collect => {
                    let counts = Box::new(ctx.local.lk().counts.take());
                    let open = ctx
                        .local
                        .lk()
                        .conns
                        .iter()
                        .filter(|c| c.open && c.kind == Kind::Subscriber)
                        .count() as u64;
                    reply(Reply::Counts {
                        counts,
                        cpu: sys::thread_cpu(),
                        open,
                    });
                }
                Cmd::Pending => {
                    let n = loss::pending(&ctx.local.lk(), &ctx.shared.chans);
                    reply(Reply::Pending(n));
                }
                Cmd::Final(disturb) => {
                    let slow = if disturb {
                        read_slow(&ctx).await
                    } else {
                        SlowSeen::default()
                    };
                    let mut l = ctx.local.lk();
                    loss::count_missing(&mut l, &ctx.shared.chans);
                    let counts = Box::new(l.counts.take());
                    let churn = std::mem::take(&mut *ctx.churn.lk());
                    reply(Reply::Final {
                        counts,
                        slow,
                        churn,
                    });
                }
                Cmd::Stop => break,
            }
        }
    });
}

impl Ctx {
    /// The state of a generator thread whose connections are `mine` (indices into
    /// [`Plan::conns`]), none of them open yet.
    fn new(plan: Arc<Plan>, shared: Arc<Shared>, mine: &[usize]) -> Ctx {
        Ctx {
            shared,
            plan: plan.clone(),
            local: Mutex::new(Local {
                buf: vec![0; READ_BUF],
                conns: mine
                    .iter()
                    .map(|&g| LConn {
                        parser: FrameParser::default(),
                        ch: plan.conns[g].channel,
                        kind: plan.conns[g].kind,
                        node: plan.conns[g].node,
                        next: 0,
                        live: false,
                        open: false,
                        close_code: None,
                        hint: 0,
                    })
                    .collect(),
                counts: Counts::for_nodes(plan.targets.len()),
            }),
            socks: Mutex::new(vec![None; mine.len()]),
            stop: AtomicBool::new(false),
            churn: Mutex::new(ChurnCounts::default()),
            churn_stop: AtomicBool::new(true),
        }
    }
}

/// The channels thread `t` publishes, as (channel, index of its publisher among the thread's
/// connections): those whose first subscriber is here.
fn publishes(plan: &Plan, t: usize) -> Vec<(u32, usize)> {
    let mut publishes: Vec<(u32, usize)> = Vec::new();
    let mut seen = vec![false; plan.channels.len()];
    for (g, c) in plan.conns.iter().enumerate() {
        if c.kind == Kind::Subscriber && !seen[c.channel as usize] {
            seen[c.channel as usize] = true;
            if g % plan.threads == t {
                publishes.push((c.channel, g / plan.threads));
            }
        }
    }
    publishes
}

/// Starts a step on thread `t`: marks where its channels' messages begin, starts their
/// publishers with `load`, and when `disturb`, subscribes the slow clients and (thread 0 only)
/// starts the churn. The tasks started go into `tasks`, for EndStep to wait on.
async fn start_step(
    ctx: &Arc<Ctx>,
    t: usize,
    publishes: &[(u32, usize)],
    load: Load,
    disturb: bool,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    let plan = &ctx.plan;
    ctx.stop.store(false, Relaxed);
    for &(ch, _) in publishes {
        let c = &ctx.shared.chans[ch as usize];
        c.measure_start.store(c.next_seq.load(Relaxed), Relaxed);
    }
    match load {
        Load::Closed { window } => {
            for &(ch, li) in publishes {
                tasks.push(tokio::spawn(rounds(ctx.clone(), ch, li, window)));
            }
        }
        Load::Open { rate } => {
            if !publishes.is_empty() {
                let per_channel = rate / plan.channels.len() as f64;
                tasks.push(tokio::spawn(open_loop(
                    ctx.clone(),
                    publishes.to_vec(),
                    per_channel,
                )));
            }
        }
        Load::Broadcasts { count } => {
            for &(ch, li) in publishes {
                tasks.push(tokio::spawn(broadcasts(ctx.clone(), ch, li, count)));
            }
        }
        Load::Idle => {}
    }
    if disturb {
        subscribe_slow(ctx).await;
        if let (Some(churn), 0) = (plan.churn, t) {
            ctx.churn_stop.store(false, Relaxed);
            *ctx.churn.lk() = ChurnCounts::default();
            tasks.push(tokio::spawn(churn_task(ctx.clone(), churn)));
        }
    }
}

pub(super) fn sock(ctx: &Ctx, li: usize) -> Option<Arc<Sock>> {
    ctx.socks.lk()[li].clone()
}

pub(super) async fn timed_write(sock: &Sock, buf: &[u8]) -> Result<(), &'static str> {
    match tokio::time::timeout(WRITE_TIMEOUT, sock.write_all(buf)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("publish write error"),
        Err(_) => Err("publish write timeout"),
    }
}
