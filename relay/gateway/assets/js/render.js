// Rendering: the DOM helper, the request list, one panel per open request
// (budget, decision prompt, notes, agent tree, activity log), the connection
// indicator and the banner. Rendering is batched: anything that changes state
// calls schedule(), and flush() redraws what is dirty once per animation frame.
// The buttons' actions and the two channels come from main.js via bindRender().

import { ago, countdown, fmt, shortId } from "./format.js";
import { TERMINAL, requestStatus, store } from "./store.js";

const WARN_PCT = 80;             // fallback warning level when no warning was seen

// {listing, detail, openRequest, closeRequest, cancel, answer}
let app = null;
export function bindRender(deps) { app = deps; }

let scheduled = false;
export function schedule() {
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

export const $ = (id) => document.getElementById(id);

// A socket came up or went down: every panel redraws (e.g. the prompt's buttons).
export function connChanged() {
  for (const view of store.views.values()) view.full = true;
  renderConn();
  schedule();
}

export function renderConn() {
  const chans = app.detail.stopped ? [app.listing] : [app.listing, app.detail];
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
      app.openRequest(s.id);
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
    const n = known ? view.agents.size : s.agents;
    const running = known ? [...view.agents.values()].filter((a) => !TERMINAL.has(a.status)).length
      : s.running;
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
    onclick: () => app.cancel(view, rid), "aria-label": `Cancel request ${rid}` }, "Cancel request");
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
        h("button", { class: "btn ghost", onclick: () => app.closeRequest(rid),
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

export function clearViewDom(view) {
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
    onclick: () => app.answer(view, "continue") }, "Continue");
  dom.stop = h("button", { class: "btn danger", "data-testid": "budget-stop",
    onclick: () => app.answer(view, "stop") }, "Stop");
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
  d.go.disabled = d.stop.disabled = Boolean(view.answering) || !app.detail.live;
}

function agentDom(view, a) {
  const id = a.id;
  const dom = {};
  dom.badge = h("span", { class: "badge", "data-testid": `agent-status-${id}` });
  dom.task = h("span", { class: "task" });
  dom.flags = h("span", { class: "flags" });
  dom.tokens = h("span", { class: "tokens", "data-testid": `agent-tokens-${id}` });
  dom.cancel = h("button", { class: "btn small danger", "data-testid": `cancel-${id}`,
    onclick: () => app.cancel(view, id) }, "Cancel");
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
export function tick() {
  for (const el of document.querySelectorAll(".ago[data-ts]")) el.textContent = ago(Number(el.dataset.ts));
  for (const el of document.querySelectorAll(".deadline[data-deadline]")) {
    if (el.dataset.deadline) el.textContent = countdown(Number(el.dataset.deadline), el.dataset.default);
  }
  renderConn();
}
