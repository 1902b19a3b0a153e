// lpa-relay status page: a snapshot from /api/status, then live job_update notifications
// from /events (Server-Sent Events).  The page never reloads and never polls the relay: the
// snapshot is read again only when the stream (re)opens, when the relay says "resync" (its
// LISTEN connection came back and notifications may have been lost), or when a notification
// names a job or host the page does not know yet.  The one timer below only redraws the
// "last event" ages from the browser's own clock.
"use strict";

(function () {
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const HOUR = 3600;

  // A marker of this page load: a reload would make a new one (tests read it).
  window.lpaStatus = { loadedAt: Date.now(), token: Math.random().toString(36).slice(2),
                       applied: 0, snapshots: 0 };

  let jobs = new Map();      // job_id -> {job_id, kind, status, completed_at, hosts: Map}
  let offset = 0;            // browser clock minus the database's clock, seconds
  let loading = false;       // a snapshot is on its way: notifications wait in `buffered`
  let buffered = [];
  let again = false;         // another snapshot was asked for while one was loading
  let streamOpen = false;

  const $ = (id) => document.getElementById(id);
  const now = () => Date.now() / 1000 - offset;

  function setState(state, text) {
    const element = $("connection");
    element.dataset.state = state;
    element.textContent = text;
  }

  function fromSnapshot(document) {
    offset = Date.now() / 1000 - document.now;
    const next = new Map();
    for (const job of document.running.concat(document.finished)) {
      const hosts = new Map();
      for (const host of job.hosts) hosts.set(host.host_id, host);
      next.set(job.job_id, { ...job, hosts: hosts });
    }
    jobs = next;
    window.lpaStatus.snapshots += 1;
  }

  async function loadSnapshot() {
    if (loading) { again = true; return; }
    loading = true;
    setState("resyncing", "loading…");
    try {
      const response = await fetch("api/status", { cache: "no-store" });
      if (!response.ok) throw new Error((await response.json()).error || response.statusText);
      fromSnapshot(await response.json());
      const waiting = buffered;
      buffered = [];
      for (const payload of waiting) apply(payload, true);
      setState(streamOpen ? "live" : "down", streamOpen ? "live" : "reconnecting…");
    } catch (error) {
      setState("down", "status unavailable: " + error.message);
    } finally {
      loading = false;
      render();
      if (again) { again = false; loadSnapshot(); }
    }
  }

  function apply(payload, fromBuffer) {
    const job = jobs.get(payload.job_id);
    if (!job) {
      if (payload.event_type === "host" || !TERMINAL.has(payload.status)) loadSnapshot();
      return;
    }
    if (payload.event_type === "job") {
      job.status = payload.status;
      if (TERMINAL.has(payload.status) && !job.completed_at) job.completed_at = now();
      window.lpaStatus.applied += 1;
      return;
    }
    const host = job.hosts.get(payload.host_id);
    if (!host) { loadSnapshot(); return; }
    if (fromBuffer && payload.seq != null && payload.seq <= host.seq) return;  // in the snapshot
    if (host.status !== payload.status) host.message = "";  // the old status's message
    host.status = payload.status;
    if (payload.progress != null) host.progress = payload.progress;
    if (payload.transport) host.transport = payload.transport;
    if (payload.seq != null) host.seq = payload.seq;
    host.error_message = payload.error_message;
    if (payload.output) {
      const lines = payload.output.split("\n").filter((line) => line.trim() !== "");
      if (lines.length) host.message = lines[lines.length - 1];
    }
    host.last_event_at = now();
    if (TERMINAL.has(host.status) && !host.completed_at) host.completed_at = now();
    window.lpaStatus.applied += 1;
  }

  function age(seconds) {
    if (seconds == null) return "—";
    const value = Math.max(0, now() - seconds);
    if (value < 60) return Math.floor(value) + " s ago";
    if (value < HOUR) return Math.floor(value / 60) + " min ago";
    return Math.floor(value / HOUR) + " h ago";
  }

  function cell(row, className, text) {
    const td = document.createElement("td");
    td.className = className;
    td.textContent = text == null ? "" : String(text);
    row.appendChild(td);
    return td;
  }

  function hostRow(host) {
    const row = document.createElement("tr");
    row.className = "host";
    row.dataset.host = host.host || host.host_id;
    row.dataset.hostId = host.host_id;
    cell(row, "name", host.host || host.host_id);
    cell(row, "status " + host.status, host.status);
    const progress = cell(row, "progress", "");
    if (host.progress != null) {
      const bar = document.createElement("progress");
      bar.max = 100;
      bar.value = host.progress;
      progress.appendChild(bar);
      progress.appendChild(document.createTextNode(" " + host.progress + " %"));
    }
    cell(row, "transport", host.transport || "—");
    const last = cell(row, "age", age(host.last_event_at));
    last.dataset.at = host.last_event_at == null ? "" : String(host.last_event_at);
    cell(row, "message", host.message || "");
    cell(row, "error", host.error_message || "");
    return row;
  }

  function jobBlock(job) {
    const block = document.createElement("article");
    block.className = "job";
    block.id = "job-" + job.job_id;
    block.dataset.status = job.status;
    const title = document.createElement("h3");
    const status = document.createElement("span");
    status.className = "status " + job.status;
    status.textContent = job.status;
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = job.kind + " " + job.job_id;
    title.append(status, id);
    const table = document.createElement("table");
    const head = document.createElement("tr");
    for (const name of ["host", "status", "progress", "via", "last event", "message", "error"]) {
      const th = document.createElement("th");
      th.textContent = name;
      head.appendChild(th);
    }
    table.appendChild(head);
    const hosts = Array.from(job.hosts.values()).sort(
      (a, b) => String(a.host).localeCompare(String(b.host)));
    for (const host of hosts) table.appendChild(hostRow(host));
    block.append(title, table);
    return block;
  }

  function render() {
    const cutoff = now() - HOUR;
    const running = [];
    const finished = [];
    for (const job of jobs.values()) {
      if (!TERMINAL.has(job.status)) running.push(job);
      else if (job.completed_at == null || job.completed_at >= cutoff) finished.push(job);
    }
    const newest = (a, b) => (b.created_at || 0) - (a.created_at || 0);
    for (const [name, list] of [["running", running], ["finished", finished]]) {
      list.sort(newest);
      $(name).replaceChildren(...list.map(jobBlock));
      $(name + "-count").textContent = String(list.length);
      $(name + "-empty").hidden = list.length > 0;
    }
  }

  function redrawAges() {
    for (const element of document.querySelectorAll("td.age")) {
      const at = element.dataset.at;
      element.textContent = age(at === "" ? null : Number(at));
    }
  }

  function connect() {
    const stream = new EventSource("events");
    stream.onopen = () => { streamOpen = true; loadSnapshot(); };
    stream.onerror = () => {
      streamOpen = false;
      setState("down", "relay unreachable; retrying…");
    };
    stream.addEventListener("job_update", (message) => {
      let payload;
      try { payload = JSON.parse(message.data); } catch (error) { return; }
      if (loading) { buffered.push(payload); return; }
      apply(payload, false);
      render();
    });
    stream.addEventListener("resync", () => loadSnapshot());
    stream.addEventListener("ping", (message) => {
      const state = JSON.parse(message.data);
      if (!state.listening) setState("down", "relay has no database connection; waiting…");
      else if ($("connection").dataset.state === "down") loadSnapshot();
    });
  }

  connect();
  setInterval(redrawAges, 1000);
})();
