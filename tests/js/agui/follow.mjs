// Follows one relay request with the official AG-UI client (@ag-ui/client's
// HttpAgent) until its run ends, the way an AG-UI frontend would:
//
// - every run goes through the client's own pipeline, which verifies the
//   event stream (verifyEvents) and applies it to agent.messages / agent.state;
//   a verification error (AGUIError) fails the test at once (exit 3);
// - a stream that breaks (gateway killed, connection reset) or ends without
//   RUN_FINISHED is followed by another runAgent() on the same agent: the
//   client sends back its state and messages, which is where relay reads the
//   position to resume from;
// - a RUN_FINISHED with the interrupt outcome (a budget pause) is answered with
//   the next run's `resume` input;
// - optionally one sub-agent is cancelled through relay's REST route as soon
//   as it starts.
//
// Usage: node follow.mjs <base-url> <request-id> [json options]
//   options: {"decision": "continue"|"stop", "cancel": true, "token": "…",
//             "maxRuns": 100}
// Prints JSON lines: {"progress": n, "seq": s} while running, then one
// {"done": true, …} line with everything the test checks.

import { AGUIError, HttpAgent } from "@ag-ui/client";

const [base, requestId, rawOptions] = process.argv.slice(2);
const options = JSON.parse(rawOptions ?? "{}");
const headers = options.token ? { Authorization: `Bearer ${options.token}` } : {};
const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// When a stream breaks, the client cancels its reader and rethrows the
// socket error from that teardown, outside any promise the caller holds: a
// browser logs it as an unhandled rejection, Node would exit. Recorded here
// (the test requires them to be network errors), and runAgent() rejects as well.
const unhandled = [];
process.on("unhandledRejection", (err) => unhandled.push(String(err?.cause ?? err)));

// The client warns when it strips or drops something it does not recognise,
// and logs each failed run ("Agent execution failed") as an error.
const warnings = [];
const errors = [];
console.warn = (...args) => warnings.push(args.map(String).join(" "));
console.error = (...args) => errors.push(args.map(String).join(" "));

const agent = new HttpAgent({ url: `${base}/agui/requests/${requestId}`, headers });
let events = 0;
let ending = null;
const runs = [];
const customs = [];
const subagents = { started: 0, finished: 0, errors: [] };
let cancelled = null;

agent.subscribe({
  onEvent({ event }) {
    events += 1;
    if (events % 20 === 0) out({ progress: events, seq: agent.state?.relay?.seq ?? 0 });
  },
  onRunFinishedEvent({ outcome, interrupts, result }) {
    ending = { outcome, interrupts, result };
  },
  onRunErrorEvent({ event }) {
    ending = { outcome: "error", code: event.code, message: event.message };
  },
  onCustomEvent({ event }) {
    customs.push(event.name);
  },
  onSubagentStartedEvent({ event }) {
    subagents.started += 1;
    if (options.cancel && cancelled === null && event.parentSubagentRunId === undefined) {
      cancelled = event.subagentRunId;
      fetch(`${base}/api/v1/agents/${cancelled}/cancel`, {
        method: "POST",
        headers: { ...headers, "Content-Type": "application/json" },
        body: JSON.stringify({ reason: "cancelled from the AG-UI test" }),
      }).then(
        (resp) => out({ cancel: cancelled, status: resp.status }),
        (err) => out({ cancel: cancelled, error: String(err) }),
      );
    }
  },
  onSubagentFinishedEvent() {
    subagents.finished += 1;
  },
  onSubagentErrorEvent({ event }) {
    subagents.errors.push(event.code);
  },
});

const failures = [];
let resume;
for (let n = 0; ; n += 1) {
  if (n >= (options.maxRuns ?? 100)) {
    out({ done: false, reason: "too many runs", runs, failures });
    process.exit(4);
  }
  ending = null;
  try {
    await agent.runAgent({ runId: `run-${n}`, resume });
  } catch (err) {
    if (err instanceof AGUIError) {
      out({ done: false, verifyError: String(err), runs });
      process.exit(3);
    }
    failures.push(String(err?.cause ?? err));
  }
  resume = undefined;
  runs.push(ending ? { ...ending } : { outcome: "disconnected" });
  if (ending?.outcome === "interrupt") {
    resume = ending.interrupts.map((i) => ({
      interruptId: i.id,
      status: "resolved",
      payload: { decision: options.decision ?? "continue" },
    }));
    continue;
  }
  if (ending?.outcome === "success" || ending?.outcome === "cancelled") break;
  if (ending?.outcome === "error" && ending.code === "relay.agent_failed") break;
  await sleep(100); // the stream broke: start another run, which resumes
}

out({
  done: true,
  runs,
  failures,
  unhandled,
  warnings,
  errors,
  customs,
  cancelled,
  subagents,
  events,
  state: agent.state,
  messages: agent.messages,
});
