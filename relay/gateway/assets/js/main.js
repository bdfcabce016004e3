// relay live console: boot and wiring. Loaded by index.html as a module; the
// other modules are store.js (state and reducers), session.js (the request
// listing and the detail socket, over listing.js and channel.js), render.js (the DOM) and format.js.
// The user's actions (open, close, cancel, answer a budget pause) live here.

import { auth, onAuthProblem, setToken } from "./auth.js";
import { $, bindRender, clearViewDom, schedule, tick } from "./render.js";
import { command, detail, listing, subscribe } from "./session.js";
import { effects, newView, store } from "./store.js";

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

// A newcomer should see a tree at once: open the first request this page
// learns of, once, unless the URL already says which requests to show.
let autoOpenDone = /open=/.test(location.hash);
function autoOpen(rid) {
  if (autoOpenDone) return;
  autoOpenDone = true;
  setTimeout(() => { if (store.views.size === 0) openRequest(rid); }, 0);
}

// ------------------------------------------------------------------ boot

function boot() {
  Object.assign(effects, { newRequest: autoOpen, needPending: subscribe, resetDom: clearViewDom });
  bindRender({ listing, detail, openRequest, closeRequest, cancel, answer });
  $("open-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("open-input");
    if (openRequest(input.value)) input.value = "";
    else input.setAttribute("aria-invalid", "true");
  });
  $("open-input").addEventListener("input", (e) => e.target.removeAttribute("aria-invalid"));
  // The token form shows whenever the gateway refused or asked for a token.
  const showAuth = () => {
    $("auth-form").hidden = !auth.problem;
    $("auth-message").textContent = auth.problem || "";
  };
  onAuthProblem(showAuth);
  $("auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (setToken($("auth-input").value)) $("auth-input").value = "";
  });
  const m = /open=([^&]*)/.exec(location.hash);
  if (m) for (const rid of decodeURIComponent(m[1]).split(",")) openRequest(rid);
  listing.start();
  setInterval(tick, 1000);
  schedule();
  window.relayConsole = { store, listing, detail, auth };   // for debugging and tests
}

boot();
