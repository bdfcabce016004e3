// The console's two sockets and what is said on them.
//
// * The "firehose" socket never subscribes, so it receives every event of every
//   request: it feeds the request list on the left.
// * The "detail" socket subscribes to each opened request with snapshot:true,
//   renders from the snapshot plus the live events after it, and on reconnect
//   resumes each request with after_seq (the last seq rendered) and epoch.
// Commands (cancel, budget answers) go out on the detail socket; their ack or
// error comes back with the same command_id.

import { Channel } from "./channel.js";
import { connChanged, renderConn, schedule } from "./render.js";
import { applyEvent, applySnapshot, applySummary, note, store, summary } from "./store.js";

const CONTROL = new Set(["subscribed", "unsubscribed", "snapshot", "budget_pending", "lagged",
  "resync_required", "ack", "error", "pong", "workflow_subscribed", "workflow_unsubscribed"]);

const link = {
  onStatus: () => renderConn(),
  onLinkChange: () => connChanged(),
  afterFrame: () => schedule(),
};

export const firehose = new Channel("firehose",
  { ...link, onFrame: onFirehoseFrame, onOpen: loadRecent });

export const detail = new Channel("detail", { ...link, onFrame: onDetailFrame, onOpen: () => {
  for (const view of store.views.values()) { view.subscribed = false; subscribe(view); }
} });

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

function isEvent(f) {
  return !CONTROL.has(f.type) && typeof f.request_id === "string" && Number.isInteger(f.seq);
}

function onFirehoseFrame(f) {
  if (isEvent(f)) applySummary(f);
  else if (f.type === "error" && f.code === "unavailable") store.banner = f.message;
}

// Subscribe an open request: from a snapshot, or resumed after the last seq seen.
export function subscribe(view) {
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

// Send a command on the detail socket; false (and a note) when not connected.
export function command(view, kind, target, frame) {
  const id = store.nextCommand++;
  if (!detail.send({ ...frame, command_id: id })) {
    note(view, "Not connected: the command was not sent.");
    return false;
  }
  store.commands.set(id, { rid: view.id, kind, target });
  return true;
}
