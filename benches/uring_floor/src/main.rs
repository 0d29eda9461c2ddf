//! uring_floor: `shared/bench/floor.c` ported to Rust, to measure whether io_uring beats
//! "one write(2) per socket per round" for WebSocket fan-out.
//!
//! A benchmark, not a server: one thread, epoll, the fan-out benchmark protocol only, and only
//! fanout.c's fixed handshake key. Like floor.c, every publish is built into a frame once and
//! appended to each subscriber's buffer; after each epoll round every buffer with data is flushed.
//! How it is flushed is the only thing the modes change:
//!
//! - `--mode write`: one `write(2)` per dirty socket, exactly as floor.c does (including its spin
//!   on EAGAIN).
//! - `--mode uring`: one `IORING_OP_SEND` (MSG_DONTWAIT | MSG_NOSIGNAL) per dirty socket, all
//!   submitted and waited for with one `io_uring_enter` (one per ring-full, if ever more sockets
//!   are dirty than the ring holds). A partial send or EAGAIN keeps the rest in the buffer and
//!   arms EPOLLOUT; an error closes the connection.
//! - `--mode uring-fixed`: as `uring`, with every socket in a registered file table
//!   (IORING_REGISTER_FILES), so the kernel skips the per-request fd lookup (fdget/fdput).
//!
//! On SIGTERM or SIGINT it prints counters (rounds, sends, io_uring_enter calls, partial sends,
//! EAGAINs, errors) to stderr and exits.
//!
//! Build and run (server on CPU 0, load client on CPU 1, as shared/bench/compare.sh does):
//!
//! ```text
//! cargo build --release            # in benches/uring_floor
//! taskset -c 0 target/release/uring_floor 19500 --mode uring &
//! taskset -c 1 ~/.cache/wshub-bench/fanout 19500 1000 16 100 5
//! ```

use io_uring::{opcode, squeue, types, IoUring};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

/// Highest fd + 1 that gets a connection, as in floor.c.
const MAXC: usize = 65536;
/// Sec-WebSocket-Accept for fanout.c's key `dGhlIHNhbXBsZSBub25jZQ==` (RFC 6455's example).
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// Submission queue entries. 16384 covers the 10,000-subscriber scenario in one
/// io_uring_enter; larger rounds are submitted in ring-sized chunks.
const RING_ENTRIES: u32 = 16384;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Write,
    Uring,
    UringFixed,
}

#[derive(Default)]
struct Conn {
    upgraded: bool,
    subscribed: bool,
    dirty: bool,
    /// EPOLLOUT is armed because a send left data behind (uring modes only).
    want_out: bool,
    inbuf: Vec<u8>,
    out: Vec<u8>,
}

#[derive(Default)]
struct Stats {
    rounds: u64,
    sends: u64,
    enters: u64,
    partial: u64,
    eagain: u64,
    errors: u64,
}

struct Server {
    mode: Mode,
    ep: i32,
    conns: Vec<Option<Box<Conn>>>,
    subs: Vec<i32>,
    dirty: Vec<i32>,
    ring: Option<IoUring>,
    frame: Vec<u8>,
    stats: Stats,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Server {
    fn conn(&mut self, fd: i32) -> &mut Conn {
        self.conns[fd as usize].as_mut().expect("live connection")
    }

    fn append(&mut self, fd: i32, bytes: &[u8]) {
        let c = self.conns[fd as usize].as_mut().expect("live connection");
        c.out.extend_from_slice(bytes);
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(fd);
        }
    }

    /// `{"type":"publish","channel":"CH","data":"..."}` becomes
    /// `{"type":"message","channel":"CH","data":"...","timestamp":"..."}`, built once, copied to
    /// every subscriber's buffer (floor.c's `publish`).
    fn publish(&mut self, payload: &[u8]) {
        let Some(at) = find(payload, b"\"channel\"") else {
            return;
        };
        let rest = &payload[at..payload.len() - 1]; // drop the closing brace
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to live locals of the right types.
        unsafe {
            libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts);
            libc::gmtime_r(&ts.tv_sec, &mut tm);
        }
        let mut stamp = [0u8; 64];
        let sl = {
            let mut w = &mut stamp[..];
            let _ = write!(
                w,
                ",\"timestamp\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z\"}}",
                tm.tm_year + 1900,
                tm.tm_mon + 1,
                tm.tm_mday,
                tm.tm_hour,
                tm.tm_min,
                tm.tm_sec,
                ts.tv_nsec
            );
            64 - w.len()
        };
        let body = 18 + rest.len() + sl;
        let mut frame = std::mem::take(&mut self.frame);
        frame.clear();
        frame.push(0x81);
        if body < 126 {
            frame.push(body as u8);
        } else {
            frame.extend_from_slice(&[126, (body >> 8) as u8, body as u8]);
        }
        frame.extend_from_slice(b"{\"type\":\"message\",");
        frame.extend_from_slice(rest);
        frame.extend_from_slice(&stamp[..sl]);
        for i in 0..self.subs.len() {
            let fd = self.subs[i];
            self.append(fd, &frame);
        }
        self.frame = frame;
    }

    fn on_frame(&mut self, fd: i32, p: &[u8]) {
        if find(p, b"\"subscribe\"").is_some() {
            let c = self.conn(fd);
            if !c.subscribed {
                c.subscribed = true;
                self.subs.push(fd);
            }
        } else if find(p, b"\"publish\"").is_some() {
            self.publish(p);
        }
    }

    fn drop_conn(&mut self, fd: i32) {
        self.subs.retain(|&s| s != fd);
        self.dirty.retain(|&d| d != fd);
        if self.mode == Mode::UringFixed {
            // Empty the slot so the table never points at a closed (or reused) file.
            let ring = self.ring.as_ref().expect("ring");
            let _ = ring.submitter().register_files_update(fd as u32, &[-1]);
        }
        // SAFETY: fd is a socket this server accepted and still owns.
        unsafe { libc::close(fd) };
        self.conns[fd as usize] = None;
    }

    fn on_read(&mut self, fd: i32) {
        // The input buffer is taken out so frames can be handed to on_frame/publish, which
        // touch every connection (this one included) while we still read from it.
        let mut inb = std::mem::take(&mut self.conn(fd).inbuf);
        loop {
            inb.reserve(2048);
            let spare = inb.capacity() - inb.len();
            // SAFETY: reading into the vector's spare capacity, then marking what was read.
            let r = unsafe { libc::read(fd, inb.as_mut_ptr().add(inb.len()).cast(), spare) };
            if r > 0 {
                unsafe { inb.set_len(inb.len() + r as usize) };
                continue;
            }
            let e = errno();
            if r == 0 || (e != libc::EAGAIN && e != libc::EINTR) {
                self.drop_conn(fd);
                return;
            }
            break;
        }
        let mut off = 0;
        if !self.conn(fd).upgraded {
            let Some(end) = find(&inb, b"\r\n\r\n") else {
                self.conn(fd).inbuf = inb;
                return;
            };
            off = end + 4;
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
            );
            self.append(fd, resp.as_bytes());
            self.conn(fd).upgraded = true;
        }
        loop {
            let avail = inb.len() - off;
            if avail < 6 {
                break;
            }
            let f = &inb[off..];
            let (len, h) = match f[1] & 0x7f {
                126 if avail < 8 => break,
                126 => (((f[2] as usize) << 8) | f[3] as usize, 4),
                127 => break, // the benchmark never sends frames this large
                n => (n as usize, 2),
            };
            if avail < h + 4 + len {
                break;
            }
            let key = [f[h], f[h + 1], f[h + 2], f[h + 3]];
            let p = off + h + 4;
            for i in 0..len {
                inb[p + i] ^= key[i & 3];
            }
            self.on_frame(fd, &inb[p..p + len]);
            off = p + len;
        }
        inb.drain(..off);
        self.conn(fd).inbuf = inb;
    }

    fn accept_all(&mut self, ls: i32) {
        let one: libc::c_int = 1;
        loop {
            // SAFETY: plain syscalls on fds we own.
            let c = unsafe {
                libc::accept4(
                    ls,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK,
                )
            };
            if c < 0 {
                return;
            }
            if c as usize >= MAXC {
                unsafe { libc::close(c) };
                continue;
            }
            unsafe {
                libc::setsockopt(
                    c,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&one as *const libc::c_int).cast(),
                    4,
                );
            }
            if self.mode == Mode::UringFixed {
                // Fixed-file index = fd number, so no separate mapping is needed.
                let ring = self.ring.as_ref().expect("ring");
                if ring
                    .submitter()
                    .register_files_update(c as u32, &[c])
                    .is_err()
                {
                    unsafe { libc::close(c) };
                    continue;
                }
            }
            self.conns[c as usize] = Some(Box::default());
            let mut e = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: c as u64,
            };
            unsafe { libc::epoll_ctl(self.ep, libc::EPOLL_CTL_ADD, c, &mut e) };
        }
    }

    /// floor.c's cork: one write per socket that has something to send.
    fn flush_write(&mut self) {
        for i in 0..self.dirty.len() {
            let fd = self.dirty[i];
            let c = self.conns[fd as usize].as_mut().expect("live connection");
            let mut off = 0;
            while off < c.out.len() {
                // SAFETY: writing from the live buffer's initialized bytes.
                let w = unsafe { libc::write(fd, c.out[off..].as_ptr().cast(), c.out.len() - off) };
                self.stats.sends += 1;
                if w > 0 {
                    off += w as usize;
                } else if errno() == libc::EAGAIN {
                    self.stats.eagain += 1;
                    continue; // as floor.c: the benchmark's clients always read
                } else {
                    self.stats.errors += 1;
                    break;
                }
            }
            c.out.clear();
            c.dirty = false;
        }
        self.dirty.clear();
    }

    /// All dirty sockets' sends in one io_uring_enter (per ring-full).
    fn flush_uring(&mut self) {
        let mut ring = self.ring.take().expect("ring");
        let fixed = self.mode == Mode::UringFixed;
        let dirty = std::mem::take(&mut self.dirty);
        let mut keep = Vec::new(); // sockets with bytes left over: stay dirty, EPOLLOUT armed
        let mut close = Vec::new();
        for chunk in dirty.chunks(RING_ENTRIES as usize) {
            {
                let mut sq = ring.submission();
                for &fd in chunk {
                    let c = self.conns[fd as usize].as_ref().expect("live connection");
                    let len = c.out.len() as u32;
                    // MSG_DONTWAIT: a full socket buffer must complete at once with -EAGAIN,
                    // not park the request on an internal poll, since we wait for all of them.
                    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
                    let sqe = if fixed {
                        opcode::Send::new(types::Fixed(fd as u32), c.out.as_ptr(), len)
                    } else {
                        opcode::Send::new(types::Fd(fd), c.out.as_ptr(), len)
                    }
                    .flags(flags)
                    .build()
                    .user_data(fd as u64);
                    // SAFETY: the buffer is not touched until this chunk's completions are
                    // reaped below, and the chunk never exceeds the ring's size.
                    unsafe { sq.push(&sqe).expect("submission queue has room") };
                }
            }
            let mut left = chunk.len();
            while left > 0 {
                // One io_uring_enter: submits everything pending, waits for `left` completions.
                match ring.submit_and_wait(left) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => panic!("io_uring_enter: {e}"),
                }
                self.stats.enters += 1;
                for cqe in ring.completion() {
                    left -= 1;
                    self.stats.sends += 1;
                    let fd = cqe.user_data() as i32;
                    let res = cqe.result();
                    let c = self.conns[fd as usize].as_mut().expect("live connection");
                    if res >= 0 {
                        c.out.drain(..res as usize);
                        if c.out.is_empty() {
                            c.dirty = false;
                            if c.want_out {
                                c.want_out = false;
                                let mut e = libc::epoll_event {
                                    events: libc::EPOLLIN as u32,
                                    u64: fd as u64,
                                };
                                unsafe {
                                    libc::epoll_ctl(self.ep, libc::EPOLL_CTL_MOD, fd, &mut e)
                                };
                            }
                        } else {
                            self.stats.partial += 1;
                            keep.push(fd);
                        }
                    } else if res == -libc::EAGAIN {
                        self.stats.eagain += 1;
                        keep.push(fd);
                    } else {
                        self.stats.errors += 1;
                        close.push(fd);
                    }
                }
            }
        }
        self.ring = Some(ring);
        for &fd in &keep {
            let c = self.conn(fd);
            if !c.want_out {
                c.want_out = true;
                let mut e = libc::epoll_event {
                    events: (libc::EPOLLIN | libc::EPOLLOUT) as u32,
                    u64: fd as u64,
                };
                unsafe { libc::epoll_ctl(self.ep, libc::EPOLL_CTL_MOD, fd, &mut e) };
            }
        }
        self.dirty = keep;
        for fd in close {
            self.drop_conn(fd);
        }
    }
}

fn main() {
    let mut port: u16 = 9104;
    let mut mode = Mode::Write;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => {
                mode = match args.next().as_deref() {
                    Some("write") => Mode::Write,
                    Some("uring") => Mode::Uring,
                    Some("uring-fixed") => Mode::UringFixed,
                    m => panic!("--mode write|uring|uring-fixed, not {m:?}"),
                }
            }
            p => {
                port = p
                    .parse()
                    .expect("usage: uring_floor PORT [--mode write|uring|uring-fixed]")
            }
        }
    }

    let ring = match mode {
        Mode::Write => None,
        _ => {
            // CQ is twice the SQ by default, so one full chunk of completions always fits.
            let ring = IoUring::<squeue::Entry>::new(RING_ENTRIES).expect("io_uring_setup");
            if mode == Mode::UringFixed {
                // A sparse table as large as the fd limit allows; slots are filled on accept.
                let mut rl = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
                let slots = (rl.rlim_cur as usize).min(MAXC) as u32;
                ring.submitter()
                    .register_files_sparse(slots)
                    .expect("IORING_REGISTER_FILES");
            }
            Some(ring)
        }
    };

    // SAFETY: plain libc setup calls on locals; the handler only stores to an atomic.
    let (ls, ep) = unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        let ls = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let one: libc::c_int = 1;
        libc::setsockopt(
            ls,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            4,
        );
        let sa_in = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        if libc::bind(ls, (&sa_in as *const libc::sockaddr_in).cast(), len) != 0
            || libc::listen(ls, 4096) != 0
        {
            panic!("listen: {}", std::io::Error::last_os_error());
        }
        libc::fcntl(ls, libc::F_SETFL, libc::O_NONBLOCK);
        let ep = libc::epoll_create1(0);
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: ls as u64,
        };
        libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, ls, &mut ev);
        (ls, ep)
    };

    let mut s = Server {
        mode,
        ep,
        conns: (0..MAXC).map(|_| None).collect(),
        subs: Vec::new(),
        dirty: Vec::new(),
        ring,
        frame: Vec::new(),
        stats: Stats::default(),
    };
    println!("uring_floor listening {port}");
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    while !STOP.load(Ordering::Relaxed) {
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 1024, -1) };
        for ev in &evs[..n.max(0) as usize] {
            let (events, fd) = (ev.events, ev.u64 as i32);
            if fd == ls {
                s.accept_all(ls);
            } else if s.conns[fd as usize].is_some() && events != libc::EPOLLOUT as u32 {
                // EPOLLOUT alone needs nothing here: the socket is still dirty, flushed below.
                s.on_read(fd);
            }
        }
        if s.dirty.is_empty() {
            continue;
        }
        s.stats.rounds += 1;
        match mode {
            Mode::Write => s.flush_write(),
            _ => s.flush_uring(),
        }
    }
    let t = &s.stats;
    eprintln!(
        "stats rounds={} sends={} io_uring_enter={} partial={} eagain={} errors={}",
        t.rounds, t.sends, t.enters, t.partial, t.eagain, t.errors
    );
}
