// The chat page of `gemma4 serve`: a client of the server's OpenAI API.
//
// - Conversations (messages, attachments, settings) live in localStorage; the server
//   keeps nothing for the page.
// - Answers stream from /v1/chat/completions (server-sent events): the thought channel
//   (`reasoning_content`) goes to a collapsible block, tool calls to cards that take the
//   tool's result, the text through markdown.js.
// - /tokenize gives an attachment's token cost, /v1/models the model, its context and
//   what it can take, /metrics the server's queue.
'use strict';

const STORE = 'gemma4.conversations.v1';
const CURRENT = 'gemma4.current.v1';
const KEY = 'gemma4.apiKey';
const SETTINGS = ['system', 'temperature', 'top_p', 'top_k', 'max_tokens', 'tools', 'extra'];

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

// A button that does `onClick` (never a form submit).
function button(label, cls, onClick, title) {
  const b = el('button', cls, label);
  b.type = 'button';
  if (title) b.title = title;
  b.addEventListener('click', onClick);
  return b;
}

const state = {
  convs: [],
  current: null,
  model: null, // {id, max_model_len, capabilities, models}
  pending: [], // attachments waiting in the composer
  busy: null, // {controller, conv, msg}
  recording: null,
  renderQueued: false,
};

// ---------------------------------------------------------------- storage

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function defaultSettings() {
  return { system: '', temperature: '', top_p: '', top_k: '', max_tokens: '', tools: '', extra: '', thinking: false, model: '' };
}

function newConversation(from) {
  const settings = Object.assign(defaultSettings(), from ? from.settings : {});
  return { id: newId(), title: 'New chat', created: Date.now(), updated: Date.now(), settings, messages: [] };
}

function load() {
  let convs = [];
  try {
    convs = JSON.parse(localStorage.getItem(STORE) || '[]');
  } catch (_) {
    toast('The saved conversations could not be read; starting afresh.');
  }
  state.convs = Array.isArray(convs) ? convs.filter(validConversation) : [];
  for (const c of state.convs) {
    c.settings = Object.assign(defaultSettings(), c.settings || {});
    // An answer cut off by a reload is kept as it was.
    for (const m of c.messages) {
      if (m.role === 'assistant' && m.stats && !m.stats.finish && !m.error) m.stats.finish = 'interrupted';
    }
  }
  const current = localStorage.getItem(CURRENT);
  state.current = state.convs.find((c) => c.id === current) ? current : null;
  if (!state.current) {
    if (!state.convs.length) state.convs.push(newConversation());
    state.current = state.convs[0].id;
  }
}

let saveTimer = null;
function save(soon) {
  if (soon) {
    if (!saveTimer) saveTimer = setTimeout(() => { saveTimer = null; save(); }, 1000);
    return;
  }
  try {
    localStorage.setItem(STORE, JSON.stringify(state.convs));
    localStorage.setItem(CURRENT, state.current);
  } catch (e) {
    toast('The browser storage is full: delete or export some conversations (' + e.name + ').');
  }
}

function validConversation(c) {
  return c && typeof c === 'object' && typeof c.id === 'string' && Array.isArray(c.messages);
}

function conv() {
  return state.convs.find((c) => c.id === state.current);
}

// ---------------------------------------------------------------- API

function authHeaders() {
  const key = localStorage.getItem(KEY);
  return key ? { Authorization: 'Bearer ' + key } : {};
}

async function api(path, opts) {
  opts = opts || {};
  const headers = Object.assign({}, authHeaders(), opts.headers || {});
  if (opts.body) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  if (r.status === 401) {
    localStorage.removeItem(KEY);
    await askKey(true);
    return api(path, opts);
  }
  return r;
}

// Asks for the key until the server takes it (GET /auth answers 200 either way, so the
// console stays free of failed requests).
async function ensureKey() {
  for (;;) {
    const r = await fetch('/auth', { headers: authHeaders() });
    const a = await r.json();
    $('forget-key').hidden = !a.key_required;
    if (a.key_valid) return;
    await askKey(!!localStorage.getItem(KEY));
  }
}

function askKey(wrong) {
  return new Promise((resolve) => {
    const d = $('key-dialog');
    $('key-error').hidden = !wrong;
    $('key-input').value = '';
    const done = () => {
      const k = $('key-input').value.trim();
      if (k) localStorage.setItem(KEY, k);
      d.removeEventListener('close', done);
      resolve();
    };
    d.addEventListener('close', done);
    if (!d.open) d.showModal();
  });
}

async function errorText(r) {
  const text = await r.text();
  try {
    const e = JSON.parse(text).error;
    if (e && e.message) return e.message;
  } catch (_) { /* not JSON */ }
  return text || r.status + ' ' + r.statusText;
}

// The `data:` payloads of a server-sent event stream, parsed.
async function* events(body) {
  const reader = body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let at;
    while ((at = buf.indexOf('\n\n')) >= 0) {
      const ev = buf.slice(0, at);
      buf = buf.slice(at + 2);
      const data = ev.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      if (!data) continue; // a keep-alive comment
      if (data === '[DONE]') return;
      yield JSON.parse(data);
    }
  }
}

// ---------------------------------------------------------------- model and server

async function loadModel() {
  try {
    const r = await api('/v1/models');
    if (!r.ok) throw new Error(await errorText(r));
    const list = (await r.json()).data || [];
    const base = list.find((m) => !m.parent) || list[0];
    state.model = Object.assign({ models: list.map((m) => m.id) }, base);
    $('model-name').textContent = base.id;
    $('model-ctx').textContent = base.max_model_len ? 'context ' + base.max_model_len.toLocaleString('en') : '';
    const sel = $('model-select');
    sel.replaceChildren();
    for (const id of state.model.models) sel.appendChild(el('option', null, id)).value = id;
    sel.hidden = list.length < 2;
    $('model-name').hidden = list.length >= 2;
    showSettings();
    updateCapabilities();
  } catch (e) {
    $('model-name').textContent = 'not ready: ' + e.message;
    setTimeout(loadModel, 2000);
  }
}

function updateCapabilities() {
  const caps = (state.model && state.model.capabilities) || {};
  const accept = [];
  if (caps.vision) accept.push('image/*');
  if (caps.audio) accept.push('audio/*', '.wav', '.mp3', '.flac', '.ogg');
  $('file-input').accept = accept.join(',');
  $('attach').hidden = !accept.length;
  $('record').hidden = !(caps.audio && navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.AudioWorkletNode);
}

// Running and queued requests, polled from the Prometheus text of /metrics.
async function pollMetrics() {
  if (document.visibilityState === 'visible') {
    try {
      const r = await api('/metrics');
      if (r.ok) {
        const text = await r.text();
        const get = (name) => {
          const m = new RegExp('^gemma4_' + name + ' ([0-9.e+-]+)$', 'm').exec(text);
          return m ? Number(m[1]) : null;
        };
        const running = get('running_sequences');
        const queued = get('queued_requests');
        const decode = get('decode_tokens_per_second');
        const parts = [];
        if (running !== null) parts.push(running + ' running');
        if (queued !== null) parts.push(queued + ' queued');
        if (decode) parts.push(decode.toFixed(1) + ' tok/s decode');
        $('server-state').textContent = parts.join(' · ');
      }
    } catch (_) {
      $('server-state').textContent = 'server unreachable';
    }
  }
  setTimeout(pollMetrics, 2000);
}

// ---------------------------------------------------------------- attachments

function audioFormat(type, name) {
  const t = (type || '').toLowerCase();
  const ext = (name.split('.').pop() || '').toLowerCase();
  if (t.includes('mpeg') || t.includes('mp3') || ext === 'mp3') return 'mp3';
  if (t.includes('flac') || ext === 'flac') return 'flac';
  if (t.includes('ogg') || ext === 'ogg' || ext === 'oga') return 'ogg';
  return 'wav';
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function addFiles(files) {
  const caps = (state.model && state.model.capabilities) || {};
  for (const f of files) {
    const isImage = f.type.startsWith('image/');
    const isAudio = f.type.startsWith('audio/') || /\.(wav|mp3|flac|ogg|oga)$/i.test(f.name);
    if (!(isImage && caps.vision) && !(isAudio && caps.audio)) {
      toast(f.name + ': this model takes ' + ([caps.vision && 'images', caps.audio && 'audio'].filter(Boolean).join(' and ') || 'text only'));
      continue;
    }
    const att = { kind: isImage ? 'image' : 'audio', name: f.name, url: await readDataUrl(f), tokens: null };
    if (!isImage) att.format = audioFormat(f.type, f.name);
    state.pending.push(att);
    renderAttachments();
    measure(att);
  }
}

function part(att) {
  if (att.kind === 'image') return { type: 'image_url', image_url: { url: att.url } };
  return { type: 'input_audio', input_audio: { data: att.url.slice(att.url.indexOf(',') + 1), format: att.format } };
}

// The attachment's token cost: the soft tokens the server expands it to.
async function measure(att) {
  try {
    const r = await api('/tokenize', { method: 'POST', body: JSON.stringify({ messages: [{ role: 'user', content: [part(att)] }] }) });
    if (!r.ok) throw new Error(await errorText(r));
    const v = await r.json();
    const n = (att.kind === 'image' ? v.image_tokens : v.audio_tokens) || [];
    att.tokens = n.length ? n[0] : null;
    att.error = n.length ? null : 'no token count';
  } catch (e) {
    att.error = e.message;
  }
  renderAttachments();
  if (!state.pending.includes(att)) render();
}

function attachmentView(att, onRemove) {
  const box = el('div', 'attachment ' + att.kind);
  if (att.kind === 'image') {
    const img = el('img');
    img.src = att.url;
    img.alt = att.name;
    box.appendChild(img);
  } else {
    const a = el('audio');
    a.controls = true;
    a.src = att.url;
    box.appendChild(a);
  }
  const meta = el('div', 'attachment-meta');
  meta.appendChild(el('span', 'attachment-name', att.name));
  const cost = el('span', 'attachment-tokens muted',
    att.tokens !== null && att.tokens !== undefined ? att.tokens + ' tokens' : att.error ? '? tokens' : '… tokens');
  if (att.error) cost.title = att.error;
  meta.appendChild(cost);
  box.appendChild(meta);
  if (onRemove) {
    box.appendChild(button('×', 'remove icon', onRemove, 'Remove'));
  }
  return box;
}

function renderAttachments() {
  const box = $('attachments');
  box.replaceChildren(...state.pending.map((att) => attachmentView(att, () => {
    state.pending.splice(state.pending.indexOf(att), 1);
    renderAttachments();
  })));
}

// Microphone recording through an AudioWorklet, written out as a 16-bit PCM WAV clip.
async function toggleRecording() {
  if (state.recording) {
    const rec = state.recording;
    state.recording = null;
    $('record').classList.remove('recording');
    rec.stream.getTracks().forEach((t) => t.stop());
    rec.node.disconnect();
    await rec.ctx.close();
    const blob = wav(rec.chunks, rec.ctx.sampleRate);
    const file = new File([blob], 'recording-' + new Date().toISOString().slice(11, 19).replace(/:/g, '') + '.wav', { type: 'audio/wav' });
    await addFiles([file]);
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const ctx = new AudioContext();
    await ctx.audioWorklet.addModule('/assets/recorder-worklet.js');
    const src = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, 'gemma4-recorder');
    const rec = { stream, ctx, node, chunks: [] };
    node.port.onmessage = (e) => rec.chunks.push(e.data);
    src.connect(node);
    state.recording = rec;
    $('record').classList.add('recording');
  } catch (e) {
    toast('Cannot record: ' + e.message);
  }
}

function wav(chunks, rate) {
  const n = chunks.reduce((s, c) => s + c.length, 0);
  const buf = new ArrayBuffer(44 + 2 * n);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, 'RIFF'); v.setUint32(4, 36 + 2 * n, true); str(8, 'WAVE');
  str(12, 'fmt '); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
  str(36, 'data'); v.setUint32(40, 2 * n, true);
  let o = 44;
  for (const c of chunks) {
    for (let i = 0; i < c.length; i++, o += 2) v.setInt16(o, Math.max(-1, Math.min(1, c[i])) * 0x7fff, true);
  }
  return new Blob([buf], { type: 'audio/wav' });
}

// ---------------------------------------------------------------- requests

function number(s, name, integer) {
  if (s === '' || s === undefined || s === null) return undefined;
  const x = Number(s);
  if (!Number.isFinite(x) || (integer && !Number.isInteger(x))) throw new Error(name + ' is not a number: ' + s);
  return x;
}

function jsonSetting(s, name, kind) {
  if (!s || !s.trim()) return undefined;
  let v;
  try {
    v = JSON.parse(s);
  } catch (e) {
    throw new Error('Settings: ' + name + ' is not valid JSON (' + e.message + ')');
  }
  if (kind === 'list' ? !Array.isArray(v) : (typeof v !== 'object' || v === null || Array.isArray(v))) {
    throw new Error('Settings: ' + name + ' must be a JSON ' + (kind === 'list' ? 'list' : 'object'));
  }
  return v;
}

// The request for an answer to `c`'s messages before index `upto`.
function request(c, upto) {
  const s = c.settings;
  const messages = [];
  if (s.system.trim()) messages.push({ role: 'system', content: s.system });
  for (const m of c.messages.slice(0, upto)) {
    if (m.role === 'user') {
      const atts = m.attachments || [];
      messages.push({ role: 'user', content: atts.length ? atts.map(part).concat(m.content ? [{ type: 'text', text: m.content }] : []) : m.content });
    } else if (m.role === 'assistant') {
      if (m.error && !m.content && !(m.tool_calls || []).length) continue;
      const o = { role: 'assistant', content: m.content || null };
      if ((m.tool_calls || []).length) {
        o.tool_calls = m.tool_calls.map((t) => ({ id: t.id, type: 'function', function: { name: t.name, arguments: t.arguments } }));
      }
      messages.push(o);
    } else if (m.role === 'tool') {
      messages.push({ role: 'tool', tool_call_id: m.tool_call_id, content: m.content });
    }
  }
  const body = {
    model: s.model || (state.model && state.model.id) || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: number(s.temperature, 'temperature'),
    top_p: number(s.top_p, 'top-p'),
    top_k: number(s.top_k, 'top-k', true),
    max_tokens: number(s.max_tokens, 'max tokens', true),
    chat_template_kwargs: { enable_thinking: !!s.thinking },
  };
  const tools = jsonSetting(s.tools, 'tools', 'list');
  if (tools) body.tools = tools;
  return Object.assign(body, jsonSetting(s.extra, 'extra request fields', 'object') || {});
}

// Streams an answer to the conversation's messages into a new assistant message.
async function answer(c) {
  const upto = c.messages.length;
  const msg = { role: 'assistant', content: '', reasoning: '', tool_calls: [], stats: {} };
  let body;
  try {
    body = request(c, upto);
  } catch (e) {
    msg.error = e.message;
    msg.stats.finish = 'error';
    c.messages.push(msg);
    save();
    render();
    return;
  }
  c.messages.push(msg);
  c.updated = Date.now();
  const controller = new AbortController();
  state.busy = { controller, conv: c, msg };
  setBusy(true);
  render();
  const t0 = performance.now();
  let first = null;
  let deltas = 0;
  // Time to first token, and the rate of the `n` tokens so far after the first.
  const timing = (n) => {
    const now = performance.now();
    if (first !== null) {
      msg.stats.ttft_ms = first - t0;
      if (n > 1 && now > first) msg.stats.tok_s = (n - 1) / ((now - first) / 1000);
    }
  };
  try {
    const r = await api('/v1/chat/completions', { method: 'POST', body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) throw new Error(await errorText(r));
    for await (const ev of events(r.body)) {
      if (ev.error) throw new Error(ev.error.message || JSON.stringify(ev.error));
      if (ev.usage) msg.stats.usage = ev.usage;
      const ch = ev.choices && ev.choices[0];
      if (!ch) continue;
      const d = ch.delta || {};
      if (d.content || d.reasoning_content || d.tool_calls) {
        if (first === null) first = performance.now();
        deltas++;
      }
      if (d.reasoning_content) msg.reasoning += d.reasoning_content;
      if (d.content) msg.content += d.content;
      for (const t of d.tool_calls || []) {
        const call = msg.tool_calls[t.index] || (msg.tool_calls[t.index] = { id: '', name: '', arguments: '' });
        if (t.id) call.id = t.id;
        if (t.function && t.function.name) call.name = t.function.name;
        if (t.function && t.function.arguments) call.arguments += t.function.arguments;
      }
      if (ch.finish_reason) msg.stats.finish = ch.finish_reason;
      timing(deltas);
      queueRender();
      save(true);
    }
    if (!msg.stats.finish) msg.stats.finish = 'incomplete';
  } catch (e) {
    if (e.name === 'AbortError') {
      msg.stats.finish = 'stopped';
    } else {
      msg.error = e.message;
      msg.stats.finish = 'error';
    }
  }
  msg.stats.tokens = msg.stats.usage ? msg.stats.usage.completion_tokens : deltas;
  timing(msg.stats.tokens);
  msg.tool_calls = msg.tool_calls.filter(Boolean);
  state.busy = null;
  setBusy(false);
  save();
  render();
}

function stop() {
  if (state.busy) state.busy.controller.abort();
}

async function send() {
  if (state.busy) return;
  const text = $('input').value.trim();
  if (!text && !state.pending.length) return;
  const c = conv();
  const attachments = state.pending.splice(0);
  c.messages.push({ role: 'user', content: text, attachments });
  if (c.title === 'New chat') c.title = (text || attachments.map((a) => a.name).join(', ')).slice(0, 48);
  $('input').value = '';
  autosize();
  renderAttachments();
  renderList();
  await answer(c);
}

async function regenerate(c, index) {
  if (state.busy) return;
  c.messages.splice(index);
  await answer(c);
}

async function sendToolResults(c, msg, inputs) {
  if (state.busy) return;
  msg.tool_calls.forEach((t, i) => {
    c.messages.push({ role: 'tool', tool_call_id: t.id, name: t.name, content: inputs[i].value });
  });
  await answer(c);
}

// ---------------------------------------------------------------- rendering

function setBusy(busy) {
  $('send').hidden = busy;
  $('stop').hidden = !busy;
  document.body.classList.toggle('busy', busy);
}

function queueRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(() => {
    state.renderQueued = false;
    if (state.busy && state.busy.conv.id === state.current) renderMessage(state.busy.conv, state.busy.msg);
  });
}

function formatStats(s) {
  const parts = [];
  if (s.ttft_ms !== undefined) parts.push('TTFT ' + (s.ttft_ms / 1000).toFixed(2) + ' s');
  if (s.tok_s !== undefined) parts.push(s.tok_s.toFixed(1) + ' tok/s');
  if (s.tokens !== undefined && s.finish !== 'error') parts.push(s.tokens + ' tokens');
  if (s.usage) parts.push(s.usage.prompt_tokens + ' prompt');
  if (s.finish && s.finish !== 'stop') parts.push(s.finish);
  return parts.join(' · ');
}

function toolCallView(t) {
  const box = el('div', 'tool-call');
  const head = el('div', 'tool-head');
  head.appendChild(el('span', 'tool-label', 'Tool call'));
  head.appendChild(el('span', 'tool-name', t.name || '…'));
  box.appendChild(head);
  let args = t.arguments;
  try {
    args = JSON.stringify(JSON.parse(t.arguments), null, 2);
  } catch (_) { /* still streaming, or not JSON: shown as it came */ }
  box.appendChild(el('pre', 'tool-args', args));
  return box;
}

function messageBody(c, m, index) {
  const frag = document.createDocumentFragment();
  const streaming = state.busy && state.busy.msg === m;
  if (m.role === 'user') {
    if ((m.attachments || []).length) {
      const row = el('div', 'attachments');
      for (const a of m.attachments) row.appendChild(attachmentView(a));
      frag.appendChild(row);
    }
    if (m.content) frag.appendChild(el('div', 'content plain', m.content));
    return frag;
  }
  if (m.role === 'tool') {
    const box = el('div', 'tool-result');
    box.appendChild(el('span', 'tool-label', 'Result of ' + (m.name || 'the tool')));
    box.appendChild(el('pre', null, m.content));
    frag.appendChild(box);
    return frag;
  }
  if (m.reasoning) {
    const d = el('details', 'thinking');
    d.open = streaming && !m.content && !(m.tool_calls || []).length ? true : !!m.thinkingOpen;
    const summary = el('summary', null, streaming && !m.content ? 'Thinking…' : 'Thought');
    // Only the reader's clicks are remembered (the block opens by itself while thinking).
    summary.addEventListener('click', () => { m.thinkingOpen = !d.open; save(true); });
    d.appendChild(summary);
    const body = el('div', 'thinking-body');
    body.appendChild(window.renderMarkdown(m.reasoning));
    d.appendChild(body);
    frag.appendChild(d);
  }
  const content = el('div', 'content');
  content.appendChild(window.renderMarkdown(m.content));
  if (streaming) content.appendChild(el('span', 'cursor'));
  frag.appendChild(content);
  const calls = (m.tool_calls || []).filter(Boolean);
  if (calls.length) {
    const box = el('div', 'tool-calls');
    calls.forEach((t) => box.appendChild(toolCallView(t)));
    // The last answer's calls take the tools' results, which go back to the model.
    if (!streaming && index === c.messages.length - 1) {
      const inputs = calls.map((t) => {
        const i = el('input', 'tool-input');
        i.placeholder = 'Result of ' + t.name;
        box.appendChild(i);
        return i;
      });
      box.appendChild(button('Send ' + (calls.length > 1 ? 'results' : 'result'), 'send-tool-results primary',
        () => sendToolResults(c, m, inputs)));
    }
    frag.appendChild(box);
  }
  if (m.error) frag.appendChild(el('div', 'error-text', m.error));
  if (m.stats) frag.appendChild(el('div', 'stats muted', formatStats(m.stats)));
  return frag;
}

function messageActions(c, m, index) {
  const bar = el('div', 'actions');
  if (m.role === 'user') {
    bar.appendChild(button('Edit', 'edit', () => editMessage(c, index)));
  } else if (m.role === 'assistant') {
    if (m.content) bar.appendChild(button('Copy', 'copy', () => copyText(m.content)));
    bar.appendChild(button('Regenerate', 'regenerate', () => regenerate(c, index)));
  }
  return bar;
}

function renderMessage(c, m) {
  const index = c.messages.indexOf(m);
  const node = document.querySelector('#messages [data-index="' + index + '"]');
  if (!node) return render();
  const body = node.querySelector('.body');
  body.replaceChildren(messageBody(c, m, index));
  stickToBottom();
}

function render() {
  const c = conv();
  const box = $('messages');
  const nodes = c.messages.map((m, index) => {
    const node = el('div', 'msg ' + m.role + (m.error ? ' error' : ''));
    node.dataset.index = index;
    node.appendChild(el('div', 'role', m.role === 'assistant' ? 'Gemma' : m.role === 'user' ? 'You' : 'Tool'));
    const body = el('div', 'body');
    body.appendChild(messageBody(c, m, index));
    node.appendChild(body);
    if (!state.busy) node.appendChild(messageActions(c, m, index));
    return node;
  });
  const empty = $('empty');
  empty.hidden = nodes.length > 0;
  box.replaceChildren(empty, ...nodes);
  renderList();
  stickToBottom(true);
}

function stickToBottom(force) {
  const box = $('messages');
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
}

function editMessage(c, index) {
  if (state.busy) return;
  const m = c.messages[index];
  const node = document.querySelector('#messages [data-index="' + index + '"]');
  const body = node.querySelector('.body');
  const area = el('textarea', 'edit-box');
  area.value = m.content;
  const bar = el('div', 'edit-actions');
  bar.append(
    button('Save & send', 'primary save-edit', async () => {
      m.content = area.value.trim();
      c.messages.splice(index + 1);
      await answer(c);
    }),
    button('Cancel', 'cancel-edit', render));
  body.replaceChildren(...Array.from(body.querySelectorAll('.attachments')), area, bar);
  const actions = node.querySelector('.actions');
  if (actions) actions.hidden = true;
  area.focus();
}

function renderList() {
  const list = $('conversations');
  const items = [...state.convs].sort((a, b) => b.updated - a.updated).map((c) => {
    const li = el('li', c.id === state.current ? 'active' : '');
    li.dataset.id = c.id;
    const title = el('span', 'title', c.title || 'Untitled');
    title.title = c.title;
    title.addEventListener('click', () => select(c.id));
    li.appendChild(title);
    li.append(
      button('✎', 'rename icon', (e) => { e.stopPropagation(); renameConversation(c, li); }, 'Rename'),
      button('✕', 'delete icon', (e) => { e.stopPropagation(); deleteConversation(c); }, 'Delete'));
    return li;
  });
  list.replaceChildren(...items);
}

function renameConversation(c, li) {
  const input = el('input', 'rename-input');
  input.value = c.title;
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim()) c.title = input.value.trim();
    save();
    renderList();
  };
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') finish(true);
    if (e.key === 'Escape') finish(false);
  });
  input.addEventListener('blur', () => finish(true));
}

function deleteConversation(c) {
  if (state.busy && state.busy.conv === c) stop();
  if (!confirm('Delete "' + c.title + '"?')) return;
  state.convs = state.convs.filter((x) => x !== c);
  if (!state.convs.length) state.convs.push(newConversation(c));
  if (state.current === c.id) state.current = [...state.convs].sort((a, b) => b.updated - a.updated)[0].id;
  save();
  showSettings();
  render();
}

function select(id) {
  state.current = id;
  save();
  showSettings();
  render();
  document.body.classList.remove('sidebar-open');
}

function newChat() {
  const c = conv();
  if (c && !c.messages.length) return $('input').focus();
  const n = newConversation(c);
  state.convs.push(n);
  select(n.id);
  $('input').focus();
}

// ---------------------------------------------------------------- settings

function showSettings() {
  const s = conv().settings;
  for (const k of SETTINGS) $('set-' + k).value = s[k] === undefined ? '' : s[k];
  $('thinking').checked = !!s.thinking;
  const sel = $('model-select');
  if (state.model) sel.value = s.model && state.model.models.includes(s.model) ? s.model : state.model.id;
}

function bindSettings() {
  for (const k of SETTINGS) {
    const update = (e) => {
      conv().settings[k] = e.target.value;
      save(true);
    };
    $('set-' + k).addEventListener('input', update);
    $('set-' + k).addEventListener('change', update);
  }
  $('thinking').addEventListener('change', (e) => {
    conv().settings.thinking = e.target.checked;
    save();
  });
  $('model-select').addEventListener('change', (e) => {
    conv().settings.model = e.target.value;
    save();
  });
}

// ---------------------------------------------------------------- export / import

function exportAll() {
  const blob = new Blob([JSON.stringify({ format: 'gemma4-chat', version: 1, conversations: state.convs }, null, 2)], { type: 'application/json' });
  const a = el('a');
  a.href = URL.createObjectURL(blob);
  a.download = 'gemma4-conversations-' + new Date().toISOString().slice(0, 10) + '.json';
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

async function importFile(file) {
  try {
    const v = JSON.parse(await file.text());
    const list = Array.isArray(v) ? v : v && Array.isArray(v.conversations) ? v.conversations : null;
    if (!list) throw new Error('no `conversations` list');
    const good = list.filter(validConversation);
    if (!good.length) throw new Error('no conversation in it');
    for (const c of good) {
      if (state.convs.some((x) => x.id === c.id)) c.id = newId();
      c.title = typeof c.title === 'string' ? c.title : 'Imported';
      c.updated = Number(c.updated) || Date.now();
      c.created = Number(c.created) || Date.now();
      c.settings = Object.assign(defaultSettings(), c.settings || {});
      state.convs.push(c);
    }
    state.current = good[0].id;
    save();
    showSettings();
    render();
    toast('Imported ' + good.length + ' conversation' + (good.length > 1 ? 's' : '') + '.');
  } catch (e) {
    toast(file.name + ' cannot be imported: ' + e.message);
  }
}

// ---------------------------------------------------------------- small things

let toastTimer = null;
function toast(text) {
  const t = $('toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 5000);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    toast('Copied.');
  } catch (_) {
    // No clipboard API outside secure contexts: the old way.
    const area = el('textarea');
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand('copy');
    area.remove();
    toast('Copied.');
  }
}

function autosize() {
  const i = $('input');
  i.style.height = 'auto';
  i.style.height = Math.min(i.scrollHeight, 240) + 'px';
}

function bind() {
  $('composer').addEventListener('submit', (e) => { e.preventDefault(); send(); });
  $('input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $('input').addEventListener('input', autosize);
  $('stop').addEventListener('click', stop);
  document.addEventListener('keydown', (e) => { if (e.key === 'Escape' && state.busy) stop(); });
  $('new-chat').addEventListener('click', newChat);
  $('attach').addEventListener('click', () => $('file-input').click());
  $('file-input').addEventListener('change', (e) => { addFiles(Array.from(e.target.files)); e.target.value = ''; });
  $('record').addEventListener('click', toggleRecording);
  $('export').addEventListener('click', exportAll);
  $('import').addEventListener('click', () => $('import-file').click());
  $('import-file').addEventListener('change', (e) => { if (e.target.files[0]) importFile(e.target.files[0]); e.target.value = ''; });
  $('toggle-settings').addEventListener('click', () => { $('settings').hidden = !$('settings').hidden; });
  $('toggle-sidebar').addEventListener('click', () => document.body.classList.toggle('sidebar-open'));
  $('forget-key').addEventListener('click', () => { localStorage.removeItem(KEY); ensureKey(); });
  $('key-dialog').addEventListener('cancel', (e) => e.preventDefault());
  const main = $('main');
  main.addEventListener('dragover', (e) => { e.preventDefault(); main.classList.add('dropping'); });
  main.addEventListener('dragleave', () => main.classList.remove('dropping'));
  main.addEventListener('drop', (e) => {
    e.preventDefault();
    main.classList.remove('dropping');
    addFiles(Array.from(e.dataTransfer.files));
  });
  document.addEventListener('paste', (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []);
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  // Copy buttons of code blocks, wherever markdown.js put them.
  $('messages').addEventListener('click', (e) => {
    const b = e.target.closest('.copy-code');
    if (b) copyText(b.closest('.code-block').querySelector('code').textContent);
  });
  window.addEventListener('beforeunload', () => save());
}

async function main() {
  load();
  bind();
  bindSettings();
  showSettings();
  render();
  await ensureKey();
  await loadModel();
  pollMetrics();
  $('input').focus();
  document.body.dataset.ready = 'true';
}

main();
