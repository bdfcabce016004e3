// relay live console: a state store fed by two WebSockets, and render functions.
//
// * The "firehose" socket never subscribes, so it receives every event of every
//   request: it feeds the request list on the left.
// * The "detail" socket subscribes to each opened request with snapshot:true,
//   renders from the snapshot plus the live events after it, and on reconnect
//   resumes each request with after_seq (the last seq rendered) and epoch.
"use strict";
(() => {
  const TEXT_KEEP = 2048;          // streamed text kept per agent (characters)
  const MAX_REQUESTS = 200;        // request list entries kept
  const MAX_LOG = 40;              // activity lines kept per open request
  const WARN_PCT = 80;             // fallback warning level when no warning was seen
  const BACKOFF_BASE_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  const JITTER = 0.3;
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const CONTROL = new Set(["subscribed", "unsubscribed", "snapshot", "budget_pending", "lagged",
    "resync_required", "ack", "error", "pong", "workflow_subscribed", "workflow_unsubscribed"]);
  const WS_URL = (() => {
    const url = new URL("ws/events", document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.toString();
  })();

  // ------------------------------------------------------------------ store

  const store = {
    requests: new Map(),   // request id -> summary from the firehose
    views: new Map(),      // request id -> open request (snapshot + live events)
    commands: new Map(),   // command_id -> {rid, kind, target}
    nextCommand: 1,
    listDirty: true,
    banner: null,
  };

  function summary(rid, ts) {
    let s = store.requests.get(rid);
    if (!s) {
      s = { id: rid, firstTs: ts, lastTs: ts, agents: new Set(), running: new Set(),
        roots: new Set(), status: "running", used: null, paused: false };
      store.requests.set(rid, s);
      trimRequests();
      autoOpen(rid);
    }
    if (ts) s.lastTs = Math.max(s.lastTs || 0, ts);
    return s;
  }

  // A newcomer should see a tree at once: open the first request this page
  // learns of, once, unless the URL already says which requests to show.
  let autoOpenDone = /open=/.test(location.hash);
  function autoOpen(rid) {
    if (autoOpenDone) return;
    autoOpenDone = true;
    setTimeout(() => { if (store.views.size === 0) openRequest(rid); }, 0);
  }

  function trimRequests() {
    for (const rid of store.requests.keys()) {
      if (store.requests.size <= MAX_REQUESTS) break;
      if (!store.views.has(rid)) store.requests.delete(rid);
    }
  }

  function newView(rid) {
    return { id: rid, epoch: null, lastSeq: 0, awaiting: true, subscribed: false, agents: new Map(),
      budget: null, pending: null, answering: null, decision: null,
      outcome: null, log: [], notes: [], cancelling: new Set(),
      dom: null, dirty: new Set(), full: true, logVer: 0, notesVer: 0, shown: {} };
  }

  function newAgent(id) {
    return { id, parent: null, task: "", depth: 0, status: "running", tokens: null,
      duration: null, summary: "", error: "", reason: "", text: "", flags: [], dom: null };
  }

  // Apply one event to the request-list summary (firehose).
  function applySummary(ev) {
    const s = summary(ev.request_id, ev.ts);
    const aid = ev.agent_id;
    switch (ev.type) {
      case "agent_spawned":
        s.agents.add(aid); s.running.add(aid);
        if (ev.parent_id === null) s.roots.add(aid);
        break;
      case "agent_completed": case "agent_failed": case "agent_cancelled":
        if (ev.type === "agent_failed" && ev.will_retry) break;
        s.running.delete(aid);
        if (s.roots.has(aid)) s.status = ev.type.slice(6);
        break;
      case "budget_update": case "budget_exhausted":
        s.used = ev.tokens_used;
        break;
      case "budget_warning":
        s.used = ev.tokens_used; s.paused = true;
        break;
      case "budget_decision":
        s.paused = false;
        break;
    }
    store.listDirty = true;
  }

  function agentOf(view, id) {
    let a = view.agents.get(id);
    if (!a) { a = newAgent(id); view.agents.set(id, a); }
    view.dirty.add(id);
    return a;
  }

  function logLine(view, ts, text, tone) {
    view.log.unshift({ ts: ts ?? Date.now(), text, tone: tone || "" });
    view.log.length = Math.min(view.log.length, MAX_LOG);
    view.logVer += 1;
  }

  function label(view, id) {
    const a = view.agents.get(id);
    return a && a.task ? `"${clip(a.task, 48)}"` : shortId(id);
  }

  // Apply one live event to an open request.
  function applyEvent(view, ev) {
    const aid = ev.agent_id;
    switch (ev.type) {
      case "agent_spawned": {
        const a = agentOf(view, aid);
        Object.assign(a, { parent: ev.parent_id, task: ev.task_description, depth: ev.depth });
        break;
      }
      case "agent_text_delta": {
        const a = agentOf(view, aid);
        a.text = (a.text + String(ev.text)).slice(-TEXT_KEEP);
        break;
      }
      case "agent_completed":
        Object.assign(agentOf(view, aid), { status: "completed", tokens: ev.tokens_used,
          duration: ev.duration_ms, summary: ev.result_summary });
        break;
      case "agent_failed":
        Object.assign(agentOf(view, aid), { status: ev.will_retry ? "retrying" : "failed",
          error: ev.error });
        logLine(view, ev.ts, `${label(view, aid)} failed${ev.will_retry ? " (will retry)" : ""}: ${ev.error}`, "bad");
        break;
      case "agent_cancelled":
        Object.assign(agentOf(view, aid), { status: "cancelled", reason: ev.reason });
        view.cancelling.delete(aid);
        logLine(view, ev.ts, `${label(view, aid)} cancelled: ${ev.reason}`, "muted");
        break;
      case "depth_limit_reached":
        agentOf(view, aid).flags.push(`depth limit ${ev.max_depth}`);
        logLine(view, ev.ts, `${label(view, aid)} hit the depth limit (${ev.attempted_depth} > ${ev.max_depth})`, "warn");
        break;
      case "cycle_detected":
        agentOf(view, aid).flags.push("cycle");
        logLine(view, ev.ts, `cycle detected at ${label(view, aid)}: ${ev.cycle_description}`, "warn");
        break;
      case "memory_created":
        logLine(view, ev.ts, `${label(view, aid)} remembered: ${ev.fact}`);
        break;
      case "budget_update":
        view.budget = { ...(view.budget || {}), tokens_used: ev.tokens_used,
          budget_total: ev.budget_total };
        break;
      case "budget_warning":
        view.budget = { ...(view.budget || {}), tokens_used: ev.tokens_used,
          budget_total: ev.budget_total, warned: true };
        view.pending = { ...(view.pending || {}), tokens_used: ev.tokens_used,
          budget_total: ev.budget_total };
        logLine(view, ev.ts, `budget warning at ${fmt(ev.tokens_used)} of ${fmt(ev.budget_total)} tokens`, "warn");
        // The warning carries no deadline; re-subscribing from here brings budget_pending.
        if (!view.pending.deadline_ts && view.subscribed) subscribe(view);
        break;
      case "budget_exhausted":
        view.budget = { ...(view.budget || {}), tokens_used: ev.tokens_used,
          budget_total: ev.budget_total, exhausted: true };
        logLine(view, ev.ts, `budget exhausted: ${ev.incomplete_agents.length} agent(s) did not complete`, "bad");
        break;
      case "budget_decision":
        view.pending = null; view.answering = null;
        view.decision = { decision: ev.decision, decided_by: ev.decided_by };
        logLine(view, ev.ts, `budget decision: ${ev.decision} (by ${ev.decided_by})`, ev.decision === "stop" ? "bad" : "good");
        break;
      case "synthesis_started":
        logLine(view, ev.ts, "synthesis started", "good");
        break;
      case "provider_failover":
        logLine(view, ev.ts, `provider failover ${ev.from_provider} → ${ev.to_provider}: ${ev.reason}`, "warn");
        break;
      default:
        return;
    }
    const a = aid && view.agents.get(aid);
    if (a && a.parent === null && TERMINAL.has(a.status)) {
      view.outcome = { status: a.status, agent_id: aid };
    }
  }

  function applySnapshot(view, snap) {
    clearViewDom(view);
    view.agents.clear();
    for (const s of snap.agents || []) {
      const a = newAgent(s.agent_id);
      Object.assign(a, { parent: s.parent_id, task: s.task_description || "", depth: s.depth || 0,
        status: s.status || "running", tokens: s.status === "completed" ? s.tokens_used : null,
        duration: s.duration_ms ?? null, summary: s.result_summary || "", error: s.error || "",
        reason: s.reason || "" });
      if (s.depth_limit !== undefined) a.flags.push(`depth limit ${s.depth_limit}`);
      if (s.cycle) a.flags.push("cycle");
      view.agents.set(a.id, a);
      view.dirty.add(a.id);
    }
    view.budget = snap.budget || null;
    view.pending = snap.pending_decision || null;
    view.answering = null;
    view.decision = snap.last_decision || null;
    view.outcome = snap.outcome || null;
    view.cancelling.clear();
    view.log = [];
    for (const a of view.agents.values()) {
      if (a.status === "failed") logLine(view, 0, `${label(view, a.id)} failed: ${a.error}`, "bad");
    }
    if (view.pending) logLine(view, view.pending.opened_ts, "budget warning: waiting for a decision", "warn");
    if (view.decision) {
      logLine(view, 0, `last budget decision: ${view.decision.decision} (by ${view.decision.decided_by})`);
    }
    view.lastSeq = snap.seq || 0;
    view.epoch = snap.epoch ?? null;
    view.awaiting = false;
    view.full = true;
  }

  function requestStatus(view) {
    if (view.outcome) return view.outcome.status;
    if (view.pending) return "paused";
    if (view.budget && view.budget.exhausted) return "exhausted";
    return view.agents.size ? "running" : "waiting";
  }

  // ------------------------------------------------------------------ sockets

  class Channel {
    constructor(name, onFrame, onOpen) {
      Object.assign(this, { name, onFrame, onOpen, ws: null, state: "idle", attempt: 0,
        timer: null, retryAt: 0, stopped: true });
    }
    start() { if (this.stopped) { this.stopped = false; this.connect(); } }
    stop() {
      this.stopped = true;
      clearTimeout(this.timer);
      if (this.ws) { this.ws.onclose = null; this.ws.close(); this.ws = null; }
      this.state = "idle"; this.attempt = 0;
      renderConn();
    }
    connect() {
      this.state = this.attempt ? "reconnecting" : "connecting";
      renderConn();
      const ws = new WebSocket(WS_URL);
      this.ws = ws;
      ws.onopen = () => {
        this.attempt = 0; this.state = "live";
        connChanged();
        this.onOpen();
      };
      ws.onmessage = (msg) => {
        let frame;
        try { frame = JSON.parse(msg.data); } catch { return; }   // not JSON: ignore
        if (!frame || typeof frame !== "object" || typeof frame.type !== "string") return;
        try { this.onFrame(frame); } catch (err) { console.warn("relay: bad frame", frame, err); }
        schedule();
      };
      ws.onclose = () => {
        if (this.ws !== ws || this.stopped) return;
        this.ws = null;
        this.attempt += 1;
        const base = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (this.attempt - 1));
        const delay = base * (1 + (Math.random() * 2 - 1) * JITTER);
        this.state = "reconnecting"; this.retryAt = Date.now() + delay;
        this.timer = setTimeout(() => this.connect(), delay);
        connChanged();
      };
    }
    get live() { return this.state === "live"; }
    send(obj) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
      this.ws.send(JSON.stringify(obj));
      return true;
    }
  }

  const firehose = new Channel("firehose", onFirehoseFrame, loadRecent);

  // Requests that published before this page (or while it was away), e.g. one
  // quietly paused for a budget decision. Live events take over from here.
  async function loadRecent() {
    let body;
    try {
      const resp = await fetch(new URL("api/v1/requests", document.baseURI), { cache: "no-store" });
      if (!resp.ok) return;
      body = await resp.json();
    } catch { return; }
    for (const r of (body && body.requests) || []) {
      if (typeof r.request_id !== "string") continue;
      const fresh = !store.requests.has(r.request_id);
      const s = summary(r.request_id, r.last_ts);
      if (!fresh) continue;
      s.paused = Boolean(r.budget_pending);
      if (r.outcome) s.status = r.outcome.status;
      if (r.budget) s.used = r.budget.tokens_used;
    }
    store.listDirty = true;
    schedule();
  }
  const detail = new Channel("detail", onDetailFrame, () => {
    for (const view of store.views.values()) { view.subscribed = false; subscribe(view); }
  });

  function isEvent(f) {
    return !CONTROL.has(f.type) && typeof f.request_id === "string" && Number.isInteger(f.seq);
  }

  function onFirehoseFrame(f) {
    if (isEvent(f)) applySummary(f);
    else if (f.type === "error" && f.code === "unavailable") store.banner = f.message;
  }

  function subscribe(view) {
    const cmd = { type: "subscribe", request_id: view.id };
    if (view.awaiting) cmd.snapshot = true;
    else { cmd.after_seq = view.lastSeq; if (view.epoch) cmd.epoch = view.epoch; }
    detail.send(cmd);
  }

  function resnapshot(view, why) {
    view.awaiting = true;
    note(view, why);
    subscribe(view);
  }

  function onDetailFrame(f) {
    const view = store.views.get(f.request_id);
    if (isEvent(f)) {
      // Before "subscribed" the socket may still be in firehose mode (no gap filling).
      if (!view || !view.subscribed || view.awaiting || f.seq <= view.lastSeq) return;
      applyEvent(view, f);
      view.lastSeq = f.seq;
      store.listDirty = true;
      if (f.type !== "agent_text_delta") view.full = true;
      return;
    }
    switch (f.type) {
      case "snapshot":
        if (view) { applySnapshot(view, f); store.listDirty = true; }
        break;
      case "subscribed":   // from here on this socket carries the request in seq order
        if (view) view.subscribed = true;
        break;
      case "budget_pending":
        if (view) view.pending = { ...f };
        break;
      case "lagged":
        if (view) note(view, `The connection fell behind: ${f.skipped} event(s) skipped, then recovered from history.`, "lagged");
        break;
      case "resync_required":
        if (view) resnapshot(view, `Stream reset (${f.reason}): reloaded from a snapshot.`);
        break;
      case "ack": case "error":
        onReply(f);
        break;
    }
    if (view) view.full = true;
  }

  function onReply(f) {
    const cmd = store.commands.get(f.command_id);
    store.commands.delete(f.command_id);
    if (f.type === "error" && f.code === "unavailable") store.banner = f.message;
    const view = cmd && store.views.get(cmd.rid);
    if (!view) return;
    if (f.type === "ack") return;
    if (cmd.kind === "cancel") {
      view.cancelling.delete(cmd.target);
      view.dirty.add(cmd.target);
      note(view, `Cancel failed: ${f.message}`);
    } else if (f.code === "no_pending_decision") {
      view.pending = null; view.answering = null;
      note(view, "That budget pause was already answered or timed out.");
    } else {
      view.answering = null;
      note(view, `Budget answer failed: ${f.message}`);
    }
  }

  function command(view, kind, target, frame) {
    const id = store.nextCommand++;
    if (!detail.send({ ...frame, command_id: id })) {
      note(view, "Not connected: the command was not sent.");
      return false;
    }
    store.commands.set(id, { rid: view.id, kind, target });
    return true;
  }

  function note(view, text, kind) {
    view.notes = view.notes.filter((n) => !kind || n.kind !== kind);
    view.notes.push({ text, kind: kind || "", ts: Date.now() });
    view.notes = view.notes.slice(-3);
    view.notesVer += 1;
    view.full = true;
  }

  // ------------------------------------------------------------------ actions

  function openRequest(rid) {
    rid = rid.trim().toLowerCase();
    if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(rid)) return false;
    if (!store.views.has(rid)) {
      const view = newView(rid);
      store.views.set(rid, view);
      if (detail.live) subscribe(view); else detail.start();
      saveHash();
    }
    store.listDirty = true;
    schedule();
    return true;
  }

  function closeRequest(rid) {
    const view = store.views.get(rid);
    if (!view) return;
    detail.send({ type: "unsubscribe", request_id: rid });
    if (view.dom) view.dom.root.remove();
    store.views.delete(rid);
    if (!store.views.size) detail.stop();
    store.listDirty = true;
    saveHash();
    schedule();
  }

  function cancel(view, target) {
    if (command(view, "cancel", target, { type: "cancel_agent", agent_id: target })) {
      view.cancelling.add(target);
      view.dirty.add(target);
      view.full = true;
    }
    schedule();
  }

  function answer(view, decision) {
    if (command(view, "budget", decision, { type: `budget_${decision}`, request_id: view.id })) {
      view.answering = decision;
    }
    view.full = true;
    schedule();
  }

  function saveHash() {
    const ids = [...store.views.keys()];
    history.replaceState(null, "", ids.length ? `#open=${ids.join(",")}` : location.pathname);
  }

  // ------------------------------------------------------------------ render

  let scheduled = false;
  function schedule() {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => { scheduled = false; flush(); });
  }

  function flush() {
    if (store.listDirty) { store.listDirty = false; renderList(); }
    for (const view of store.views.values()) renderView(view);
    $("panels-empty").hidden = store.views.size > 0;
    renderBanner();
  }

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) el.append(c);
    return el;
  }

  const $ = (id) => document.getElementById(id);
  const fmt = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));
  const shortId = (id) => String(id).slice(0, 8);
  const clip = (s, n) => (s.length > n ? `${s.slice(0, n - 1)}…` : s);

  function ago(ts) {
    if (!ts) return "";
    const s = Math.max(0, Math.round((Date.now() - ts) / 1000));
    if (s < 60) return `${s}s ago`;
    if (s < 3600) return `${Math.floor(s / 60)}m ago`;
    return `${Math.floor(s / 3600)}h ago`;
  }

  function connChanged() {
    for (const view of store.views.values()) view.full = true;
    renderConn();
    schedule();
  }

  function renderConn() {
    const chans = detail.stopped ? [firehose] : [firehose, detail];
    const down = chans.find((c) => c.state === "reconnecting");
    const el = $("conn-status");
    let state = "live";
    let text = "live";
    if (down) {
      state = "reconnecting";
      const wait = Math.max(0, Math.ceil((down.retryAt - Date.now()) / 1000));
      text = `reconnecting · attempt ${down.attempt}${down.ws ? "" : ` · in ${wait}s`}`;
    } else if (chans.some((c) => c.state !== "live")) {
      state = text = "connecting";
    }
    el.dataset.state = state;
    el.querySelector(".conn-text").textContent = text;
  }

  function renderBanner() {
    const el = $("banner");
    el.hidden = !store.banner;
    el.textContent = store.banner ? `Gateway: ${store.banner}` : "";
  }

  function requestItem(s) {
    const dom = { badge: h("span", { "data-testid": `request-status-${s.id}` }),
      meta: h("span", { class: "req-counts" }), ago: h("span", { class: "ago" }) };
    dom.button = h("button", { class: "req", "data-testid": `request-${s.id}`,
      // Opens (or brings into view) the request; its panel's Close button closes it.
      onclick: () => {
        openRequest(s.id);
        const panel = document.querySelector(`[data-testid="panel-${s.id}"]`);
        if (panel) panel.scrollIntoView({ block: "nearest" });
      } },
    h("span", { class: "req-top" }, h("span", { class: "mono req-id", text: s.id, title: s.id }), dom.badge),
    h("span", { class: "req-meta" }, dom.meta, dom.ago));
    dom.li = h("li", {}, dom.button);
    return dom;
  }

  function renderList() {
    const list = $("request-list");
    const items = [...store.requests.values()].sort((a, b) => (b.firstTs || 0) - (a.firstTs || 0));
    for (const el of [...list.children]) {
      if (!store.requests.has(el.dataset.rid)) el.remove();
    }
    items.forEach((s, i) => {
      if (!s.dom) { s.dom = requestItem(s); s.dom.li.dataset.rid = s.id; }
      const d = s.dom;
      const open = store.views.has(s.id);
      d.button.className = `req${open ? " open" : ""}`;
      d.button.setAttribute("aria-pressed", String(open));
      d.button.title = open ? "Close this request" : "Open this request";
      // An open request knows better (its snapshot saw the events before this page).
      const view = store.views.get(s.id);
      const known = view && !view.awaiting;
      const n = known ? view.agents.size : s.agents.size;
      const running = known ? [...view.agents.values()].filter((a) => !TERMINAL.has(a.status)).length
        : s.running.size;
      const status = known ? requestStatus(view)
        : s.paused && !TERMINAL.has(s.status) ? "paused" : s.status;
      const used = known && view.budget ? view.budget.tokens_used : s.used;
      d.badge.className = `badge badge-${status}`;
      d.badge.textContent = status;
      const parts = n || known ? [`${n} agent${n === 1 ? "" : "s"}`, `${running} running`] : [];
      if (used !== null && used !== undefined) parts.push(`${fmt(used)} tok`);
      d.meta.textContent = parts.join(" · ");
      d.ago.dataset.ts = s.lastTs || "";
      d.ago.textContent = ago(s.lastTs);
      if (list.children[i] !== d.li) list.insertBefore(d.li, list.children[i] || null);
    });
    $("request-count").textContent = String(store.requests.size);
    $("list-empty").hidden = store.requests.size > 0;
  }

  function panelDom(view) {
    const rid = view.id;
    const dom = {};
    dom.status = h("span", { class: "badge" });
    dom.cancel = h("button", { class: "btn danger", "data-testid": `cancel-${rid}`,
      onclick: () => cancel(view, rid), "aria-label": `Cancel request ${rid}` }, "Cancel request");
    dom.counts = h("span", { class: "counts" });
    dom.budgetText = h("span", { class: "budget-text", "data-testid": `budget-text-${rid}` });
    dom.budgetFill = h("div", { class: "budget-fill" });
    dom.budgetBar = h("div", { class: "budget-bar", role: "progressbar", "aria-label": "Tokens used",
      "aria-valuemin": "0", "data-testid": `budget-bar-${rid}` }, dom.budgetFill);
    dom.decision = h("span", { class: "decision", "data-testid": `decision-${rid}` });
    dom.prompt = h("div", { class: "prompt-slot" });
    dom.notes = h("div", { class: "notes", "data-testid": `notes-${rid}` });
    dom.tree = h("ul", { class: "tree", "aria-label": "Agent tree", "data-testid": `tree-${rid}` });
    dom.empty = h("p", { class: "hint", text: "Loading snapshot…" });
    dom.log = h("ol", { class: "log", "aria-label": "Activity" });
    dom.root = h("section", { class: "panel", "data-testid": `panel-${rid}`,
      "aria-label": `Request ${rid}` },
      h("header", { class: "panel-head" },
        h("div", { class: "panel-title" }, h("h2", { class: "mono", text: rid }), dom.status),
        h("div", { class: "panel-actions" }, dom.cancel,
          h("button", { class: "btn ghost", onclick: () => closeRequest(rid),
            "aria-label": `Close request ${rid}`, "data-testid": `close-${rid}` }, "Close"))),
      h("div", { class: "budget" },
        h("div", { class: "budget-row" }, dom.budgetText, dom.decision), dom.budgetBar),
      dom.prompt, dom.notes,
      h("div", { class: "panel-body" },
        h("div", { class: "tree-wrap" }, h("div", { class: "section-head" },
          h("h3", { text: "Agents" }), dom.counts), dom.empty, dom.tree),
        h("div", { class: "log-wrap" }, h("h3", { text: "Activity" }), dom.log)));
    $("panels").append(dom.root);
    return dom;
  }

  function clearViewDom(view) {
    for (const a of view.agents.values()) a.dom = null;
    if (view.dom) view.dom.tree.replaceChildren();
  }

  function renderView(view) {
    if (!view.dom) view.dom = panelDom(view);
    for (const id of view.dirty) {
      const a = view.agents.get(id);
      try { if (a) renderAgent(view, a); } catch (err) { console.warn("relay: agent", id, err); }
    }
    view.dirty.clear();
    if (!view.full) return;
    view.full = false;
    const d = view.dom;
    const status = requestStatus(view);
    d.status.className = `badge badge-${status}`;
    d.status.textContent = status;
    d.status.dataset.testid = `panel-status-${view.id}`;
    d.cancel.hidden = TERMINAL.has(status) || view.awaiting;
    d.cancel.disabled = view.cancelling.has(view.id);
    d.cancel.textContent = view.cancelling.has(view.id) ? "Cancelling…" : "Cancel request";
    const counts = { running: 0, completed: 0, failed: 0, cancelled: 0 };
    for (const a of view.agents.values()) {
      const k = a.status === "retrying" ? "running" : a.status;
      counts[k] = (counts[k] || 0) + 1;
    }
    d.counts.textContent = `${view.agents.size} total · ${Object.entries(counts)
      .filter(([, n]) => n).map(([k, n]) => `${n} ${k}`).join(" · ")}`;
    d.empty.hidden = view.agents.size > 0;
    d.empty.textContent = view.awaiting ? "Loading snapshot…" : "No agents yet.";
    renderBudget(view);
    renderPrompt(view);
    if (view.shown.notes !== view.notesVer) {
      view.shown.notes = view.notesVer;
      d.notes.replaceChildren(...view.notes.map((n) =>
        h("p", { class: "note", "data-testid": n.kind ? `note-${n.kind}` : null, text: n.text })));
    }
    if (view.shown.log !== view.logVer) {
      view.shown.log = view.logVer;
      d.log.replaceChildren(...view.log.map((l) => h("li", { class: l.tone },
        h("time", { text: l.ts ? new Date(l.ts).toLocaleTimeString([], { hour12: false }) : "earlier" }),
        h("span", { text: l.text }))));
    }
  }

  function renderBudget(view) {
    const d = view.dom;
    const b = view.budget;
    const used = b ? b.tokens_used : 0;
    const total = b ? b.budget_total : 0;
    const pct = total ? (100 * used) / total : 0;
    const tone = b && (b.exhausted || pct >= 100) ? "bad" : b && (b.warned || pct >= WARN_PCT) ? "warn" : "ok";
    d.budgetText.textContent = b
      ? `${fmt(used)} / ${fmt(total)} tokens · ${pct.toFixed(1)}%${b.exhausted ? " · exhausted" : ""}`
      : "No budget reported yet";
    d.budgetBar.className = `budget-bar ${tone}`;
    d.budgetBar.dataset.tone = tone;
    d.budgetBar.setAttribute("aria-valuemax", String(total || 0));
    d.budgetBar.setAttribute("aria-valuenow", String(used || 0));
    d.budgetFill.style.width = `${Math.min(100, pct)}%`;
    const dec = view.decision;
    d.decision.textContent = dec ? `last pause: ${dec.decision} (${dec.decided_by})` : "";
    d.decision.dataset.decidedBy = dec ? dec.decided_by : "";
  }

  function promptDom(view) {
    const dom = { used: h("span", {}), deadline: h("span", { class: "deadline" }),
      sent: h("span", { class: "hint" }) };
    dom.go = h("button", { class: "btn primary", "data-testid": "budget-continue",
      onclick: () => answer(view, "continue") }, "Continue");
    dom.stop = h("button", { class: "btn danger", "data-testid": "budget-stop",
      onclick: () => answer(view, "stop") }, "Stop");
    dom.root = h("div", { class: "prompt", role: "group", "data-testid": "budget-prompt",
      "aria-label": "Budget decision" },
    h("div", { class: "prompt-text" },
      h("strong", { text: "Budget warning — the request is paused." }), dom.used, dom.deadline),
    h("div", { class: "prompt-actions" }, dom.sent, dom.go, dom.stop));
    return dom;
  }

  function renderPrompt(view) {
    const slot = view.dom.prompt;
    const p = view.pending;
    if (!p) { slot.replaceChildren(); view.dom.ask = null; return; }
    const d = view.dom.ask || (view.dom.ask = promptDom(view));
    if (d.root.parentNode !== slot) slot.replaceChildren(d.root);
    d.used.textContent = ` ${fmt(p.tokens_used)} of ${fmt(p.budget_total)} tokens used. Continue?`;
    d.deadline.dataset.deadline = p.deadline_ts || "";
    d.deadline.dataset.default = p.timeout_decision || "";
    d.deadline.textContent = p.deadline_ts ? countdown(p.deadline_ts, p.timeout_decision) : "";
    d.sent.textContent = view.answering ? `Sent “${view.answering}”…` : "";
    d.go.disabled = d.stop.disabled = Boolean(view.answering) || !detail.live;
  }

  function countdown(deadline, dflt) {
    const s = Math.max(0, Math.round((deadline - Date.now()) / 1000));
    const mmss = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
    return ` Default “${dflt || "stop"}” in ${mmss}.`;
  }

  function agentDom(view, a) {
    const id = a.id;
    const dom = {};
    dom.badge = h("span", { class: "badge", "data-testid": `agent-status-${id}` });
    dom.task = h("span", { class: "task" });
    dom.flags = h("span", { class: "flags" });
    dom.tokens = h("span", { class: "tokens", "data-testid": `agent-tokens-${id}` });
    dom.cancel = h("button", { class: "btn small danger", "data-testid": `cancel-${id}`,
      onclick: () => cancel(view, id) }, "Cancel");
    dom.detail = h("p", { class: "detail" });
    dom.text = h("pre", { class: "stream", "data-testid": `agent-text-${id}` });
    dom.toggle = h("button", { class: "btn link", "aria-expanded": "false",
      onclick: () => { a.expanded = !a.expanded; view.dirty.add(id); schedule(); } });
    dom.children = h("ul", { class: "children" });
    dom.li = h("li", { class: "agent", "data-testid": `agent-${id}`, "data-agent-id": id },
      h("div", { class: "agent-row" }, dom.badge, dom.task, dom.flags,
        h("span", { class: "mono aid", title: id, text: shortId(id) }), dom.tokens, dom.toggle,
        dom.cancel),
      dom.detail, dom.text, dom.children);
    return dom;
  }

  function renderAgent(view, a) {
    if (!a.dom) a.dom = agentDom(view, a);
    const d = a.dom;
    const parent = a.parent && view.agents.get(a.parent);
    if (parent && !parent.dom) renderAgent(view, parent);
    const container = parent ? parent.dom.children : view.dom.tree;
    if (d.li.parentNode !== container) container.append(d.li);
    d.li.dataset.status = a.status;
    d.badge.className = `badge badge-${a.status}`;
    d.badge.textContent = a.status;
    d.task.textContent = a.task || "(agent)";
    d.task.title = a.task;
    d.flags.replaceChildren(...a.flags.slice(-3).map((f) => h("span", { class: "tag warn", text: f })));
    const bits = [];
    if (a.tokens !== null) bits.push(`${fmt(a.tokens)} tok`);
    if (a.duration !== null) bits.push(`${(a.duration / 1000).toFixed(1)}s`);
    d.tokens.textContent = bits.join(" · ");
    const cancelling = view.cancelling.has(a.id);
    d.cancel.hidden = !(a.status === "running" || a.status === "retrying");
    d.cancel.disabled = cancelling;
    d.cancel.textContent = cancelling ? "Cancelling…" : "Cancel";
    d.cancel.setAttribute("aria-label", `Cancel agent ${a.task || a.id}`);
    const detailText = a.status === "completed" ? a.summary
      : a.status === "cancelled" ? a.reason : a.error;
    d.detail.textContent = detailText || "";
    d.detail.className = `detail ${a.status}`;
    d.detail.hidden = !detailText;
    if (d.text.textContent !== a.text) {
      const stick = d.text.scrollTop + d.text.clientHeight >= d.text.scrollHeight - 4;
      d.text.textContent = a.text;
      if (stick) d.text.scrollTop = d.text.scrollHeight;
    }
    const live = !TERMINAL.has(a.status);   // a finished agent's output folds away
    d.text.hidden = !a.text || (!live && !a.expanded);
    d.toggle.hidden = !a.text || live;
    d.toggle.textContent = a.expanded ? "hide output" : "output";
    d.toggle.setAttribute("aria-expanded", String(Boolean(a.expanded)));
  }

  // Relative times and the decision countdown tick once a second.
  function tick() {
    for (const el of document.querySelectorAll(".ago[data-ts]")) el.textContent = ago(Number(el.dataset.ts));
    for (const el of document.querySelectorAll(".deadline[data-deadline]")) {
      if (el.dataset.deadline) el.textContent = countdown(Number(el.dataset.deadline), el.dataset.default);
    }
    renderConn();
  }

  // ------------------------------------------------------------------ boot

  function boot() {
    $("open-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const input = $("open-input");
      if (openRequest(input.value)) input.value = "";
      else input.setAttribute("aria-invalid", "true");
    });
    $("open-input").addEventListener("input", (e) => e.target.removeAttribute("aria-invalid"));
    const m = /open=([^&]*)/.exec(location.hash);
    if (m) for (const rid of decodeURIComponent(m[1]).split(",")) openRequest(rid);
    firehose.start();
    setInterval(tick, 1000);
    schedule();
    window.relayConsole = { store, firehose, detail };   // for debugging and tests
  }

  boot();
})();
