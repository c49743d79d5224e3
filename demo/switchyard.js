// switchyard.js: the browser client for a switchyard chat gateway.
//
// An ES module with no dependencies and no build step. `connect()` creates a session, attaches
// the first transport that works (WebSocket, Server-Sent Events, long polling, short polling),
// and keeps it attached: a dropped transport is resumed from the last seq seen, so the
// application sees every event once, in order. On a server that authenticates users it sends
// the application's identity token and keeps the session's token fresh (`refresh`).
// docs/client.md describes the API.

/** Transport names, in the default fallback order. */
export const TRANSPORTS = Object.freeze(['websocket', 'sse', 'long-polling', 'short-polling']);

/** WebSocket close codes the server uses, by reason. */
export const CLOSE_REASONS = Object.freeze({
  4000: 'superseded',
  4001: 'slow_consumer',
  4002: 'shutdown',
  4003: 'expired',
  4004: 'heartbeat_timeout',
  4005: 'token_expired',
});

/** Events a handler can subscribe to with `client.on(type, handler)`. */
export const EVENT_TYPES = Object.freeze([
  'message', 'presence', 'presence_diff', 'typing', 'history', 'history_page', 'error', 'reset', 'state',
  'transport',
]);

/** Event types the server sends, which are also the SSE `event:` names (`error` aside). */
const SERVER_EVENT_TYPES = Object.freeze([
  'message', 'presence', 'presence_diff', 'typing', 'history', 'history_page', 'reset',
]);

const DEFAULTS = Object.freeze({
  transports: TRANSPORTS,
  openTimeoutMs: 3000,
  shortPollMs: undefined, // the server's short_poll_ms
  longPollMs: undefined, // the server's long_poll_ms
  sendTimeoutMs: 5000,
  sendAttempts: 4,
  historyTimeoutMs: 10000,
  reconnectMinMs: 250,
  reconnectMaxMs: 10000,
  token: undefined,
  refreshBeforeMs: 60000,
  ackMs: 10000,
});

const ROOM_PATTERN = /^[A-Za-z0-9_.-]{1,64}$/;
const MAX_TEXT_CHARS = 4000;
/** The most messages one `history` command may ask for. */
const MAX_PAGE = 200;
/** A transport that stays up this long counts as healthy: the reconnect backoff starts over. */
const STABLE_AFTER_MS = 5000;
/** Extra time a long poll may take beyond its `wait` before it is presumed dead. */
const LONG_POLL_GRACE_MS = 15000;
/** The server's heartbeat interval when neither the session nor the stream names one. */
const DEFAULT_HEARTBEAT_MS = 15000;
/**
 * A WebSocket or SSE stream from which nothing (no event, no heartbeat) has come for two
 * heartbeat intervals and this much more is presumed dead: the slack covers a heartbeat that
 * is a little late on a busy server or network.
 */
const SILENCE_SLACK_MS = 1000;
/** Frames without a seq that only show the stream is alive; never delivered as events. */
const LIVENESS_TYPES = new Set(['ready', 'heartbeat']);
/**
 * Events processed but not yet acknowledged past which a stream's `ack` goes at once instead
 * of after `ackMs`: a busy stream acknowledges every 64 events (one small command per 64
 * events), a quiet one every `ackMs`.
 */
const ACK_EVENTS = 64;
/** A send refused with `rate_limited` this many times rejects with that error. */
const MAX_RATE_LIMITED = 10;
/** The wait before retrying a `rate_limited` command when the server gives no hint. */
const RATE_LIMITED_WAIT_MS = 1200;
/** Codes of HTTP command failures that a retry cannot fix. */
const FINAL_CODES = new Set([
  'bad_command', 'too_large', 'invalid_room', 'invalid_name', 'invalid_text', 'not_in_room',
  'too_many_rooms', 'forbidden_origin', 'forbidden_host', 'forbidden', 'closed',
]);
/**
 * The server's refusals of an identity token (401). The same token gets the same answer, so
 * none is retried: creating a session with a refused token ends the client (`closed`).
 */
export const TOKEN_ERRORS = Object.freeze([
  'token_missing', 'token_malformed', 'token_bad_signature', 'token_unsigned',
  'token_wrong_algorithm', 'token_expired', 'token_not_yet_valid',
]);
/** Reasons a transport ends for that mean the session is gone (or its resume point is). */
const SESSION_GONE = new Set(['unknown_session', 'expired', 'invalid_after', 'token_expired']);
/** An automatic refresh that failed for a reason that may pass is tried again after this. */
const REFRESH_RETRY_MS = 5000;
/** setTimeout's longest delay; a token valid for longer is checked again after it. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** An error from the server (`code` is its stable error code) or from the client. */
export class SwitchyardError extends Error {
  constructor(code, message, status) {
    super(message || code);
    this.name = 'SwitchyardError';
    this.code = code;
    this.status = status;
  }
}

/**
 * Creates a session on the server at `baseUrl` and attaches a transport.
 * Resolves with the connected {@link Client}; rejects if the session cannot be created or no
 * transport opens (the error's `fallbacks` lists what was tried).
 */
export async function connect(baseUrl = '', options = {}) {
  const client = new Client(baseUrl, options);
  await client._start();
  return client;
}

/** A random `client_id` for a `send` (works outside secure contexts, unlike randomUUID). */
export function newClientId() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return 'c' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * `fetch` with a deadline for the response's headers. A request the browser sends on a pooled
 * connection that the network silently dropped (a NAT or proxy that lost its state) would
 * otherwise wait for TCP to give up, minutes later; aborting it also retires that connection.
 * Rejects with an `AbortError` past `ms`.
 */
async function fetchWithin(url, init, ms) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), ms);
  try {
    return await fetch(url, { ...init, signal: controller.signal });
  } finally {
    clearTimeout(timer);
  }
}
const now = () => performance.now();
const jitter = (ms) => ms * (0.5 + Math.random() * 0.5);

/** A session's connection to the server. Create it with {@link connect}. */
export class Client {
  constructor(baseUrl, options) {
    this.options = { ...DEFAULTS, ...options };
    const wanted = this.options.transports || TRANSPORTS;
    const unknown = wanted.filter((t) => !TRANSPORTS.includes(t));
    if (unknown.length || wanted.length === 0) {
      throw new SwitchyardError('bad_option', `transports must be a non-empty list of ${TRANSPORTS.join(', ')}; got ${JSON.stringify(wanted)}`);
    }
    this.options.transports = [...wanted];
    const { token } = this.options;
    if (token !== undefined && token !== null && typeof token !== 'function' && (typeof token !== 'string' || !token)) {
      throw new SwitchyardError('bad_option', 'token must be a non-empty string or a function returning one');
    }
    /** The token to create a session with when the `token` option is a string: moved on by refresh(). */
    this._token = typeof token === 'string' ? token : null;
    const base = new URL(baseUrl || '/', globalThis.location ? globalThis.location.href : undefined);
    this.baseUrl = base.href.replace(/\/+$/, '');
    this.name = this.options.name || `guest-${String(Math.floor(Math.random() * 10000)).padStart(4, '0')}`;

    /** Session id on the server. */
    this.sessionId = null;
    /** The server's reply to session creation: transports, intervals, limits. */
    this.server = null;
    /** Name of the live transport (or the one being resumed); null before the first. */
    this.transport = null;
    /** connecting | open | reconnecting | superseded | expired | closed | failed */
    this.state = 'connecting';
    /**
     * Why the client closed by itself (state `closed` without close()): `token_expired`, or
     * the token_* code that refused a new session. null otherwise.
     */
    this.closeReason = null;
    /** The authenticated user (the token's `sub`) when the server authenticates, else null. */
    this.user = null;
    /**
     * When the session ends unless refreshed, in ms since the Unix epoch (the token's `exp`),
     * when the server authenticates; else null.
     */
    this.expiresAtMs = null;
    /**
     * The last transport selection's failures, in the order tried: `{transport, reason,
     * detail, ms}`. `reason` is a code (not_offered, timeout, no_data, error, or a close
     * reason), `detail` says what happened in words.
     */
    this.fallbacks = [];
    /** Seq of the last event delivered; resume point of the next attach. */
    this.lastSeq = 0;
    this._ackedSeq = 0; // the last seq sent in an `ack` (or as a resume point)
    this._ackTimer = null;
    /**
     * Joined rooms: name -> `{online: [names], count, complete, lastMessageId, oldestMessageId,
     * more}`, presence as of the last `presence` snapshot and the `presence_diff` events after
     * it, and the span of messages held (see newRoomState).
     */
    this.rooms = new Map();

    this._handlers = new Map();
    this._active = null; // the transport attempt that may deliver events
    this._pending = new Map(); // client_id -> a send waiting for its echo
    this._pages = new Map(); // room -> a loadOlder waiting for its history_page
    this._epoch = 0; // bumped whenever an async flow (reconnect, renew) must give up
    this._reconnectAttempt = 0;
    this._preOpenFailures = 0;
    this._timers = new Set();
    this._stableTimer = null;
    this._renewing = false;
    this._sessionReady = Promise.resolve();
    this._roomRules = null; // the `rooms` claim of the session's token, if it has one
    this._clockOffsetMs = 0; // the server's clock minus ours, from its Date header
    this._refreshTimer = null;
    this._onOnline = () => {
      if (this.state === 'reconnecting') this._reconnectNow();
    };
  }

  // ---- public API ----

  /** Subscribes to an event type; returns a function that unsubscribes. */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    return () => this.off(type, handler);
  }

  /** Unsubscribes a handler. */
  off(type, handler) {
    this._handlers.get(type)?.delete(handler);
  }

  /**
   * Joins a room (created on first join). The server answers with `history` and a `presence`
   * snapshot of the room without you; your own join arrives in the next `presence_diff`.
   */
  async join(room) {
    checkRoom(room);
    // The server refuses it too (403); over the WebSocket its `error` event could not say
    // which join it answers, so the token's own `rooms` claim is checked first.
    if (this._roomRules && !mayJoin(this._roomRules, room)) {
      throw new SwitchyardError('forbidden', `your token does not let you join room ${JSON.stringify(room)}`, 403);
    }
    if (!this.rooms.has(room)) this.rooms.set(room, newRoomState());
    try {
      await this._command({ type: 'join', room });
    } catch (error) {
      // history_unavailable: the server could not read the room's history, so did not join it.
      // backend_unavailable: a cluster node could not reach Redis (or lagged); join again later.
      if (FINAL_CODES.has(error.code) || error.code === 'server_full' || error.code === 'history_unavailable'
        || error.code === 'backend_unavailable') {
        this.rooms.delete(room);
        this._failPages(room, error);
      }
      throw error;
    }
  }

  /** Leaves a room. */
  async leave(room) {
    checkRoom(room);
    if (!this.rooms.delete(room)) return;
    this._failPages(room, new SwitchyardError('not_in_room', `left room ${JSON.stringify(room)}`));
    await this._command({ type: 'leave', room });
  }

  /**
   * Tells the members of a joined room that this user is typing. The server names the typers
   * in one `typing` event per room per presence interval, sent to every member (this session
   * included: see {@link Client#othersTyping}). Not retried when rate limited: a late
   * typing indication is worse than none.
   */
  async typing(room) {
    if (!this.rooms.has(room)) return;
    await this._command({ type: 'typing', room }, { retryRateLimited: false }).catch(() => {});
  }

  /**
   * Sends a message. Resolves with the echoed `message` event (matched by `client_id`).
   * Without an echo after `sendTimeoutMs` it is sent again with the same `client_id` (the
   * server does not broadcast a retry twice), up to `sendAttempts` times, then rejects.
   * The returned promise carries the `clientId`. `options.clientId` picks it.
   */
  send(room, text, options = {}) {
    const clientId = options.clientId || newClientId();
    let entry;
    const promise = new Promise((resolve, reject) => {
      entry = { room, text: String(text), clientId, resolve, reject, attempts: 0, timer: null };
    });
    promise.clientId = clientId;
    const chars = [...entry.text].length;
    if (!this.rooms.has(room)) {
      entry.reject(new SwitchyardError('not_in_room', `not in room ${JSON.stringify(room)}; join it first`));
    } else if (chars === 0 || chars > MAX_TEXT_CHARS) {
      entry.reject(new SwitchyardError('invalid_text', `text must be 1-${MAX_TEXT_CHARS} characters, got ${chars}`));
    } else if (this.state === 'closed') {
      entry.reject(new SwitchyardError('closed', 'the client is closed'));
    } else {
      this._pending.set(clientId, entry);
      this._attemptSend(entry);
    }
    return promise;
  }

  /**
   * Asks for the messages of a joined room just older than the oldest one this client holds
   * (the newest, if it holds none): up to `options.limit` of them (1-200, the server's
   * default 50). Handlers get the server's answer as a `history_page` event, with every
   * message this client already delivered (in a `message`, a `history` or an earlier page)
   * removed; the promise resolves with that same event. It rejects with the server's error,
   * with `reset` if the room's view is replaced (a `reset`, or a `history` after a rejoin)
   * before the page comes, or with `timeout` after `historyTimeoutMs`. One request per room
   * at a time: a call while one is on its way returns the same promise. Once the room's start
   * is reached ({@link Client#hasOlder} false) it resolves at once with an empty page.
   */
  loadOlder(room, options = {}) {
    const waiting = this._pages.get(room);
    if (waiting) return waiting.promise;
    const state = this.rooms.get(room);
    const { limit } = options;
    if (limit !== undefined && !(Number.isInteger(limit) && limit >= 1 && limit <= MAX_PAGE)) {
      return Promise.reject(new SwitchyardError('bad_option', `limit must be an integer 1-${MAX_PAGE}, got ${JSON.stringify(limit)}`));
    }
    if (!state) return Promise.reject(new SwitchyardError('not_in_room', `not in room ${JSON.stringify(room)}; join it first`));
    if (this.state === 'closed') return Promise.reject(new SwitchyardError('closed', 'the client is closed'));
    if (!state.loaded) return Promise.reject(new SwitchyardError('not_ready', `the history of ${JSON.stringify(room)} has not arrived yet`));
    const before = state.oldestMessageId || null;
    if (!state.more) return Promise.resolve({ type: 'history_page', room, before, messages: [], more: false });
    let entry;
    const promise = new Promise((resolve, reject) => {
      entry = { room, before, limit, resolve, reject, timer: null, via: null };
    });
    entry.promise = promise;
    this._pages.set(room, entry);
    state.askedBefore.add(before || 0);
    const command = { type: 'history', room };
    if (before) command.before = before;
    if (limit !== undefined) command.limit = limit;
    entry.timer = setTimeout(() => {
      this._finishPage(entry, new SwitchyardError('timeout', `no history_page for ${JSON.stringify(room)} within ${this._eventWaitMs(this.options.historyTimeoutMs)} ms`));
    }, this._eventWaitMs(this.options.historyTimeoutMs));
    this._command(command)
      .then((result) => { entry.via = result.via; })
      .catch((error) => this._finishPage(entry, error));
    return promise;
  }

  /**
   * Whether a joined room may have messages older than the oldest this client holds: true
   * until a `history_page` says `more: false`, and again after {@link Client#forgetOlder}.
   * False for a room not joined or whose `history` has not arrived.
   */
  hasOlder(room) {
    const state = this.rooms.get(room);
    return Boolean(state && state.loaded && state.more);
  }

  /**
   * Tells the client that the page no longer shows the messages of `room` older than
   * `before` (the id of the oldest message it still shows; past the newest when it shows
   * none), so {@link Client#loadOlder} asks for them again rather than starting below them.
   * For a page that trims long rooms; a pending `loadOlder` below `before` rejects with
   * `cancelled`.
   */
  forgetOlder(room, before) {
    const state = this.rooms.get(room);
    if (!state || !state.oldestMessageId || !(before > state.oldestMessageId)) return;
    state.oldestMessageId = Math.min(before, state.lastMessageId + 1);
    state.more = true;
    for (const asked of state.askedBefore) {
      if (asked < state.oldestMessageId) state.askedBefore.delete(asked);
    }
    const entry = this._pages.get(room);
    if (entry && (entry.before || 0) < state.oldestMessageId) {
      this._finishPage(entry, new SwitchyardError('cancelled', 'the messages it would have joined onto were forgotten'));
    }
  }

  /**
   * Names online in a joined room, in join order, as of the last presence event. When the
   * room is larger than the server's presence list limit this is only a sample (see
   * {@link Client#presence}); [] for a room not joined.
   */
  online(room) {
    return [...(this.rooms.get(room)?.online || [])];
  }

  /** Members online in a joined room (authoritative even when the name list is a sample). */
  count(room) {
    return this.rooms.get(room)?.count || 0;
  }

  /**
   * A joined room's presence: `{count, online: [names], complete}`. `complete` false means
   * the room is above the server's presence list limit: `online` is a sample (possibly
   * stale) and only `count` is exact. null for a room not joined.
   */
  presence(room) {
    const state = this.rooms.get(room);
    if (!state) return null;
    return { count: state.count, online: [...state.online], complete: state.complete };
  }

  /** The names in a `typing` event other than this session's own (the server names everyone). */
  othersTyping(event) {
    return (event?.users || []).filter((name) => name !== this.name);
  }

  /**
   * Re-runs transport selection on the same session with a new preference list (for example
   * `['sse']`), resuming from the last seq: nothing is lost or repeated.
   * Resolves with the transport name now attached.
   */
  async setTransports(transports) {
    const list = transports && transports.length ? [...transports] : [...TRANSPORTS];
    if (list.some((t) => !TRANSPORTS.includes(t))) {
      throw new SwitchyardError('bad_option', `unknown transport in ${JSON.stringify(list)}`);
    }
    this._ensureNotClosed();
    this.options.transports = list;
    const epoch = this._cancelFlows();
    this._stopActive();
    this._setState('connecting', 'transport change');
    await this._sessionReady;
    try {
      return await this._attachChain(list, epoch);
    } catch (error) {
      if (epoch === this._epoch) this._afterAttachFailure(error, epoch);
      throw error;
    }
  }

  /**
   * Attaches again now: after `superseded` this takes the session back from whichever tab or
   * transport took it; while reconnecting it skips the backoff delay.
   */
  reconnect() {
    this._ensureNotClosed();
    this._reconnectAttempt = 0;
    this._reconnectNow();
  }

  /**
   * Extends the session with a new identity token for the same user, before the current one
   * expires (the `refresh` command). Without `token`, the `token` option (a function) is asked
   * for one. Sent with `POST /commands` whatever the transport: over the WebSocket a refresh
   * that works gets no answer. Resolves with `{expiresAtMs}`, the session's new end; rejects
   * with the server's error: a token_* code, `forbidden` (a token for another user, or a
   * session created without one), `bad_command` (the server does not authenticate).
   */
  async refresh(token) {
    this._ensureNotClosed();
    if (token === undefined && typeof this.options.token === 'function') token = await this._freshToken();
    if (typeof token !== 'string' || !token) {
      throw new SwitchyardError('bad_option', 'refresh needs a token (a non-empty string)');
    }
    await this._sessionReady;
    this._ensureNotClosed();
    await this._post({ type: 'refresh', token });
    const claims = tokenClaims(token);
    if (this._token !== null) this._token = token;
    if (claims && Array.isArray(claims.rooms)) this._roomRules = claims.rooms;
    else if (claims) this._roomRules = null;
    const expiresAtMs = claims && typeof claims.exp === 'number' ? claims.exp * 1000 : null;
    // An expiry that did not move is not scheduled again: it would refresh in a loop.
    if (expiresAtMs !== null && (this.expiresAtMs === null || expiresAtMs > this.expiresAtMs)) {
      this.expiresAtMs = expiresAtMs;
      this._scheduleRefresh();
    }
    return { expiresAtMs: this.expiresAtMs };
  }

  /** Ends the session on the server (its rooms see it `left` in a `presence_diff`) and stops the client. */
  async close() {
    if (this.state === 'closed') return;
    this._shutDown(null, new SwitchyardError('closed', 'the client was closed'));
    if (this.sessionId) {
      await fetch(this._url(`/v1/sessions/${this.sessionId}`), { method: 'DELETE', keepalive: true })
        .catch(() => {});
    }
  }

  /**
   * Test hook: drops the live transport abruptly (closes the socket or EventSource, aborts the
   * poll) without telling the server, so the client must reconnect and resume.
   */
  _dropForTest() {
    const active = this._active;
    if (!active) return false;
    active.fail({ reason: 'network', detail: 'dropped by _dropForTest()' });
    return true;
  }

  /**
   * Stops the client for good: state `closed` (its `reason`: `reason`, null for close()),
   * pending sends and `loadOlder`s reject with `error`.
   */
  _shutDown(reason, error) {
    this._cancelFlows();
    this._stopActive();
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    this.closeReason = reason;
    this._setState('closed', reason || undefined, reason ? { error } : undefined);
    globalThis.removeEventListener?.('online', this._onOnline);
    for (const entry of this._pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(error);
    }
    this._pending.clear();
    this._failPages(null, error);
  }

  // ---- session and transport selection ----

  async _start() {
    globalThis.addEventListener?.('online', this._onOnline);
    const epoch = this._epoch;
    try {
      await this._createSession();
      await this._attachChain(this.options.transports, epoch);
    } catch (error) {
      this._cancelFlows();
      this._stopActive();
      clearTimeout(this._refreshTimer);
      this._refreshTimer = null;
      this._setState('failed', error.message);
      globalThis.removeEventListener?.('online', this._onOnline);
      if (this.sessionId) {
        fetch(this._url(`/v1/sessions/${this.sessionId}`), { method: 'DELETE', keepalive: true }).catch(() => {});
      }
      throw error;
    }
  }

  /**
   * Creates a session: with the identity token, if there is one, as `Authorization: Bearer`
   * (a server that does not authenticate ignores it and takes the name). `token`: the one to
   * use, else the `token` option's.
   */
  async _createSession(token) {
    if (token === undefined) token = typeof this.options.token === 'function' ? await this._freshToken() : this._token;
    const headers = { 'content-type': 'application/json' };
    if (token) headers.authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetchWithin(this._url('/v1/sessions'), {
        method: 'POST',
        headers,
        body: JSON.stringify({ name: this.name }),
      }, this.options.sendTimeoutMs);
    } catch (error) {
      throw new SwitchyardError('network', `cannot reach ${this.baseUrl}: ${error.message}`);
    }
    const body = await response.json().catch(() => null);
    if (response.status !== 201 || !body || !body.session) {
      const error = body?.error || { code: `http_${response.status}`, message: `session creation answered ${response.status}` };
      throw new SwitchyardError(error.code, error.message, response.status);
    }
    // Date is whole seconds, so the server's clock is on average half a second past it.
    // Hidden cross-origin (not a safelisted header): then our own clock is taken as right.
    const serverNow = Date.parse(response.headers.get('date') || '') + 500;
    if (Number.isFinite(serverNow)) this._clockOffsetMs = serverNow - Date.now();
    this.sessionId = body.session;
    this.name = body.name;
    this.server = body;
    this._startSeqs();
    this.user = typeof body.user === 'string' ? body.user : null;
    this.expiresAtMs = typeof body.expires_at_ms === 'number' ? body.expires_at_ms : null;
    const claims = this.user !== null && token ? tokenClaims(token) : null;
    this._roomRules = claims && Array.isArray(claims.rooms) ? claims.rooms : null;
    this._scheduleRefresh();
  }

  /** A token from the `token` option's function; `token_unavailable` if it gives none. */
  async _freshToken() {
    let token;
    try {
      token = await this.options.token();
    } catch (error) {
      throw new SwitchyardError('token_unavailable', `the token function failed: ${error?.message || error}`);
    }
    if (typeof token !== 'string' || !token) {
      throw new SwitchyardError('token_unavailable', 'the token function returned no token (a non-empty string)');
    }
    return token;
  }

  /**
   * Refreshes the session's token shortly before it expires, when the `token` option is a
   * function: `refreshBeforeMs` ahead, or halfway through a shorter remaining life.
   */
  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    const lead = this.options.refreshBeforeMs;
    if (typeof this.options.token !== 'function' || !(lead > 0) || this.expiresAtMs === null) return;
    const remaining = this.expiresAtMs - this._serverNow();
    const dueAt = Date.now() + Math.max(0, remaining - Math.min(lead, remaining / 2));
    this._refreshAt(dueAt, this.sessionId);
  }

  _refreshAt(dueAt, sessionId) {
    this._refreshTimer = setTimeout(() => {
      this._refreshTimer = null;
      if (Date.now() < dueAt) this._refreshAt(dueAt, sessionId); // past setTimeout's range
      else this._autoRefresh(sessionId);
    }, Math.min(MAX_TIMER_MS, Math.max(0, dueAt - Date.now())));
  }

  /**
   * The scheduled refresh. A failure is reported as an `error` event (code `refresh_failed`,
   * the cause in `cause`) and, unless the server refused the token, tried again while the
   * session lasts; at worst the session ends `token_expired` and is replaced with a fresh
   * token (see _sessionGone).
   */
  async _autoRefresh(sessionId) {
    const current = () => sessionId === this.sessionId && this.state !== 'closed';
    if (!current()) return;
    try {
      await this.refresh();
    } catch (error) {
      if (!current()) return;
      this._emit('error', {
        type: 'error', code: 'refresh_failed', cause: error.code, message: `automatic token refresh failed: ${error.message}`,
      });
      const refused = TOKEN_ERRORS.includes(error.code) || error.code === 'forbidden' || error.code === 'bad_command';
      const wait = Math.min(REFRESH_RETRY_MS, (this.expiresAtMs - this._serverNow()) / 2);
      if (!refused && wait >= 500) this._refreshAt(Date.now() + wait, sessionId);
    }
  }

  /** Our estimate of the server's clock, in ms since the Unix epoch. */
  _serverNow() {
    return Date.now() + this._clockOffsetMs;
  }

  /**
   * The session is gone (or its resume point is). A session that ended `token_expired` is
   * replaced only with a token from the `token` option's function: the token it was created
   * with has expired, so the client closes with that reason. Anything else: see _renew.
   */
  _sessionGone(reason) {
    // A session found gone (unknown_session) after its token's expiry ended that way too,
    // with no transport attached to be told. The server would take the expired token for a
    // few seconds more (its leeway for clock skew) and end each new session at once.
    if (reason !== 'invalid_after' && this.expiresAtMs !== null && this._serverNow() >= this.expiresAtMs) {
      reason = 'token_expired';
    }
    if (reason === 'token_expired' && typeof this.options.token !== 'function') {
      this._shutDown('token_expired', new SwitchyardError('token_expired', 'the identity token expired: a new session needs a new token', 401));
      return;
    }
    this._renew(reason);
  }

  /** Tries each transport in `list` until one opens; records the failures in `fallbacks`. */
  async _attachChain(list, epoch) {
    const offered = this.server.transports || TRANSPORTS;
    const tried = [];
    this.fallbacks = [];
    for (const name of list) {
      if (epoch !== this._epoch) throw new SwitchyardError('cancelled', 'superseded by a newer attach');
      if (!offered.includes(name)) {
        this._recordFallback(name, { reason: 'not_offered', detail: 'not offered by the server' }, 0);
        tried.push(name);
        continue;
      }
      const started = now();
      try {
        await this._tryTransport(name, epoch);
        return name;
      } catch (info) {
        if (epoch !== this._epoch) throw new SwitchyardError('cancelled', 'superseded by a newer attach');
        if (SESSION_GONE.has(info.reason)) {
          throw new SwitchyardError(info.reason, info.detail || info.reason);
        }
        this._recordFallback(name, info, Math.round(now() - started));
        tried.push(name);
      }
    }
    const error = new SwitchyardError('no_transport', `no transport could be opened (tried ${tried.join(', ') || 'none'})`);
    error.fallbacks = [...this.fallbacks];
    throw error;
  }

  /**
   * Opens one transport, resuming after `lastSeq`. Resolves once it is open; rejects with
   * `{reason, detail}` if it errors or does not open within `openTimeoutMs` (`timeout`;
   * `no_data` for a stream whose first event did not come, see SseTransport).
   */
  _tryTransport(name, epoch) {
    return new Promise((resolve, reject) => {
      let settled = false;
      const settle = (fn, value) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        fn(value);
      };
      const transport = makeTransport(name, this, {
        open: () => {
          if (epoch !== this._epoch) {
            transport.stop();
            settle(reject, { reason: 'cancelled' });
            return;
          }
          this._opened(transport);
          settle(resolve, transport);
        },
        event: (event) => this._onEvent(transport, event),
        lost: (info) => {
          if (!settled) {
            if (this._active === transport) this._active = null;
            settle(reject, info);
          } else {
            this._onLost(transport, info);
          }
        },
      });
      const timer = setTimeout(() => {
        if (settled) return;
        transport.stop();
        if (this._active === transport) this._active = null;
        settle(reject, transport.openTimedOut(this.options.openTimeoutMs));
      }, this.options.openTimeoutMs);
      this._stopActive();
      this._active = transport;
      transport.start(this.lastSeq);
    });
  }

  _opened(transport) {
    const previous = this.transport;
    this.transport = transport.name;
    this._preOpenFailures = 0;
    clearTimeout(this._stableTimer);
    this._stableTimer = setTimeout(() => {
      if (this._active === transport) this._reconnectAttempt = 0;
    }, STABLE_AFTER_MS);
    this._setState('open');
    if (previous !== transport.name || this._fallbacksShown !== this.fallbacks) {
      this._fallbacksShown = this.fallbacks;
      this._emit('transport', { transport: transport.name, previous, fallbacks: [...this.fallbacks] });
    }
  }

  _recordFallback(transport, { reason, detail }, ms) {
    this.fallbacks.push({ transport, reason, detail: detail || reason, ms });
  }

  /** A transport that had opened went away. */
  _onLost(transport, info) {
    if (transport !== this._active) return; // a stale transport: we moved on already
    this._active = null;
    transport.stop();
    if (this.state === 'closed') return;
    switch (info.reason) {
      case 'superseded':
        // Another tab or transport attached to this session: do not fight it.
        this._setState('superseded', 'another tab or transport took over this session');
        return;
      case 'expired':
      case 'unknown_session':
      case 'invalid_after':
      case 'token_expired':
        this._sessionGone(info.reason);
        return;
      default:
        this._scheduleReconnect(info.reason);
    }
  }

  _scheduleReconnect(reason) {
    if (this.state === 'closed' || this.state === 'superseded') return;
    this._setState('reconnecting', reason);
    const delay = jitter(Math.min(this.options.reconnectMaxMs, this.options.reconnectMinMs * 2 ** this._reconnectAttempt));
    this._reconnectAttempt = Math.min(this._reconnectAttempt + 1, 16);
    const epoch = this._epoch;
    this._later(delay, () => {
      if (epoch === this._epoch) this._reconnect(epoch);
    });
  }

  _reconnectNow() {
    const epoch = this._cancelFlows();
    this._stopActive();
    this._setState('reconnecting', 'reconnect requested');
    this._reconnect(epoch);
  }

  /** Resumes on the current transport; after repeated failures runs the whole chain again. */
  async _reconnect(epoch) {
    if (this.state === 'closed') return;
    await this._sessionReady;
    if (epoch !== this._epoch) return;
    const name = this.transport && this.server.transports.includes(this.transport)
      ? this.transport
      : this.options.transports[0];
    try {
      await this._tryTransport(name, epoch);
      return;
    } catch (info) {
      if (epoch !== this._epoch || info.reason === 'cancelled') return;
      if (SESSION_GONE.has(info.reason)) {
        this._sessionGone(info.reason);
        return;
      }
      // WebSocket and EventSource cannot show why they failed: ask whether the session lives.
      // (A poll sees the HTTP status itself.)
      const blind = name === 'websocket' || name === 'sse';
      if (blind && await this._probeSession() === false) {
        if (epoch === this._epoch) this._sessionGone('unknown_session');
        return;
      }
      if (epoch !== this._epoch) return;
      this._preOpenFailures += 1;
      if (this._preOpenFailures < 3 || this.options.transports.length < 2) {
        this._scheduleReconnect(describeFailure(info));
        return;
      }
    }
    this._preOpenFailures = 0;
    try {
      await this._attachChain(this.options.transports, epoch);
    } catch (error) {
      if (epoch === this._epoch) this._afterAttachFailure(error, epoch);
    }
  }

  _afterAttachFailure(error, epoch) {
    if (epoch !== this._epoch || error.code === 'cancelled') return;
    if (SESSION_GONE.has(error.code)) {
      this._sessionGone(error.code);
    } else {
      this._scheduleReconnect(error.message);
    }
  }

  /** true if the session exists, false if the server says it does not, null if unknown. */
  async _probeSession() {
    try {
      const response = await fetchWithin(
        this._url(`/v1/sessions/${this.sessionId}`), {}, this.options.openTimeoutMs,
      );
      if (response.status !== 404) return true;
      const body = await response.json().catch(() => null);
      return body?.error?.code === 'unknown_session' ? false : true;
    } catch {
      return null;
    }
  }

  /**
   * The session is gone (expired, deleted, server restarted, its token expired): create a new
   * one with the same name (or token), rejoin the rooms and attach again. Handlers see `state`
   * 'expired' and a `reset` with `synthetic: true`, then fresh `history` events. A creation
   * that fails for a reason that may pass is tried again with backoff; one the same request
   * would get again (a refused token, an invalid name) stops the client.
   */
  async _renew(reason) {
    if (this._renewing || this.state === 'closed') return;
    this._renewing = true;
    const expiredAtMs = this.expiresAtMs;
    const epoch = this._cancelFlows();
    this._stopActive();
    clearTimeout(this._refreshTimer); // the new session's token schedules its own
    this._refreshTimer = null;
    let ready;
    this._sessionReady = new Promise((resolve) => { ready = resolve; });
    this._setState('expired', reason);
    this._startSeqs();
    for (const room of this.rooms.values()) Object.assign(room, newRoomState());
    this._failPages(null, new SwitchyardError('reset', 'a new session replaces the rooms\' views'));
    this._emit('reset', { type: 'reset', reason: `session_${reason}`, synthetic: true });
    let attempt = 0;
    for (;;) {
      try {
        let token;
        if (reason === 'token_expired') {
          // Only the function gets here (see _sessionGone). One that hands back the token that
          // just expired would make a session the server ends at once: stop instead.
          token = await this._freshToken();
          const exp = tokenClaims(token)?.exp;
          if (typeof exp === 'number' && expiredAtMs !== null && exp * 1000 <= expiredAtMs) {
            throw new SwitchyardError('token_expired', 'the token function returned no fresh token', 401);
          }
        }
        await this._createSession(token);
        break;
      } catch (error) {
        if (epoch !== this._epoch) { this._renewing = false; ready(); return; }
        if (error.code === 'invalid_name') {
          this._renewing = false;
          ready();
          this._setState('failed', error.message);
          return;
        }
        if (TOKEN_ERRORS.includes(error.code)) {
          this._renewing = false;
          ready();
          this._shutDown(error.code, error);
          return;
        }
        this._setState('reconnecting', `cannot create a new session: ${error.message}`);
        await sleep(jitter(Math.min(this.options.reconnectMaxMs, this.options.reconnectMinMs * 2 ** attempt++)));
        if (epoch !== this._epoch) { this._renewing = false; ready(); return; }
      }
    }
    this._renewing = false;
    ready();
    if (this.state === 'closed') {
      // Closed while the session was being created.
      fetch(this._url(`/v1/sessions/${this.sessionId}`), { method: 'DELETE', keepalive: true }).catch(() => {});
      return;
    }
    for (const room of this.rooms.keys()) {
      this._command({ type: 'join', room }).catch((error) => {
        // The new token may allow fewer rooms.
        if (error.code === 'forbidden') this.rooms.delete(room);
        this._emit('error', { type: 'error', code: error.code, message: error.message, room });
      });
    }
    if (epoch !== this._epoch) return; // setTransports or reconnect took over attaching
    this._setState('connecting', 'new session');
    try {
      await this._attachChain(this.options.transports, epoch);
    } catch (error) {
      this._afterAttachFailure(error, epoch);
    }
  }

  // ---- events ----

  _onEvent(transport, event) {
    if (transport !== this._active) return;
    // Every event the application sees has a seq; frames without one (ready, heartbeat) stop
    // in the transport. A seq at or below lastSeq was delivered already.
    if (!event || typeof event.seq !== 'number' || event.seq <= this.lastSeq) return;
    this.lastSeq = event.seq;
    this._ackSoon();
    switch (event.type) {
      case 'message': {
        const pending = this._pending.get(event.client_id);
        if (pending) {
          this._pending.delete(event.client_id);
          clearTimeout(pending.timer);
          pending.resolve(event);
        }
        const room = this.rooms.get(event.room);
        // Room message ids strictly increase, so a lower id is a retried send echoed again
        // (or a message a page already delivered).
        if (room && event.id <= room.lastMessageId) return;
        if (room) {
          room.lastMessageId = event.id;
          if (!room.oldestMessageId) room.oldestMessageId = event.id;
        }
        break;
      }
      case 'history': {
        const room = this.rooms.get(event.room);
        if (room) {
          replaceMessages(room, event.messages);
          this._failPages(event.room, new SwitchyardError('reset', `the view of ${JSON.stringify(event.room)} was replaced`));
        }
        break;
      }
      case 'history_page': {
        const page = applyPage(this.rooms.get(event.room), event);
        if (!page) return; // asked for in a view since replaced: it could leave a gap
        this._emit('history_page', page);
        const entry = this._pages.get(event.room);
        if (entry && (entry.before || 0) === (event.before || 0)) this._finishPage(entry, null, page);
        return;
      }
      case 'presence': {
        const room = this.rooms.get(event.room);
        if (room) applyPresence(room, event);
        break;
      }
      case 'presence_diff': {
        const room = this.rooms.get(event.room);
        if (room) applyPresenceDiff(room, event);
        break;
      }
      case 'reset':
        for (const room of this.rooms.values()) Object.assign(room, newRoomState());
        this._failPages(null, new SwitchyardError('reset', 'the resume point was lost; fresh histories follow'));
        this._emit('reset', event);
        // Fresh histories follow from the server; joining again also restores any room the
        // server no longer counts us in, and is harmless for the others.
        for (const room of this.rooms.keys()) this._command({ type: 'join', room }).catch(() => {});
        return;
      case 'error':
        if (event.code === 'rate_limited') {
          const refused = new SwitchyardError(event.code, event.message);
          refused.retryAfterMs = event.retry_after_ms;
          this._retryRateLimitedSend(this._pending.get(event.client_id), event.retry_after_ms, refused);
        } else if (event.client_id) {
          this._failWebSocketSend(event);
        } else if (event.code === 'history_unavailable' || event.code === 'backend_unavailable') {
          // Error events name no command but a send; these codes without a client_id are a
          // `history` (or a join) the store, or a cluster node, could not answer in time. A
          // page that comes after all is still applied and reaches `history_page` handlers.
          this._failPages(null, new SwitchyardError(event.code, event.message), 'websocket');
        }
        break;
      default:
        break;
    }
    this._emit(event.type, event);
  }

  /** A new session: its seqs start over. */
  _startSeqs() {
    this.lastSeq = 0;
    this._ackedSeq = 0;
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
  }

  /**
   * Schedules an `ack` of the events delivered, so the server can forget them instead of
   * keeping each session's last `replay_window` events: after `ackMs`, or at once (once the
   * handlers of this event have run) when ACK_EVENTS are waiting. Streams only: every poll
   * acknowledges its `after` by itself.
   */
  _ackSoon() {
    const name = this._active?.name;
    if (name !== 'websocket' && name !== 'sse') return;
    const many = this.lastSeq - this._ackedSeq >= ACK_EVENTS;
    if (this._ackTimer !== null && !many) return;
    clearTimeout(this._ackTimer);
    this._ackTimer = setTimeout(() => this._ack(), many ? 0 : this.options.ackMs);
  }

  _ack() {
    this._ackTimer = null;
    const seq = this.lastSeq;
    if (seq <= this._ackedSeq || this.state === 'closed' || !this._active) return;
    this._ackedSeq = seq;
    // A lost ack costs only memory on the server: the next ack, or the next resume point,
    // covers the same events.
    this._command({ type: 'ack', seq }, { retryRateLimited: false }).catch(() => {});
  }

  _emit(type, payload) {
    const handlers = this._handlers.get(type);
    if (!handlers) return;
    for (const handler of [...handlers]) {
      try {
        handler(payload, this);
      } catch (error) {
        console.error(`switchyard: a '${type}' handler threw`, error);
      }
    }
  }

  /** `extra`: more fields for the `state` event (`error` when a failure closed the client). */
  _setState(state, reason, extra) {
    if (this.state === state) return;
    const previous = this.state;
    this.state = state;
    this._emit('state', { state, previous, reason, ...extra });
  }

  // ---- commands ----

  /**
   * Sends a command over the open WebSocket, else `POST /commands`. `options.retryRateLimited`
   * (default true): whether `POST /commands` retries a 429 itself.
   */
  async _command(command, options = {}) {
    await this._sessionReady;
    this._ensureNotClosed();
    const active = this._active;
    if (active && active.name === 'websocket' && active.sendCommand(command)) {
      return { ok: true, via: 'websocket' };
    }
    return this._post(command, options);
  }

  async _post(command, options = {}, attempt = 0) {
    const sessionId = this.sessionId;
    const again = () => this._post(command, options, attempt + 1);
    let response;
    try {
      // A retry after a timeout is safe: a send carries its client_id, and the other
      // commands mean the same applied twice.
      response = await fetchWithin(this._url(`/v1/sessions/${sessionId}/commands`), {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(command),
      }, this.options.sendTimeoutMs);
    } catch (error) {
      if (attempt < 3 && this.state !== 'closed') {
        await sleep(jitter(500 * 2 ** attempt));
        return again();
      }
      throw new SwitchyardError('network', `command not delivered: ${error.message}`);
    }
    const body = await response.json().catch(() => null);
    if (response.ok) return { ...(body?.results?.[0] || { ok: true }), via: 'http' };
    const error = body?.error || { code: `http_${response.status}`, message: `HTTP ${response.status}` };
    if (response.status === 408 || error.code === 'request_timeout') {
      // The body did not reach the server in time: nothing was applied. Like a network error.
      if (attempt < 3 && this.state !== 'closed') {
        await sleep(jitter(500 * 2 ** attempt));
        return again();
      }
      throw new SwitchyardError('request_timeout', error.message, response.status);
    }
    if (response.status === 429) {
      const retryAfterMs = retryAfter(error, response);
      if (options.retryRateLimited !== false && attempt < 8 && this.state !== 'closed') {
        await sleep(rateLimitedWait(retryAfterMs, jitter(600 * 2 ** Math.min(attempt, 3))));
        return again();
      }
      const refused = new SwitchyardError(error.code, error.message, response.status);
      refused.retryAfterMs = retryAfterMs;
      throw refused;
    }
    if (error.code === 'unknown_session' && attempt < 2 && this.state !== 'closed') {
      if (sessionId === this.sessionId) this._sessionGone('unknown_session');
      await this._sessionReady;
      this._ensureNotClosed(); // the new session could not be made
      return again();
    }
    throw new SwitchyardError(error.code, error.message, response.status);
  }

  /** Sends (or sends again) a pending send; `counted` false for a retry after `rate_limited`. */
  _attemptSend(entry, counted = true) {
    if (this._pending.get(entry.clientId) !== entry) return;
    if (counted) entry.attempts += 1;
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => this._sendTimedOut(entry), this._sendTimeoutMs());
    entry.via = null;
    // A 429 comes back here rather than being retried inside _post, so the wait it asks for
    // replaces the echo timer instead of racing it.
    this._command({ type: 'send', room: entry.room, text: entry.text, client_id: entry.clientId }, { retryRateLimited: false })
      .then((result) => { entry.via = result.via; })
      .catch((error) => {
        if (error.code === 'rate_limited') {
          this._retryRateLimitedSend(entry, error.retryAfterMs, error);
        } else if (error.code !== 'network' && error.code !== 'request_timeout' && error.code !== 'backend_unavailable') {
          // Network trouble, a body that arrived too late (408: nothing was applied) and a
          // cluster node that cannot reach Redis (503 backend_unavailable: the send may or may
          // not have been applied) are retried by the timer, with the same client_id; anything
          // else will not get better.
          this._finishSend(entry, error);
        }
      });
  }

  _sendTimedOut(entry) {
    if (this._pending.get(entry.clientId) !== entry) return;
    if (entry.attempts >= this.options.sendAttempts) {
      this._finishSend(entry, new SwitchyardError('timeout', `no echo for ${entry.clientId} after ${entry.attempts} attempts`));
    } else {
      this._attemptSend(entry);
    }
  }

  _finishSend(entry, error) {
    if (this._pending.get(entry.clientId) !== entry) return;
    this._pending.delete(entry.clientId);
    clearTimeout(entry.timer);
    entry.reject(error);
  }

  /**
   * A send refused with `rate_limited` (over HTTP or as a WebSocket `error` event): nothing
   * was applied, so send it again with the same client_id once the server's `retry_after_ms`
   * has passed (about a second without one). Refusals do not count as attempts, but after
   * MAX_RATE_LIMITED of them the send rejects with the server's error.
   */
  _retryRateLimitedSend(entry, retryAfterMs, error) {
    if (!entry || this._pending.get(entry.clientId) !== entry) return;
    clearTimeout(entry.timer);
    entry.refusals = (entry.refusals || 0) + 1;
    if (entry.refusals >= MAX_RATE_LIMITED) {
      this._finishSend(entry, error);
      return;
    }
    entry.timer = setTimeout(() => this._attemptSend(entry, false), rateLimitedWait(retryAfterMs, jitter(RATE_LIMITED_WAIT_MS)));
  }

  /** A send refused over the WebSocket for good (not_in_room, invalid_text, ...). */
  _failWebSocketSend(event) {
    const entry = this._pending.get(event.client_id);
    if (entry) this._finishSend(entry, new SwitchyardError(event.code, event.message));
  }

  /** Settles a pending `loadOlder`: rejects with `error`, or resolves with `page` when it is null. */
  _finishPage(entry, error, page) {
    if (this._pages.get(entry.room) !== entry) return;
    this._pages.delete(entry.room);
    clearTimeout(entry.timer);
    if (error) entry.reject(error);
    else entry.resolve(page);
  }

  /**
   * Rejects the pending `loadOlder` of `room` (of every room when null) with `error`; `via`,
   * if given, limits it to commands sent that way (`websocket` or `http`).
   */
  _failPages(room, error, via) {
    for (const entry of [...this._pages.values()]) {
      if ((room === null || entry.room === room) && (!via || entry.via === via)) this._finishPage(entry, error);
    }
  }

  _sendTimeoutMs() {
    return this._eventWaitMs(this.options.sendTimeoutMs);
  }

  /** How long to wait for the event a command causes: on short polling, at least three polls. */
  _eventWaitMs(ms) {
    const poll = this.transport === 'short-polling' ? 3 * this._shortPollMs() : 0;
    return Math.max(ms, poll);
  }

  // ---- helpers ----

  _shortPollMs() {
    return this.options.shortPollMs ?? this.server?.short_poll_ms ?? 1000;
  }

  _longPollMs() {
    return this.options.longPollMs ?? this.server?.long_poll_ms ?? 25000;
  }

  _url(path, params) {
    const url = new URL(this.baseUrl + path);
    for (const [key, value] of Object.entries(params || {})) url.searchParams.set(key, String(value));
    return url.href;
  }

  _stopActive() {
    const active = this._active;
    this._active = null;
    if (active) active.stop();
  }

  /** Cancels pending reconnects and in-flight async flows; returns the new epoch. */
  _cancelFlows() {
    this._epoch += 1;
    for (const timer of this._timers) clearTimeout(timer);
    this._timers.clear();
    clearTimeout(this._stableTimer);
    return this._epoch;
  }

  _later(ms, fn) {
    const timer = setTimeout(() => {
      this._timers.delete(timer);
      fn();
    }, ms);
    this._timers.add(timer);
  }

  _ensureNotClosed() {
    if (this.state === 'closed') throw new SwitchyardError('closed', 'the client is closed');
  }
}

/**
 * A room's state before the server has described it. `synced` turns true with the first
 * `presence` snapshot: diffs before it (in flight from an earlier membership) are ignored.
 *
 * Messages: `loaded` turns true with the room's `history`. From then on the client holds
 * every message of the room from `oldestMessageId` to `lastMessageId` (0 and 0: none yet),
 * with no gap: the history, the live messages after it (the server lets none fall between)
 * and pages of older ones joined below. So one comparison with that span tells whether a
 * message was delivered already. `more`: whether older messages may exist (the last page's
 * `more`). `askedBefore`: the `before` of each `history` command sent in this view (0 for
 * none); only a page answering one of them is applied.
 */
function newRoomState() {
  return {
    online: [], count: 0, complete: true, synced: false,
    loaded: false, lastMessageId: 0, oldestMessageId: 0, more: false, askedBefore: new Set(),
  };
}

/** A `history`: the room's messages are these, whatever the client held before. */
function replaceMessages(room, messages) {
  const ids = messages.map((m) => m.id);
  room.loaded = true;
  room.lastMessageId = ids.length ? Math.max(...ids) : 0;
  room.oldestMessageId = ids.length ? Math.min(...ids) : 0;
  room.more = true;
  room.askedBefore = new Set();
}

/**
 * A `history_page`. Applied only if it answers a command sent in the room's current view:
 * its messages end just below `before`, so they join onto what the client holds if `before`
 * was the oldest id held then (or none was held). A page asked for before a `reset` or a new
 * `history` could leave a gap, and is dropped (null). Keeps only the messages older than
 * every one held: a page can overlap what the client has (one asked for with no `before`
 * ends with the newest messages, which may have come as `message` events too). Returns the
 * event with those messages, oldest first.
 */
function applyPage(room, event) {
  if (!room || !room.askedBefore.delete(event.before || 0) || !Array.isArray(event.messages)) return null;
  const held = room.oldestMessageId;
  const messages = event.messages.filter((m) => !held || m.id < held);
  if (messages.length) {
    const ids = messages.map((m) => m.id);
    room.oldestMessageId = Math.min(...ids);
    room.lastMessageId = Math.max(room.lastMessageId, ...ids);
  }
  room.more = event.more !== false;
  return { ...event, messages };
}

/** A `presence` event (a snapshot, or a full list again): replaces the room's view. */
function applyPresence(room, event) {
  room.online = Array.isArray(event.online) ? [...event.online] : [];
  room.count = typeof event.count === 'number' ? event.count : room.online.length;
  room.complete = event.complete !== false;
  room.synced = true;
}

/**
 * A `presence_diff`: who joined and who left since the previous diff or snapshot. `joined`
 * is applied first (appended in order), then `left` (one occurrence of each name removed:
 * names are not unique). Above the list limit (`complete` false) the names are a sample, so
 * only the count is kept.
 */
function applyPresenceDiff(room, event) {
  if (!room.synced) return;
  if (typeof event.count === 'number') room.count = event.count;
  if (event.complete === false || !room.complete) {
    room.complete = false;
    return;
  }
  room.online.push(...(event.joined || []));
  for (const name of event.left || []) {
    const at = room.online.indexOf(name);
    if (at >= 0) room.online.splice(at, 1);
  }
  // A complete list always matches the count; if it does not, the list is not to be trusted.
  if (room.online.length !== room.count) room.complete = false;
}

/**
 * The claims of a JWT, read without checking anything (the server verifies tokens; the client
 * only wants `exp` and `rooms`). null if it is not a JWT.
 */
function tokenClaims(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const bytes = Uint8Array.from(atob(part + '='.repeat((4 - (part.length % 4)) % 4)), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === 'object' && !Array.isArray(claims) ? claims : null;
  } catch {
    return null;
  }
}

/** Whether a token's `rooms` claim lets its user join `room`: exact names, or prefixes ending in `*`. */
function mayJoin(rules, room) {
  return rules.some((rule) => (typeof rule === 'string'
    && (rule.endsWith('*') ? room.startsWith(rule.slice(0, -1)) : rule === room)));
}

/** The server's retry hint of a `rate_limited` error: `retry_after_ms`, else `Retry-After`. */
function retryAfter(error, response) {
  if (typeof error?.retry_after_ms === 'number') return error.retry_after_ms;
  // Cross-origin, the header is hidden unless exposed: then null, not a wait of 0.
  const header = response?.headers?.get('retry-after');
  const seconds = header ? Number(header) : NaN;
  return Number.isFinite(seconds) && seconds >= 0 ? seconds * 1000 : undefined;
}

/**
 * How long to wait before retrying a `rate_limited` command: the server's hint plus a little
 * spread (so refused clients do not all come back at once, never less than the hint), else
 * `fallbackMs`.
 */
function rateLimitedWait(retryAfterMs, fallbackMs) {
  if (typeof retryAfterMs === 'number' && retryAfterMs >= 0) {
    return retryAfterMs + Math.random() * Math.min(250, 50 + retryAfterMs / 4);
  }
  return fallbackMs;
}

function checkRoom(room) {
  if (typeof room !== 'string' || !ROOM_PATTERN.test(room)) {
    throw new SwitchyardError('invalid_room', `room names are 1-64 of A-Za-z0-9_.- (got ${JSON.stringify(room)})`);
  }
}

/** A heartbeat interval the server named, if it is a usable one. */
function validHeartbeat(ms) {
  return typeof ms === 'number' && Number.isFinite(ms) && ms > 0 ? ms : undefined;
}

function describeFailure(info) {
  switch (info.reason) {
    case 'timeout':
      return info.detail || 'timed out';
    case 'error':
      return info.detail || 'error before open';
    default:
      return info.detail ? `${info.reason}: ${info.detail}` : info.reason;
  }
}

// ---- transports ----
//
// Each transport attempt calls `hooks.open()` once it is attached, `hooks.event(e)` per event
// and `hooks.lost({reason, detail})` once when it ends by itself. `stop()` ends it silently.
// `reason` is a server close reason (superseded, slow_consumer, shutdown, expired,
// heartbeat_timeout, token_expired), 'unknown_session', 'invalid_after', 'network' (dropped
// after opening) or 'error' (failed before opening). `heartbeat_timeout` is also the client's own verdict on a
// stream it heard nothing from for two heartbeat intervals (see `watchesSilence`): the same
// rule the server applies to the client, seen from the other end.

function makeTransport(name, client, hooks) {
  switch (name) {
    case 'websocket':
      return new WebSocketTransport(client, hooks);
    case 'sse':
      return new SseTransport(client, hooks);
    case 'long-polling':
      return new PollTransport(client, hooks, 'long-polling');
    case 'short-polling':
      return new PollTransport(client, hooks, 'short-polling');
    default:
      throw new SwitchyardError('bad_option', `unknown transport ${name}`);
  }
}

class Transport {
  constructor(name, client, hooks) {
    this.name = name;
    this.client = client;
    this.hooks = hooks;
    this.live = true;
    this.opened = false;
    this.sessionPath = `/v1/sessions/${client.sessionId}`;
    /**
     * Streams (WebSocket, SSE) are presumed dead after two heartbeat intervals without a
     * frame: the browser hides pings and comments, so the server sends heartbeat frames a page
     * can see. Polls need no watchdog: each reply is proof of life, and a poll that hangs is
     * aborted by its own timer.
     */
    this.watchesSilence = false;
    /** The server's heartbeat interval: the session's, until a `ready` event names one. */
    this.heartbeatMs = validHeartbeat(client.server?.heartbeat_ms) ?? DEFAULT_HEARTBEAT_MS;
    this.lastHeard = 0;
    this.silenceTimer = null;
  }

  _open() {
    if (!this.live || this.opened) return;
    this.opened = true;
    this._heard();
    this.hooks.open();
  }

  _event(event) {
    if (this.live) this.hooks.event(event);
  }

  /**
   * One frame of a stream arrived (WebSocket text frame, SSE event): proof that data gets
   * through, which opens a stream that waits for it (SSE) and feeds the silence watchdog.
   * `ready` and `heartbeat` end here; anything else is handed on as an event. A frame that
   * is not JSON is ignored.
   */
  _frame(text) {
    if (!this.live) return;
    this._heard();
    let event;
    try {
      event = JSON.parse(text);
    } catch {
      return;
    }
    if (!event || typeof event !== 'object') return;
    if (LIVENESS_TYPES.has(event.type) && typeof event.seq !== 'number') {
      this.heartbeatMs = validHeartbeat(event.heartbeat_ms) ?? this.heartbeatMs;
      this._open();
      return;
    }
    this._open();
    this._event(event);
  }

  /** Data came in now; (re)starts the silence watchdog of an open stream. */
  _heard() {
    this.lastHeard = now();
    if (this.watchesSilence && this.opened && this.live && !this.silenceTimer) {
      this._watchSilence(this._silenceLimitMs());
    }
  }

  /** Two heartbeat intervals and a little slack. */
  _silenceLimitMs() {
    return 2 * this.heartbeatMs + SILENCE_SLACK_MS;
  }

  /**
   * Checks for silence after `ms`. One timer per stream, not one per frame: when it fires
   * after data came, it waits for the rest of the limit counted from the last frame.
   */
  _watchSilence(ms) {
    this.silenceTimer = setTimeout(() => {
      this.silenceTimer = null;
      if (!this.live) return;
      const limit = this._silenceLimitMs();
      const silent = now() - this.lastHeard;
      if (silent < limit) {
        this._watchSilence(limit - silent);
        return;
      }
      this.fail({ reason: 'heartbeat_timeout', detail: `nothing from the server for ${Math.round(silent)} ms` });
    }, ms);
  }

  /** What a transport that did not open within `ms` failed with. */
  openTimedOut(ms) {
    return { reason: 'timeout', detail: `did not open within ${ms} ms` };
  }

  /** Ends the attempt and reports why. */
  fail(info) {
    if (!this.live) return;
    this._end();
    this.hooks.lost(info);
  }

  /** Ends the attempt without reporting. */
  stop() {
    if (!this.live) return;
    this._end();
  }

  _end() {
    this.live = false;
    clearTimeout(this.silenceTimer);
    this.silenceTimer = null;
    this.teardown();
  }

  sendCommand() {
    return false;
  }

  teardown() {}
}

/**
 * Open once the handshake completes: a proxy that does not pass the upgrade makes the
 * handshake fail, so a socket that opened reaches the server. A socket that goes silent later
 * is caught by the silence watchdog.
 */
class WebSocketTransport extends Transport {
  constructor(client, hooks) {
    super('websocket', client, hooks);
    this.watchesSilence = true;
  }

  start(after) {
    const url = new URL(this.client._url(`${this.sessionPath}/ws`, { after }));
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(url.href);
    this.ws = ws;
    ws.onopen = () => this._open();
    ws.onmessage = (message) => this._frame(message.data);
    ws.onerror = () => {}; // onclose follows with the code
    ws.onclose = (close) => {
      const reason = CLOSE_REASONS[close.code] || (this.opened ? 'network' : 'error');
      const detail = close.reason || (this.opened ? `socket closed (${close.code})` : 'could not connect');
      this.fail({ reason, code: close.code, detail });
    };
  }

  sendCommand(command) {
    if (!this.live || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(command));
    return true;
  }

  teardown() {
    const ws = this.ws;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    try {
      ws.close();
    } catch {
      // already closed
    }
  }
}

/**
 * Open when the first event arrives (the server's `ready`, sent at once), not on
 * EventSource's `open`: a proxy that buffers or compresses the stream lets the headers through
 * (or not) and holds every event back, so a stream counts as working only once data came.
 */
class SseTransport extends Transport {
  constructor(client, hooks) {
    super('sse', client, hooks);
    this.watchesSilence = true;
    /** Whether EventSource saw the response's headers. */
    this.responded = false;
  }

  start(after) {
    const source = new EventSource(this.client._url(`${this.sessionPath}/sse`, { after }));
    this.source = source;
    const onData = (message) => this._frame(message.data);
    source.onopen = () => { this.responded = true; };
    for (const type of [...SERVER_EVENT_TYPES, ...LIVENESS_TYPES]) {
      source.addEventListener(type, onData);
    }
    // `error` is both the server's error event (it has data) and EventSource's own failure.
    source.addEventListener('error', (message) => {
      if (typeof message.data === 'string') {
        onData(message);
        return;
      }
      // EventSource would reconnect by itself; we close it and resume ourselves, so it never
      // races another transport or resumes from a point we did not choose.
      let detail = 'stream dropped';
      if (!this.opened) detail = this.responded ? 'the stream ended before its ready event' : 'could not open the stream';
      this.fail({ reason: this.opened ? 'network' : 'error', detail });
    });
    source.addEventListener('close', (message) => {
      let reason = 'network';
      try {
        reason = JSON.parse(message.data).reason || reason;
      } catch {
        // keep 'network'
      }
      this.fail({ reason, detail: 'the server closed the stream' });
    });
  }

  /**
   * `no_data` whether or not the headers came: a proxy that holds the events back may hold
   * the headers with them (nginx sends nothing until it has a packet's worth to send).
   */
  openTimedOut(ms) {
    const detail = this.responded
      ? `the stream opened but no event came within ${ms} ms (a proxy buffering or compressing it?)`
      : `neither headers nor events within ${ms} ms`;
    return { reason: 'no_data', detail };
  }

  teardown() {
    this.source?.close();
  }
}

/** Long polling (`wait` = long_poll_ms) and short polling (`wait=0` every shortPollMs). */
class PollTransport extends Transport {
  constructor(client, hooks, kind) {
    super(kind, client, hooks);
    this.long = kind === 'long-polling';
  }

  start() {
    this._loop();
  }

  async _loop() {
    // A long-polling attempt opens with `wait=1`: it answers at once, so a working endpoint is
    // known to work within openTimeoutMs even when no event is waiting.
    let wait = this.long ? 1 : 0;
    while (this.live) {
      const controller = new AbortController();
      this.controller = controller;
      const watchdog = setTimeout(() => controller.abort(), wait + LONG_POLL_GRACE_MS);
      let response;
      let body;
      try {
        response = await fetch(
          this.client._url(`${this.sessionPath}/poll`, { after: this.client.lastSeq, wait }),
          { signal: controller.signal, cache: 'no-store' },
        );
        body = await response.json().catch(() => null);
      } catch (error) {
        clearTimeout(watchdog);
        this.fail({ reason: this.opened ? 'network' : 'error', detail: error.name === 'AbortError' ? 'poll timed out' : error.message });
        return;
      } finally {
        clearTimeout(watchdog);
      }
      if (!this.live) return;
      if (response.status === 409) {
        // poll_in_progress: an earlier poll of this session is still held; it ends soon.
        await this._pause(jitter(300));
        continue;
      }
      if (!response.ok || !body || !Array.isArray(body.events)) {
        const code = body?.error?.code;
        const reason = code === 'unknown_session' || code === 'invalid_after' ? code : (this.opened ? 'network' : 'error');
        this.fail({ reason, detail: `HTTP ${response.status}${code ? ` ${code}` : ''}` });
        return;
      }
      this._open();
      for (const event of body.events) {
        if (!this.live) return;
        this._event(event);
      }
      if (body.closed) {
        this.fail({ reason: body.closed, detail: 'the server closed the poll' });
        return;
      }
      if (this.long) {
        wait = this.client._longPollMs();
      } else {
        await this._pause(this.client._shortPollMs());
      }
    }
  }

  _pause(ms) {
    return new Promise((resolve) => {
      this.pauseTimer = setTimeout(resolve, ms);
      this.wake = resolve;
    });
  }

  teardown() {
    this.controller?.abort();
    clearTimeout(this.pauseTimer);
    this.wake?.();
  }
}
