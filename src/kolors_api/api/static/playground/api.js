// The page's calls to the API: the key from localStorage in the x-api-key header (never a URL or
// a cookie), errors as {status, message}, and the event stream of a job read with fetch().
const KEY_NAME = "kolors-api.key";

export function getKey() {
  return localStorage.getItem(KEY_NAME) || "";
}

export function setKey(key) {
  if (key) localStorage.setItem(KEY_NAME, key);
  else localStorage.removeItem(KEY_NAME);
}

/** The API's base URL as a client outside the browser would write it (where this page is served). */
export function baseUrl() {
  return new URL(".", location.href).href.replace(/\/$/, "");
}

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

/** A friendly message for an error: 401/403 say what to do about the key. */
export function explain(err) {
  if (!(err instanceof ApiError)) return `Cannot reach the server: ${err.message || err}`;
  if (err.status === 401) return `Key refused (401): ${err.message}. Paste a valid API key above.`;
  if (err.status === 403) return `Not allowed with this key (403): ${err.message}`;
  return err.status ? `${err.message} (HTTP ${err.status})` : err.message;
}

/** JSON from `path` (relative to the page); non-2xx raises ApiError with the server's `error`. */
export async function api(path, { method = "GET", body, signal, okStatuses = [] } = {}) {
  const headers = { "x-api-key": getKey() };
  if (body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try {
    data = await r.json();
  } catch {
    data = null;
  }
  if (!r.ok && !okStatuses.includes(r.status)) {
    const message = data && typeof data.error === "string" ? data.error : `HTTP ${r.status}`;
    throw new ApiError(r.status, message, data);
  }
  return { status: r.status, data };
}

/** Split an SSE text buffer into complete frames; returns [frames, rest]. */
export function parseFrames(buffer) {
  const frames = [];
  const parts = buffer.replace(/\r\n?/g, "\n").split("\n\n");
  const rest = parts.pop();
  for (const part of parts) {
    const frame = { id: null, event: "message", data: [] };
    for (const line of part.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const at = line.indexOf(":");
      const field = at < 0 ? line : line.slice(0, at);
      let value = at < 0 ? "" : line.slice(at + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "id") frame.id = value;
      else if (field === "event") frame.event = value;
      else if (field === "data") frame.data.push(value);
    }
    if (frame.data.length) frames.push({ ...frame, data: frame.data.join("\n") });
  }
  return [frames, rest];
}

/**
 * Follow a job until it ends: the event stream with previews, and polling of the status when the
 * stream is not there (404) or breaks. `on(event, body)` gets queued/started/progress/completed/failed.
 * Resolves with the final event name.
 */
export async function follow(requestId, on, signal) {
  const id = encodeURIComponent(requestId);
  let lastId = null;
  for (let attempt = 0; attempt < 3 && !signal.aborted; attempt++) {
    const end = await streamOnce(id, on, signal, lastId, (v) => { lastId = v; });
    if (end === "completed" || end === "failed") return end;
    if (end === "unsupported") break;
  }
  return poll(id, on, signal);
}

async function streamOnce(id, on, signal, lastId, setLastId) {
  const headers = { "x-api-key": getKey(), accept: "text/event-stream" };
  if (lastId !== null) headers["last-event-id"] = lastId;
  let r;
  try {
    r = await fetch(`v2/requests/${id}/events?previews=1`, { headers, signal });
  } catch {
    return "broken";
  }
  const type = r.headers.get("content-type") || "";
  if (!r.ok || !type.startsWith("text/event-stream") || !r.body) {
    if (r.status === 401 || r.status === 403) {
      const data = await r.json().catch(() => ({}));
      throw new ApiError(r.status, data.error || `HTTP ${r.status}`, data);
    }
    return "unsupported";
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return "broken";
      buffer += value;
      const [frames, rest] = parseFrames(buffer);
      buffer = rest;
      for (const frame of frames) {
        if (frame.id !== null) setLastId(frame.id);
        let body;
        try {
          body = JSON.parse(frame.data);
        } catch {
          continue;
        }
        on(frame.event, body);
        if (frame.event === "completed" || frame.event === "failed") {
          reader.cancel().catch(() => {});
          return frame.event;
        }
      }
    }
  } catch (err) {
    if (signal.aborted) throw err;
    return "broken";
  }
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const t = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(t); reject(signal.reason); }, { once: true });
});

async function poll(id, on, signal) {
  let started = false;
  for (;;) {
    const { status, data } = await api(`v2/requests/${id}/status`, { signal, okStatuses: [422] });
    if (status === 422 || data.status === "FAILED") {
      on("failed", data);
      return "failed";
    }
    if (data.status === "QUEUED") on("queued", data);
    if (data.status === "PROCESSING") {
      if (!started) on("started", data);
      started = true;
      if (data.progress) on("progress", { ...data, ...data.progress });
    }
    if (data.status === "COMPLETED") {
      const result = await api(`v2/requests/${id}`, { signal, okStatuses: [422] });
      if (result.status === 422) {
        on("failed", result.data);
        return "failed";
      }
      on("completed", result.data);
      return "completed";
    }
    await sleep(250, signal);
  }
}
