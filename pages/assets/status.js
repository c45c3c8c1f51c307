/* intermission holding pages: live status (plain ES2017, no dependencies).
 *
 * The page works without this script. With it, the page polls the status
 * endpoint, keeps the message, the expected end and the updates current,
 * shows times in the visitor's time zone, and asks for the page again (by GET,
 * so that a form is never sent twice) once the mode is "normal" so the visitor
 * lands on the page they asked for. On the operator preview it never reloads; on
 * any other path under the reserved prefix (a bypass link with a wrong secret) it
 * goes to `/`, where the right link leads.
 *
 * Hooks (all set by the templates):
 *   <html data-status-url data-prefix data-mode data-retry-after lang>
 *   #message, #until-line > #until, #overrun-line > #overrun, #since-line > #since,
 *   #status-line > #status-link, #updates-section > #updates, #auto-note
 * Server data only ever reaches the DOM through textContent / setAttribute.
 */
(function () {
  'use strict';

  const root = document.documentElement;
  const statusUrl = root.getAttribute('data-status-url');
  if (!statusUrl || typeof window.fetch !== 'function') return;

  const prefix = root.getAttribute('data-prefix') || '';
  const pageMode = root.getAttribute('data-mode') || '';
  const lang = root.getAttribute('lang') || undefined;
  const reserved = prefix.length > 1 && location.pathname.indexOf(prefix) === 0;
  // The operator's preview never navigates. Any other page under the prefix is a bypass link
  // whose secret did not match (changed since, or mistyped): the link leads to `/` once the
  // secret is right, and the site's own page is there once it is back, where asking for the
  // link again would get a bare 404, and not asking left the page waiting for good.
  const isPreview = reserved && location.pathname === prefix + 'preview';
  const backTo = reserved ? '/' : null;

  const BASE_MS = 10000;       // normal poll interval
  const MAX_BACKOFF_MS = 120000;
  const FETCH_TIMEOUT_MS = 8000;
  const RELOAD_KEY = 'intermission-reload';

  const $ = (id) => document.getElementById(id);

  let failures = 0;
  let timer = null;
  let inFlight = false;
  let reloading = false;

  // ---- time formatting ---------------------------------------------------

  function makeFormat(opts) {
    try { return new Intl.DateTimeFormat(lang, opts); } catch (e) { return null; }
  }
  const longFmt = makeFormat({
    year: 'numeric', month: 'short', day: 'numeric',
    hour: '2-digit', minute: '2-digit', timeZoneName: 'short'
  });
  const shortFmt = makeFormat({ hour: '2-digit', minute: '2-digit', timeZoneName: 'short' });

  // `up`: rounded up to the minute, as the server writes an expected end: "back by 10:00"
  // must not pass while Retry-After still counts down to 10:00:45.
  function format(fmt, iso, up) {
    if (!fmt || typeof iso !== 'string') return null;
    let d = new Date(iso);
    if (isNaN(d.getTime())) return null;
    if (up) d = new Date(Math.ceil(d.getTime() / 60000) * 60000);
    try { return fmt.format(d); } catch (e) { return null; }
  }

  // Point a <time> at an RFC 3339 instant and show it in local time.
  // Without a usable formatter the server-rendered text stays.
  function setTime(el, iso, fmt, up) {
    if (!el) return;
    if (el.getAttribute('datetime') !== iso) el.setAttribute('datetime', iso);
    const text = format(fmt, iso, up);
    if (text && el.textContent !== text) el.textContent = text;
    if (fmt === shortFmt) {
      const full = format(longFmt, iso);
      if (full) el.title = full;
    }
  }

  // ---- applying a status object -----------------------------------------

  function setText(el, text) {
    if (el && el.textContent !== text) el.textContent = text;
  }

  function applyTimeLine(lineId, timeId, iso, up) {
    const line = $(lineId);
    if (!line) return;
    if (typeof iso === 'string' && iso) {
      setTime($(timeId), iso, longFmt, up);
      line.hidden = false;
    } else {
      line.hidden = true;
    }
  }

  function applyStatusPage(url) {
    const line = $('status-line');
    const link = $('status-link');
    if (!line || !link) return;
    if (typeof url === 'string' && /^https?:\/\//i.test(url)) {
      if (link.getAttribute('href') !== url) link.setAttribute('href', url);
      line.hidden = false;
    } else if (url === null || url === '') {
      line.hidden = true;
    }
  }

  function updateKey(at, message) {
    return (at || '') + '\n' + message;
  }

  // Key for a server-rendered <li><time datetime>..</time> <span dir="auto">message</span></li>.
  function keyOfItem(li) {
    const k = li.getAttribute('data-key');
    if (k !== null) return k;
    const t = li.querySelector('time');
    let text = '';
    Array.prototype.forEach.call(li.childNodes, (n) => {
      if (n !== t) text += n.textContent;
    });
    const key = updateKey(t ? t.getAttribute('datetime') : '', text.replace(/^\s+/, ''));
    li.setAttribute('data-key', key);
    return key;
  }

  function buildItem(u) {
    const li = document.createElement('li');
    li.setAttribute('data-key', updateKey(u.at, u.message));
    if (typeof u.at === 'string' && u.at) {
      const t = document.createElement('time');
      t.setAttribute('datetime', u.at);
      t.textContent = format(shortFmt, u.at) || u.at;
      li.appendChild(t);
      li.appendChild(document.createTextNode(' '));
    }
    // As the server renders it: dir="auto" lets a right-to-left message read so.
    const text = document.createElement('span');
    text.setAttribute('dir', 'auto');
    text.textContent = u.message;
    li.appendChild(text);
    return li;
  }

  function applyUpdates(list) {
    const ul = $('updates');
    const section = $('updates-section');
    if (!ul) return;
    const items = (Array.isArray(list) ? list : [])
      .filter((u) => u && typeof u.message === 'string');
    const want = items.map((u) => updateKey(u.at, u.message));
    const have = Array.prototype.map.call(ul.children, keyOfItem);

    if (want.join('\u0000') !== have.join('\u0000')) {
      const added = want.length - have.length;
      const onlyPrepended = have.length > 0 && added > 0 &&
        want.slice(added).join('\u0000') === have.join('\u0000');
      if (onlyPrepended) {
        // Insert just the new items so screen readers announce only those.
        const first = ul.firstChild;
        for (let i = 0; i < added; i++) ul.insertBefore(buildItem(items[i]), first);
      } else {
        while (ul.firstChild) ul.removeChild(ul.firstChild);
        items.forEach((u) => ul.appendChild(buildItem(u)));
      }
    }
    // Show every update time in local time (covers server-rendered items).
    Array.prototype.forEach.call(ul.querySelectorAll('time[datetime]'), (t) => {
      setTime(t, t.getAttribute('datetime'), shortFmt);
    });
    if (section) section.hidden = items.length === 0;
  }

  function apply(s) {
    if (typeof s.message === 'string' && s.message) setText($('message'), s.message);
    // Past its announced end, a page says so rather than promise a time gone by; a page
    // with no overrun line just stops showing the end.
    const overrun = s.overrun === true;
    applyTimeLine('until-line', 'until', overrun ? null : s.until, true);
    applyTimeLine('overrun-line', 'overrun', overrun ? s.until : null, true);
    applyTimeLine('since-line', 'since', s.since);
    applyStatusPage(s.status_page);
    applyUpdates(s.updates);
  }

  // ---- reloading ---------------------------------------------------------

  // Ask again for the page the visitor asked for. If we keep landing back
  // here (e.g. the proxy still holds this path), space the reloads out.
  // By GET, never location.reload(): this page may answer a form's POST (held, or
  // one the application failed after it arrived, which the proxy never sends twice),
  // and a reload would send that form again, unasked, at every try.
  function reloadSoon() {
    if (isPreview || reloading) return;
    reloading = true;
    let n = 0;
    try {
      const last = JSON.parse(sessionStorage.getItem(RELOAD_KEY) || 'null');
      if (last && Date.now() - last.t < 120000) n = (last.n | 0) + 1;
    } catch (e) { /* storage unavailable */ }
    const wait = n === 0 ? 0 : Math.min(5000 * Math.pow(2, n - 1), 300000);
    setTimeout(() => {
      try { sessionStorage.setItem(RELOAD_KEY, JSON.stringify({ n: n, t: Date.now() })); } catch (e) { /* ignore */ }
      // The same address with a #fragment would only scroll: reload that one (a form's
      // action rarely has one).
      if (backTo) location.replace(backTo);
      else if (location.hash) location.reload();
      else location.replace(location.href);
    }, wait);
  }

  // ---- polling -----------------------------------------------------------

  function nextDelay() {
    let ms = BASE_MS;
    if (failures > 0) {
      const retryAfter = parseInt(root.getAttribute('data-retry-after'), 10) * 1000;
      const cap = retryAfter > BASE_MS ? Math.min(retryAfter, MAX_BACKOFF_MS) : MAX_BACKOFF_MS;
      ms = Math.min(BASE_MS * Math.pow(2, failures), cap);
    }
    return Math.round(ms * (0.8 + Math.random() * 0.4)); // +/- 20 % jitter
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  async function poll() {
    timer = null;
    if (reloading || inFlight) return;
    if (document.hidden) return; // resumed by visibilitychange
    inFlight = true;
    const ctrl = typeof AbortController === 'function' ? new AbortController() : null;
    const killer = ctrl ? setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS) : null;
    try {
      const res = await fetch(statusUrl, {
        cache: 'no-store',
        credentials: 'same-origin',
        headers: { Accept: 'application/json' },
        signal: ctrl ? ctrl.signal : undefined
      });
      if (!res.ok) throw new Error('status ' + res.status);
      const s = await res.json();
      if (!s || typeof s !== 'object') throw new Error('bad status body');
      failures = 0;
      if (s.mode === 'normal') {
        reloadSoon();
      } else if (s.mode !== pageMode && (s.mode === 'maintenance' || s.mode === 'outage')) {
        // Planned <-> unplanned: fetch the matching page (never on preview,
        // where the operator chose which page to look at).
        reloadSoon();
      } else {
        apply(s);
      }
    } catch (e) {
      failures = Math.min(failures + 1, 10);
    } finally {
      if (killer) clearTimeout(killer);
      inFlight = false;
    }
    if (!reloading && !document.hidden) schedule(nextDelay());
  }

  document.addEventListener('visibilitychange', () => {
    if (document.hidden) {
      clearTimeout(timer);
      timer = null;
    } else if (!timer && !inFlight && !reloading) {
      schedule(500 + Math.random() * 1500);
    }
  });

  const note = $('auto-note');
  if (note) note.hidden = false;
  poll();
})();
