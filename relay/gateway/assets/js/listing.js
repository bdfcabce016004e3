// The request listing, read every few seconds from the gateway's REST API.
// A 401 or 403 shows the token form (auth.js) and pauses polling until a
// token is entered.
// It looks like a Channel to the connection indicator: a state ("idle",
// "connecting", "live", "reconnecting"), the attempt and when the next one is.

import { authHeaders, onTokenChange, refused, token } from "./auth.js";

const POLL_MS = 2000;
const BACKOFF_MAX_MS = 30000;

export const LIST_URL = new URL("api/v1/requests?agents=1", document.baseURI).toString();

export class Listing {
  // onBody(json) for each listing; hooks.onStatus() / onLinkChange() as for a Channel.
  constructor(onBody, hooks) {
    Object.assign(this, { onBody, hooks, state: "idle", attempt: 0, timer: null,
      retryAt: 0, stopped: true, ws: null, waiting: false });
    onTokenChange(() => {
      if (this.waiting && !this.stopped) { this.waiting = false; this.poll(); }
    });
  }
  start() { if (this.stopped) { this.stopped = false; this.poll(); } }
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.state = "idle"; this.attempt = 0;
    this.hooks.onStatus();
  }
  get live() { return this.state === "live"; }
  async poll() {
    if (this.stopped) return;
    if (this.state === "idle") { this.state = "connecting"; this.hooks.onStatus(); }
    let body = null;
    let denied = null;
    const sent = token();
    try {
      const resp = await fetch(LIST_URL, { cache: "no-store", headers: authHeaders() });
      if (resp.ok) body = await resp.json();
      else if (resp.status === 401 || resp.status === 403) {
        const reply = await resp.json().catch(() => ({}));
        denied = resp.status === 401
          ? `The gateway needs a token: ${reply.message || "unauthorized"}.`
          : `The token was refused: ${reply.message || "forbidden"}.`;
      }
    } catch { body = null; }
    if (this.stopped) return;
    if (denied && token() !== sent) denied = null;   // a new token came meanwhile: retry now
    if (denied) {
      // No point retrying with the same token: wait for a new one.
      this.state = "reconnecting"; this.hooks.onLinkChange();
      this.waiting = true;
      refused(denied);
      return;
    }
    const was = this.state;
    let delay = POLL_MS;
    if (body) {
      this.attempt = 0; this.state = "live";
      try { this.onBody(body); } catch (err) { console.warn("relay: bad listing", err); }
    } else {
      this.attempt += 1; this.state = "reconnecting";
      delay = Math.min(BACKOFF_MAX_MS, POLL_MS * 2 ** (this.attempt - 1));
      this.retryAt = Date.now() + delay;
    }
    if (was !== this.state) this.hooks.onLinkChange();
    this.timer = setTimeout(() => this.poll(), delay);
  }
}
