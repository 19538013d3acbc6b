// Calls to the `salfctl ui` server: api() with the launch secret as X-Salf-Secret, its errors shown in
// the page's error banner, and latestOnly() (one request in flight per control, the latest value next).
import { $ } from "./dom.js";
import { SalfUI } from "./state.js";

const SECRET = new URLSearchParams(location.search).get("secret") || "";
const DEBOUNCE_MS = 150;      // slider -> request

// One request at a time per control: a call while one is in flight replaces the waiting one (only the
// latest value is ever sent next); debounced() also waits `ms` for the control to settle.
export function latestOnly(name, run) {
  let busy = false, pending = null, timer = null;
  const stats = (SalfUI.stats[name] = { sent: 0, maxInFlight: 0, inFlight: 0 });
  async function go(args) {
    busy = true; stats.sent++; stats.inFlight++;
    stats.maxInFlight = Math.max(stats.maxInFlight, stats.inFlight);
    try { await run(args); } catch (e) { showError(e); } finally {
      busy = false; stats.inFlight--;
      if (pending) { const p = pending; pending = null; go(p.args); }
    }
  }
  return {
    now(args) { clearTimeout(timer); if (busy) pending = { args }; else go(args); },
    debounced(args, ms = DEBOUNCE_MS) { clearTimeout(timer); timer = setTimeout(() => this.now(args), ms); },
    get idle() { return !busy && !pending; },
  };
}

export class UIError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

export async function api(path, { json, body, headers = {} } = {}) {
  const init = { method: "GET", headers: { ...headers, "X-Salf-Secret": SECRET }, credentials: "same-origin" };
  if (json !== undefined) {
    init.method = "POST"; init.body = JSON.stringify(json); init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.method = "POST"; init.body = body; init.headers["Content-Type"] = "application/octet-stream";
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new UIError("NO_SERVER", "the explorer server does not answer (is `salfctl ui` still running?)");
  }
  if (!resp.ok) {
    let doc = null;
    try { doc = await resp.json(); } catch (e) { /* not JSON */ }
    const err = doc && doc.error ? doc.error : { code: String(resp.status), message: resp.statusText };
    throw new UIError(err.code, err.message);
  }
  clearError();
  return resp;
}
export const getJSON = async (path, opts) => (await api(path, opts)).json();

export function showError(e) {
  const box = $("error");
  $("error-text").textContent = e instanceof UIError ? `${e.code}: ${e.message}` : String(e);
  box.hidden = false;
}
export function clearError() { $("error").hidden = true; }
