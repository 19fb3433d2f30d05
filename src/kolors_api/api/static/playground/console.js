// The console: the caller's history (thumbnails through the signed output URLs, re-run), account,
// and for an admin key the keys page (create, list, disable/enable, add credits, delete: the
// actions of `kolors-api keys`, under the same names).
import { api, explain } from "./api.js";
import { $, copyText, credits, el } from "./dom.js";

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");

// -- history
let cursor = null;

export async function loadHistory(rerun, more = false) {
  const list = $("#history-list");
  const msg = $("#history-msg");
  if (!more) {
    cursor = null;
    list.replaceChildren();
  }
  msg.textContent = "Loading…";
  try {
    const q = `v1/requests?limit=12${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`;
    const { data } = await api(q);
    cursor = data.next_cursor;
    $("#history-more").hidden = !cursor;
    msg.textContent = data.data.length || more ? "" : "No requests yet.";
    for (const item of data.data) list.append(await historyItem(item, rerun));
  } catch (err) {
    msg.textContent = explain(err);
  }
}

/** What a request cost: charged once COMPLETED, refunded when FAILED, reserved until then. */
function charged(item) {
  if (item.status === "FAILED") return "refunded";
  if (item.status === "COMPLETED") return credits(item.cost);
  return `${credits(item.cost)} reserved`;
}

async function historyItem(item, rerun) {
  const li = el("li", { class: "history-item", "data-request": item.request_id });
  const meta = el("div", {},
    el("strong", { class: `state state-${item.status.toLowerCase()}` }, item.status), " ",
    el("code", {}, item.request_id), el("br"),
    el("span", { class: "muted", "data-cost": "" }, `${when(item.created_at)} · ${charged(item)}`));
  if (item.error) meta.append(el("br"), el("span", { class: "error" }, item.error));
  let thumb = el("div", { class: "thumb empty" });
  if (item.status === "COMPLETED") {
    try {
      const { data } = await api(`v2/requests/${encodeURIComponent(item.request_id)}`);
      if (data.output && data.output.length) {
        thumb = el("a", { href: data.output[0], target: "_blank", rel: "noopener" },
          el("img", { class: "thumb", src: data.output[0], alt: `output of ${data.input.prompt}`, loading: "lazy" }));
      }
      meta.append(el("br"), el("span", {}, data.input.prompt));
      const again = el("button", { type: "button", class: "rerun" }, "Re-run");
      again.addEventListener("click", () => rerun(data.input));
      meta.append(el("br"), again);
    } catch {
      // expired between the list and this call: the row stays without a thumbnail
    }
  }
  li.append(thumb, meta);
  return li;
}

// -- account
export async function loadAccount() {
  document.dispatchEvent(new Event("kolors:account"));
  const dl = $("#account");
  const msg = $("#account-msg");
  dl.replaceChildren();
  try {
    const { data } = await api("v1/account");
    msg.textContent = "";
    const rows = [
      ["Name", data.name], ["Key id", data.id], ["Admin", data.admin ? "yes" : "no"],
      ["Credits", data.credits === null ? "unlimited" : data.credits],
      ["Rate limit", data.limits.rate_limit || "none"],
      ["Max concurrency", data.limits.max_concurrency ?? "none"],
      ["Weight (share of the workers)", data.limits.weight],
      ["Credits spent", data.usage.credits_spent], ["Credits reserved", data.usage.credits_reserved],
      ["Requests", data.usage.requests], ["Running now", data.usage.running],
    ];
    for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, v));
    return data;
  } catch (err) {
    msg.textContent = explain(err);
    return null;
  }
}

// -- keys (admin)
export function setupKeys() {
  $("#key-create").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const f = new FormData(form);
    const body = { name: String(f.get("name")).trim() };
    if (!body.name) {
      $("#keys-msg").textContent = "name: must not be empty";
      form.elements.name.focus();
      return;
    }
    if (f.get("credits")) body.credits = Number(f.get("credits"));
    if (f.get("rate_limit")) body.rate_limit = String(f.get("rate_limit")).trim();
    if (f.get("max_concurrency")) body.max_concurrency = Number(f.get("max_concurrency"));
    if (f.get("weight")) body.weight = Number(f.get("weight"));
    if (f.get("admin")) body.admin = true;
    try {
      const { data } = await api("v1/admin/keys", { method: "POST", body });
      $("#new-key-value").textContent = data.key;
      $("#new-key").hidden = false;
      $("#keys-msg").textContent = `Created key ${data.name} (${data.prefix}…).`;
      form.reset();
      await loadKeys();
      $("#new-key-copy").focus();
    } catch (err) {
      $("#keys-msg").textContent = explain(err);
    }
  });
  $("#new-key-copy").addEventListener("click", async () => {
    const ok = await copyText($("#new-key-value").textContent);
    $("#keys-msg").textContent = ok ? "Key copied." : "Copy failed: select the key and copy it.";
  });
}

async function act(call, done) {
  try {
    await call();
    await loadKeys();
    $("#keys-msg").textContent = done;
    document.dispatchEvent(new Event("kolors:account")); // the header's credits may have moved
  } catch (err) {
    $("#keys-msg").textContent = explain(err);
  }
}

export async function loadKeys() {
  const body = $("#keys-table tbody");
  try {
    const { data } = await api("v1/admin/keys");
    body.replaceChildren();
    for (const k of data.data) body.append(keyRow(k));
  } catch (err) {
    $("#keys-msg").textContent = explain(err);
  }
}

function keyRow(k) {
  const path = `v1/admin/keys/${encodeURIComponent(k.id)}`;
  const toggle = el("button", { type: "button", class: "toggle" }, k.enabled ? "Disable" : "Enable");
  toggle.addEventListener("click", () => act(() => api(path, { method: "PATCH", body: { enabled: !k.enabled } }),
    `${k.enabled ? "Disabled" : "Enabled"} ${k.name}.`));
  const amount = el("input", { type: "number", step: "any", class: "add-amount", "aria-label": `credits to add to ${k.name}`,
    placeholder: "+credits" });
  const add = el("button", { type: "button", class: "add" }, "Add");
  add.addEventListener("click", () => {
    const value = Number(amount.value);
    if (!amount.value || !Number.isFinite(value)) {
      $("#keys-msg").textContent = "add_credits: must be a number";
      amount.focus();
      return;
    }
    act(() => api(path, { method: "PATCH", body: { add_credits: value } }), `Added ${value} credits to ${k.name}.`);
  });
  const weight = el("input", { type: "number", step: "any", min: "0", class: "weight-value", value: String(k.weight),
    "aria-label": `weight of ${k.name}` });
  const setWeight = el("button", { type: "button", class: "set-weight" }, "Set");
  setWeight.addEventListener("click", () => {
    const value = Number(weight.value);
    if (!weight.value || !Number.isFinite(value) || value <= 0) {
      $("#keys-msg").textContent = "weight: must be a number greater than 0";
      weight.focus();
      return;
    }
    act(() => api(path, { method: "PATCH", body: { weight: value } }), `Set the weight of ${k.name} to ${value}.`);
  });
  const remove = el("button", { type: "button", class: "delete danger" }, "Delete");
  remove.addEventListener("click", () => {
    if (confirm(`Delete the key ${k.name} (${k.prefix}…) for good? This cannot be undone; Disable can be.`)) {
      act(() => api(path, { method: "DELETE" }), `Deleted ${k.name}.`);
    }
  });
  return el("tr", { "data-key": k.id, "data-name": k.name },
    el("td", {}, k.name), el("td", {}, el("code", {}, k.prefix)), el("td", {}, k.admin ? "yes" : "no"),
    el("td", { class: "enabled" }, k.enabled ? "yes" : "no"),
    el("td", { class: "credits" }, k.credits === null ? "unlimited" : k.credits),
    el("td", {}, k.rate_limit || "–"), el("td", {}, k.max_concurrency ?? "–"),
    el("td", { class: "weight" }, weight, setWeight),
    el("td", { class: "row-actions" }, toggle, amount, add, remove));
}
