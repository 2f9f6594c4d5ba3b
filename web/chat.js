// The h3infer chat page: streams chat completions from the gateway with
// fetch() and a ReadableStream and shows what the connection did.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    form: $('form'), prompt: $('prompt'), send: $('send'), log: $('log'),
    model: $('model'), maxTokens: $('max-tokens'), temperature: $('temperature'),
    token: $('token'), clear: $('clear'), settings: $('settings'),
    settingsToggle: $('settings-toggle'), pageProto: $('page-proto'),
    statProto: $('stat-proto'), statTTFT: $('stat-ttft'), statRate: $('stat-rate'),
    statTokens: $('stat-tokens'),
  };
  const TOKEN_KEY = 'h3infer.token';
  const endpoint = new URL('/v1/chat/completions', location.href).href;

  // The conversation sent with every turn, and what each turn measured.
  // window.h3infer exposes the measurements to anyone curious, the
  // end-to-end test included.
  const messages = [];
  const runs = [];
  window.h3infer = { runs, messages };

  // --- settings -----------------------------------------------------------

  el.token.value = localStorage.getItem(TOKEN_KEY) || '';
  el.token.addEventListener('input', () => {
    const t = el.token.value.trim();
    if (t) localStorage.setItem(TOKEN_KEY, t); else localStorage.removeItem(TOKEN_KEY);
  });
  el.settingsToggle.addEventListener('click', () => {
    el.settings.hidden = !el.settings.hidden;
    el.settingsToggle.setAttribute('aria-expanded', String(!el.settings.hidden));
  });
  el.clear.addEventListener('click', () => {
    messages.length = 0;
    el.log.replaceChildren();
    el.prompt.focus();
  });

  // authHeaders sends the token only when one is set: a gateway without
  // auth needs none.
  function authHeaders() {
    const h = {};
    const t = el.token.value.trim();
    if (t) h.Authorization = 'Bearer ' + t;
    return h;
  }

  const nav = performance.getEntriesByType('navigation')[0];
  showProto(el.pageProto, nav ? nav.nextHopProtocol : '');

  function showProto(node, proto) {
    node.textContent = proto || '?';
    node.classList.toggle('h3', proto === 'h3');
  }

  async function loadModels() {
    let names = [];
    try {
      const resp = await fetch('/v1/models', { headers: authHeaders(), cache: 'no-store' });
      // Encoders answer embeddings, not chat.
      if (resp.ok) names = ((await resp.json()).data || []).filter((m) => m.task !== 'embed').map((m) => m.id);
    } catch (_) { /* the first chat turn reports what is wrong */ }
    if (names.length === 0) names = ['demo'];
    el.model.replaceChildren(...names.map((n) => new Option(n, n)));
  }

  // --- the conversation ---------------------------------------------------

  function bubble(role, text) {
    const hint = el.log.querySelector('.hint');
    if (hint) hint.remove();
    const div = document.createElement('div');
    div.className = 'msg ' + role;
    const body = document.createTextNode(text);
    div.append(body);
    el.log.append(div);
    el.log.scrollTop = el.log.scrollHeight;
    return { div, body };
  }

  function fmtMs(ms) {
    if (ms == null) return '–';
    return ms < 10 ? ms.toFixed(2) + ' ms' : Math.round(ms) + ' ms';
  }

  function showStats(run) {
    showProto(el.statProto, run.protocol);
    el.statTTFT.textContent = fmtMs(run.ttft);
    el.statRate.textContent = run.rate == null ? '–' : Math.round(run.rate).toString();
    el.statTokens.textContent = run.tokens ? String(run.tokens) : '–';
  }

  async function errorText(resp) {
    try {
      const e = await resp.json();
      if (e.error && e.error.message) return resp.status + ': ' + e.error.message;
    } catch (_) { /* not JSON */ }
    return resp.status + ' ' + resp.statusText;
  }

  // protocolOf reads the protocol a finished fetch used. The resource timing
  // entry appears once the body has been read to its end, sometimes a tick
  // later.
  async function protocolOf(url) {
    for (let i = 0; i < 20; i++) {
      const entries = performance.getEntriesByName(url, 'resource');
      if (entries.length > 0) {
        const proto = entries[entries.length - 1].nextHopProtocol;
        performance.clearResourceTimings();
        return proto;
      }
      await new Promise((r) => setTimeout(r, 25));
    }
    return '';
  }

  async function send(prompt) {
    messages.push({ role: 'user', content: prompt });
    bubble('user', prompt);
    const out = bubble('assistant', '');
    out.div.classList.add('streaming');
    const run = {
      prompt, text: '', reads: [], tokens: 0, ttft: null, rate: null,
      protocol: '', finish: '', error: '', done: false,
    };
    runs.push(run);
    showStats(run);
    const body = {
      model: el.model.value || 'demo',
      messages,
      max_tokens: Number(el.maxTokens.value) || 64,
      temperature: Number(el.temperature.value) || 0,
      stream: true,
      stream_options: { include_usage: true },
    };
    const started = performance.now();
    let first = null;
    let last = null;
    let pieces = 0;
    try {
      const resp = await fetch(endpoint, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', ...authHeaders() },
        body: JSON.stringify(body),
        cache: 'no-store',
      });
      if (!resp.ok) throw new Error(await errorText(resp));
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = '';
      let sawDone = false;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const now = performance.now();
        run.reads.push({ t: now - started, bytes: value.byteLength });
        buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, '\n');
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const event = buf.slice(0, end);
          buf = buf.slice(end + 2);
          for (const line of event.split('\n')) {
            if (!line.startsWith('data:')) continue;
            const data = line.slice(5).trim();
            if (data === '[DONE]') { sawDone = true; continue; }
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            for (const choice of chunk.choices || []) {
              const piece = choice.delta && choice.delta.content;
              if (piece) {
                if (first === null) { first = now; run.ttft = now - started; }
                last = now;
                pieces++;
                run.text += piece;
                out.body.data += piece;
              }
              if (choice.finish_reason) run.finish = choice.finish_reason;
            }
            if (chunk.usage) run.tokens = chunk.usage.completion_tokens;
          }
        }
        run.tokens = run.tokens || pieces;
        if (first !== null && last > first) run.rate = (pieces - 1) / ((last - first) / 1000);
        showStats(run);
        el.log.scrollTop = el.log.scrollHeight;
      }
      if (!sawDone) throw new Error('the stream ended before [DONE]');
      if (run.tokens > 1 && last > first) run.rate = (run.tokens - 1) / ((last - first) / 1000);
      run.protocol = await protocolOf(endpoint);
      messages.push({ role: 'assistant', content: run.text });
      const meta = document.createElement('span');
      meta.className = 'meta';
      meta.textContent = [run.protocol || '?', 'first token ' + fmtMs(run.ttft),
        run.rate == null ? null : Math.round(run.rate) + ' tokens/s',
        run.tokens + ' tokens', run.finish].filter(Boolean).join(' · ');
      out.div.append(meta);
      el.log.scrollTop = el.log.scrollHeight;
    } catch (err) {
      run.error = String((err && err.message) || err);
      // Drop the unanswered turn so the next one is not sent after it.
      messages.pop();
      if (!run.text) out.div.remove();
      bubble('error', run.error);
    } finally {
      out.div.classList.remove('streaming');
      run.done = true;
      showStats(run);
    }
  }

  // --- the composer -------------------------------------------------------

  function grow() {
    el.prompt.style.height = 'auto';
    el.prompt.style.height = el.prompt.scrollHeight + 'px';
  }
  el.prompt.addEventListener('input', grow);
  el.prompt.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      el.form.requestSubmit();
    }
  });
  el.form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const prompt = el.prompt.value.trim();
    if (!prompt || el.send.disabled) return;
    el.prompt.value = '';
    grow();
    el.send.disabled = true;
    try {
      await send(prompt);
    } finally {
      el.send.disabled = false;
      el.prompt.focus();
    }
  });

  loadModels();
  el.prompt.focus();
})();
