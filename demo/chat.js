// The chat page: one switchyard client, rooms in the sidebar, messages in the middle.
// User data is only ever written with textContent, never as HTML.

import { connect, TRANSPORTS, TOKEN_ERRORS } from '/switchyard.js';

const ROOM_PATTERN = /^[A-Za-z0-9_.-]{1,64}$/;
const MAX_KEPT = 500; // messages kept per room while the reader is at the bottom
const PAGE_SIZE = 50; // older messages asked for at a time
const NEAR_TOP_PX = 120; // this close to the top of the list, older messages are loaded
// A loadOlder ending with these is no failure: the room's view was replaced or left, and
// what replaces it is shown instead.
const QUIET_PAGE_ERRORS = new Set(['reset', 'cancelled', 'not_in_room', 'not_ready', 'closed']);
const GROUP_MS = 5 * 60 * 1000; // consecutive messages of one sender within this share a header
const TYPING_SHOWN_MS = 4000;
// The server sends typing at most once per presence interval (250 ms by default), so a batch
// naming someone can arrive just after their message: ignore it for that long and a little.
const TYPING_AFTER_MESSAGE_MS = 1000;
const TYPING_SENT_EVERY_MS = 2500;
const NAMES_SHOWN = 100; // the presence list shows at most this many names

const $ = (id) => document.getElementById(id);
const el = {
  dot: $('conn-dot'),
  transport: $('transport'),
  state: $('conn-state'),
  fallbacks: $('fallbacks'),
  picker: $('transport-picker'),
  nameForm: $('name-form'),
  nameInput: $('name-input'),
  identity: $('identity'),
  identityName: $('identity-name'),
  identityUser: $('identity-user'),
  roomList: $('room-list'),
  joinForm: $('join-form'),
  joinInput: $('join-input'),
  presenceCount: $('presence-count'),
  presenceList: $('presence-list'),
  presenceMore: $('presence-more'),
  roomTitle: $('room-title'),
  roomMeta: $('room-meta'),
  leave: $('leave-button'),
  banner: $('banner'),
  bannerText: $('banner-text'),
  bannerAction: $('banner-action'),
  scroll: $('messages-scroll'),
  historyMarker: $('history-marker'),
  historyMarkerText: $('history-marker-text'),
  historyRetry: $('history-retry'),
  empty: $('empty-state'),
  messages: $('messages'),
  typing: $('typing'),
  composerForm: $('composer-form'),
  composer: $('composer'),
  send: $('send-button'),
};

const params = new URLSearchParams(location.search);
let myName = validName(params.get('name')) || `guest-${String(Math.floor(Math.random() * 10000)).padStart(4, '0')}`;
const wantedRoom = ROOM_PATTERN.test(params.get('room') || '') ? params.get('room') : 'lobby';
let forced = TRANSPORTS.includes(params.get('transport')) ? params.get('transport') : null;
// An identity token for a server that authenticates users (a development convenience: a token
// in the address bar lands in the history; a real page fetches it from its own backend).
const token = params.get('token') || null;

/** @type {import('/switchyard.js').Client | null} */
let client = null;
/**
 * room -> { items: [message | notice], unread, typing: Map(user -> until), spoke,
 * loadingOlder, olderError }
 */
const rooms = new Map();
/** Each rendered list item's item, to find the one the reader is looking at. */
const itemOfNode = new WeakMap();
let current = null;
let lastTypingSent = 0;
let retryTimer = null;

el.picker.value = forced || 'auto';
el.nameInput.value = myName;
// With a token the server names the user; the name field comes back if it ignores the token.
el.nameForm.hidden = Boolean(token);

// ---- connection ----

async function start(roomsToJoin) {
  clearTimeout(retryTimer);
  hideBanner();
  renderConnection(null);
  let next;
  try {
    next = await connect('', { name: myName, token: token || undefined, transports: forced ? [forced] : TRANSPORTS });
  } catch (error) {
    window.switchyardError = error;
    renderConnection(null, 'failed');
    renderIdentity(null);
    if (TOKEN_ERRORS.includes(error.code)) {
      // The same token gets the same answer: no retry, say what is wrong with it.
      showBanner(tokenProblem(error.code, error.message), null, null, error.code);
      return;
    }
    showBanner(`Cannot connect: ${error.message}`, 'Retry now', () => start(roomsToJoin), error.code);
    retryTimer = setTimeout(() => start(roomsToJoin), 5000);
    return;
  }
  client = next;
  window.switchyardClient = client;
  window.switchyardError = null;
  myName = client.name;
  el.nameInput.value = myName;
  renderIdentity(client);
  if (token && client.user === null) showToast('This server does not authenticate users: the token was ignored');
  wire(client);
  renderConnection(client);
  for (const room of roomsToJoin) await joinRoom(room, room === roomsToJoin[0]);
}

function wire(c) {
  const mine = (fn) => (payload) => {
    if (c === client) fn(payload);
  };
  c.on('state', mine(({ state, reason, error }) => {
    renderConnection(c);
    if (state === 'superseded') {
      showBanner('This session was taken over by another tab or transport.', 'Take it back', () => c.reconnect());
    } else if (state === 'expired') {
      showBanner('Your session expired; starting a new one and rejoining your rooms…');
    } else if (state === 'failed') {
      showBanner(`Connection failed: ${reason || 'unknown error'}`, 'Reconnect', () => restart());
    } else if (state === 'closed' && c.closeReason) {
      // The client stopped by itself: its token expired, or a new session's was refused.
      showBanner(tokenProblem(c.closeReason, error && error.message), null, null, c.closeReason);
    } else if (state === 'open') {
      hideBanner();
    }
  }));
  c.on('transport', mine(() => renderConnection(c)));
  c.on('history', mine(onHistory));
  c.on('history_page', mine(onHistoryPage));
  c.on('message', mine(onMessage));
  c.on('presence', mine(onPresence));
  c.on('presence_diff', mine(onPresenceDiff));
  c.on('typing', mine(onTyping));
  c.on('reset', mine(() => {
    // Fresh histories follow; until then show the rooms as empty rather than stale.
    for (const state of rooms.values()) state.items = state.items.filter((item) => item.pending);
    renderRoom();
  }));
  c.on('error', mine((error) => {
    // A rate-limited send is sent again by the client after retry_after_ms; only its final
    // failure (if any) is worth a word, and sendText reports that.
    if (error.code === 'rate_limited' && error.client_id) return;
    showToast(`${error.code}: ${error.message}`);
  }));
}

async function restart() {
  const joined = [...rooms.keys()];
  if (current) joined.sort((a, b) => (a === current ? -1 : b === current ? 1 : 0));
  const old = client;
  client = null;
  if (old) await old.close();
  rooms.clear();
  current = null;
  renderRooms();
  renderRoom();
  await start(joined.length ? joined : [wantedRoom]);
}

/** What to tell the user about a token the server refused, or one that expired. */
function tokenProblem(code, message) {
  if (code === 'token_expired') {
    return 'Your token has expired. Open the page with a new ?token= to continue.';
  }
  if (code === 'token_missing') return 'This server needs an identity token: open the page with ?token=.';
  return `Your token was refused (${code})${message ? `: ${message}` : ''}.`;
}

/** With a token, the user as the server knows them replaces the name field. */
function renderIdentity(c) {
  const signedIn = Boolean(c && c.user !== null);
  el.identity.hidden = !signedIn;
  el.nameForm.hidden = signedIn || (!c && Boolean(token));
  if (!signedIn) return;
  el.identityName.textContent = c.name;
  el.identityUser.textContent = c.user;
  el.identity.title = c.expiresAtMs
    ? `signed in by token as ${c.user}, valid until ${new Date(c.expiresAtMs).toLocaleString()}`
    : `signed in by token as ${c.user}`;
}

function renderConnection(c, forcedState) {
  const state = forcedState || (c ? c.state : 'connecting');
  el.dot.dataset.state = state;
  el.transport.textContent = c && c.transport ? c.transport : '';
  el.transport.dataset.transport = c && c.transport ? c.transport : '';
  el.state.textContent = {
    connecting: 'connecting…',
    open: forced ? 'connected (forced)' : 'connected',
    reconnecting: 'reconnecting…',
    superseded: 'taken over',
    expired: 'session expired',
    closed: c && c.closeReason ? (c.closeReason === 'token_expired' ? 'token expired' : 'token refused') : 'closed',
    failed: 'offline',
  }[state] || state;
  el.state.title = c && c.sessionId ? `session ${c.sessionId}` : "";
  renderFallbacks(c ? c.fallbacks : []);
}

function renderFallbacks(fallbacks) {
  el.fallbacks.replaceChildren();
  el.fallbacks.hidden = fallbacks.length === 0;
  const recent = fallbacks.slice(-4);
  for (const step of recent) {
    const chip = document.createElement('span');
    chip.className = 'fallback';
    chip.dataset.transport = step.transport;
    chip.title = `${step.transport}: ${step.reason}: ${step.detail} (${step.ms} ms)`;
    const name = document.createElement('s');
    name.textContent = step.transport;
    const why = document.createElement('span');
    why.className = 'why';
    why.textContent = `${step.reason}${step.ms ? ` · ${step.ms} ms` : ''}`;
    chip.append(name, ' ', why);
    el.fallbacks.append(chip, document.createTextNode(' → '));
  }
  if (recent.length) {
    const live = document.createElement('span');
    live.className = 'fallback-live';
    live.textContent = client && client.transport ? client.transport : '…';
    el.fallbacks.append(live);
  }
}

// ---- rooms ----

function roomState(room) {
  if (!rooms.has(room)) {
    rooms.set(room, {
      items: [], unread: 0, typing: new Map(), spoke: new Map(), loadingOlder: false, olderError: null,
    });
  }
  return rooms.get(room);
}

async function joinRoom(room, show = true) {
  if (!client) return;
  roomState(room);
  if (show || !current) switchRoom(room);
  renderRooms();
  try {
    await client.join(room);
  } catch (error) {
    rooms.delete(room);
    if (current === room) switchRoom(rooms.keys().next().value || null);
    renderRooms();
    showToast(`Cannot join ${room}: ${error.message}`);
  }
}

async function leaveRoom(room) {
  if (!client || !room) return;
  rooms.delete(room);
  switchRoom(rooms.keys().next().value || null);
  renderRooms();
  try {
    await client.leave(room);
  } catch (error) {
    showToast(`Cannot leave ${room}: ${error.message}`);
  }
}

function switchRoom(room) {
  current = room;
  if (room) {
    roomState(room).unread = 0;
    const url = new URL(location.href);
    url.searchParams.set('room', room);
    history.replaceState(null, '', url);
  }
  renderRooms();
  renderRoom();
}

function renderRooms() {
  el.roomList.replaceChildren();
  for (const [name, state] of rooms) {
    const li = document.createElement('li');
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'room' + (name === current ? ' active' : '');
    button.dataset.room = name;
    const hash = document.createElement('span');
    hash.className = 'hash';
    hash.textContent = '#';
    const label = document.createElement('span');
    label.className = 'room-name';
    label.textContent = name;
    button.append(hash, label);
    if (state.unread > 0 && name !== current) {
      const unread = document.createElement('span');
      unread.className = 'unread';
      unread.textContent = state.unread > 99 ? '99+' : String(state.unread);
      button.append(unread);
    }
    button.addEventListener('click', () => switchRoom(name));
    li.append(button);
    el.roomList.append(li);
  }
}

function renderRoom() {
  const state = current ? rooms.get(current) : null;
  el.roomTitle.textContent = current ? `#${current}` : 'No room';
  el.composer.placeholder = current ? `Message #${current}` : 'Join a room to chat';
  el.composer.disabled = !current;
  el.send.disabled = !current;
  el.leave.hidden = !current;
  renderList(state);
  renderPresence();
  renderTyping();
  scrollToBottom();
  renderHistoryMarker();
  loadOlderIfAtTop();
}

/** Renders the current room's items (none for null). */
function renderList(state) {
  const items = state ? state.items : [];
  const list = document.createDocumentFragment();
  let previous = null;
  for (const item of items) {
    list.append(renderItem(item, previous));
    previous = item;
  }
  el.messages.replaceChildren(list);
  el.empty.hidden = items.length > 0 || !current;
}

// ---- messages ----

function onHistory(event) {
  const state = roomState(event.room);
  const pending = state.items.filter((item) => item.pending);
  state.items = event.messages.map((m) => ({ ...m, kind: 'message' }));
  state.olderError = null;
  for (const item of pending) {
    if (!state.items.some((m) => m.client_id === item.client_id)) state.items.push(item);
  }
  if (event.room === current) renderRoom();
}

// A page of older messages, every one new to this page (the client library drops those it
// delivered already): they go above what the room shows, and the message the reader is
// looking at stays where it is on the screen.
function onHistoryPage(page) {
  const state = rooms.get(page.room);
  if (!state) return;
  if (page.messages.length) {
    const older = page.messages.map((m) => ({ ...m, kind: 'message' }));
    // A page asked for before any message arrived can hold the echo of a send of ours that
    // is still pending: the library will not deliver that echo again, so the page's copy
    // takes the pending one's place.
    const echoed = new Set(older.filter((m) => m.from === myName).map((m) => m.client_id));
    const rest = state.items.filter((item) => !(item.pending && echoed.has(item.client_id)));
    state.items = [...older, ...rest];
    if (page.room === current) {
      const place = readingPlace();
      renderList(state);
      keepPlace(place);
    }
  }
  if (page.room === current) renderHistoryMarker();
}

/** The topmost list item on screen and where its text is, to put it back after a re-render. */
function readingPlace() {
  const top = el.scroll.getBoundingClientRect().top;
  for (const node of el.messages.children) {
    if (node.getBoundingClientRect().bottom > top) return { item: itemOfNode.get(node), y: textTop(node) };
  }
  return null;
}

/** Scrolls so the item of `place` is where it was; to the bottom when there was none. */
function keepPlace(place) {
  const node = place && [...el.messages.children].find((child) => itemOfNode.get(child) === place.item);
  if (node) el.scroll.scrollTop += textTop(node) - place.y;
  else if (!place) scrollToBottom();
}

// The text, not the item's top: an item whose group now starts above it loses its header.
function textTop(node) {
  return (node.querySelector('.text') || node).getBoundingClientRect().top;
}

/** Asks for older messages of the current room if the reader is at the top of it. */
function loadOlderIfAtTop(retry = false) {
  if (current && el.scroll.scrollTop <= NEAR_TOP_PX) loadOlder(current, retry);
}

/**
 * One request at a time per room, none once the room's start is shown. After a failure,
 * only a retry (scrolling up again, the Retry button) asks again.
 */
function loadOlder(room, retry) {
  const c = client;
  const state = rooms.get(room);
  if (!c || !state || state.loadingOlder || (state.olderError && !retry) || !c.hasOlder(room)) return;
  state.loadingOlder = true;
  state.olderError = null;
  renderHistoryMarker();
  c.loadOlder(room, { limit: PAGE_SIZE })
    .catch((error) => {
      if (!QUIET_PAGE_ERRORS.has(error.code)) state.olderError = error;
    })
    .finally(() => {
      state.loadingOlder = false;
      if (c !== client || room !== current) return;
      renderHistoryMarker();
      // Still at the top (a short page, a short room): keep going until the list fills.
      loadOlderIfAtTop();
    });
}

// Above the list: loading, a failure with a retry, or the start of the room's history (when
// the page shows messages and the server has said there are no older ones).
function renderHistoryMarker() {
  const state = current ? rooms.get(current) : null;
  const room = current && client ? client.rooms.get(current) : null;
  const shown = state && state.items.some((item) => item.kind === 'message' && item.id !== undefined);
  let mode = '';
  if (state && state.loadingOlder) mode = 'loading';
  else if (state && state.olderError) mode = 'error';
  else if (shown && room && room.loaded && !room.more) mode = 'start';
  el.historyMarker.dataset.state = mode;
  el.historyMarkerText.textContent = {
    loading: 'Loading older messages…',
    error: `Cannot load older messages: ${state && state.olderError ? state.olderError.message : ''}`,
    start: 'Beginning of history',
  }[mode] || '';
  el.historyRetry.hidden = mode !== 'error';
}

function onMessage(message) {
  const state = rooms.get(message.room);
  if (!state) return;
  state.typing.delete(message.from);
  state.spoke.set(message.from, Date.now());
  const pendingIndex = state.items.findIndex((item) => item.pending && item.client_id === message.client_id);
  const item = { ...message, kind: 'message' };
  if (pendingIndex >= 0) {
    state.items[pendingIndex] = item;
  } else {
    state.items.push(item);
    if (message.room !== current) state.unread += 1;
  }
  trim(message.room, state);
  if (message.room === current) {
    if (pendingIndex >= 0) {
      const node = el.messages.querySelector(`[data-client-id="${cssEscape(message.client_id)}"]`);
      const previous = state.items[pendingIndex - 1] || null;
      if (node) node.replaceWith(renderItem(item, previous));
      else renderRoom();
    } else {
      appendItem(item, state);
    }
    renderTyping();
  } else {
    renderRooms();
  }
}

// A `presence` replaces the room's view (the client library already applied it).
function onPresence(event) {
  if (event.room === current && rooms.has(event.room)) renderPresence();
}

// A `presence_diff`: one notice per diff ("ann joined", "ann, bob and 3 others left"), and
// none when the room is above the server's list limit (the names are then only a sample).
function onPresenceDiff(event) {
  const state = rooms.get(event.room);
  if (!state) return; // a diff still in flight after we left
  if (event.complete !== false) {
    for (const [names, verb] of [[event.joined, 'joined'], [event.left, 'left']]) {
      const others = (names || []).filter((name) => name !== myName);
      if (others.length === 0) continue;
      const notice = { kind: 'notice', text: `${listNames(others)} ${verb}`, ts: Date.now() * 1000 };
      state.items.push(notice);
      trim(event.room, state);
      if (event.room === current) appendItem(notice, state);
    }
  }
  if (event.room === current) renderPresence();
}

// A `typing` names everyone who typed in the room lately, us included: show the others.
function onTyping(event) {
  const state = rooms.get(event.room);
  if (!state || !client) return;
  const nowMs = Date.now();
  const others = client.othersTyping(event)
    .filter((user) => !(nowMs - (state.spoke.get(user) || 0) < TYPING_AFTER_MESSAGE_MS));
  if (others.length === 0) return;
  const until = nowMs + TYPING_SHOWN_MS;
  for (const user of others) state.typing.set(user, until);
  if (event.room === current) renderTyping();
  setTimeout(() => {
    if (event.room === current) renderTyping();
  }, TYPING_SHOWN_MS + 50);
}

function listNames(names) {
  if (names.length === 1) return names[0];
  if (names.length === 2) return `${names[0]} and ${names[1]}`;
  if (names.length === 3) return `${names[0]}, ${names[1]} and ${names[2]}`;
  return `${names[0]}, ${names[1]} and ${names.length - 2} others`;
}

function appendItem(item, state) {
  const nearBottom = isNearBottom();
  const index = state.items.lastIndexOf(item);
  el.messages.append(renderItem(item, state.items[index - 1] || null));
  while (el.messages.children.length > state.items.length) el.messages.firstElementChild.remove();
  el.empty.hidden = true;
  if (nearBottom || item.pending) scrollToBottom();
}

function renderItem(item, previous) {
  const li = document.createElement('li');
  itemOfNode.set(li, item);
  if (item.kind === 'notice') {
    li.className = 'notice';
    li.textContent = item.text;
    return li;
  }
  const own = item.from === myName;
  const continued = previous && previous.kind === 'message' && previous.from === item.from
    && !previous.failed && Math.abs(item.ts - previous.ts) / 1000 < GROUP_MS;
  li.className = 'message' + (own ? ' own' : '') + (continued ? ' continued' : '')
    + (item.pending ? ' pending' : '') + (item.failed ? ' failed' : '');
  li.dataset.testid = item.pending || item.failed ? 'message-pending' : 'message';
  if (item.id !== undefined) li.dataset.id = String(item.id);
  if (item.client_id) li.dataset.clientId = item.client_id;

  const avatar = document.createElement('span');
  avatar.className = 'avatar';
  avatar.setAttribute('aria-hidden', 'true');
  avatar.style.setProperty('--hue', String(hue(item.from)));
  avatar.dataset.initials = initials(item.from); // drawn by CSS: not part of the text

  const body = document.createElement('div');
  body.className = 'bubble';
  const meta = document.createElement('div');
  meta.className = 'meta';
  const author = document.createElement('span');
  author.className = 'author';
  author.textContent = item.from;
  const time = document.createElement('time');
  const date = new Date(item.ts / 1000);
  time.dateTime = date.toISOString();
  time.title = date.toLocaleString();
  time.textContent = item.failed ? 'not sent' : item.pending ? 'sending…' : formatTime(date);
  meta.append(author, time);
  const text = document.createElement('div');
  text.className = 'text';
  text.textContent = item.text;
  body.append(meta, text);
  if (item.failed) {
    const retry = document.createElement('button');
    retry.type = 'button';
    retry.className = 'link-button';
    retry.textContent = 'Retry';
    retry.addEventListener('click', () => {
      const state = rooms.get(item.room);
      if (state) state.items = state.items.filter((i) => i !== item);
      li.remove();
      sendText(item.room, item.text);
    });
    body.append(retry);
  }
  li.append(avatar, body);
  return li;
}

// Drops a long room's oldest items, but not while the reader is up in them; the client
// library is told, so scrolling back up loads the dropped messages again.
function trim(room, state) {
  if (state.items.length <= MAX_KEPT || (room === current && !isNearBottom())) return;
  const dropped = state.items.splice(0, state.items.length - MAX_KEPT);
  const isMessage = (item) => item.kind === 'message' && item.id !== undefined;
  if (!client || !dropped.some(isMessage)) return;
  const oldest = state.items.find(isMessage);
  client.forgetOlder(room, oldest ? oldest.id : Infinity);
  if (room === current) renderHistoryMarker();
}

function sendText(room, text) {
  if (!client || !room) return;
  const state = roomState(room);
  const promise = client.send(room, text);
  const item = {
    kind: 'message', pending: true, room, text, from: myName, client_id: promise.clientId, ts: Date.now() * 1000,
  };
  state.items.push(item);
  if (room === current) appendItem(item, state);
  promise.catch((error) => {
    const index = state.items.indexOf(item);
    if (index < 0) return;
    item.pending = false;
    item.failed = true;
    const node = el.messages.querySelector(`[data-client-id="${cssEscape(item.client_id)}"]`);
    if (node) node.replaceWith(renderItem(item, state.items[index - 1] || null));
    showToast(`Message not sent: ${error.message}`);
  });
}

// ---- presence and typing ----

// The count is the server's; the list shows at most NAMES_SHOWN names, so a room of ten
// thousand stays cheap to render, and says how many it leaves out.
function renderPresence() {
  const presence = current && client ? client.presence(current) : null;
  const count = presence ? presence.count : 0;
  const online = presence ? presence.online : [];
  const shown = online.slice(0, NAMES_SHOWN);
  el.presenceCount.textContent = String(count);
  el.roomMeta.textContent = current ? `${count.toLocaleString()} online` : 'Join a room from the sidebar';
  el.presenceList.replaceChildren();
  if (!presence || presence.complete) {
    el.presenceMore.textContent = count > shown.length ? `and ${(count - shown.length).toLocaleString()} more` : '';
  } else {
    el.presenceMore.textContent = `showing some of ${count.toLocaleString()}`;
  }
  el.presenceMore.hidden = !el.presenceMore.textContent;
  for (const name of shown) {
    const li = document.createElement('li');
    const avatar = document.createElement('span');
    avatar.className = 'avatar small';
    avatar.setAttribute('aria-hidden', 'true');
    avatar.style.setProperty('--hue', String(hue(name)));
    avatar.dataset.initials = initials(name);
    const label = document.createElement('span');
    label.className = 'presence-name';
    label.textContent = name;
    li.append(avatar, label);
    if (name === myName) li.className = 'me'; // CSS adds a "you" tag
    el.presenceList.append(li);
  }
}

function renderTyping() {
  const state = current ? rooms.get(current) : null;
  const nowMs = Date.now();
  const who = [];
  if (state) {
    for (const [user, until] of state.typing) {
      if (until > nowMs) who.push(user);
      else state.typing.delete(user);
    }
  }
  el.typing.replaceChildren();
  if (who.length === 0) return;
  const dots = document.createElement('span');
  dots.className = 'dots';
  dots.setAttribute('aria-hidden', 'true');
  dots.append(document.createElement('i'), document.createElement('i'), document.createElement('i'));
  const text = document.createElement('span');
  text.textContent = who.length === 1 ? `${who[0]} is typing…`
    : who.length === 2 ? `${who[0]} and ${who[1]} are typing…`
      : 'Several people are typing…';
  el.typing.append(dots, text);
}

// ---- banner, toast, helpers ----

/** `code`: the error code or close reason behind it, if any (in `data-code`, for tests). */
function showBanner(text, actionLabel, action, code) {
  el.banner.hidden = false;
  el.banner.dataset.code = code || '';
  el.bannerText.textContent = text;
  el.bannerAction.hidden = !actionLabel;
  el.bannerAction.textContent = actionLabel || '';
  el.bannerAction.onclick = action || null;
}

function hideBanner() {
  el.banner.hidden = true;
  el.banner.dataset.code = '';
}

let toastTimer = null;
function showToast(text) {
  let toast = document.querySelector('.toast');
  if (!toast) {
    toast = document.createElement('div');
    toast.className = 'toast';
    toast.setAttribute('role', 'status');
    document.body.append(toast);
  }
  toast.textContent = text;
  toast.classList.add('visible');
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => toast.classList.remove('visible'), 4000);
}

function isNearBottom() {
  const s = el.scroll;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 120;
}

function scrollToBottom() {
  el.scroll.scrollTop = el.scroll.scrollHeight;
}

function formatTime(date) {
  const time = date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  if (date.toDateString() === new Date().toDateString()) return time;
  return `${date.toLocaleDateString([], { month: 'short', day: 'numeric' })} ${time}`;
}

function hue(name) {
  let h = 0;
  for (const ch of String(name)) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function initials(name) {
  const parts = String(name).split(/[\s_.-]+/).filter(Boolean);
  const letters = parts.length > 1 ? [parts[0], parts[1]] : [String(name)];
  return letters.map((p) => [...p][0] || '?').join('').slice(0, 2).toUpperCase();
}

function validName(name) {
  if (!name) return null;
  const chars = [...name];
  // eslint-disable-next-line no-control-regex
  return chars.length >= 1 && chars.length <= 32 && !/[\u0000-\u001f\u007f-\u009f]/.test(name) ? name : null;
}

function cssEscape(value) {
  return window.CSS && CSS.escape ? CSS.escape(value) : String(value).replace(/["\\]/g, '\\$&');
}

function setParam(key, value) {
  const url = new URL(location.href);
  if (value) url.searchParams.set(key, value);
  else url.searchParams.delete(key);
  history.replaceState(null, '', url);
}

// ---- UI events ----

el.composerForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const text = el.composer.value;
  if (!text.trim() || !current) return;
  el.composer.value = '';
  lastTypingSent = 0;
  sendText(current, text);
});

el.composer.addEventListener('input', () => {
  if (!client || !current || !el.composer.value) return;
  const nowMs = Date.now();
  if (nowMs - lastTypingSent < TYPING_SENT_EVERY_MS) return;
  lastTypingSent = nowMs;
  client.typing(current);
});

el.joinForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const room = el.joinInput.value.trim().replace(/^#/, '');
  if (!ROOM_PATTERN.test(room)) {
    showToast('Room names are 1-64 letters, digits, _ . or -');
    return;
  }
  el.joinInput.value = '';
  if (rooms.has(room)) switchRoom(room);
  else joinRoom(room, true);
});

el.leave.addEventListener('click', () => leaveRoom(current));

let lastScrollTop = 0;
el.scroll.addEventListener('scroll', () => {
  // Scrolling up again near the top retries a load that failed.
  const up = el.scroll.scrollTop < lastScrollTop;
  lastScrollTop = el.scroll.scrollTop;
  loadOlderIfAtTop(up);
}, { passive: true });

el.historyRetry.addEventListener('click', () => {
  if (current) loadOlder(current, true);
});

el.nameForm.addEventListener('submit', (event) => {
  event.preventDefault();
  if (client && client.user !== null) return; // the token names the user
  const name = validName(el.nameInput.value.trim());
  if (!name) {
    showToast('Names are 1-32 characters, no control characters');
    return;
  }
  if (name === myName) return;
  myName = name;
  setParam('name', name);
  restart();
});

el.picker.addEventListener('change', async () => {
  const value = el.picker.value;
  forced = value === 'auto' ? null : value;
  setParam('transport', forced);
  if (!client || client.state === 'failed' || client.state === 'closed') {
    restart();
    return;
  }
  try {
    await client.setTransports(forced ? [forced] : TRANSPORTS);
  } catch (error) {
    showToast(`Cannot switch to ${value}: ${error.message}`);
  }
  renderConnection(client);
});

addEventListener('pagehide', () => {
  if (client) client.close();
});

addEventListener('pageshow', (event) => {
  // Restored from the back/forward cache after pagehide closed the session.
  if (event.persisted) restart();
});

setInterval(() => {
  if (current) renderTyping();
}, 1000);

start([wantedRoom]);
