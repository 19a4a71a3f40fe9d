// cib's pages, made live. Every page works without this script: it only follows the server's
// event streams (EventSource, which resumes by itself with Last-Event-ID after a cut) and
// refreshes the parts of the page marked data-live-part, and on a log page it appends the
// live tail, loads earlier lines, toggles timestamps and selects line ranges.
(function () {
  'use strict';

  // Pages whose body names an event sequence number follow the event stream from there.
  function livePage() {
    var from = document.body.dataset.liveFrom;
    if (from === undefined) return;
    var build = document.body.dataset.liveBuild;
    var timer = null, busy = false, again = false;
    var source = new EventSource('/live/events?from=' + encodeURIComponent(from));
    source.addEventListener('event', function (e) {
      var ev;
      try { ev = JSON.parse(e.data); } catch (err) { return; }
      if (build && ev.build !== build) return;
      schedule();
    });
    function schedule() { if (!timer) timer = setTimeout(refresh, 200); }
    function refresh() {
      timer = null;
      if (busy) { again = true; return; }
      busy = true;
      fetch(location.href, { credentials: 'same-origin' }).then(function (r) {
        if (!r.ok) return;
        return r.text().then(function (text) {
          var doc = new DOMParser().parseFromString(text, 'text/html');
          document.querySelectorAll('[data-live-part]').forEach(function (el) {
            var fresh = doc.getElementById(el.id);
            if (fresh) el.replaceWith(fresh);
          });
        });
      }).finally(function () {
        busy = false;
        if (again) { again = false; schedule(); }
      });
    }
  }

  // The same colours as the server's rendering (web/ansi.rs), for lines that arrive live.
  function ansiInto(parent, text) {
    var style = {};
    var re = /\x1b\[([0-9;]*)([@-~])|\x1b\][^\x07\x1b]*(\x07|\x1b\\)?|\x1b./g;
    var last = 0, m;
    function flush(upto) {
      var piece = text.slice(last, upto).replace(/[\x00-\x08\x0b-\x1f\x7f]/g, '');
      if (!piece) return;
      var cls = [];
      if (style.fg !== undefined) cls.push('f' + style.fg);
      if (style.bg !== undefined) cls.push('g' + style.bg);
      if (style.b) cls.push('b');
      if (style.dim) cls.push('dim');
      if (style.i) cls.push('i');
      if (style.u) cls.push('u');
      if (cls.length) {
        var span = document.createElement('span');
        span.className = cls.join(' ');
        span.textContent = piece;
        parent.appendChild(span);
      } else {
        parent.appendChild(document.createTextNode(piece));
      }
    }
    while ((m = re.exec(text)) !== null) {
      flush(m.index);
      last = re.lastIndex;
      if (m[2] !== 'm') continue;
      var codes = (m[1] || '0').split(';').map(function (c) { return parseInt(c, 10) || 0; });
      for (var k = 0; k < codes.length; k++) {
        var c = codes[k];
        if (c === 0) style = {};
        else if (c === 1) style.b = true;
        else if (c === 2) style.dim = true;
        else if (c === 3) style.i = true;
        else if (c === 4) style.u = true;
        else if (c === 22) { style.b = false; style.dim = false; }
        else if (c === 23) style.i = false;
        else if (c === 24) style.u = false;
        else if (c >= 30 && c <= 37) style.fg = c - 30;
        else if (c === 39) delete style.fg;
        else if (c >= 40 && c <= 47) style.bg = c - 40;
        else if (c === 49) delete style.bg;
        else if (c >= 90 && c <= 97) style.fg = c - 90 + 8;
        else if (c >= 100 && c <= 107) style.bg = c - 100 + 8;
        else if (c === 38 || c === 48) {
          if (codes[k + 1] === 5) { var n = codes[k + 2]; if (n < 16) { if (c === 38) style.fg = n; else style.bg = n; } k += 2; }
          else if (codes[k + 1] === 2) { if (c === 38) delete style.fg; else delete style.bg; k += 4; }
        }
      }
    }
    flush(text.length);
  }

  var ERROR = /error|fail|panicked/i;

  function logPage() {
    var log = document.getElementById('log');
    if (!log) return;
    var end = Number(log.dataset.end);
    // Deep in a long log the server sends lines unnumbered, and the count comes separately.
    var numbered = !log.dataset.count;
    var nextLine = numbered ? Number(log.dataset.nextLine) : NaN;
    var partial = '';
    var state = document.getElementById('log-state');
    var firstError = document.getElementById('first-error');
    var encoder = new TextEncoder();
    var decoder = new TextDecoder();

    function numberLink(n) {
      var a = document.createElement('a');
      a.className = 'n';
      a.href = '#L' + n;
      a.setAttribute('aria-label', 'line ' + n);
      a.textContent = n;
      return a;
    }

    // Numbers every line shown once the count of the lines before them is known.
    function numberAll(before) {
      var n = before;
      log.querySelectorAll('.l').forEach(function (el) {
        n++;
        var old = el.querySelector('.n');
        if (old) old.replaceWith(numberLink(n));
        if (firstError && firstError.getAttribute('href') === '#' + el.id) {
          firstError.href = '#L' + n;
          firstError.textContent = 'Jump to first error (line ' + n + ')';
        }
        el.id = 'L' + n;
      });
      nextLine = n + 1;
      numbered = true;
      if (earlier) {
        earlier.dataset.line = before + 1;
        earlier.textContent = 'Show earlier lines (' + before + ' more)';
      }
      log.dataset.numbered = 'true';
      fromHash();
    }

    function lineElement(n, text, offset) {
      var div = document.createElement('div');
      div.className = 'l';
      div.id = 'L' + n;
      div.dataset.o = offset;
      var a;
      if (numbered) {
        a = numberLink(n);
      } else {
        a = document.createElement('span');
        a.className = 'n';
        div.id = 'O' + offset;
      }
      var ts = document.createElement('span');
      ts.className = 'ts';
      ts.textContent = new Date().toISOString();
      var c = document.createElement('span');
      c.className = 'c';
      ansiInto(c, text.replace(/\r$/, '').replace(/.*\r/, ''));
      div.appendChild(a); div.appendChild(ts); div.appendChild(c);
      if (firstError && firstError.hidden && ERROR.test(c.textContent)) {
        firstError.hidden = false;
        firstError.href = '#L' + n;
        firstError.textContent = 'Jump to first error (line ' + n + ')';
      }
      return div;
    }

    // Appends text that starts at byte `offset`; bytes already shown are skipped, so a resumed
    // stream that repeats some output never shows it twice.
    function append(offset, text) {
      var bytes = encoder.encode(text);
      if (offset + bytes.length <= end) return;
      if (offset < end) { bytes = bytes.slice(end - offset); text = decoder.decode(bytes); }
      var lineStart = end - encoder.encode(partial).length;
      end += bytes.length;
      var atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
      var pieces = (partial + text).split('\n');
      partial = pieces.pop();
      var frag = document.createDocumentFragment();
      pieces.forEach(function (p) {
        frag.appendChild(lineElement(nextLine++, p, lineStart));
        lineStart += encoder.encode(p).length + 1;
      });
      log.appendChild(frag);
      if (atBottom && pieces.length) window.scrollTo(0, document.body.scrollHeight);
    }

    if (log.dataset.live === 'true') {
      var source = new EventSource(log.dataset.stream + '&from=' + end);
      log.dataset.connections = '0';
      source.onopen = function () {
        log.dataset.connections = String(Number(log.dataset.connections) + 1);
        if (state) state.textContent = 'Following…';
      };
      source.onerror = function () { if (state && source.readyState !== 2) state.textContent = 'Reconnecting…'; };
      source.addEventListener('log', function (e) {
        var d = JSON.parse(e.data);
        if (typeof d.text === 'string') append(d.offset, d.text);
      });
      source.addEventListener('end', function () {
        source.close();
        if (partial) { log.appendChild(lineElement(nextLine++, partial, end)); partial = ''; }
        log.dataset.live = 'false';
        if (state) state.textContent = 'Finished.';
      });
    }

    // Earlier lines, a window at a time, above what is shown, keeping the view where it is.
    var earlier = document.getElementById('earlier');
    if (earlier) {
      earlier.addEventListener('click', function (e) {
        // Until the lines are numbered, the link pages back the way it does without script.
        if (!numbered) return;
        e.preventDefault();
        var before = earlier.dataset.before, line = earlier.dataset.line;
        fetch(log.dataset.lines + '&before=' + before + '&line=' + line, { credentials: 'same-origin' }).then(function (r) {
          if (!r.ok) return;
          var start = r.headers.get('x-cib-start'), first = r.headers.get('x-cib-first-line');
          return r.text().then(function (html) {
            var height = document.body.scrollHeight;
            log.insertAdjacentHTML('afterbegin', html);
            window.scrollBy(0, document.body.scrollHeight - height);
            if (Number(start) === 0) { earlier.parentNode.remove(); return; }
            earlier.dataset.before = start;
            earlier.dataset.line = first;
            earlier.textContent = 'Show earlier lines (' + (Number(first) - 1) + ' more)';
          });
        });
      });
    }

    // Timestamps shown or hidden without a reload.
    var toggle = document.getElementById('ts-toggle');
    if (toggle) {
      toggle.addEventListener('click', function (e) {
        e.preventDefault();
        var on = log.classList.toggle('show-ts');
        toggle.setAttribute('aria-pressed', on ? 'true' : 'false');
        toggle.textContent = on ? 'Hide timestamps' : 'Show timestamps';
      });
    }

    // Line anchors: a click selects a line, a shift-click a range (#L10-L20), to share.
    var anchor = null;
    function select(from, to) {
      log.querySelectorAll('.l.sel').forEach(function (el) { el.classList.remove('sel'); });
      if (from > to) { var t = from; from = to; to = t; }
      for (var n = from; n <= to; n++) {
        var el = document.getElementById('L' + n);
        if (el) el.classList.add('sel');
      }
    }
    function fromHash() {
      var m = /^#L(\d+)(?:-L(\d+))?$/.exec(location.hash);
      if (!m) return;
      var a = Number(m[1]), b = m[2] ? Number(m[2]) : a;
      anchor = a;
      select(a, b);
      var el = document.getElementById('L' + Math.min(a, b));
      if (el) el.scrollIntoView({ block: 'center' });
    }
    log.addEventListener('click', function (e) {
      var a = e.target.closest('a.n');
      if (!a) return;
      e.preventDefault();
      var n = Number(a.textContent);
      if (e.shiftKey && anchor !== null) {
        var lo = Math.min(anchor, n), hi = Math.max(anchor, n);
        history.replaceState(null, '', '#L' + lo + '-L' + hi);
        select(lo, hi);
      } else {
        anchor = n;
        history.replaceState(null, '', '#L' + n);
        select(n, n);
      }
    });
    window.addEventListener('hashchange', fromHash);
    if (numbered) {
      log.dataset.numbered = 'true';
      fromHash();
    } else {
      fetch(log.dataset.count, { credentials: 'same-origin' }).then(function (r) {
        if (r.ok) return r.text().then(function (t) { numberAll(Number(t)); });
      });
    }
    document.body.dataset.ready = 'true';
  }

  function start() {
    livePage();
    logPage();
    document.documentElement.dataset.scripted = 'true';
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
