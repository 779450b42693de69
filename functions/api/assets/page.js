// Shared by chainrun's pages: the token, calls to the API, exact money, and DOM/SVG helpers.
'use strict';
const chainrun = (() => {
  const TOKEN_KEY = 'chainrun.token';

  // The token comes in the URL fragment (`#token=…`), which browsers never send to a
  // server, so it is in no access log; it moves to this tab's sessionStorage and leaves
  // the address bar (and the history, and a link copied from it).
  function takeToken() {
    const found = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (found) {
      const value = decodeURIComponent(found[1]).trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
      const rest = location.hash.slice(1).split('&').filter((part) => !part.startsWith('token=')).join('&');
      history.replaceState(null, '', location.pathname + location.search + (rest ? '#' + rest : ''));
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  // A link with another token, opened in this tab, does not reload the page: `then` gets
  // the new token and draws again.
  function onTokenLink(then) {
    window.addEventListener('hashchange', () => {
      if (/(?:^#|&)token=/.test(location.hash)) then(takeToken());
    });
  }

  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
  }

  class ApiError extends Error {
    constructor(status, title, detail) {
      super(detail ? `${title}: ${detail}` : title);
      this.status = status;
      this.title = title;
      this.detail = detail;
    }
  }

  // One GET of the API at `base + path`: its JSON, or an ApiError (status 0: no answer).
  async function get(base, path, token) {
    const headers = { Accept: 'application/json' };
    if (token) headers.Authorization = 'Bearer ' + token;
    let response;
    try {
      response = await fetch(base + path, { headers, cache: 'no-store', credentials: 'omit', referrerPolicy: 'no-referrer' });
    } catch (e) {
      throw new ApiError(0, 'The API did not answer', String(e && e.message || e));
    }
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      throw new ApiError(response.status, (body && body.title) || response.statusText || `HTTP ${response.status}`, (body && body.detail) || '');
    }
    return body;
  }

  function setState(state) {
    document.body.dataset.state = state;
  }

  // Shows the token form with `message`; `onToken(token)` gets what the person gives.
  function askToken(message, onToken) {
    const form = document.getElementById('auth');
    form.querySelector('.why').textContent = message;
    form.hidden = false;
    setState('auth');
    const input = form.querySelector('input');
    input.value = '';
    form.onsubmit = (event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      input.value = '';
      form.hidden = true;
      onToken(token);
    };
    input.focus();
  }

  function showProblem(message) {
    const box = document.getElementById('problem');
    box.textContent = message;
    box.hidden = false;
    setState('error');
  }

  function clearProblem() {
    document.getElementById('problem').hidden = true;
  }

  // A transient trouble that does not stop the page (a poll that failed and will be tried again).
  function notice(message) {
    const box = document.getElementById('notice');
    if (!box) return;
    box.textContent = message || '';
    box.hidden = !message;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';

  // An SVG element with attributes (and text), appended to `parent` when given.
  function svg(tag, attrs, parent, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(key, String(value));
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (parent) parent.appendChild(node);
    return node;
  }

  // An HTML element with attributes (and text), appended to `parent` when given.
  function el(tag, attrs, parent, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === 'class') node.className = value;
      else node.setAttribute(key, String(value));
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (parent) parent.appendChild(node);
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  // Money is shown as the API wrote it (an exact decimal string). Sums and comparisons
  // are made on integer pico-dollars parsed from that string, never on floats.
  const PICO = 1000000000000n;

  function usd(text) {
    return text === undefined || text === null ? '—' : '$' + text;
  }

  function picoOf(usdText) {
    const [whole, frac = ''] = String(usdText || '0').split('.');
    return BigInt(whole || '0') * PICO + BigInt((frac + '000000000000').slice(0, 12));
  }

  function usdOf(pico) {
    const whole = pico / PICO;
    const frac = (pico % PICO).toString().padStart(12, '0').replace(/0+$/, '');
    return frac ? `${whole}.${frac}` : `${whole}`;
  }

  // 1 234 567 (with thin spaces).
  function count(n) {
    return n === undefined || n === null ? '—' : String(n).replace(/\B(?=(\d{3})+(?!\d))/g, '\u2009');
  }

  // A duration for people: 850 ms, 1.2 s, 2 min 5 s, 1 h 3 min.
  function duration(ms) {
    if (ms === undefined || ms === null || !Number.isFinite(ms)) return '—';
    ms = Math.max(0, Math.round(ms));
    if (ms < 1000) return `${ms} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
    const s = Math.round(ms / 1000);
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function clip(text, max) {
    text = String(text);
    return text.length > max ? text.slice(0, max - 1) + '…' : text;
  }

  return { takeToken, onTokenLink, forgetToken, ApiError, get, setState, askToken, showProblem, clearProblem, notice, svg, el, clear, usd, picoOf, usdOf, count, duration, clip };
})();
