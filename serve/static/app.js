/* clipsql curation app: plain JS, no build step, no outside requests (see serve/app.py for the API). */
'use strict';

const PAGE = 100;            // rows per /api/page request
const TW = 176, TH = 234;    // tile cell width / height (px), as in app.css
const MAX_RANGE = 20000;     // shift-click ranges load at most this many rows

const S = {
  info: null, state: blankState(), prev: null, total: 0, allRows: 0, columns: [], gen: 0,
  pages: new Map(), pending: new Map(), selected: new Set(), selectAll: false, anchor: null, focus: 0,
  cols: 1, broken: new Map(), hists: new Map(), histQueue: [], histBusy: false, detailId: null,
};

function blankState() { return { sql: null, search: null, brushes: {}, filters: [], where: '', tag: null, sort: null }; }
const $ = (sel, root) => (root || document).querySelector(sel);
const el = (tag, attrs, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v; else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v); else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
};

async function api(path, body) {
  const opts = body === undefined ? {} : { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) throw new Error((data && (data.error || data.broken)) || `${r.status} ${r.statusText}`);
  return data;
}

function status(msg, error) {
  const s = $('#status');
  s.textContent = msg || '';
  s.className = error ? 'error' : '';
}

function fmt(v) {
  if (v === null || v === undefined) return 'NULL';
  if (typeof v === 'number') return Number.isInteger(v) ? String(v) : (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(3) : String(Number(v.toPrecision(4))));
  return String(v);
}

// ------------------------------------------------------------------ state
function showColumns() {
  const st = S.state, out = [];
  if (st.search) out.push('similarity');
  if (st.sort && st.sort.column) out.push(st.sort.column);
  for (const c of Object.keys(st.brushes || {})) out.push(c);
  return [...new Set(out)].filter(c => !['id', 'uri', 'caption'].includes(c));
}

function writeHash() {
  const st = S.state, plain = JSON.stringify(st) === JSON.stringify(blankState());
  history.replaceState(null, '', plain ? location.pathname : '#' + encodeURIComponent(JSON.stringify(st)));
}

function readHash() {
  if (!location.hash || location.hash.length < 2) return;
  try { S.state = Object.assign(blankState(), JSON.parse(decodeURIComponent(location.hash.slice(1)))); } catch (e) { /* ignore */ }
}

async function apply(opts) {
  opts = opts || {};
  S.gen += 1;
  S.pages.clear(); S.pending.clear();
  if (!opts.keepSelection) { S.selected.clear(); S.selectAll = false; S.anchor = null; }
  if (!opts.keepScroll) { $('#grid').scrollTop = 0; S.focus = 0; }
  for (const t of document.querySelectorAll('.tile')) t.remove();
  const gen = S.gen;
  try {
    await loadPage(0, gen);
  } catch (e) {
    status(e.message, true);
    if (S.prev && !opts.noRevert) {                // show the last state that ran, keep the message
      S.state = S.prev; S.prev = null; syncControls();
      await apply({ noRevert: true, keepScroll: true });
      status(e.message, true);
      return;
    }
    document.body.dataset.gen = String(gen);
    return;
  }
  S.prev = JSON.parse(JSON.stringify(S.state));
  writeHash();
  syncControls();
  buildHists();
  render();
  updateSelInfo();
  document.body.dataset.gen = String(gen);      // tests wait on this: the grid shows the new state
}

function change(mutate, opts) {
  S.prev = JSON.parse(JSON.stringify(S.state));
  mutate(S.state);
  status('');
  return apply(opts);
}

// ------------------------------------------------------------------ pages and the virtual grid
function loadPage(idx, gen) {
  if (S.pages.has(idx)) return Promise.resolve(S.pages.get(idx));
  if (S.pending.has(idx)) return S.pending.get(idx);
  const p = api('/api/page', { state: S.state, offset: idx * PAGE, limit: PAGE, show: showColumns() }).then(r => {
    if (gen !== S.gen) return null;
    S.pages.set(idx, r.rows);
    S.pending.delete(idx);
    S.total = r.total; S.allRows = r.all_rows;
    if (idx === 0 || !S.columns.length) { S.columns = r.columns; $('#sql').textContent = r.sql; }
    $('#total').textContent = `${r.total.toLocaleString()} of ${r.all_rows.toLocaleString()} rows`;
    $('#total').dataset.total = r.total;
    return r.rows;
  }, e => { S.pending.delete(idx); throw e; });
  S.pending.set(idx, p);
  return p;
}

function rowAt(i) {
  const rows = S.pages.get(Math.floor(i / PAGE));
  return rows ? rows[i % PAGE] || null : null;
}

function render() {
  const grid = $('#grid'), spacer = $('#spacer');
  S.cols = Math.max(1, Math.floor((grid.clientWidth - 8) / TW));
  const nrows = Math.ceil(S.total / S.cols);
  spacer.style.height = (nrows * TH + 16) + 'px';
  const first = Math.max(0, Math.floor(grid.scrollTop / TH) - 2);
  const last = Math.min(nrows - 1, Math.ceil((grid.scrollTop + grid.clientHeight) / TH) + 2);
  const lo = first * S.cols, hi = Math.min(S.total - 1, (last + 1) * S.cols - 1);
  const keep = new Set();
  for (let i = lo; i <= hi; i++) {
    keep.add(i);
    const row = rowAt(i);
    let t = spacer.querySelector(`.tile[data-index="${i}"]`);
    if (t && row && t.dataset.id !== row.id) { t.remove(); t = null; }
    if (!t) {
      t = row ? tile(row, i) : el('div', { class: 'tile loading', 'data-index': i }, el('div', { class: 'img' }));
      t.style.left = (8 + (i % S.cols) * TW) + 'px';
      t.style.top = (8 + Math.floor(i / S.cols) * TH) + 'px';
      spacer.append(t);
    } else {
      t.style.left = (8 + (i % S.cols) * TW) + 'px';
      t.style.top = (8 + Math.floor(i / S.cols) * TH) + 'px';
    }
    decorate(t, i);
    if (!row) loadPage(Math.floor(i / PAGE), S.gen).then(r => { if (r) render(); }, e => status(e.message, true));
  }
  for (const t of spacer.querySelectorAll('.tile')) if (!keep.has(+t.dataset.index)) t.remove();
}

function tile(row, i) {
  const img = el('div', { class: 'img' });
  const t = el('div', { class: 'tile', 'data-index': i, 'data-id': row.id, title: `${row.id}\n${row.uri || ''}` }, img,
    el('div', { class: 'cap', text: row.caption === null ? '(no caption)' : row.caption }),
    el('div', { class: 'vals', text: Object.entries(row.values || {}).map(([k, v]) => `${k} ${fmt(v)}`).join(' · ') }),
    el('div', { class: 'tags' }, ...(row.tags || []).map(x => el('span', { class: 'chip', text: x }))),
    el('div', { class: 'acts' },
      el('button', { type: 'button', title: 'Details (Enter)', 'data-act': 'detail', text: 'i' }),
      el('button', { type: 'button', title: 'More like this (m)', 'data-act': 'like', text: '≈' })));
  if (S.broken.has(row.id)) broken(t, S.broken.get(row.id));
  else {
    const im = el('img', { alt: row.caption || row.id, loading: 'lazy', decoding: 'async' });
    im.addEventListener('error', () => whyBroken(row, im.src).then(why => { S.broken.set(row.id, why); broken(t, why); }));
    im.src = row.thumb;
    img.append(im);
  }
  return t;
}

async function whyBroken(row, src) {
  if (row.remote && S.info && S.info.remote_images) return 'remote image: your browser could not load it';
  try { const r = await fetch(src); const d = await r.json(); return d.broken || d.error || 'unreadable'; } catch (e) { return 'unreadable'; }
}

function broken(t, why) {
  t.classList.add('broken');
  const img = $('.img', t);
  img.replaceChildren(el('span', { class: 'why', text: 'broken image: ' + why }));
}

function decorate(t, i) {
  const id = t.dataset.id;
  t.classList.toggle('selected', !!id && (S.selectAll || S.selected.has(id)));
  t.classList.toggle('focused', i === S.focus);
}

function redecorate() { for (const t of document.querySelectorAll('.tile')) decorate(t, +t.dataset.index); updateSelInfo(); }

function updateSelInfo() {
  $('#sel-info').textContent = S.selectAll ? `all ${S.total.toLocaleString()} matching selected` : `${S.selected.size} selected`;
}

// ------------------------------------------------------------------ selection and keyboard
async function selectRange(a, b) {
  const lo = Math.min(a, b), hi = Math.max(a, b);
  if (hi - lo + 1 > MAX_RANGE) { status(`a range of more than ${MAX_RANGE} rows: use "Select all matching" with a filter`, true); return; }
  const gen = S.gen;
  for (let p = Math.floor(lo / PAGE); p <= Math.floor(hi / PAGE); p++) await loadPage(p, gen);
  if (gen !== S.gen) return;
  for (let i = lo; i <= hi; i++) { const r = rowAt(i); if (r) S.selected.add(r.id); }
  redecorate();
}

function clickTile(i, e) {
  const row = rowAt(i);
  if (!row) return;
  if (S.selectAll) { S.selectAll = false; S.selected.clear(); }
  if (e.shiftKey && S.anchor !== null) selectRange(S.anchor, i);
  else if (e.ctrlKey || e.metaKey) { S.selected.has(row.id) ? S.selected.delete(row.id) : S.selected.add(row.id); S.anchor = i; }
  else { S.selected.clear(); S.selected.add(row.id); S.anchor = i; }
  S.focus = i;
  redecorate();
}

function moveFocus(d) {
  if (!S.total) return;
  S.focus = Math.max(0, Math.min(S.total - 1, S.focus + d));
  const grid = $('#grid'), top = 8 + Math.floor(S.focus / S.cols) * TH;
  if (top < grid.scrollTop) grid.scrollTop = top - 8;
  else if (top + TH > grid.scrollTop + grid.clientHeight) grid.scrollTop = top + TH - grid.clientHeight + 8;
  render();
}

function toggleFocused(range) {
  const row = rowAt(S.focus);
  if (!row) return;
  if (S.selectAll) { S.selectAll = false; S.selected.clear(); }
  if (range && S.anchor !== null) { selectRange(S.anchor, S.focus); return; }
  S.selected.has(row.id) ? S.selected.delete(row.id) : S.selected.add(row.id);
  S.anchor = S.focus;
  redecorate();
}

function onKey(e) {
  const tag = (e.target && e.target.tagName) || '';
  if (['INPUT', 'TEXTAREA', 'SELECT'].includes(tag)) {
    if (e.key === 'Escape') e.target.blur();
    return;
  }
  const k = e.key;
  if (k === 'ArrowRight') moveFocus(1); else if (k === 'ArrowLeft') moveFocus(-1);
  else if (k === 'ArrowDown') moveFocus(S.cols); else if (k === 'ArrowUp') moveFocus(-S.cols);
  else if (k === ' ') toggleFocused(e.shiftKey);
  else if (k === 't') { $('#tag-name').focus(); }
  else if (k === '/') { $('#search').focus(); }
  else if (k === 'Enter') { const r = rowAt(S.focus); if (r) openDetail(r.id); }
  else if (k === 'm') { const r = rowAt(S.focus); if (r) moreLike(r.id); }
  else if (k === 'Escape') { closeDetail(); $('#help').hidden = true; }
  else return;
  e.preventDefault();
}

// ------------------------------------------------------------------ histograms with brushing
function buildHists() {
  const box = $('#hists');
  const numeric = S.columns.filter(c => c.numeric && c.name !== 'id').map(c => c.name);
  const have = [...box.children].map(x => x.dataset.column);
  if (JSON.stringify(have) !== JSON.stringify(numeric)) {
    box.replaceChildren(...numeric.map(histBlock));
    S.hists.clear();
  }
  S.histQueue = [];
  for (const b of box.children) { b.dataset.gen = ''; if (b.dataset.visible === '1') queueHist(b.dataset.column); }
}

const histObserver = new IntersectionObserver(entries => {
  for (const en of entries) {
    en.target.dataset.visible = en.isIntersecting ? '1' : '0';
    if (en.isIntersecting && en.target.dataset.gen !== String(S.gen)) queueHist(en.target.dataset.column);
  }
});

function histBlock(name) {
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', '0 0 280 58'); svg.setAttribute('preserveAspectRatio', 'none');
  const b = el('div', { class: 'hist', 'data-column': name },
    el('div', { class: 'name' }, el('b', { text: name, title: name }), el('span', { class: 'count muted' })),
    svg, el('div', { class: 'axis' }, el('span', { class: 'lo' }), el('span', { class: 'hi' })),
    el('div', { class: 'state', text: 'not computed yet' }));
  brushing(svg, name);
  histObserver.observe(b);
  return b;
}

function queueHist(name) {
  if (!S.histQueue.includes(name)) S.histQueue.push(name);
  pumpHists();
}

async function pumpHists() {
  if (S.histBusy) return;
  S.histBusy = true;
  try {
    while (S.histQueue.length) {
      const name = S.histQueue.shift(), gen = S.gen;
      const b = $(`.hist[data-column="${CSS.escape(name)}"]`);
      if (!b || b.dataset.gen === String(gen)) continue;
      $('.state', b).textContent = 'computing…';
      try {
        const h = await api('/api/histogram', { state: S.state, column: name });
        if (gen !== S.gen) { queueHist(name); continue; }
        S.hists.set(name, h); b.dataset.gen = String(gen);
        drawHist(b, h);
      } catch (e) { $('.state', b).textContent = e.message; $('.state', b).classList.add('err'); b.dataset.gen = String(gen); }
    }
  } finally { S.histBusy = false; }
}

function drawHist(b, h) {
  const svg = $('svg', b), W = 280, H = 58, n = h.all.length, bw = W / n;
  const max = Math.max(1, ...h.all);
  const ns = 'http://www.w3.org/2000/svg', kids = [];
  for (let i = 0; i < n; i++) {
    const ha = h.all[i] / max * (H - 2), hs = h.selected[i] / max * (H - 2);
    const a = document.createElementNS(ns, 'rect');
    a.setAttribute('class', 'all'); a.setAttribute('x', i * bw + 0.5); a.setAttribute('width', Math.max(0.5, bw - 1));
    a.setAttribute('y', H - ha); a.setAttribute('height', ha); kids.push(a);
    const s = document.createElementNS(ns, 'rect');
    s.setAttribute('class', 'sel'); s.setAttribute('x', i * bw + 0.5); s.setAttribute('width', Math.max(0.5, bw - 1));
    s.setAttribute('y', H - hs); s.setAttribute('height', hs); kids.push(s);
  }
  const br = S.state.brushes[h.column];
  if (br) {
    const x0 = (br[0] - h.lo) / (h.hi - h.lo) * W, x1 = (br[1] - h.lo) / (h.hi - h.lo) * W;
    const r = document.createElementNS(ns, 'rect');
    r.setAttribute('class', 'brush'); r.setAttribute('x', Math.max(0, x0)); r.setAttribute('y', 0);
    r.setAttribute('width', Math.max(1, Math.min(W, x1) - Math.max(0, x0))); r.setAttribute('height', H); kids.push(r);
  }
  svg.replaceChildren(...kids);
  $('.lo', b).textContent = fmt(h.lo); $('.hi', b).textContent = fmt(h.hi);
  $('.count', b).textContent = `${h.selected_rows.toLocaleString()}`;
  const st = $('.state', b); st.classList.remove('err');
  st.textContent = (br ? `brushed ${fmt(br[0])} – ${fmt(br[1])}` : '') + (h.nulls ? `  ${h.nulls} NULL` : '');
}

function brushing(svg, name) {
  let x0 = null, rect = null;
  const frac = e => { const r = svg.getBoundingClientRect(); return Math.max(0, Math.min(1, (e.clientX - r.left) / r.width)); };
  svg.addEventListener('pointerdown', e => {
    if (!S.hists.has(name)) return;
    x0 = frac(e); svg.setPointerCapture(e.pointerId);
    rect = document.createElementNS('http://www.w3.org/2000/svg', 'rect');
    rect.setAttribute('class', 'brush'); rect.setAttribute('y', 0); rect.setAttribute('height', 58);
    svg.append(rect);
  });
  svg.addEventListener('pointermove', e => {
    if (x0 === null) return;
    const x1 = frac(e);
    rect.setAttribute('x', Math.min(x0, x1) * 280); rect.setAttribute('width', Math.abs(x1 - x0) * 280);
  });
  svg.addEventListener('pointerup', e => {
    if (x0 === null) return;
    const x1 = frac(e), h = S.hists.get(name), a = x0;
    x0 = null;
    if (Math.abs(x1 - a) < 0.01) {
      if (S.state.brushes[name]) change(st => { delete st.brushes[name]; });
      else if (rect) rect.remove();
      return;
    }
    const span = h.hi - h.lo;
    let lo = h.lo + Math.min(a, x1) * span, hi = h.lo + Math.max(a, x1) * span;
    lo = Number(lo.toPrecision(4)); hi = Number(hi.toPrecision(4));
    if (hi <= lo) hi = lo + Math.abs(span) * 1e-3;
    change(st => { st.brushes = Object.assign({}, st.brushes, { [name]: [lo, hi] }); });
  });
}

// ------------------------------------------------------------------ controls
function syncControls() {
  const st = S.state;
  $('#base-sql').value = st.sql || (S.info ? S.info.default_sql : '');
  $('#where').value = st.where || '';
  $('#search').value = st.search ? (st.search.text !== undefined ? st.search.text : '≈ ' + st.search.like) : '';
  $('#search-clear').hidden = !st.search;
  const scalar = S.columns.filter(c => c.scalar && c.name !== 'id');
  const sortSel = $('#sort-column');
  sortSel.replaceChildren(el('option', { value: '', text: '(the SQL\'s order)' }),
    ...scalar.map(c => el('option', { value: c.name, text: c.name })));
  sortSel.value = st.sort ? st.sort.column : '';
  $('#sort-desc').checked = st.sort ? !!st.sort.desc : true;
  const mf = $('#mf-column'), keepCol = mf.value;
  mf.replaceChildren(...scalar.map(c => el('option', { value: c.name, text: c.name })));
  if (keepCol && scalar.some(c => c.name === keepCol)) mf.value = keepCol;
  $('#meta-filters').replaceChildren(...(st.filters || []).map((f, i) => el('span', { class: 'chip' },
    `${f.column} ${f.op} ${JSON.stringify(f.value)}`,
    el('button', { type: 'button', title: 'remove', text: '×', onclick: () => change(s => { s.filters.splice(i, 1); }) }))));
  $('#tag-filter').value = st.tag || '';
}

function fillTags(tags) {
  S.info.tags = tags;
  const sel = $('#tag-filter'), cur = S.state.tag || '';
  sel.replaceChildren(el('option', { value: '', text: '— any —' }),
    ...tags.map(t => el('option', { value: t.tag, text: `${t.tag} (${t.n})` })));
  if (cur && !tags.some(t => t.tag === cur)) sel.append(el('option', { value: cur, text: `${cur} (0)` }));
  sel.value = cur;
  $('#tag-names').replaceChildren(...tags.map(t => el('option', { value: t.tag })));
}

async function tagAction(action) {
  const name = $('#tag-name').value.trim();
  if (!name) { status('type a tag name first (t)', true); $('#tag-name').focus(); return; }
  let body;
  if (S.selectAll) body = { action, tag: name, all: true, state: S.state };
  else if (S.selected.size) body = { action, tag: name, ids: [...S.selected] };
  else { const r = rowAt(S.focus); if (!r) { status('select tiles first (click, shift-click, space)', true); return; } body = { action, tag: name, ids: [r.id] }; }
  try {
    const r = await api('/api/tags', body);
    status(action === 'add' ? `tagged ${r.added} row(s) '${r.tag}'${r.already ? ` (${r.already} already had it)` : ''}${r.commit_id ? `, commit ${r.commit_id}` : ''}`
      : `removed '${r.tag}' from ${r.removed} row(s)${r.commit_id ? `, commit ${r.commit_id}` : ''}`);
    fillTags((await api('/api/tags')).tags);
    await apply({ keepScroll: true, keepSelection: true });
    if (S.detailId) openDetail(S.detailId);
  } catch (e) { status(e.message, true); }
}

async function doExport() {
  const links = $('#export-links');
  links.replaceChildren(el('span', { class: 'muted', text: 'exporting…' }));
  try {
    const r = await api('/api/export', { state: S.state, format: $('#export-format').value });
    links.replaceChildren(...r.links.map(h => el('a', { href: h, download: h.split('/').pop(), text: h.split('/').pop() })));
    const c = r.counts || {};
    status(`exported ${c.selected} row(s) through clipsql select --sql` + (r.warnings.length ? ` — ${r.warnings.join('; ')}` : ''));
  } catch (e) { links.replaceChildren(); status(e.message, true); }
}

function moreLike(id) { change(st => { st.search = { like: id }; st.sort = null; st.brushes = {}; }); }

async function copySql() {
  const text = $('#sql').textContent;
  try { await navigator.clipboard.writeText(text); status('SQL copied'); return; } catch (e) { /* fall back */ }
  const ta = el('textarea'); ta.value = text; document.body.append(ta); ta.select();
  try { document.execCommand('copy'); status('SQL copied'); } catch (e) { status('select the SQL and copy it', true); }
  ta.remove();
}

// ------------------------------------------------------------------ detail panel
function closeDetail() { $('#detail').hidden = true; S.detailId = null; requestAnimationFrame(render); }

async function openDetail(id) {
  S.detailId = id;
  const panel = $('#detail'), body = $('#detail-body');
  panel.hidden = false;
  body.replaceChildren(el('p', { class: 'muted', text: 'loading…' }));
  requestAnimationFrame(render);
  let d;
  try { d = await api('/api/detail?id=' + encodeURIComponent(id)); } catch (e) { body.replaceChildren(el('p', { class: 'err', text: e.message })); return; }
  if (S.detailId !== id) return;
  const big = el('div', { class: 'big' });
  const im = el('img', { alt: d.caption || d.id });
  im.addEventListener('error', () => whyBroken(d, im.src).then(w => { big.classList.add('broken'); big.replaceChildren('broken image: ' + w); }));
  im.src = d.thumb; big.append(im);
  const kv = obj => el('table', {}, ...Object.entries(obj).map(([k, v]) => el('tr', {}, el('td', { class: 'k', text: k }), el('td', { text: fmt(v) }))));
  const scores = el('table', { id: 'detail-scores' }, el('tr', {}, el('td', { class: 'k', text: 'score' }), el('td', { class: 'n', text: 'value' }), el('td', { class: 'n', text: 'percentile' })),
    ...d.scores.filter(s => s.default_model).map(s => el('tr', { 'data-col': s.column }, el('td', { class: 'k', text: s.column }), el('td', { class: 'n', text: fmt(s.value) }), el('td', { class: 'n pct', text: '…' }))));
  const mini = r => el('div', { class: 'mini', title: `${r.id}\n${r.caption || ''}`, onclick: () => openDetail(r.id) },
    el('img', { src: r.thumb, alt: '', loading: 'lazy' }), el('div', { text: `${fmt(r.score !== undefined ? r.score : r.cosine)}` }));
  body.replaceChildren(big,
    el('p', {}, el('b', { text: d.caption === null ? '(no caption)' : d.caption })),
    el('div', { class: 'row' },
      el('button', { type: 'button', text: 'More like this', onclick: () => moreLike(d.id) }),
      el('button', { type: 'button', text: S.selected.has(d.id) ? 'Selected' : 'Select', onclick: e => { S.selected.add(d.id); e.target.textContent = 'Selected'; redecorate(); } })),
    el('h3', { text: 'Tags' }), el('div', {}, ...(d.tags.length ? d.tags.map(t => el('span', { class: 'chip' }, t,
      el('button', { type: 'button', title: 'remove', text: '×', onclick: async () => { $('#tag-name').value = t; S.selected = new Set([d.id]); S.selectAll = false; await tagAction('remove'); } }))) : [el('span', { class: 'muted', text: 'none' })])),
    el('h3', { text: 'Scores (percentile in the pool)' }), d.scores_error ? el('p', { class: 'err', text: d.scores_error }) : scores,
    el('h3', { text: 'Metadata' }), kv(d.sample),
    el('h3', { text: 'Nearest neighbours (image → image)' }), d.neighbours_error ? el('p', { class: 'err', text: d.neighbours_error }) : el('div', { class: 'strip' }, ...d.neighbours.map(mini)),
    el('h3', { text: 'Duplicate group (SemDeDup)' }), d.dedup ? el('div', {}, el('p', { class: 'small', text: `cluster ${d.dedup.cluster} (${d.dedup.size} rows), max similarity to an earlier member ${fmt(d.dedup.max_sim)}; closest members:` }), el('div', { class: 'strip' }, ...d.dedup.members.map(mini))) : el('p', { class: 'muted small', text: 'no dedup scores (clipsql dedup STORE)' }),
    el('h3', { text: 'Targets it is near (NormSim∞)' }), d.targets.length ? el('table', {}, ...d.targets.map(t => el('tr', {}, el('td', { class: 'k', text: t.target }), el('td', { class: 'n', text: fmt(t.norm_sim_inf) })))) : el('p', { class: 'muted small', text: 'no target sets (clipsql target add)' }));
  loadPercentiles(id, false);
}

async function loadPercentiles(id, compute) {
  try {
    const p = await api('/api/percentiles', { id, compute });
    if (S.detailId !== id) return;
    for (const tr of document.querySelectorAll('#detail-scores tr[data-col]')) {
      const hit = p.percentiles[tr.dataset.col], cell = $('.pct', tr);
      if (hit) cell.textContent = hit.percentile === null ? '—' : hit.percentile.toFixed(1) + '%';
      else if (p.pending.includes(tr.dataset.col)) cell.replaceChildren(el('a', { href: '#', text: 'compute', onclick: e => { e.preventDefault(); cell.textContent = '…'; loadPercentiles(id, true); } }));
      else cell.textContent = '—';
    }
  } catch (e) { status(e.message, true); }
}

// ------------------------------------------------------------------ start
async function start() {
  readHash();
  try { S.info = await api('/api/info'); } catch (e) { status(e.message, true); return; }
  $('#store').textContent = S.info.store; $('#store').title = S.info.store;
  if (S.info.remote_images) { const b = $('#banner'); b.hidden = false; b.textContent = 'Remote images (http/https uris) are loaded by your browser directly from their hosts; local images come from this server.'; }
  $('#export-format').replaceChildren(...S.info.formats.map(f => el('option', { value: f, text: f })));
  fillTags(S.info.tags);
  const grid = $('#grid');
  grid.addEventListener('scroll', () => requestAnimationFrame(render));
  window.addEventListener('resize', () => requestAnimationFrame(render));
  grid.addEventListener('click', e => {
    const t = e.target.closest('.tile'); if (!t) return;
    const act = e.target.closest('[data-act]'), row = rowAt(+t.dataset.index);
    if (act && row) { if (act.dataset.act === 'detail') openDetail(row.id); else moreLike(row.id); return; }
    clickTile(+t.dataset.index, e);
  });
  grid.addEventListener('dblclick', e => { const t = e.target.closest('.tile'); const r = t && rowAt(+t.dataset.index); if (r) openDetail(r.id); });
  document.addEventListener('keydown', onKey);
  $('#search-form').addEventListener('submit', e => { e.preventDefault(); const q = $('#search').value.trim(); if (q && !q.startsWith('≈ ')) change(st => { st.search = { text: q }; st.sort = null; st.brushes = {}; }); });
  $('#search-clear').addEventListener('click', () => change(st => { st.search = null; st.sort = null; st.brushes = {}; }));
  $('#base-run').addEventListener('click', () => change(st => { const v = $('#base-sql').value.trim(); st.sql = v && v !== S.info.default_sql ? v : null; st.search = null; st.brushes = {}; st.sort = null; st.filters = []; }));
  $('#base-reset').addEventListener('click', () => change(st => { st.sql = null; st.search = null; st.brushes = {}; st.sort = null; st.filters = []; }));
  $('#where-apply').addEventListener('click', () => change(st => { st.where = $('#where').value.trim(); }));
  $('#where').addEventListener('keydown', e => { if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); $('#where-apply').click(); } });
  $('#filters-clear').addEventListener('click', () => change(st => { st.brushes = {}; st.filters = []; st.where = ''; st.tag = null; }));
  $('#mf-column').addEventListener('change', fillValues);
  $('#mf-column').addEventListener('focus', fillValues, { once: true });
  $('#mf-add').addEventListener('click', () => {
    const column = $('#mf-column').value, op = $('#mf-op').value, raw = $('#mf-value').value;
    if (!column) return;
    const col = S.columns.find(c => c.name === column);
    const value = col && col.numeric && op !== 'contains' && raw.trim() !== '' && !isNaN(Number(raw)) ? Number(raw) : raw;
    change(st => { st.filters = (st.filters || []).concat([{ column, op, value }]); });
  });
  $('#tag-filter').addEventListener('change', e => change(st => { st.tag = e.target.value || null; }));
  $('#sort-column').addEventListener('change', e => change(st => { st.sort = e.target.value ? { column: e.target.value, desc: $('#sort-desc').checked } : null; }));
  $('#sort-desc').addEventListener('change', e => { if (S.state.sort) change(st => { st.sort.desc = e.target.checked; }); });
  $('#select-all').addEventListener('click', () => { S.selectAll = true; S.selected.clear(); redecorate(); });
  $('#select-none').addEventListener('click', () => { S.selectAll = false; S.selected.clear(); redecorate(); });
  $('#tag-add').addEventListener('click', () => tagAction('add'));
  $('#tag-remove').addEventListener('click', () => tagAction('remove'));
  $('#tag-name').addEventListener('keydown', e => { if (e.key === 'Enter') { e.preventDefault(); tagAction(e.shiftKey ? 'remove' : 'add'); } });
  $('#export').addEventListener('click', doExport);
  $('#sql-copy').addEventListener('click', copySql);
  $('#detail-close').addEventListener('click', closeDetail);
  $('#help-toggle').addEventListener('click', () => { $('#help').hidden = !$('#help').hidden; });
  await apply({ keepSelection: false });
  document.body.dataset.ready = '1';
}

async function fillValues() {
  const column = $('#mf-column').value;
  if (!column) return;
  try {
    const v = await api('/api/values', { state: S.state, column });
    $('#mf-values').replaceChildren(...v.values.map(x => el('option', { value: x.value === null ? '' : String(x.value), label: `${x.value} (${x.n})` })));
  } catch (e) { /* suggestions only */ }
}

window.addEventListener('DOMContentLoaded', start);
