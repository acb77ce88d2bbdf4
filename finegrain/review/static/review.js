// finegrain review: every decision from the keyboard. A decision is a POST with the page's token; the page says
// "saved" only when the server answered that the decision is stored, then opens the next photo (preloaded).
(function () {
  'use strict';
  var token = document.querySelector('meta[name="review-token"]').content;
  var main = document.getElementById('item');
  var status = document.getElementById('status');
  var box = document.getElementById('typed');
  var input = document.getElementById('species');
  var typed = null;  // the kbd whose species box is open
  var busy = false;

  function say(text, kind) {
    status.textContent = text;
    status.className = kind || '';
  }

  function post(url, body) {
    return fetch(url, {
      method: 'POST', credentials: 'same-origin', body: JSON.stringify(body || {}),
      headers: {'Content-Type': 'application/json', 'X-Review-Token': token}
    }).then(function (r) {
      return r.json().catch(function () { return {error: r.statusText}; }).then(function (j) {
        if (!r.ok) { throw new Error(j.error || r.statusText); }
        return j;
      });
    });
  }

  function remember(ms) {  // acknowledgement times of this tab, for benchmarks/bench_review.py
    var list = JSON.parse(sessionStorage.getItem('finegrainAckMs') || '[]');
    list.push(ms);
    sessionStorage.setItem('finegrainAckMs', JSON.stringify(list));
  }

  function decide(action, label) {
    if (busy || !main) { return; }
    busy = true;
    say('saving…');
    var t0 = performance.now();
    post('/api/decide', {item: main.dataset.item, action: action, label: label || ''}).then(function (j) {
      remember(performance.now() - t0);
      document.getElementById('done').textContent = j.done;
      document.getElementById('left').textContent = j.left;
      say('saved', 'saved');
      location.assign(j.next);
    }).catch(function (e) {
      busy = false;
      say('not saved: ' + e.message, 'error');
    });
  }

  function undo() {
    if (busy) { return; }
    busy = true;
    say('undoing…');
    post('/api/undo').then(function (j) {
      say('undone', 'saved');
      location.assign(j.next);
    }).catch(function (e) {
      busy = false;
      say(e.message, 'error');
    });
  }

  function species() {
    return Array.prototype.map.call(document.querySelectorAll('#species-list option'), function (o) { return o.value; });
  }

  function resolve(text) {  // exact name, else the one name matching case-insensitively (whole, prefix, then part)
    var names = species(), low = text.toLowerCase();
    if (names.indexOf(text) >= 0) { return text; }
    var tests = [function (n) { return n.toLowerCase() === low; },
                 function (n) { return n.toLowerCase().indexOf(low) === 0; },
                 function (n) { return n.toLowerCase().indexOf(low) >= 0; }];
    for (var i = 0; i < tests.length; i++) {
      var found = names.filter(tests[i]);
      if (found.length === 1) { return found[0]; }
      if (found.length > 1) { return null; }
    }
    return null;
  }

  function openBox(kbd) {
    typed = kbd;
    box.hidden = false;
    document.getElementById('typed-label').textContent = kbd.dataset.typed === 'new' ? 'new species' : 'species';
    input.value = '';
    input.focus();
  }

  if (input) {
    input.addEventListener('keydown', function (e) {
      if (e.key === 'Escape') {
        e.preventDefault();
        box.hidden = true;
        input.blur();
        typed = null;
      } else if (e.key === 'Enter') {
        e.preventDefault();
        var text = input.value.trim();
        if (!text || !typed) { return; }
        if (typed.dataset.typed === 'new') { decide(typed.dataset.action, text); return; }
        var name = resolve(text);
        if (name === null) {
          say('no single species matches "' + text + '": type more, or Esc then n for a new species', 'error');
          return;
        }
        decide(typed.dataset.action, name);
      }
    });
  }

  document.addEventListener('keydown', function (e) {
    if (e.target === input || e.ctrlKey || e.metaKey || e.altKey) { return; }
    var kbd = null;
    document.querySelectorAll('kbd[data-key]').forEach(function (k) {
      if (k.dataset.key === e.key && kbd === null) { kbd = k; }
    });
    if (kbd === null) { return; }
    e.preventDefault();
    var action = kbd.dataset.action;
    if (action === 'undo') { undo(); }
    else if (action === 'index') { location.assign('/'); }
    else if (action === 'open') { location.assign(kbd.dataset.href); }
    else if (kbd.dataset.typed) { openBox(kbd); }
    else { decide(action, kbd.dataset.label); }
  });
}());
