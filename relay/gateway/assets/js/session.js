// What the console reads from the gateway, and what it says on its socket.
//
// * The request list on the left comes from GET api/v1/requests, polled.
// * The "detail" socket subscribes to each opened request with snapshot:true,
//   renders from the snapshot plus the live events after it, and on reconnect
//   resumes each request with after_seq (the last seq rendered) and epoch.
// Commands (cancel, budget answers) go out on the detail socket; their ack or
// error comes back with the same command_id.

import { Channel } from "./channel.js";
import { Listing } from "./listing.js";
import { connChanged, renderConn, schedule } from "./render.js";
import { applyEvent, applyListing, applySnapshot, note, store } from "./store.js";

const CONTROL = new Set(["subscribed", "unsubscribed", "snapshot", "budget_pending", "lagged",
  "resync_required", "ack", "error", "pong", "workflow_subscribed", "workflow_unsubscribed"]);

const link = {
  onStatus: () => renderConn(),
  onLinkChange: () => connChanged(),
  afterFrame: () => schedule(),
};

// The request list is read from the gateway's listing every few seconds: a
// console watching one request then costs the gateway that request's traffic
// only, instead of every event of the tenant on a socket of its own.
export const listing = new Listing(onListing, link);

export const detail = new Channel("detail", { ...link, onFrame: onDetailFrame, onOpen: () => {
  for (const view of store.views.values()) { view.subscribed = false; subscribe(view); }
} });

function onListing(body) {
  for (const r of (body && body.requests) || []) {
    if (typeof r.request_id === "string") applyListing(r);
  }
  schedule();
}

function isEvent(f) {
  return !CONTROL.has(f.type) && typeof f.request_id === "string" && Number.isInteger(f.seq);
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
