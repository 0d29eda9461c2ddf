//! What the client tells the application: [`Event`]s, in order, through [`Events`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;

use crate::{Envelope, Error, Position};

/// Everything that happens to a [`Client`](crate::Client), in the order it happened,
/// messages included. Read them from [`Events`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A connection is up (the first one, and every one after a reconnection), and the
    /// subscriptions have been sent on it.
    Connected,
    /// Follows [`Event::Connected`] on every connection but the first: `attempt` is the
    /// number of the attempt that succeeded (1: the first after the connection was lost).
    Reconnected {
        /// 1 for the first attempt after the loss, then one more per failure.
        attempt: u32,
    },
    /// The connection was lost; the client will reconnect (unless it was closed).
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
    /// The client waits `delay` (the backoff, with jitter) before attempt number `attempt`.
    Reconnecting {
        /// The attempt that follows the wait.
        attempt: u32,
        /// How long the client waits.
        delay: Duration,
    },
    /// Connection attempt number `attempt` failed.
    ConnectFailed {
        /// 1 for the first attempt since the last connection (or since the start).
        attempt: u32,
        /// Why ([`Error::Connect`] or [`Error::Write`]).
        error: Error,
    },
    /// The hub acknowledged a subscription (on every connection, since the client subscribes
    /// again after each reconnection).
    Subscribed {
        /// The channel.
        channel: String,
        /// Present when the client subscribed with `since` (it resumes a channel with history,
        /// or [`Client::subscribe_since`](crate::Client::subscribe_since) was called):
        /// `Some(true)` means nothing was missed; **`Some(false)` means the history could not
        /// fill the gap (trimmed, a new epoch after the hub restarted, or the position was
        /// beyond the latest): the application must reset what it built from this channel.**
        recovered: Option<bool>,
        /// On a channel with history, its position when the subscription took effect: live
        /// messages follow from `offset + 1` (after the replay, when there is one).
        position: Option<Position>,
    },
    /// A live message on a subscribed channel came in a new epoch (the hub lost the
    /// channel's counter while the client was subscribed): offsets start again, and the
    /// application must reset what it built from this channel. The message follows.
    EpochChanged {
        /// The channel.
        channel: String,
        /// Its new epoch.
        epoch: String,
    },
    /// The hub acknowledged an unsubscribe.
    Unsubscribed {
        /// The channel.
        channel: String,
    },
    /// A message for the application: anything the hub sent that is not an acknowledgement,
    /// a pong or an error. On channels with history, at most once per offset and in order.
    Message(Envelope),
    /// The answer to [`Client::ping`](crate::Client::ping).
    Pong,
    /// An `error` message from the hub: a refused or malformed request of this client
    /// (`subscription refused`, `publish refused`, ...), or the hub's `send_error` to every
    /// client (the protocol does not tell the two apart).
    ServerError {
        /// The channel it is about, if any.
        channel: Option<String>,
        /// The reason (the message's data).
        message: String,
    },
    /// Something went wrong that did not stop the client (a malformed server frame).
    Error(Error),
    /// The client has stopped; the last event. `error` is `None` after
    /// [`Client::close`](crate::Client::close) (which does not wait for room in a full
    /// buffer: then this event is skipped, and the stream just ends), [`Error::GaveUp`] when
    /// it gave up.
    Closed {
        /// Why it stopped, if not by `close`.
        error: Option<Error>,
    },
}

/// Why a connection was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The hub sent a close frame (1001 at shutdown, 4000 for a slow consumer, a code given
    /// to `Hub::disconnect`, ...).
    ServerClosed {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// The connection ended without a close frame (EOF).
    Ended,
    /// Reading failed (e.g. a reset).
    Error(String),
    /// Nothing arrived for the configured read timeout.
    Stalled,
}

/// The events of one [`Client`](crate::Client), in order: a [`Stream`] of [`Event`], or
/// [`recv`](Events::recv) in a loop. It ends (`None`) after [`Event::Closed`].
///
/// The buffer holds [`event_capacity`](crate::ClientConfigBuilder::event_capacity) events;
/// while it is full the client reads nothing from its socket, so an application that stops
/// reading events slows the hub's sends to it down (and is cut as a slow consumer, then
/// recovers, on channels with history). Dropping `Events` discards every further event.
#[derive(Debug)]
pub struct Events {
    pub(crate) rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event, or `None` once the client has stopped and every event was read.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}
