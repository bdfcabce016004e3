// One WebSocket to the gateway's /ws/events that reconnects on its own:
// exponential backoff with jitter, and a state ("idle", "connecting", "live",
// "reconnecting") the connection indicator shows. What is said on the socket
// (subscribe, resume with after_seq/epoch) is up to the owner: see session.js.

import { onTokenChange, refused, token, wsProtocols } from "./auth.js";

const BACKOFF_BASE_MS = 1000;
const CLOSE_POLICY = 1008;          // missing or refused token
const CLOSE_TOKEN_EXPIRED = 4001;   // the token expired while connected
const BACKOFF_MAX_MS = 30000;
const JITTER = 0.3;

// Relative to the page, so the console also works behind a path prefix.
// stream=none: the socket carries nothing until it subscribes (never every
// event of the tenant), so the gateway holds only the requests it opens.
export const WS_URL = (() => {
  const url = new URL("ws/events?stream=none", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
})();

// hooks: onFrame(frame) for each JSON frame with a string "type"; onOpen() once
// connected; afterFrame() after each frame; onStatus() when the state shows
// differently; onLinkChange() when the socket comes up or goes down.
export class Channel {
  constructor(name, hooks) {
    Object.assign(this, { name, hooks, ws: null, state: "idle", attempt: 0,
      timer: null, retryAt: 0, stopped: true, waiting: false });
    onTokenChange(() => {
      if (this.waiting && !this.stopped) { this.waiting = false; this.attempt = 0; this.connect(); }
    });
  }
  start() { if (this.stopped) { this.stopped = false; this.connect(); } }
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) { this.ws.onclose = null; this.ws.close(); this.ws = null; }
    this.state = "idle"; this.attempt = 0;
    this.hooks.onStatus();
  }
  connect() {
    this.state = this.attempt ? "reconnecting" : "connecting";
    this.hooks.onStatus();
    const ws = new WebSocket(WS_URL, wsProtocols());
    const sent = token();
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0; this.state = "live";
      this.hooks.onLinkChange();
      this.hooks.onOpen();
    };
    ws.onmessage = (msg) => {
      let frame;
      try { frame = JSON.parse(msg.data); } catch { return; }   // not JSON: ignore
      if (!frame || typeof frame !== "object" || typeof frame.type !== "string") return;
      try { this.hooks.onFrame(frame); } catch (err) { console.warn("relay: bad frame", frame, err); }
      this.hooks.afterFrame();
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws || this.stopped) return;
      this.ws = null;
      const authClose = ev.code === CLOSE_POLICY || ev.code === CLOSE_TOKEN_EXPIRED;
      if (authClose && token() !== sent) { this.attempt = 0; this.connect(); return; }
      if (authClose) {
        // Reconnecting with the same token would be refused again: wait for a new one.
        this.state = "reconnecting"; this.waiting = true;
        this.hooks.onLinkChange();
        refused(ev.code === CLOSE_TOKEN_EXPIRED
          ? "Your token expired. Paste a new one (relay token ...)."
          : `The gateway refused the connection: ${ev.reason || "policy violation"}.`);
        return;
      }
      this.attempt += 1;
      const base = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (this.attempt - 1));
      const delay = base * (1 + (Math.random() * 2 - 1) * JITTER);
      this.state = "reconnecting"; this.retryAt = Date.now() + delay;
      this.timer = setTimeout(() => this.connect(), delay);
      this.hooks.onLinkChange();
    };
  }
  get live() { return this.state === "live"; }
  send(obj) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }
}
