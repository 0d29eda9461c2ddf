// wshub.js: a dependency-free browser client for wshub (and go-ws) hubs, as an ES module.
//
// It connects, subscribes, reconnects with exponential backoff and jitter, restores every
// subscription after a reconnection `since` the last position (offset, epoch) seen on each
// channel with history, drops what it already delivered, and tells the page when the history
// could not fill a gap or the channel's epoch changed. The wire protocol is PROTOCOL.md's.

/**
 * A position in a channel's history: the last offset delivered and the channel's epoch.
 * @typedef {{offset: number, epoch: string}} Position
 */

/**
 * What `onSubscribed` is told after each `subscribed` acknowledgement.
 * @typedef {object} SubscribedInfo
 * @property {string} channel
 * @property {boolean|undefined} recovered `true`: nothing was missed; `false`: the history
 *   could not fill the gap (or the epoch changed); `undefined`: a first subscribe, or a
 *   channel without history.
 * @property {string|undefined} epoch the channel's epoch (channels with history only)
 * @property {number|undefined} offset the channel's latest offset when the subscription took effect
 */

/**
 * What `onReset` is told when the page must drop what it showed of a channel.
 * @typedef {object} ResetInfo
 * @property {string} channel
 * @property {"epoch"|"gap"} reason `"epoch"`: the channel's counter was lost (a hub restart
 *   without persistent history, say) and what follows starts again; `"gap"`: the history no
 *   longer held everything missed, what follows is what it still holds.
 * @property {string|undefined} epoch the channel's new (or current) epoch
 */

/**
 * Options of {@link WshubClient}. Every callback is optional.
 * @typedef {object} WshubOptions
 * @property {number} [initialBackoff=1000] ms before the first reconnection attempt
 * @property {number} [maxBackoff=30000] cap on the delay between attempts, in ms
 * @property {number} [backoffMultiplier=2] each attempt's delay is the previous one's times this
 * @property {number} [maxRetries=0] consecutive failed attempts before giving up; 0: never
 * @property {boolean} [jitter=true] wait a random delay between 0 and the backoff ("full
 *   jitter"), so that clients do not all come back at once after a hub restart
 * @property {(message: object) => void} [onMessage] each message, once, in order per channel
 * @property {(info: SubscribedInfo) => void} [onSubscribed] after each `subscribed` acknowledgement
 * @property {(info: ResetInfo) => void} [onReset] the page must drop what it has of a channel
 * @property {(state: "connecting"|"connected"|"disconnected"|"closed") => void} [onStateChange]
 * @property {(attempt: number) => void} [onReconnect] after a successful reconnection
 * @property {(error: Error) => void} [onGiveUp] `maxRetries` attempts failed in a row
 * @property {typeof WebSocket} [WebSocket] the WebSocket class (default: the global one)
 */

/**
 * A reconnecting client of a wshub hub.
 *
 * @example
 * import { WshubClient } from "/wshub.js";
 * const client = new WshubClient("ws://localhost:8080/ws", {
 *   onMessage: (msg) => console.log(msg.type, msg.data),
 *   onReset: ({ channel }) => console.warn("reload", channel),
 * });
 * client.subscribe("process:build-1", { fromStart: true });
 * client.connect();
 */
export class WshubClient {
  /**
   * @param {string} url the hub's WebSocket URL, such as `ws://localhost:8080/ws`
   * @param {WshubOptions} [options]
   */
  constructor(url, options = {}) {
    this.url = url;
    this.options = {
      initialBackoff: 1000,
      maxBackoff: 30000,
      backoffMultiplier: 2,
      maxRetries: 0,
      jitter: true,
      ...options,
    };
    /** @type {"disconnected"|"connecting"|"connected"|"closed"} */
    this.state = "disconnected";
    /** @type {Map<string, {fromStart: boolean}>} the channels to be subscribed to */
    this._subscriptions = new Map();
    /** @type {Map<string, Position>} the last position delivered, per channel with history */
    this._positions = new Map();
    this._socket = null;
    this._timer = null;
    this._attempt = 0;
    this._everConnected = false;
  }

  /** Starts connecting (and reconnecting until {@link WshubClient#close}). */
  connect() {
    if (this.state === "closed") throw new Error("wshub: client is closed");
    if (this._socket || this._timer) return;
    this._open();
  }

  /**
   * Subscribes to `channel`, now if connected and again after every reconnection (then
   * `since` the last position delivered, on a channel with history). Idempotent.
   * @param {string} channel
   * @param {{fromStart?: boolean}} [options] `fromStart`: the first subscribe asks for the
   *   whole history (`since: {offset: 0}`), for a page opened half-way through a build log
   */
  subscribe(channel, options = {}) {
    this._subscriptions.set(channel, { fromStart: Boolean(options.fromStart) });
    if (this.state === "connected") this._sendSubscribe(channel);
  }

  /**
   * Unsubscribes from `channel` and forgets its position.
   * @param {string} channel
   */
  unsubscribe(channel) {
    this._subscriptions.delete(channel);
    this._positions.delete(channel);
    if (this.state === "connected") this._write({ type: "unsubscribe", data: channel });
  }

  /**
   * Sends a message (an envelope object; it is JSON-encoded). Nothing is queued.
   * @param {object} message such as `{type: "ping"}`
   * @throws {Error} when not connected
   */
  send(message) {
    if (this.state !== "connected") throw new Error("wshub: not connected");
    this._write(message);
  }

  /**
   * The last position delivered on `channel`, or `undefined` (no history, or nothing yet).
   * @param {string} channel
   * @returns {Position|undefined}
   */
  position(channel) {
    const position = this._positions.get(channel);
    return position && { ...position };
  }

  /** Closes the connection and stops reconnecting. */
  close() {
    clearTimeout(this._timer);
    this._timer = null;
    const socket = this._socket;
    this._socket = null;
    this._setState("closed");
    if (socket) socket.close(1000);
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.options.onStateChange?.(state);
  }

  _open() {
    this._timer = null;
    this._setState("connecting");
    const WebSocketClass = this.options.WebSocket ?? globalThis.WebSocket;
    let socket;
    try {
      socket = new WebSocketClass(this.url);
    } catch (error) {
      this._scheduleReconnect(error);
      return;
    }
    this._socket = socket;
    let opened = false;
    socket.onopen = () => {
      if (this._socket !== socket) return;
      opened = true;
      const attempt = this._attempt;
      this._attempt = 0;
      this._setState("connected");
      for (const channel of this._subscriptions.keys()) this._sendSubscribe(channel);
      if (this._everConnected) this.options.onReconnect?.(attempt);
      this._everConnected = true;
    };
    socket.onmessage = (event) => {
      if (this._socket !== socket) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this._receive(message);
    };
    socket.onclose = () => {
      if (this._socket !== socket) return;
      this._socket = null;
      this._scheduleReconnect(new Error(opened ? "wshub: connection lost" : "wshub: connection failed"));
    };
    // Errors are followed by `close`, which reconnects.
    socket.onerror = () => {};
  }

  _scheduleReconnect(error) {
    if (this.state === "closed") return;
    this._setState("disconnected");
    this._attempt += 1;
    const { initialBackoff, maxBackoff, backoffMultiplier, maxRetries, jitter } = this.options;
    if (maxRetries > 0 && this._attempt > maxRetries) {
      this._setState("closed");
      this.options.onGiveUp?.(error);
      return;
    }
    const backoff = Math.min(maxBackoff, initialBackoff * backoffMultiplier ** (this._attempt - 1));
    const delay = jitter ? Math.random() * backoff : backoff;
    this._timer = setTimeout(() => this._open(), delay);
  }

  _sendSubscribe(channel) {
    const request = { type: "subscribe", data: channel };
    const position = this._positions.get(channel);
    if (position) {
      request.since = { offset: position.offset, epoch: position.epoch };
    } else if (this._subscriptions.get(channel)?.fromStart) {
      request.since = { offset: 0 };
    }
    this._write(request);
  }

  _write(message) {
    this._socket.send(JSON.stringify(message));
  }

  _receive(message) {
    const channel = message.channel;
    if (message.type === "subscribed" && channel !== undefined) {
      this._acknowledged(channel, message.data);
      return;
    }
    if (typeof message.offset === "number" && typeof message.epoch === "string" && channel !== undefined) {
      const position = this._positions.get(channel);
      if (position && position.epoch === message.epoch && message.offset <= position.offset) {
        return; // delivered already
      }
      if (position && position.epoch !== message.epoch) {
        this.options.onReset?.({ channel, reason: "epoch", epoch: message.epoch });
      }
      this._positions.set(channel, { offset: message.offset, epoch: message.epoch });
    }
    this.options.onMessage?.(message);
  }

  _acknowledged(channel, data) {
    const recovered = data?.recovered;
    const epoch = data?.epoch;
    const offset = data?.offset;
    if (typeof epoch === "string" && typeof offset === "number") {
      const position = this._positions.get(channel);
      if (!position) {
        // A first subscribe: live from `offset + 1`, or the replay after `since` 0.
        const fromStart = recovered !== undefined;
        this._positions.set(channel, { offset: fromStart ? 0 : offset, epoch });
        if (recovered === false) this.options.onReset?.({ channel, reason: "gap", epoch });
      } else if (position.epoch !== epoch) {
        // The counter was lost: the replay starts again from the first offset held.
        this._positions.set(channel, { offset: 0, epoch });
        this.options.onReset?.({ channel, reason: "epoch", epoch });
      } else if (recovered === false) {
        // Trimmed (what is replayed comes after our offset), or our offset is beyond the
        // latest: live publications follow from `offset + 1`.
        position.offset = Math.min(position.offset, offset);
        this.options.onReset?.({ channel, reason: "gap", epoch });
      }
    }
    this.options.onSubscribed?.({ channel, recovered, epoch, offset });
  }
}
