// The console's state and the reducers that apply frames to it.
//
// * store.requests: one summary per recent request (left list), from the
//   gateway's request listing, read every few seconds (session.js).
// * store.views: the opened requests, each rebuilt from a snapshot and then
//   kept current by the live events after it (applySnapshot, applyEvent).
// No sockets and no DOM here: what the reducers need done elsewhere goes
// through `effects`, which main.js wires up.

import { clip, fmt, shortId } from "./format.js";

const TEXT_KEEP = 2048;          // streamed text kept per agent (characters)
const MAX_REQUESTS = 200;        // request list entries kept
const MAX_LOG = 40;              // activity lines kept per open request
export const TERMINAL = new Set(["completed", "failed", "cancelled"]);

export const store = {
  requests: new Map(),   // request id -> summary from the request listing
  views: new Map(),      // request id -> open request (snapshot + live events)
  commands: new Map(),   // command_id -> {rid, kind, target}
  nextCommand: 1,
  listDirty: true,
  banner: null,
};

export const effects = {
  newRequest: (rid) => {},      // the first time this page learns of a request
  needPending: (view) => {},    // a budget warning without a deadline: ask for budget_pending
  resetDom: (view) => {},       // a snapshot is about to replace the view's agents
};

export function summary(rid, ts) {
  let s = store.requests.get(rid);
  if (!s) {
    s = { id: rid, firstTs: ts, lastTs: ts, agents: 0, running: 0,
      status: "running", used: null, paused: false };
    store.requests.set(rid, s);
    trimRequests();
    effects.newRequest(rid);
  }
  if (ts) s.lastTs = Math.max(s.lastTs || 0, ts);
  return s;
}

function trimRequests() {
  for (const rid of store.requests.keys()) {
    if (store.requests.size <= MAX_REQUESTS) break;
    if (!store.views.has(rid)) store.requests.delete(rid);
  }
}

export function newView(rid) {
  return { id: rid, epoch: null, lastSeq: 0, awaiting: true, subscribed: false, agents: new Map(),
    budget: null, pending: null, answering: null, decision: null,
    outcome: null, log: [], notes: [], cancelling: new Set(),
    dom: null, dirty: new Set(), full: true, logVer: 0, notesVer: 0, shown: {} };
}

function newAgent(id) {
  return { id, parent: null, task: "", depth: 0, status: "running", tokens: null,
    duration: null, summary: "", error: "", reason: "", text: "", flags: [], dom: null };
}

// Apply one entry of the request listing to the request-list summary.
export function applyListing(r) {
  const s = summary(r.request_id, r.last_ts);
  s.paused = Boolean(r.budget_pending);
  s.status = r.outcome && TERMINAL.has(r.outcome.status) ? r.outcome.status : "running";
  s.used = r.budget && Number.isFinite(r.budget.tokens_used) ? r.budget.tokens_used : null;
  if (Number.isInteger(r.agents)) s.agents = r.agents;
  if (Number.isInteger(r.running)) s.running = r.running;
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
export function applyEvent(view, ev) {
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
      if (!view.pending.deadline_ts && view.subscribed) effects.needPending(view);
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

// Replace an open request's state with a snapshot frame.
export function applySnapshot(view, snap) {
  effects.resetDom(view);
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
  // Each agent's text so far (its latest bytes when long), complete up to
  // text_seq: the live deltas after it continue it, so a late joiner shows
  // the text at once instead of replaying every delta. A gateway without
  // texts sends none; the text then starts with the next delta, as before.
  const texts = snap.texts && typeof snap.texts === "object" ? snap.texts : {};
  for (const [id, t] of Object.entries(texts)) {
    if (!t || typeof t.text !== "string") continue;
    agentOf(view, id).text = t.text.slice(-TEXT_KEEP);
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

// A short notice on an open request (at most three; a kind replaces its predecessor).
export function note(view, text, kind) {
  view.notes = view.notes.filter((n) => !kind || n.kind !== kind);
  view.notes.push({ text, kind: kind || "", ts: Date.now() });
  view.notes = view.notes.slice(-3);
  view.notesVer += 1;
  view.full = true;
}

export function requestStatus(view) {
  if (view.outcome) return view.outcome.status;
  if (view.pending) return "paused";
  if (view.budget && view.budget.exhausted) return "exhausted";
  return view.agents.size ? "running" : "waiting";
}
