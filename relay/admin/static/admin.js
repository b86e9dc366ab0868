/* relay admin: keeps the live list and the event page current from /admin/stream (server-sent
   events). Every value is written with textContent: data from Extole never becomes HTML. */
(function () {
  "use strict";

  var MAX_ROWS = 500;
  var STATS_EVERY_MS = 15000;
  var STATS_AFTER_CHANGE_MS = 1200; // the server caches stats for 1 s: ask only after that
  var STATS_MAX_WAIT_MS = 3000; // during a flood of changes, still every 3 s
  var LOGIN_URL = "/admin/login";
  var KEY_VARIABLES = { production: "BRAZE_API_KEY", staging: "BRAZE_STAGING_API_KEY" };

  var main = document.querySelector("main");
  if (!main) { return; }
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (e) {
      if (!window.confirm(form.dataset.confirm)) { e.preventDefault(); }
    });
  });
  if (main.dataset.page === "live") { livePage(); }
  if (main.dataset.page === "event") { eventPage(); }

  // --- shared --------------------------------------------------------------------------------

  function formatTime(iso) { return iso ? iso.replace("T", " ").slice(0, 19) : "—"; }

  function formatAge(seconds) {
    seconds = Math.floor(seconds || 0);
    if (!seconds) { return "—"; }
    if (seconds < 60) { return seconds + " s"; }
    if (seconds < 3600) { return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s"; }
    if (seconds < 86400) {
      return Math.floor(seconds / 3600) + " h " + Math.floor(seconds % 3600 / 60) + " min";
    }
    return Math.floor(seconds / 86400) + " d " + Math.floor(seconds % 86400 / 3600) + " h";
  }

  function statusLabel(event) {
    return event.status === "pending" && event.attempts > 0 ? "retrying" : event.status;
  }

  function setPill(pill, event) {
    var label = statusLabel(event);
    pill.className = "pill pill-" + label;
    pill.textContent = label;
    pill.title = event.last_error || "";
  }

  function setText(root, field, text) {
    var node = root.querySelector('[data-field="' + field + '"]');
    if (node) { node.textContent = text; }
    return node;
  }

  function setLive(state, text) {
    var indicator = document.getElementById("live");
    if (indicator) { indicator.dataset.state = state; indicator.textContent = text; }
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
      .then(function (response) {
        if (response.status === 401) {
          window.location.href = LOGIN_URL + "?next=" +
            encodeURIComponent(window.location.pathname + window.location.search);
          throw new Error("signed out");
        }
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      });
  }

  /* One EventSource; the browser reconnects by itself (sending Last-Event-ID). If it gives up
     (an error answer such as 401), check the session and open a new one a little later. */
  function follow(url, since, onEvent) {
    var lastId = since;
    function open() {
      var full = url + (url.indexOf("?") >= 0 ? "&" : "?") + "since=" + encodeURIComponent(lastId);
      var source = new EventSource(full);
      source.onopen = function () { setLive("open", "live"); };
      source.onerror = function () {
        if (source.readyState === EventSource.CLOSED) {
          setLive("error", "disconnected, retrying…");
          getJSON(main.dataset.statsApi || "/admin/api/stats").catch(function () {});
          window.setTimeout(open, 5000);
        } else {
          setLive("error", "reconnecting…");
        }
      };
      source.addEventListener("event", function (message) {
        if (message.lastEventId) { lastId = message.lastEventId; }
        var event;
        try { event = JSON.parse(message.data); } catch (e) { return; }
        onEvent(event);
      });
    }
    open();
  }

  // --- the live list -------------------------------------------------------------------------

  function livePage() {
    var tbody = document.getElementById("events");
    var template = document.getElementById("row-template");
    var older = document.getElementById("older");
    var empty = document.getElementById("empty");
    var eventUrl = main.dataset.eventUrl;
    var paged = main.dataset.paged === "1";
    var filter = {
      status: main.dataset.filterStatus, environment: main.dataset.filterEnvironment,
      name: main.dataset.filterName, q: main.dataset.filterQ
    };
    var statsTimer = null;

    function matches(event) {
      if (filter.status && event.status !== filter.status) { return false; }
      if (filter.environment && event.environment !== filter.environment) { return false; }
      if (filter.name && event.braze_event !== filter.name) { return false; }
      if (filter.q) {
        var q = filter.q.trim();
        return event.email === q.toLowerCase() || event.external_id === q ||
          event.extole_event_id === q;
      }
      return true;
    }

    function fill(row, event) {
      row.dataset.id = String(event.id);
      row.dataset.updatedAt = event.updated_at || "";
      var link = setText(row, "link", "#" + event.id);
      link.href = eventUrl + event.id;
      var time = setText(row, "received_at", formatTime(event.received_at));
      time.setAttribute("datetime", event.received_at || "");
      time.title = "event time " + formatTime(event.event_time) + " UTC";
      setText(row, "environment", event.environment);
      setText(row, "extole_type", event.extole_type || "—");
      setText(row, "braze_event", event.braze_event || "—");
      setText(row, "person", event.external_id || event.email || "—");
      setText(row, "attempts", String(event.attempts));
      setPill(row.querySelector('[data-field="status"]'), event);
    }

    function highlight(row) {
      row.classList.remove("fresh");
      void row.offsetWidth; // restart the animation
      row.classList.add("fresh");
    }

    function lowestId() {
      var last = tbody.lastElementChild;
      return last ? Number(last.dataset.id) : Infinity;
    }

    function insert(row, id) {
      var next = tbody.firstElementChild;
      while (next && Number(next.dataset.id) > id) { next = next.nextElementSibling; }
      tbody.insertBefore(row, next);
    }

    function trim() {
      var removed = false;
      while (tbody.children.length > MAX_ROWS) { tbody.lastElementChild.remove(); removed = true; }
      if (removed) { setOlder(tbody.lastElementChild.dataset.id); }
    }

    function setOlder(cursor) {
      older.dataset.cursor = cursor || "";
      older.hidden = !cursor;
      if (cursor) {
        var params = new URLSearchParams(window.location.search);
        params.set("cursor", cursor);
        older.href = "?" + params.toString();
      }
    }

    function onEvent(event) {
      var row = tbody.querySelector('tr[data-id="' + event.id + '"]');
      if (row && row.dataset.updatedAt && event.updated_at <= row.dataset.updatedAt) {
        return; // already shown (a reconnect re-reads a few seconds)
      }
      if (row) {
        fill(row, event);
        highlight(row);
      } else if (!paged && matches(event) && (event.id > lowestId() || !older.dataset.cursor)) {
        row = template.content.firstElementChild.cloneNode(true);
        fill(row, event);
        insert(row, event.id);
        highlight(row);
        trim();
      }
      empty.hidden = tbody.children.length > 0;
      statsSoon();
    }

    /* Counts follow changes: asked once things settle (STATS_AFTER_CHANGE_MS after the last
       change), or every STATS_MAX_WAIT_MS while they keep coming. */
    var lastChange = 0;
    var firstChange = 0;
    function statsSoon() {
      lastChange = Date.now();
      if (statsTimer) { return; }
      firstChange = lastChange;
      statsTimer = window.setTimeout(settle, STATS_AFTER_CHANGE_MS);
    }

    function settle() {
      var now = Date.now();
      var quiet = now - lastChange;
      statsTimer = null;
      if (quiet < STATS_AFTER_CHANGE_MS && now - firstChange < STATS_MAX_WAIT_MS) {
        statsTimer = window.setTimeout(settle, STATS_AFTER_CHANGE_MS - quiet);
        return;
      }
      refreshStats();
      if (quiet < STATS_AFTER_CHANGE_MS) { // still changing: once more when it settles
        firstChange = now;
        statsTimer = window.setTimeout(settle, STATS_AFTER_CHANGE_MS - quiet);
      }
    }

    function refreshStats() {
      getJSON(main.dataset.statsApi).then(showStats).catch(function () {});
    }

    function showStats(stats) {
      Object.keys(stats.counts).forEach(function (status) {
        var node = document.querySelector('[data-count="' + status + '"]');
        if (node) { node.textContent = String(stats.counts[status]); }
      });
      document.getElementById("oldest").textContent = formatAge(stats.oldest_pending_seconds);
      var banners = document.getElementById("banners");
      banners.replaceChildren();
      Object.keys(stats.braze).forEach(function (environment) {
        var text = bannerText(environment, stats.braze[environment]);
        if (!text) { return; }
        var p = document.createElement("p");
        p.className = "banner banner-" + text[0];
        p.setAttribute("role", "alert");
        p.textContent = text[1];
        banners.appendChild(p);
      });
      var uncertain = (stats.triggers || {}).uncertain || 0;
      if (uncertain) {
        var alert = document.createElement("p");
        alert.className = "banner banner-error";
        alert.setAttribute("role", "alert");
        alert.dataset.banner = "triggers";
        alert.textContent = triggerBannerText(uncertain);
        banners.appendChild(alert);
      }
    }

    // Mirrors relay.admin.views.trigger_banner.
    function triggerBannerText(uncertain) {
      return uncertain + " campaign/Canvas trigger" + (uncertain !== 1 ? "s are" : " is") +
        " uncertain: Braze may or may not have sent the message. Check in Braze, then resend " +
        "or drop each one on the triggers page.";
    }

    function bannerText(environment, state) {
      var variable = KEY_VARIABLES[environment] || "the Braze key";
      if (state === "refused") {
        return ["error", "Braze refused the " + environment + " key (401/403): " + environment +
          " delivery is paused and resumes by itself once the key works. Check " + variable + "."];
      }
      if (state === "missing" && environment === "production") {
        return ["error", "No Braze key for production (" + variable + " or BRAZE_REST_ENDPOINT " +
          "is not set): production events are stored and wait until one is set."];
      }
      if (state === "missing") {
        return ["info", "No Braze key for " + environment + " (" + variable + " is not set): " +
          environment + " events are stored and marked skipped."];
      }
      return null;
    }

    older.addEventListener("click", function (e) {
      if (!older.dataset.cursor) { return; }
      e.preventDefault();
      var params = new URLSearchParams();
      Object.keys(filter).forEach(function (key) { if (filter[key]) { params.set(key, filter[key]); } });
      params.set("cursor", older.dataset.cursor);
      getJSON(main.dataset.eventsApi + "?" + params.toString()).then(function (page) {
        page.events.forEach(function (event) {
          if (tbody.querySelector('tr[data-id="' + event.id + '"]')) { return; }
          var row = template.content.firstElementChild.cloneNode(true);
          fill(row, event);
          tbody.appendChild(row);
        });
        setOlder(page.next_cursor ? String(page.next_cursor) : "");
      }).catch(function () {});
    });

    window.setInterval(refreshStats, STATS_EVERY_MS);
    follow(main.dataset.stream, main.dataset.since, onEvent);
  }

  // --- one event -----------------------------------------------------------------------------

  function eventPage() {
    var eventId = Number(main.dataset.eventId);
    if (!main.dataset.stream) { setLive("error", "not live"); return; }
    follow(main.dataset.stream, main.dataset.since, function (event) {
      if (event.id !== eventId || event.updated_at === main.dataset.updatedAt) { return; }
      main.dataset.updatedAt = event.updated_at;
      setPill(main.querySelector('h1 [data-field="status"]'), event);
      setText(main, "attempts", String(event.attempts));
      setText(main, "updated_at", formatTime(event.updated_at) + " UTC");
      setText(main, "next_attempt_at", formatTime(event.next_attempt_at));
      setText(main, "delivered_at", formatTime(event.delivered_at));
      setText(main, "last_error", event.last_error || "");
      var retry = document.getElementById("retry-form");
      retry.hidden = !(event.status === "dead" || (event.status === "pending" && event.attempts > 0));
      document.getElementById("changed").hidden = false;
    });
  }
})();
