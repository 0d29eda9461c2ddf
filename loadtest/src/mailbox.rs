//! Replies from the generator threads, paired with the command that asked for them.
//!
//! The main thread sends every generator thread the same command and then takes one reply from
//! each. A reply taken for the wrong command would be read as something else (one step's
//! counts as the next step's, a `Pending` as an acknowledgement), silently, so each command
//! carries a number that its reply echoes. And a thread that does not answer in time ends the
//! run rather than being skipped: every total that followed would lack its connections.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

/// A command or a reply with the number of the command it belongs to.
#[derive(Debug)]
pub(crate) struct Tagged<T> {
    /// The command's number (0: the reply a thread sends unasked once it has connected).
    pub(crate) seq: u64,
    /// The command or reply itself.
    pub(crate) msg: T,
}

/// Takes the reply to command `seq` from each receiver, in order, waiting until `deadline`.
///
/// Replies to earlier commands are thrown away (they can only be late answers, and they are
/// not this command's). Fails if a thread answers a command that was never sent, does not
/// answer by the deadline, or has died; the caller must then stop asking that thread, since
/// whatever it says next would be out of step.
pub(crate) fn gather<'a, R: 'a>(
    receivers: impl IntoIterator<Item = &'a Receiver<Tagged<R>>>,
    seq: u64,
    deadline: Instant,
) -> Result<Vec<R>, String> {
    let mut out = Vec::new();
    for (i, rx) in receivers.into_iter().enumerate() {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(r) if r.seq == seq => {
                    out.push(r.msg);
                    break;
                }
                Ok(r) if r.seq < seq => continue,
                Ok(r) => {
                    return Err(format!(
                        "generator thread {i} answered command {} while {seq} was the last sent",
                        r.seq
                    ))
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "generator thread {i} did not answer command {seq} in time \
                         (stuck on a write the server does not take?); the run is stopped \
                         because its counts would be missing from everything after"
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("generator thread {i} died during the run"))
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(200)
    }

    #[test]
    fn each_reply_goes_with_its_command() {
        let (tx, rx) = mpsc::channel();
        for seq in 1..=3 {
            tx.send(Tagged { seq, msg: seq * 10 }).unwrap();
        }
        for seq in 1..=3 {
            assert_eq!(gather([&rx], seq, soon()).unwrap(), vec![seq * 10]);
        }
    }

    #[test]
    fn a_late_reply_is_not_taken_for_the_next_command() {
        let (tx, rx) = mpsc::channel();
        // The answer to command 4 arrives after command 5 was sent, before 5's own answer.
        tx.send(Tagged {
            seq: 4,
            msg: "counts of step 4",
        })
        .unwrap();
        tx.send(Tagged {
            seq: 5,
            msg: "counts of step 5",
        })
        .unwrap();
        assert_eq!(gather([&rx], 5, soon()).unwrap(), vec!["counts of step 5"]);
    }

    #[test]
    fn a_silent_thread_fails_instead_of_being_skipped() {
        let (a_tx, a) = mpsc::channel();
        let (_b_tx, b) = mpsc::channel::<Tagged<u32>>();
        a_tx.send(Tagged { seq: 1, msg: 1 }).unwrap();
        // Only the late answer to an earlier command: still no answer to this one.
        let (c_tx, c) = mpsc::channel();
        c_tx.send(Tagged { seq: 0, msg: 0 }).unwrap();
        let e = gather([&a, &b], 1, soon()).unwrap_err();
        assert!(e.contains("thread 1") && e.contains("in time"), "{e}");
        assert!(gather([&c], 1, soon()).is_err());
    }

    #[test]
    fn a_dead_thread_fails_at_once() {
        let (tx, rx) = mpsc::channel::<Tagged<u32>>();
        drop(tx);
        let t0 = Instant::now();
        let e = gather([&rx], 1, Instant::now() + Duration::from_secs(30)).unwrap_err();
        assert!(e.contains("died"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn an_answer_from_the_future_is_a_bug_reported() {
        let (tx, rx) = mpsc::channel();
        tx.send(Tagged { seq: 9, msg: () }).unwrap();
        assert!(gather([&rx], 2, soon()).is_err());
    }
}
