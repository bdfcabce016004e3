// Load client of benchmarks/fanout: many WebSocket (or SSE) connections in one Node process.
//
//   node client.js <url> <count> [--no-deflate] [--sse] [--expect N]
//
// Opens <count> connections to <url>, sends {"type":"ping"} on each (relay
// answers "pong"; the peers send "pong" once the socket is subscribed) and
// prints {"ready": n, "failed": f} once every connection has its pong. Then it
// reads JSON commands, one a line, on stdin:
//
//   {"cmd": "expect", "total": N, "step": S, "latency": true}
//       count events anew; print {"reached": k*S} when every connection has
//       k*S events, and {"done": ...} with the latencies at N;
//   {"cmd": "close"}   close everything and exit.
//
// An event is a frame that starts with {"type":"agent_text_delta"; its text
// starts with the publisher's wall clock (seconds, 6 decimals), so the latency
// from the publish call to the receipt here is measured on one machine's clock.
// With --expect N the client times a resume instead: from the first connect to
// the N-th event on the (single) connection, then prints {"resumed": ...}.
"use strict";

const WebSocket = require("ws");
const http = require("http");
const readline = require("readline");

const args = process.argv.slice(2);
const url = args[0];
const count = Number(args[1]);
const deflate = !args.includes("--no-deflate"); // offer permessage-deflate, as browsers do
const sse = args.includes("--sse");
const expectAt = args.indexOf("--expect");
const resumeExpect = expectAt >= 0 ? Number(args[expectAt + 1]) : 0;

const EVENT = Buffer.from('{"type":"agent_text_delta"');
const TEXT = Buffer.from('"text":"');
const PONG = Buffer.from('{"type":"pong"');
const now = () => performance.timeOrigin + performance.now(); // ms, sub-ms resolution

let ready = 0;
let failed = 0;
let others = 0;
const conns = [];

// Phase state.
let targets = [];
let hits = [];
let latencyOn = false;
let latencies = new Float64Array(0);
let nlat = 0;
let first = 0;
let last = 0;
let doneCount = 0;
let phaseTotal = 0;
let resumeStart = 0;

function onEvent(conn, buf) {
  const t = now();
  if (first === 0) first = t;
  last = t;
  conn.count += 1;
  if (latencyOn && nlat < latencies.length) {
    const i = buf.indexOf(TEXT);
    if (i >= 0) {
      const sent = parseFloat(buf.toString("latin1", i + TEXT.length, i + TEXT.length + 20));
      if (!Number.isNaN(sent)) latencies[nlat++] = t - sent * 1000;
    }
  }
  if (resumeExpect && conn.count === resumeExpect) {
    out({ resumed: resumeExpect, ms: t - resumeStart, others });
    process.exit(0);
  }
  while (conn.ti < targets.length && conn.count >= targets[conn.ti]) {
    hits[conn.ti] += 1;
    if (hits[conn.ti] === ready) {
      const reached = targets[conn.ti];
      if (reached === phaseTotal) finish();
      else out({ reached });
    }
    conn.ti += 1;
  }
}

function onFrame(conn, buf) {
  if (buf.length >= EVENT.length && buf.compare(EVENT, 0, EVENT.length, 0, EVENT.length) === 0) {
    onEvent(conn, buf);
  } else if (!conn.ready && buf.compare(PONG, 0, PONG.length, 0, PONG.length) === 0) {
    conn.ready = true;
    ready += 1;
    checkReady();
  } else {
    others += 1;
  }
}

function finish() {
  doneCount += 1;
  out({
    done: phaseTotal,
    first,
    last,
    others,
    latencies: Array.from(latencies.subarray(0, nlat), (v) => Math.round(v * 1000) / 1000),
  });
}

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function checkReady() {
  if (ready + failed === count) out({ ready, failed });
}

function openWs(conn) {
  const ws = new WebSocket(url, { perMessageDeflate: deflate, maxPayload: 0 });
  conn.ws = ws;
  ws.on("open", () => ws.send('{"type":"ping"}'));
  ws.on("message", (data) => onFrame(conn, data));
  ws.on("error", () => {});
  ws.on("close", () => {
    if (!conn.ready && !conn.failed) {
      conn.failed = true;
      failed += 1;
      checkReady();
    }
  });
}

function openSse(conn) {
  // Server-sent events: one event per "data:" line; the first comment or
  // event line counts as the subscription being live (the peers send pong).
  const req = http.get(url, { headers: { accept: "text/event-stream" } }, (res) => {
    let pending = "";
    res.setEncoding("utf8");
    res.on("data", (chunk) => {
      pending += chunk;
      let nl;
      while ((nl = pending.indexOf("\n\n")) >= 0) {
        const block = pending.slice(0, nl);
        pending = pending.slice(nl + 2);
        for (const line of block.split("\n")) {
          if (line.startsWith("data:")) onFrame(conn, Buffer.from(line.slice(5).trimStart()));
        }
      }
    });
  });
  req.on("error", () => {
    if (!conn.failed) {
      conn.failed = true;
      failed += 1;
      checkReady();
    }
  });
  conn.ws = { close: () => req.destroy() };
}

// Open connections a few hundred at a time: a burst of 10,000 SYNs overflows
// the listen backlog and measures the kernel, not the server.
let opened = 0;
function openMore() {
  const batch = Math.min(200, count - opened);
  for (let i = 0; i < batch; i++) {
    const conn = { count: 0, ti: 0, ready: false, failed: false, ws: null };
    conns.push(conn);
    if (sse) openSse(conn);
    else openWs(conn);
  }
  opened += batch;
  if (opened < count) setTimeout(openMore, 20);
}
resumeStart = now();
openMore();

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const cmd = JSON.parse(line);
  if (cmd.cmd === "expect") {
    phaseTotal = cmd.total;
    targets = [];
    for (let t = cmd.step; t < cmd.total; t += cmd.step) targets.push(t);
    targets.push(cmd.total);
    hits = targets.map(() => 0);
    latencyOn = Boolean(cmd.latency);
    latencies = new Float64Array(latencyOn ? Math.min(400000, cmd.total * conns.length) : 0);
    nlat = 0;
    first = last = 0;
    others = 0;
    for (const c of conns) {
      c.count = 0;
      c.ti = 0;
    }
    out({ expecting: phaseTotal });
  } else if (cmd.cmd === "close") {
    for (const c of conns) c.ws.close();
    setTimeout(() => process.exit(0), 200);
  }
});
