// Formatting helpers shared by the store's activity lines and the views:
// numbers, ids, clipped text, relative times and the decision countdown.
// Pure functions, no state and no DOM.

export const fmt = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));
export const shortId = (id) => String(id).slice(0, 8);
export const clip = (s, n) => (s.length > n ? `${s.slice(0, n - 1)}…` : s);

export function ago(ts) {
  if (!ts) return "";
  const s = Math.max(0, Math.round((Date.now() - ts) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  return `${Math.floor(s / 3600)}h ago`;
}

export function countdown(deadline, dflt) {
  const s = Math.max(0, Math.round((deadline - Date.now()) / 1000));
  const mmss = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  return ` Default “${dflt || "stop"}” in ${mmss}.`;
}
