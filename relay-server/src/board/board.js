// The back-office board's script: applies the relay's live patches (server-sent events from
// /board/events) to the page in place, and keeps the ages current. Every action on the page
// is a plain form, so the board works without this script, only not live.
(function () {
  "use strict";
  var body = document.body;
  var store = body.dataset.store;
  var live = document.getElementById("live");

  function say(text, state) {
    if (live) {
      live.textContent = text;
      live.dataset.state = state;
    }
  }

  if (!store) {
    if (live) { live.remove(); }
    return;
  }

  var since = body.dataset.since || "0";
  // The relay's clock minus ours: ages count from the relay's time.
  var skew = Number(body.dataset.now || Date.now()) - Date.now();

  function age(ms) {
    var s = Math.floor(Math.max(ms, 0) / 1000);
    if (s < 60) { return s + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " min"; }
    if (s < 86400) {
      var m = Math.floor((s % 3600) / 60);
      return Math.floor(s / 3600) + " h " + (m < 10 ? "0" : "") + m + " min";
    }
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function refreshAges() {
    var now = Date.now() + skew;
    document.querySelectorAll("td.age[data-since]").forEach(function (td) {
      var text = age(now - Number(td.dataset.since));
      if (td.textContent !== text) { td.textContent = text; }
    });
  }

  // Which focusable element inside `el` has the focus (its index), so it keeps it after the
  // element is replaced by a fresh copy.
  function focusIndex(el) {
    var active = document.activeElement;
    if (!active || !el.contains(active)) { return -1; }
    return Array.prototype.indexOf.call(el.querySelectorAll("a, button, input, select"), active);
  }

  function flash(el) {
    el.classList.add("changed");
    window.setTimeout(function () { el.classList.remove("changed"); }, 50);
  }

  function applyRow(p) {
    var id = p.section + "-" + p.key;
    var el = document.getElementById(id);
    if (p.html === null) {
      if (el) { el.remove(); }
      return;
    }
    var focused = el ? focusIndex(el) : -1;
    if (el) {
      el.outerHTML = p.html;
    } else {
      var list = document.getElementById(p.section + "-list");
      if (list) { list.insertAdjacentHTML("beforeend", p.html); }
    }
    var fresh = document.getElementById(id);
    if (!fresh) { return; }
    flash(fresh);
    if (focused >= 0) {
      var again = fresh.querySelectorAll("a, button, input, select")[focused];
      if (again) { again.focus(); }
    }
  }

  function apply(data) {
    var reset = data.reset || {};
    Object.keys(reset).forEach(function (id) {
      var list = document.getElementById(id);
      if (!list) { return; }
      if (list.tagName === "TABLE") {
        list.querySelectorAll("tbody").forEach(function (t) { t.remove(); });
        list.insertAdjacentHTML("beforeend", reset[id]);
      } else {
        list.innerHTML = reset[id];
      }
    });
    (data.rows || []).forEach(applyRow);
    var blocks = data.blocks || {};
    Object.keys(blocks).forEach(function (id) {
      var el = document.getElementById(id);
      if (el && el.innerHTML !== blocks[id]) { el.innerHTML = blocks[id]; }
    });
    since = String(data.since);
    body.dataset.since = since;
    // For tests and the curious: how many patches this page applied, and when the last one was.
    body.dataset.patches = String(Number(body.dataset.patches || "0") + 1);
    body.dataset.patchedAt = String(Date.now());
    refreshAges();
  }

  var retry = null;
  function connect() {
    retry = null;
    var url = "/board/events?store=" + encodeURIComponent(store) + "&since=" + encodeURIComponent(since);
    var source = new EventSource(url);
    source.addEventListener("open", function () { say("Live updates: on", "on"); });
    source.addEventListener("patch", function (e) {
      try {
        apply(JSON.parse(e.data));
      } catch (err) {
        say("Live updates: an update could not be shown; reload the page", "error");
      }
    });
    source.addEventListener("error", function () {
      say("Live updates: reconnecting", "off");
      // The browser retries by itself unless the relay refused the stream; then start again
      // from the position this page has reached (a sign-in that ended shows on reload).
      if (source.readyState === EventSource.CLOSED && retry === null) {
        retry = window.setTimeout(connect, 3000);
      }
    });
  }

  window.setInterval(refreshAges, 5000);
  connect();
})();
