// The compare view: one client per transport, all in one room, and a sender. Each panel
// measures when the sender's messages arrive, with performance.now() from the moment each
// message was sent, and shows count, p50, p90, p99, max and a chart.

import { connect, TRANSPORTS } from '/switchyard.js';

const SVG = 'http://www.w3.org/2000/svg';
const ROOM_PATTERN = /^[A-Za-z0-9_.-]{1,64}$/;
/** Stay a little under the session's rate limit, which the server states at creation. */
const RATE_MARGIN = 0.9;
const CHART_BARS = 80;
const LABELS = {
  websocket: 'WebSocket',
  sse: 'Server-Sent Events',
  'long-polling': 'Long polling',
  'short-polling': 'Short polling',
};
const HOW = {
  websocket: 'one socket carries events and commands',
  sse: 'one event stream; commands by POST',
  'long-polling': 'a held GET, answered by the first event',
  'short-polling': 'a GET every short_poll_ms',
};
const SHORT = { websocket: 'ws', sse: 'sse', 'long-polling': 'lp', 'short-polling': 'sp' };
/** The summary's log scale: 0.1 ms to 10 s. */
const SCALE_MIN = 0.1;
const SCALE_MAX = 10000;

const params = new URLSearchParams(location.search);
const room = ROOM_PATTERN.test(params.get('room') || '') ? params.get('room') : `compare-${digits(4)}`;
const burstSize = Math.min(Math.max(parseInt(params.get('burst'), 10) || 20, 1), 1000);
/** Prefix of this page's client ids: another compare page in the same room is not counted. */
const run = Math.random().toString(36).slice(2, 8);

const sentAt = new Map(); // client_id -> performance.now() at send
let sent = 0;
let acked = 0;
let sender = null;
let sending = false;
let ready = false; // every panel has joined (or given up) and the sender is in the room

const $ = (id) => document.getElementById(id);
const sendOneButton = $('send-one');
const sendBurstButton = $('send-burst');
const senderStatus = $('sender-status');
$('room-name').textContent = `#${room}`;
sendBurstButton.textContent = `Send a burst of ${burstSize}`;

const panels = TRANSPORTS.map(createPanel);
const summary = createSummary();
window.compare = { panels, room, burstSize, get sender() { return sender; } };

// ---- panels ----

function createPanel(transport) {
  const root = document.createElement('article');
  root.className = 'panel';
  root.dataset.testid = `compare-${transport}`;
  root.dataset.transport = transport;

  const head = document.createElement('div');
  head.className = 'panel-head';
  const title = document.createElement('div');
  title.className = 'panel-title';
  const swatch = document.createElement('span');
  swatch.className = 'swatch';
  const name = document.createElement('span');
  name.textContent = LABELS[transport];
  title.append(swatch, name);
  const state = document.createElement('span');
  state.className = 'panel-state';
  const dot = document.createElement('span');
  dot.className = 'conn-dot';
  dot.dataset.state = 'connecting';
  const stateText = document.createElement('span');
  stateText.dataset.testid = 'state';
  stateText.textContent = 'connecting';
  state.append(dot, stateText);
  head.append(title, state);

  const note = document.createElement('div');
  note.className = 'panel-note';
  note.textContent = HOW[transport];

  const stats = document.createElement('div');
  stats.className = 'stats';
  const values = {};
  for (const [key, label, unit] of [['count', 'count', ''], ['p50', 'p50', 'ms'], ['p90', 'p90', 'ms'], ['p99', 'p99', 'ms'], ['max', 'max', 'ms']]) {
    const stat = document.createElement('div');
    stat.className = 'stat' + (key === 'p50' ? ' primary' : '') + (key === 'count' || key === 'p50' ? ' big' : '');
    const labelEl = document.createElement('span');
    labelEl.className = 'stat-label';
    labelEl.textContent = label;
    const valueEl = document.createElement('span');
    valueEl.className = 'stat-value';
    const number = document.createElement('span');
    number.dataset.testid = key;
    number.textContent = key === 'count' ? '0' : '–';
    valueEl.append(number);
    if (unit) {
      const unitEl = document.createElement('span');
      unitEl.className = 'unit';
      unitEl.textContent = unit;
      valueEl.append(unitEl);
    }
    stat.append(labelEl, valueEl);
    stats.append(stat);
    values[key] = number;
  }

  const chart = document.createElement('div');
  chart.className = 'chart';
  const foot = document.createElement('div');
  foot.className = 'panel-foot';
  foot.textContent = 'no session yet';

  root.append(head, note, stats, chart, foot);
  $('panels').append(root);

  const panel = {
    transport, root, dot, stateText, note, values, chart, foot,
    client: null, latencies: [], seen: new Set(), dirty: true,
  };
  drawChart(panel);
  return panel;
}

async function startPanel(panel) {
  let client;
  try {
    client = await connect('', {
      name: `${SHORT[panel.transport]}-watch-${digits(4)}`,
      transports: [panel.transport],
      openTimeoutMs: 5000,
    });
  } catch (error) {
    panel.root.classList.add('unavailable');
    setPanelState(panel, 'failed', 'unavailable');
    panel.note.textContent = error.fallbacks?.length
      ? `${panel.transport}: ${error.fallbacks[error.fallbacks.length - 1].detail}`
      : error.message;
    return;
  }
  panel.client = client;
  client.on('message', (message) => {
    const start = sentAt.get(message.client_id);
    if (start === undefined || panel.seen.has(message.client_id)) return;
    panel.seen.add(message.client_id);
    panel.latencies.push(performance.now() - start);
    panel.dirty = true;
  });
  client.on('state', ({ state, reason }) => {
    setPanelState(panel, state);
    panel.note.textContent = state === 'open' ? describe(panel) : reason || state;
  });
  setPanelState(panel, client.state);
  panel.note.textContent = describe(panel);
  try {
    await client.join(room);
  } catch (error) {
    panel.note.textContent = `cannot join: ${error.message}`;
  }
  panel.dirty = true;
}

function describe(panel) {
  if (panel.transport !== 'short-polling' || !panel.client) return HOW[panel.transport];
  return `a GET every ${panel.client._shortPollMs()} ms`;
}

function setPanelState(panel, state, label) {
  panel.dot.dataset.state = state;
  panel.stateText.textContent = label || { open: 'live' }[state] || state;
}

function renderPanel(panel) {
  const sorted = [...panel.latencies].sort((a, b) => a - b);
  panel.values.count.textContent = String(sorted.length);
  panel.values.p50.textContent = formatMs(percentile(sorted, 0.5));
  panel.values.p90.textContent = formatMs(percentile(sorted, 0.9));
  panel.values.p99.textContent = formatMs(percentile(sorted, 0.99));
  panel.values.max.textContent = formatMs(sorted[sorted.length - 1]);
  const c = panel.client;
  panel.foot.textContent = c
    ? `${c.name} · session ${c.sessionId.slice(0, 8)}… · seq ${c.lastSeq}`
    : panel.foot.textContent;
  drawChart(panel, sorted);
}

/** Bars: the latency of each of the last messages, in arrival order, with the median dashed. */
function drawChart(panel, sorted = []) {
  const width = 300;
  const height = 120;
  const left = 30;
  const bottom = 14;
  const top = 6;
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.setAttribute('role', 'img');
  const recent = panel.latencies.slice(-CHART_BARS);
  svg.setAttribute('aria-label', `${LABELS[panel.transport]}: latency of the last ${recent.length} messages`);
  const plotH = height - bottom - top;
  const axis = line(left, height - bottom, width, height - bottom, 'axis');
  svg.append(axis);
  if (recent.length === 0) {
    svg.append(text(left + (width - left) / 2, height / 2, 'no messages yet', 'empty-chart', 'middle'));
    panel.chart.replaceChildren(svg);
    return;
  }
  const yMax = niceCeil(Math.max(...recent));
  for (const fraction of [0.5, 1]) {
    const y = height - bottom - plotH * fraction;
    svg.append(line(left, y, width, y, 'gridline'));
    svg.append(text(left - 4, y + 3, formatMs(yMax * fraction), 'tick', 'end'));
  }
  svg.append(text(left - 4, height - bottom + 3, '0', 'tick', 'end'));
  const slot = (width - left) / CHART_BARS;
  recent.forEach((value, i) => {
    const h = Math.max(1, (value / yMax) * plotH);
    const rect = document.createElementNS(SVG, 'rect');
    rect.setAttribute('class', 'bar');
    rect.setAttribute('x', String(left + i * slot + slot * 0.15));
    rect.setAttribute('y', String(height - bottom - h));
    rect.setAttribute('width', String(Math.max(1, slot * 0.7)));
    rect.setAttribute('height', String(h));
    const tip = document.createElementNS(SVG, 'title');
    tip.textContent = `${formatMs(value)} ms`;
    rect.append(tip);
    svg.append(rect);
  });
  const median = percentile(sorted, 0.5);
  const my = height - bottom - (median / yMax) * plotH;
  svg.append(line(left, my, width, my, 'median'));
  svg.append(text(width - 2, height - 2, `last ${recent.length} · ms`, 'tick', 'end'));
  panel.chart.replaceChildren(svg);
}

// ---- summary ----

function createSummary() {
  const container = $('summary');
  const rows = new Map();
  for (const transport of TRANSPORTS) {
    const name = document.createElement('div');
    name.className = 'summary-name';
    name.dataset.transport = transport;
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    const label = document.createElement('span');
    label.textContent = LABELS[transport];
    name.append(swatch, label);
    const track = document.createElement('div');
    track.className = 'summary-track';
    track.dataset.transport = transport;
    const bar = document.createElement('div');
    bar.className = 'summary-bar';
    bar.style.width = '0';
    const p90 = document.createElement('div');
    p90.className = 'summary-p90';
    p90.hidden = true;
    track.append(bar, p90);
    const value = document.createElement('div');
    value.className = 'summary-value';
    value.textContent = '–';
    container.append(name, track, value);
    rows.set(transport, { bar, p90, value });
  }
  const axis = document.createElement('div');
  axis.className = 'summary-axis';
  for (const label of ['0.1 ms', '1 ms', '10 ms', '100 ms', '1 s', '10 s']) {
    const tick = document.createElement('span');
    tick.textContent = label;
    axis.append(tick);
  }
  container.append(axis);
  return rows;
}

function renderSummary() {
  const medians = panels.map((p) => percentile([...p.latencies].sort((a, b) => a - b), 0.5));
  const fastest = Math.min(...medians.filter((m) => m !== undefined));
  panels.forEach((panel, i) => {
    const row = summary.get(panel.transport);
    const sorted = [...panel.latencies].sort((a, b) => a - b);
    const p50 = medians[i];
    if (p50 === undefined) {
      row.bar.style.width = '0';
      row.p90.hidden = true;
      row.value.textContent = panel.client ? '–' : 'unavailable';
      return;
    }
    row.bar.style.width = `${logPosition(p50) * 100}%`;
    row.p90.hidden = false;
    row.p90.style.left = `calc(${logPosition(percentile(sorted, 0.9)) * 100}% - 1px)`;
    const ratio = p50 / fastest;
    row.value.textContent = `${formatMs(p50)} ms${ratio >= 1.5 ? ` · ×${ratio >= 10 ? Math.round(ratio) : ratio.toFixed(1)}` : ''}`;
  });
}

function logPosition(ms) {
  const clamped = Math.min(Math.max(ms, SCALE_MIN), SCALE_MAX);
  return (Math.log10(clamped) - Math.log10(SCALE_MIN)) / (Math.log10(SCALE_MAX) - Math.log10(SCALE_MIN));
}

// ---- sending ----

async function startSender() {
  try {
    sender = await connect('', { name: `sender-${digits(4)}` });
    await sender.join(room);
  } catch (error) {
    senderStatus.textContent = `sender cannot connect: ${error.message}`;
    return;
  }
  sender.on('state', renderSender);
  renderSender();
}

function renderSender() {
  if (!sender) return;
  const live = sender.state === 'open' ? sender.transport : sender.state;
  senderStatus.textContent = `sender ${sender.name} via ${live} · ${acked}/${sent} echoed`;
  const enabled = ready && sender.state === 'open' && !sending;
  sendOneButton.disabled = !enabled;
  sendBurstButton.disabled = !enabled;
}

function sendOne(index, total) {
  sent += 1;
  const clientId = `${run}-${sent}`;
  const text = total > 1 ? `burst ${index + 1}/${total} · #${sent}` : `ping #${sent}`;
  sentAt.set(clientId, performance.now());
  sender.send(room, text, { clientId }).then(
    () => { acked += 1; renderSender(); },
    (error) => { senderStatus.textContent = `send failed: ${error.message}`; },
  );
}

async function sendBurst(count) {
  sending = true;
  renderSender();
  const limits = sender.server || {};
  const unpaced = Math.floor((limits.rate_limit_burst ?? 40) * RATE_MARGIN);
  const paceMs = Math.ceil(1000 / ((limits.rate_limit_per_sec ?? 20) * RATE_MARGIN));
  for (let i = 0; i < count; i++) {
    if (i >= unpaced) await new Promise((resolve) => setTimeout(resolve, paceMs));
    sendOne(i, count);
  }
  sending = false;
  renderSender();
}

// A click repaints the page (button states, the sender line) before the browser handles the
// next network task, which would add a frame's time to every measurement. Sending right after
// that paint measures the transports, not the click.
function afterPaint(fn) {
  requestAnimationFrame(() => setTimeout(fn, 0));
}

sendOneButton.addEventListener('click', () => afterPaint(() => {
  sendOne(0, 1);
  renderSender();
}));
sendBurstButton.addEventListener('click', () => {
  sending = true;
  renderSender();
  afterPaint(() => sendBurst(burstSize));
});
$('clear').addEventListener('click', () => {
  for (const panel of panels) {
    panel.latencies = [];
    panel.seen.clear();
    panel.dirty = true;
  }
  sentAt.clear();
});

// ---- helpers ----

function percentile(sorted, q) {
  if (sorted.length === 0) return undefined;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

function formatMs(ms) {
  if (ms === undefined || Number.isNaN(ms)) return '–';
  if (ms < 10) return ms.toFixed(1);
  return String(Math.round(ms));
}

function niceCeil(value) {
  const power = 10 ** Math.floor(Math.log10(Math.max(value, 0.1)));
  for (const step of [1, 2, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

function line(x1, y1, x2, y2, cls) {
  const l = document.createElementNS(SVG, 'line');
  l.setAttribute('x1', String(x1));
  l.setAttribute('y1', String(y1));
  l.setAttribute('x2', String(x2));
  l.setAttribute('y2', String(y2));
  l.setAttribute('class', cls);
  l.setAttribute('vector-effect', 'non-scaling-stroke');
  return l;
}

function text(x, y, content, cls, anchor) {
  const t = document.createElementNS(SVG, 'text');
  t.setAttribute('x', String(x));
  t.setAttribute('y', String(y));
  t.setAttribute('class', cls);
  t.setAttribute('text-anchor', anchor);
  t.textContent = content;
  return t;
}

function digits(n) {
  return String(Math.floor(Math.random() * 10 ** n)).padStart(n, '0');
}

// Redraw at most once a frame, only the panels that changed.
function frame() {
  let changed = false;
  for (const panel of panels) {
    if (panel.dirty) {
      panel.dirty = false;
      changed = true;
      renderPanel(panel);
    }
  }
  if (changed) renderSummary();
  requestAnimationFrame(frame);
}
requestAnimationFrame(frame);
// requestAnimationFrame pauses in background tabs; keep the numbers current there too.
setInterval(() => {
  if (document.hidden) {
    for (const panel of panels) if (panel.dirty) { panel.dirty = false; renderPanel(panel); }
    renderSummary();
  }
}, 500);

addEventListener('pagehide', () => {
  for (const panel of panels) panel.client?.close();
  sender?.close();
});

Promise.all([...panels.map(startPanel), startSender()]).then(() => {
  ready = true;
  renderSender();
});
