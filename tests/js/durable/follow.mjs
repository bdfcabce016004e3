// Follows one relay request stream with the official Durable Streams client
// (@durable-streams/client) and prints one JSON line per batch it receives.
//
//   node follow.mjs URL LIVE [--offset X] [--pause-after N] [--token T]
//
// LIVE is "long-poll" or "sse". The first session starts at --offset (default
// -1, the start of the stream). With --pause-after N it is cancelled once N
// events arrived and a new session resumes from the offset of the last batch
// (the client's own resume mechanism). A session that fails (its gateway
// died mid-response) is resumed the same way. The script exits 0 once a
// batch says the stream is closed.
import { stream } from "@durable-streams/client"

const [url, live, ...rest] = process.argv.slice(2)
const opts = {}
for (let i = 0; i < rest.length; i += 2) opts[rest[i].replace(/^--/, "")] = rest[i + 1]

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n")
const headers = opts.token ? { Authorization: `Bearer ${opts.token}` } : {}

async function session(offset, limit) {
  const res = await stream({
    url,
    offset,
    live,
    json: true,
    headers,
    // Retries network errors and 5xx (a killed gateway behind the balancer).
    backoffOptions: { initialDelay: 100, maxDelay: 1000, multiplier: 1.5, maxRetries: 100 },
  })
  return await new Promise((resolve) => {
    let count = 0
    let last = offset
    const unsubscribe = res.subscribeJson(async (batch) => {
      out({
        items: batch.items.map((f) => [f.seq, f.type]),
        offset: batch.offset,
        upToDate: batch.upToDate,
        closed: batch.streamClosed,
        cursor: batch.cursor ?? null,
      })
      last = batch.offset
      count += batch.items.length
      if (batch.streamClosed) resolve({ offset: last, closed: true })
      else if (limit && count >= limit) {
        unsubscribe()
        resolve({ offset: last, paused: true })
      }
    })
    // The session may report its end while its last batch is still queued
    // for the subscriber: give that batch a moment to arrive first.
    const settle = async (result) => {
      for (let i = 0; i < 100; i++) await new Promise((r) => setTimeout(r, 10))
      resolve(result)
    }
    res.closed.then(
      () => settle({ offset: last, ended: true }),
      (err) => settle({ offset: last, error: String(err) }),
    )
  })
}

let offset = opts.offset ?? "-1"
let limit = Number(opts["pause-after"] ?? 0)
for (let sessions = 1; sessions <= 50; sessions++) {
  const result = await session(offset, limit)
  out({ session: sessions, from: offset, ...result })
  if (result.closed) process.exit(0)
  offset = result.offset
  limit = 0
}
out({ gave_up: true })
process.exit(1)
