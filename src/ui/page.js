// The status page's script: read the live stream of snapshots and show them.
//
// The stream is read with fetch (EventSource cannot send headers); with an
// API key it goes in a header, taken from a form and kept in this tab's
// sessionStorage, never in a URL. Everything shown is set as text, never as
// markup: snapshot text comes from clients' prompts.
'use strict';

const KEY_ITEM = 'hearth-api-key';
const RETRY_MS = 2000;

const $ = (id) => document.getElementById(id);

function storedKey() {
  return sessionStorage.getItem(KEY_ITEM) || '';
}

function authHeaders() {
  const key = storedKey();
  return key ? { authorization: 'Bearer ' + key } : {};
}

// --- formatting -------------------------------------------------------------

function bytes(n) {
  if (!n) return '0 B';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + ' ' + units[i];
}

function secs(s) {
  if (s === null || s === undefined) return '—';
  if (s < 10) return s.toFixed(2) + ' s';
  if (s < 120) return s.toFixed(1) + ' s';
  const m = Math.floor(s / 60);
  if (m < 120) return m + ' min ' + Math.floor(s % 60) + ' s';
  const h = Math.floor(m / 60);
  if (h < 48) return h + ' h ' + (m % 60) + ' min';
  return Math.floor(h / 24) + ' d ' + (h % 24) + ' h';
}

function num(n) {
  return n === null || n === undefined ? '—' : Number(n).toLocaleString('en-US');
}

function rate(x) {
  return x ? x.toFixed(1) : '—';
}

// --- DOM helpers --------------------------------------------------------------

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement('tr');
  for (const c of cells) {
    tr.appendChild(c instanceof Node ? wrapCell(c) : el('td', c));
  }
  return tr;
}

function wrapCell(node) {
  if (node.tagName === 'TD') return node;
  const td = document.createElement('td');
  td.appendChild(node);
  return td;
}

function fill(tbody, rows, columns, emptyText) {
  tbody.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement('tr');
    tr.className = 'empty';
    const td = el('td', emptyText);
    td.colSpan = columns;
    tr.appendChild(td);
    tbody.appendChild(tr);
    return;
  }
  for (const r of rows) tbody.appendChild(r);
}

function phase(name) {
  return el('span', name, 'phase ' + name);
}

function progress(done, total) {
  if (!total) return el('span', '—');
  const pct = Math.min(100, Math.round((100 * done) / total));
  const wrap = document.createElement('span');
  const bar = el('span', null, 'bar');
  const fillEl = document.createElement('span');
  fillEl.style.width = pct + '%';
  bar.appendChild(fillEl);
  bar.setAttribute('role', 'progressbar');
  bar.setAttribute('aria-valuenow', String(pct));
  wrap.appendChild(bar);
  wrap.appendChild(document.createTextNode(' ' + num(done) + ' / ' + num(total) + ' (' + pct + '%)'));
  return wrap;
}

// --- rendering ----------------------------------------------------------------

function renderServer(s) {
  $('model-name').textContent = s.model_id + ' · ' + s.model;
  const facts = [
    ['model', s.model_id],
    ['file', s.model_path],
    ['parameters', num(s.n_params)],
    ['context', num(s.n_ctx) + ' (trained ' + num(s.n_ctx_train) + ')'],
    ['sequences', s.parallel],
    ['KV cells used', num(s.kv_used) + ' / ' + num(s.kv_cells)],
    ['weights', bytes(s.memory.weights)],
    ['KV', bytes(s.memory.kv)],
    ['buffers', bytes(s.memory.buffers)],
    ['build', 'hearth ' + s.version + ' · ' + s.features.join(', ')],
    ['uptime', secs(s.uptime_secs)],
    ['heartbeat', secs(s.heartbeat_secs)],
    ['engine', s.engine_alive ? 'running' : 'stopped'],
    ['steps', num(s.steps) + ' (last ' + s.last_step_rows + ' rows)'],
  ];
  const dl = $('facts');
  dl.replaceChildren();
  for (const [k, v] of facts) {
    const d = document.createElement('div');
    d.appendChild(el('dt', k));
    d.appendChild(el('dd', v));
    dl.appendChild(d);
  }
}

function lastByte(r, heartbeat) {
  if (!r.streaming) return el('span', 'not streaming');
  if (r.since_write_secs === null) return el('span', '—');
  const silent = r.since_write_secs > heartbeat * 1.5;
  return el('span', secs(r.since_write_secs) + ' ago', silent ? 'silent' : '');
}

function renderRequests(snap) {
  const q = snap.queue;
  $('queue-line').textContent =
    '· ' + q.running + ' running, ' + q.waiting + ' waiting, ' + q.in_flight + ' in flight';
  const rows = snap.requests.map((r) => {
    const tr = row([
      r.id,
      r.route,
      phase(r.phase),
      r.phase === 'prefill' ? progress(r.prefill_done, r.prefill_total) : el('span', r.phase === 'decode' ? 'done' : '—'),
      num(r.prompt_tokens),
      num(r.cached_tokens),
      r.source || '—',
      num(r.generated_tokens),
      rate(r.tokens_per_second),
      secs(r.ttft_secs),
      secs(r.age_secs),
      lastByte(r, snap.server.heartbeat_secs),
      r.slot === null ? '—' : r.slot,
    ]);
    tr.dataset.phase = r.phase;
    tr.dataset.id = r.id;
    return tr;
  });
  fill($('requests'), rows, 13, 'nothing running');
}

function renderRecent(snap) {
  const now = Date.now() / 1000;
  const rows = snap.recent.map((r) => {
    const tr = row([
      r.id,
      r.route,
      el('span', r.outcome, 'outcome-' + r.outcome),
      r.finish || '—',
      num(r.prompt_tokens),
      num(r.cached_tokens),
      r.source || '—',
      num(r.generated_tokens),
      secs(r.ttft_secs),
      secs(r.total_secs),
      secs(Math.max(0, now - r.ended_at)) + ' ago',
    ]);
    tr.dataset.outcome = r.outcome;
    tr.dataset.id = r.id;
    return tr;
  });
  fill($('recent'), rows, 11, 'no request yet');
}

function renderSlots(snap) {
  const rows = snap.slots.map((s) => row([
    s.id,
    phase(s.state),
    num(s.kv_tokens),
    s.state === 'idle' ? '—' : num(s.prompt_tokens),
    s.state === 'idle' ? '—' : num(s.cached_tokens),
    s.prefix || '—',
    s.state === 'idle' ? '—' : num(s.generated_tokens),
    rate(s.tokens_per_second),
  ]));
  fill($('slots'), rows, 8, 'no sequence');
}

function renderStores(snap) {
  const ram = snap.stores.filter((s) => s.store === 'ram');
  const disk = snap.stores.filter((s) => s.store === 'disk');
  const total = (xs) => xs.reduce((a, s) => a + s.bytes, 0);
  $('stores-line').textContent =
    '· RAM ' + ram.length + ' (' + bytes(total(ram)) + '), disk ' + disk.length + ' (' + bytes(total(disk)) + ')';
  const rows = snap.stores.map((s) => row([
    s.store,
    num(s.tokens),
    bytes(s.bytes),
    num(s.hits),
    secs(s.age_secs),
    secs(s.idle_secs) + ' ago',
    el('td', s.first_line, 'text'),
  ]));
  fill($('stores'), rows, 7, 'no snapshot kept');
}

function render(snap) {
  renderServer(snap.server);
  renderRequests(snap);
  renderRecent(snap);
  renderSlots(snap);
  renderStores(snap);
  document.body.dataset.updated = String(Date.now());
}

// --- connection ---------------------------------------------------------------

function setConn(text) {
  $('conn').textContent = text;
}

function showLogin(message) {
  $('status').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  setConn('API key required');
  $('key').focus();
}

// Read an SSE body, calling onEvent(name, data) per event.
async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const frame = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let name = 'message';
      const data = [];
      for (const line of frame.split('\n')) {
        if (line.startsWith('event:')) name = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (data.length) onEvent(name, data.join('\n'));
    }
  }
}

let generation = 0;

async function connect() {
  const mine = ++generation;
  setConn('connecting…');
  let res;
  try {
    res = await fetch('/ui/events', { headers: authHeaders(), cache: 'no-store' });
  } catch (err) {
    setConn('server unreachable; retrying');
    setTimeout(() => mine === generation && connect(), RETRY_MS);
    return;
  }
  if (res.status === 401) {
    const had = storedKey();
    sessionStorage.removeItem(KEY_ITEM);
    showLogin(had ? 'That key was not accepted.' : '');
    return;
  }
  if (!res.ok || !res.body) {
    setConn('status stream unavailable (' + res.status + '); retrying');
    setTimeout(() => mine === generation && connect(), RETRY_MS);
    return;
  }
  $('login').hidden = true;
  $('status').hidden = false;
  setConn('live');
  try {
    await readEvents(res.body, (name, data) => {
      if (name === 'snapshot' && mine === generation) render(JSON.parse(data));
    });
    setConn('stream ended; reconnecting');
  } catch (err) {
    setConn('stream lost; reconnecting');
  }
  setTimeout(() => mine === generation && connect(), RETRY_MS);
}

$('login-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const key = $('key').value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  $('key').value = '';
  connect();
});

// The page itself came with 401 when a key is required and none was sent
// (always so from the address bar): ask for one before fetching anything,
// unless this tab already holds one.
const nav = performance.getEntriesByType('navigation')[0];
if (nav && nav.responseStatus === 401 && !storedKey()) {
  showLogin('');
} else {
  connect();
}
