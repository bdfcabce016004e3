// The console's bearer token: where it comes from, where it is kept, and
// what the page says when the gateway refuses it.
//
// * `relay token` prints a console URL carrying the token in the fragment
//   (#token=...), which browsers never send to a server or write to a log;
//   it is moved into sessionStorage (this tab only, gone when it closes) and
//   removed from the address bar at once.
// * The token goes out as `Authorization: Bearer` on REST calls and as a
//   `relay.bearer.<token>` WebSocket subprotocol next to `relay.v1` (the
//   gateway echoes relay.v1 and never the token). Never in a cookie.
// * A 401 from the listing, or a socket closed with 1008 (refused) or 4001
//   (expired), shows the token form with the gateway's reason.

const KEY = "relay.token";
const onToken = new Set();     // sockets and the listing: try again with the new token
const onProblem = new Set();   // the page: show or hide the token form

export const auth = { problem: null };   // null, or what to tell the user

function takeFromUrl() {
  let taken = false;
  const parts = location.hash.replace(/^#/, "").split("&").filter(Boolean);
  const rest = [];
  for (const part of parts) {
    if (part.startsWith("token=")) {
      const value = decodeURIComponent(part.slice(6));
      if (value) { sessionStorage.setItem(KEY, value); taken = true; }
    } else rest.push(part);
  }
  if (rest.length !== parts.length) {
    history.replaceState(null, "", rest.length ? `#${rest.join("&")}` : location.pathname);
  }
  return taken;
}
takeFromUrl();
// A console URL pasted into a tab that already shows the console.
window.addEventListener("hashchange", () => {
  if (takeFromUrl()) setToken(token());
});

export function token() { return sessionStorage.getItem(KEY); }

export function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

// Subprotocols for new WebSocket(url, protocols): relay.v1 always, so the
// gateway can echo one (a browser refuses a handshake that selects none).
export function wsProtocols() {
  const t = token();
  return t ? ["relay.v1", `relay.bearer.${t}`] : ["relay.v1"];
}

// The gateway said no: remember why and let the page ask for a token.
export function refused(message) {
  auth.problem = message;
  for (const fn of onProblem) fn();
}

export function setToken(value) {
  const t = value.trim().replace(/^Bearer\s+/i, "");
  if (!t) return false;
  sessionStorage.setItem(KEY, t);
  auth.problem = null;
  for (const fn of onProblem) fn();
  for (const fn of onToken) fn();
  return true;
}

// fn() after a new token was entered (not when one is refused).
export function onTokenChange(fn) { onToken.add(fn); }
// fn() whenever auth.problem changes.
export function onAuthProblem(fn) { onProblem.add(fn); }
