//! Streaming a child process's output to its channel: [`Hub::stream_process`], an `impl Hub`
//! of its own above `hub` (the hub layer knows nothing of child processes), with
//! [`ProcessHandle`] and [`ProcessExit`].

use std::future::pending;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::wire::protocol::process_channel;

/// The most bytes of a child's output that [`Hub::stream_process`] puts in one
/// `process_output` message: 16 KiB. A longer line goes as several messages, each of at most
/// this many bytes of the child's output, cut between UTF-8 characters (never inside one).
pub const PROCESS_LINE_LIMIT: usize = 16 * 1024;

/// How a child run by [`Hub::stream_process`] ended, as its `process_status` message says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessExit {
    /// It exited with this code: `{"status":"exited","exitCode":CODE}`.
    Exited(i32),
    /// A signal ended it (Unix): `{"status":"signaled","exitCode":128+SIGNAL}`, the number a
    /// shell's `$?` shows (137 for `SIGKILL`, 143 for `SIGTERM`).
    Signaled(i32),
}

impl ProcessExit {
    /// `"exited"` or `"signaled"`: the `status` of the `process_status` message.
    pub fn status(&self) -> &'static str {
        match self {
            ProcessExit::Exited(_) => "exited",
            ProcessExit::Signaled(_) => "signaled",
        }
    }

    /// The `exitCode` of the `process_status` message: the exit code, or 128 plus the signal.
    pub fn exit_code(&self) -> i32 {
        match *self {
            ProcessExit::Exited(code) => code,
            ProcessExit::Signaled(signal) => 128 + signal,
        }
    }

    fn of(status: ExitStatus) -> ProcessExit {
        if let Some(code) = status.code() {
            return ProcessExit::Exited(code);
        }
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            if let Some(signal) = status.signal() {
                return ProcessExit::Signaled(signal);
            }
        }
        // Neither a code nor a signal: not on the platforms tokio supports.
        ProcessExit::Exited(-1)
    }
}

/// A child that [`Hub::stream_process`] runs. Dropping the handle does not stop the child:
/// its output still goes to the channel until it ends.
#[derive(Debug)]
pub struct ProcessHandle {
    id: String,
    channel: String,
    pid: Option<u32>,
    kill: Arc<Notify>,
    task: JoinHandle<Result<ProcessExit>>,
}

impl ProcessHandle {
    /// The process id given to [`Hub::stream_process`].
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The channel its output goes to: `process:ID`.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The child's operating-system process id (`None` if it had already been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Asks for the child to be killed (`SIGKILL` on Unix). What it wrote before is still
    /// streamed, then the status: `signaled`, 137, unless it had already exited.
    pub fn kill(&self) {
        self.kill.notify_one();
    }

    /// Waits until the child has ended and its status was published, and returns that
    /// status.
    ///
    /// # Errors
    ///
    /// The hub shut down while the child ran ([`Error::is_closed`]): the child was killed,
    /// and the rest of its output and its status were not sent.
    pub async fn wait(self) -> Result<ProcessExit> {
        match self.task.await {
            Ok(result) => result,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => Err(Error::closed()),
        }
    }
}

impl Hub {
    /// Runs `command` as a child process and streams its output to channel `process:ID`:
    /// each line as a `process_output` message as soon as it is read, then one
    /// `process_status` message when the child has ended. Returns once the child is started;
    /// [`ProcessHandle::wait`] waits for the end.
    ///
    /// ```no_run
    /// # async fn example(hub: wshub::Hub) -> wshub::Result<()> {
    /// let mut command = tokio::process::Command::new("cargo");
    /// command.arg("build").current_dir("/src/app");
    /// let run = hub.stream_process("build-42", command)?;
    /// // Browsers subscribe to `process:build-42` (with `since` on a channel with history).
    /// let exit = run.wait().await?;
    /// println!("{} {}", exit.status(), exit.exit_code());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// What the messages hold:
    ///
    /// - **Lines**: the child's stdin is null and its stdout and stderr are piped. A line
    ///   ends at `\n`; the `\n` (and a `\r` before it) is not sent; a last line without one is
    ///   sent at the end. `data` is the line as a string, as go-ws sends it.
    /// - **Not UTF-8**: bytes that are not UTF-8 are replaced with U+FFFD (as
    ///   `String::from_utf8_lossy` does); never an error.
    /// - **Long lines**: a line longer than [`PROCESS_LINE_LIMIT`] (16 KiB) of the child's
    ///   bytes goes as several messages of at most that many bytes, cut between characters.
    /// - **stdout and stderr** both go as `process_output` and look the same on the wire,
    ///   merged as a terminal shows them (go-ws has one output type, and its pages show every
    ///   `process_output`; a type of our own for stderr would hide those lines from them).
    ///   The lines of one stream keep their order; between the two streams, the order is the
    ///   order in which the hub read them, which is only approximately the order in which the
    ///   child wrote them. To tell them apart, have the command mark its stderr lines itself
    ///   (through `sed` in a shell pipeline, say).
    /// - **Status**: `{"status":"exited","exitCode":CODE}` when the child exits;
    ///   `{"status":"signaled","exitCode":128+SIGNAL}` when a signal ended it (see
    ///   [`ProcessExit`]); `{"status":"failed","exitCode":-1}` when it could not be started
    ///   (then this call returns the error that [`is_spawn`](Error::is_spawn), and the status
    ///   is published just after, from a task).
    ///
    /// **Backpressure**: the messages are published with the `*_async` methods, which wait
    /// for room in the shards; while they wait, the pipes are not read, so the child blocks
    /// on a full pipe instead of anything buffering without bound (the hub holds at most one
    /// line, [`PROCESS_LINE_LIMIT`] bytes and a read buffer, per stream). Slow clients get
    /// the hub's [slow-consumer policy](Hub#slow-clients), as for any channel.
    ///
    /// **One run per id**: a run must not mix with another in the channel or its history, so
    /// `id` is refused ([`Error::is_invalid_argument`]) while a run of the same id is still
    /// going, and also, on a channel with history, while its history (on this node) has
    /// publications in its current epoch: give each run an id of its own (`build-1#2`, say).
    /// Without history a later run may reuse an id; its subscribers see the two runs one
    /// after the other.
    ///
    /// The child is not killed when the handle is dropped. When the hub shuts down while it
    /// runs, it is killed (`SIGKILL`) and [`ProcessHandle::wait`] returns the
    /// [closed](Error::is_closed) error. A child that leaves a grandchild holding its stdout
    /// or stderr open counts as running until the grandchild closes them.
    ///
    /// # Errors
    ///
    /// `id` is empty, its channel is longer than the configuration's
    /// [`max_channel_len`](crate::HubConfigBuilder::max_channel_len), or it is taken (above):
    /// [`Error::is_invalid_argument`], and nothing was started or sent. The child could not
    /// be started: [`Error::is_spawn`]. The hub has shut down: [`Error::is_closed`].
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (with its IO and time drivers enabled).
    pub fn stream_process(&self, id: &str, mut command: Command) -> Result<ProcessHandle> {
        let channel = process_channel(id);
        if id.is_empty() {
            return Err(Error::invalid_argument("empty process id"));
        }
        if channel.len() > self.config().max_channel_len {
            return Err(Error::invalid_argument(format!(
                "channel {channel:?} is longer than the configured max_channel_len"
            )));
        }
        self.shared().check_running()?;
        let reservation = Reservation::take(self, id, &channel)?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                let hub = self.clone();
                tokio::spawn(async move {
                    let _ = hub
                        .send_process_status_async(&reservation.id, "failed", -1)
                        .await;
                    drop(reservation);
                });
                return Err(Error::spawn(err));
            }
        };
        let kill = Arc::new(Notify::new());
        Ok(ProcessHandle {
            id: id.to_owned(),
            channel,
            pid: child.id(),
            kill: Arc::clone(&kill),
            task: tokio::spawn(stream(self.clone(), child, kill, reservation)),
        })
    }
}

/// A process id taken by a running [`Hub::stream_process`]; given back on drop.
struct Reservation {
    hub: Hub,
    id: String,
}

impl Reservation {
    fn take(hub: &Hub, id: &str, channel: &str) -> Result<Reservation> {
        let mut running = hub
            .shared()
            .running_processes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if running.contains(id) {
            return Err(Error::invalid_argument(format!(
                "process id {id:?} is already running"
            )));
        }
        if let Some(page) = hub.history(channel, u64::MAX, 0) {
            if page.latest > 0 {
                return Err(Error::invalid_argument(format!(
                    "process id {id:?} was used before: the history of {channel} holds {} \
                     publications of an earlier run; give each run an id of its own",
                    page.latest
                )));
            }
        }
        running.insert(id.into());
        Ok(Reservation {
            hub: hub.clone(),
            id: id.to_owned(),
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.hub
            .shared()
            .running_processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.id.as_str());
    }
}

/// The task of one run: reads both pipes, publishes each line, then the status.
async fn stream(
    hub: Hub,
    mut child: Child,
    kill: Arc<Notify>,
    reservation: Reservation,
) -> Result<ProcessExit> {
    let id = reservation.id.as_str();
    let mut shutting_down = hub.shared().shutting_down.subscribe();
    let mut stdout = child.stdout.take().map(LineReader::new);
    let mut stderr = child.stderr.take().map(LineReader::new);
    while stdout.is_some() || stderr.is_some() {
        let (line, from_stdout) = tokio::select! {
            line = next_line(&mut stdout) => (line, true),
            line = next_line(&mut stderr) => (line, false),
            () = kill.notified() => {
                let _ = child.start_kill();
                continue;
            }
            () = shutdown(&mut shutting_down) => {
                let _ = child.kill().await;
                return Err(Error::closed());
            }
        };
        match line {
            Ok(Some(bytes)) => {
                let text = String::from_utf8_lossy(&bytes);
                if let Err(err) = hub.send_process_output_async(id, &text).await {
                    let _ = child.kill().await;
                    return Err(err);
                }
            }
            end => {
                if let Err(err) = end {
                    tracing::debug!(%err, process = id, "reading the child's output failed");
                }
                if from_stdout {
                    stdout = None;
                } else {
                    stderr = None;
                }
            }
        }
    }
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            () = kill.notified() => {
                let _ = child.start_kill();
            }
            () = shutdown(&mut shutting_down) => {
                let _ = child.kill().await;
                return Err(Error::closed());
            }
        }
    };
    let exit = match status {
        Ok(status) => ProcessExit::of(status),
        Err(err) => {
            tracing::warn!(%err, process = id, "waiting for the child failed");
            ProcessExit::Exited(-1)
        }
    };
    hub.send_process_status_async(id, exit.status(), exit.exit_code())
        .await?;
    Ok(exit)
}

/// Completes when the hub begins to shut down.
async fn shutdown(shutting_down: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutting_down.wait_for(|down| *down).await;
}

/// The next line of `reader`; never ready once it is `None` (so that `select!` can keep the
/// branch).
async fn next_line<R: AsyncRead + Unpin>(
    reader: &mut Option<LineReader<R>>,
) -> io::Result<Option<Vec<u8>>> {
    match reader {
        Some(reader) => reader.next().await,
        None => pending().await,
    }
}

/// Splits a pipe into lines of at most [`PROCESS_LINE_LIMIT`] bytes, holding at most a few
/// bytes more than that.
struct LineReader<R> {
    reader: BufReader<R>,
    /// What was read of the current line: no `\n`, unless `complete`.
    line: Vec<u8>,
    /// `line` ends with its `\n`.
    complete: bool,
    eof: bool,
    limit: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(reader: R) -> Self {
        Self::with_limit(reader, PROCESS_LINE_LIMIT)
    }

    fn with_limit(reader: R, limit: usize) -> Self {
        LineReader {
            reader: BufReader::with_capacity(8 * 1024, reader),
            line: Vec::new(),
            complete: false,
            eof: false,
            limit,
        }
    }

    /// The next line without its `\n` or `\r\n`, or the next piece of a line longer than the
    /// limit; `None` at the end. Cancel-safe: what was read stays in `self` across awaits.
    async fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(piece) = self.take_piece() {
                return Ok(Some(piece));
            }
            if self.eof {
                return Ok((!self.line.is_empty()).then(|| std::mem::take(&mut self.line)));
            }
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                self.eof = true;
                continue;
            }
            // Room for the limit and a lookahead: a `\r\n` and the 3 bytes that the cut
            // between characters may go back.
            let room = self.limit + 4 - self.line.len();
            let take = available.len().min(room);
            let used = match available[..take].iter().position(|&b| b == b'\n') {
                Some(at) => {
                    self.complete = true;
                    at + 1
                }
                None => take,
            };
            self.line.extend_from_slice(&available[..used]);
            self.reader.consume(used);
        }
    }

    /// A whole line, or a piece of a long one, when `line` holds one.
    fn take_piece(&mut self) -> Option<Vec<u8>> {
        if self.complete {
            self.line.pop();
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            if self.line.len() <= self.limit {
                self.complete = false;
                return Some(std::mem::take(&mut self.line));
            }
            // Too long: a piece now, the rest (with its `\n` back) later.
            self.line.push(b'\n');
        } else if self.line.len() <= self.limit || (self.line.len() < self.limit + 4 && !self.eof) {
            // Short enough, or the lookahead is not there yet.
            return None;
        }
        let cut = char_cut(&self.line, self.limit);
        let rest = self.line.split_off(cut);
        Some(std::mem::replace(&mut self.line, rest))
    }
}

/// Where to cut `bytes` (longer than `limit`) so that the first piece has at most `limit`
/// bytes and no UTF-8 character is split: `limit`, or up to 3 bytes before it when a
/// character starts there. Bytes that are not UTF-8 are cut at `limit`.
fn char_cut(bytes: &[u8], limit: usize) -> usize {
    let is_continuation = |b: u8| b & 0xC0 == 0x80;
    (limit.saturating_sub(3).max(1)..=limit)
        .rev()
        .find(|&at| !is_continuation(bytes[at]))
        .unwrap_or(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], limit: usize) -> Vec<Vec<u8>> {
        let mut reader = LineReader::with_limit(input, limit);
        let mut out = Vec::new();
        while let Some(line) = reader.next().await.unwrap() {
            out.push(line);
        }
        out
    }

    #[tokio::test]
    async fn lines_end_at_newline_and_at_the_end() {
        assert_eq!(
            lines(b"a\nbb\r\n\nlast", 8).await,
            [&b"a"[..], b"bb", b"", b"last"]
        );
        assert!(lines(b"", 8).await.is_empty());
    }

    #[tokio::test]
    async fn long_lines_are_cut_between_characters() {
        // "a" then "é" (2 bytes) eight times: 17 bytes, a character starting at every odd
        // byte; a cut at 8 would split one.
        let line = format!("a{}", "é".repeat(8));
        let pieces = lines(format!("{line}\nx\n").as_bytes(), 8).await;
        assert_eq!(pieces.concat(), format!("{line}x").into_bytes());
        for piece in &pieces {
            assert!(piece.len() <= 8, "{piece:?}");
            assert!(std::str::from_utf8(piece).is_ok(), "{piece:?}");
        }
        assert_eq!(pieces.last().unwrap(), b"x");
        // Exactly the limit, with `\r\n`: one piece.
        assert_eq!(lines(b"12345678\r\n", 8).await, [b"12345678"]);
        // Not UTF-8: cut at the limit.
        assert_eq!(lines(&[0x80; 10], 8).await, [vec![0x80; 8], vec![0x80; 2]]);
    }
}
