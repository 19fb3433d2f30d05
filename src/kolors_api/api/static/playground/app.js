// The playground: key, tabs, the generation form, a job followed to its end, "Copy as code".
import { ApiError, api, baseUrl, explain, follow, getKey, setKey } from "./api.js";
import { loadAccount, loadHistory, loadKeys, setupKeys } from "./console.js";
import { $, copyText, credits, el } from "./dom.js";
import { ParamsForm } from "./form.js";
import { snippet } from "./snippets.js";

let model = "kolors";
let models = [];
let form = null;
let lang = "segmind";
let job = null; // {id, controller}
//: What the job state line says in each phase of a running job (the status' progress.phase).
const PHASES = { denoising: "Generating…", decoding: "Decoding the image…", encoding: "Encoding the image…",
  storing: "Storing the image…" };

// -- key
function keyMessage(text, bad = false) {
  const msg = $("#key-msg");
  msg.textContent = text;
  msg.classList.toggle("error", bad);
}

async function checkKey() {
  $("#tab-keys").hidden = true;
  if (!getKey()) {
    keyMessage("Paste an API key and save it: it stays in this browser (localStorage) and goes only in the x-api-key header.");
    return;
  }
  keyMessage("Checking the key…");
  try {
    const { data } = await api("v1/account");
    const left = data.credits === null ? "unlimited credits" : credits(data.credits);
    keyMessage(`Key of ${data.name}${data.admin ? " (admin)" : ""}: ${left}.`);
    $("#tab-keys").hidden = !data.admin;
  } catch (err) {
    keyMessage(explain(err), true);
  }
}

function setupKey() {
  const input = $("#api-key");
  input.value = getKey();
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey(input.value.trim());
    checkKey();
  });
  $("#key-forget").addEventListener("click", () => {
    setKey("");
    input.value = "";
    checkKey();
    input.focus();
  });
}

// -- tabs
function show(tab) {
  for (const button of document.querySelectorAll("nav .tab[data-tab]")) {
    if (button.dataset.tab === tab) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== `panel-${tab}`;
  if (tab === "history") loadHistory(rerun);
  if (tab === "account") loadAccount();
  if (tab === "keys") loadKeys();
}

function rerun(input) {
  show("generate");
  form.fill(input);
  updateCode();
  $("#f-prompt").focus();
}

// -- copy as code
function currentParams() {
  const params = form.current();
  if (!params.prompt) params.prompt = "a red fox in the snow";
  return params;
}

function updateCode() {
  if (!form) return;
  const defaults = Object.fromEntries(Object.entries(form.props).map(([k, p]) => [k, p.default]));
  $("#code").textContent = snippet(lang, baseUrl(), currentParams(), defaults);
}

function setupCode() {
  for (const button of document.querySelectorAll(".code-tab")) {
    button.addEventListener("click", () => {
      lang = button.dataset.lang;
      for (const b of document.querySelectorAll(".code-tab")) b.setAttribute("aria-pressed", String(b === button));
      updateCode();
    });
  }
  $("#copy-code").addEventListener("click", async () => {
    const ok = await copyText($("#code").textContent);
    $("#copy-msg").textContent = ok ? "Copied." : "Copy failed: select the code and copy it.";
  });
}

// -- generate
function resetOutput() {
  $("#job").hidden = true;
  $("#result").hidden = true;
  $("#job-error").hidden = true;
  $("#preview").hidden = true;
  $("#preview").removeAttribute("src");
  $("#bar").value = 0;
  $("#step-text").textContent = "";
}

function onEvent(event, body) {
  if (event === "queued") {
    const pos = body.queue_position;
    $("#job-state").textContent = Number.isInteger(pos) ? `Queued (position ${pos + 1})` : "Queued";
  } else if (event === "started") {
    $("#job-state").textContent = "Generating…";
  } else if (event === "progress") {
    const total = body.total_steps || 1;
    const phase = body.phase || "denoising";
    $("#job-state").textContent = PHASES[phase] || "Generating…";
    $("#bar").max = total;
    $("#bar").value = body.step;
    $("#step-text").textContent = `step ${body.step}/${total}`;
    if (body.preview && body.preview.startsWith("data:image/")) {
      $("#preview").src = body.preview;
      $("#preview").hidden = false;
    }
  } else if (event === "completed") {
    showResult(body);
  } else if (event === "failed") {
    showFailure(body.error || "failed");
  }
}

function showResult(body) {
  $("#job").hidden = true;
  const images = $("#images");
  images.replaceChildren();
  const ext = (url) => new URL(url).pathname.split(".").pop();
  body.output.forEach((url, i) => {
    const seed = body.seeds[i];
    images.append(el("figure", {},
      el("img", { src: url, alt: `generated image ${i + 1}: ${body.input.prompt}`, class: "output" }),
      el("figcaption", {}, el("a", { href: url, download: `kolors-${seed}.${ext(url)}` }, `Download (seed ${seed})`))));
  });
  const m = body.metrics || {};
  const meta = $("#result-meta");
  meta.replaceChildren();
  const rows = [["Request", body.request_id], ["Seed", body.seeds.join(", ")],
    ["Inference time", `${(m.inference_time ?? 0).toFixed(2)} s`], ["Total time", `${(m.total_time ?? 0).toFixed(2)} s`],
    ["Size", `${body.input.width}×${body.input.height}, ${body.input.steps} steps`]];
  for (const [k, v] of rows) meta.append(el("dt", {}, k), el("dd", { "data-meta": k.toLowerCase() }, v));
  $("#result").hidden = false;
}

function showFailure(message) {
  $("#job").hidden = true;
  const box = $("#job-error");
  box.textContent = `FAILED: ${message}`;
  box.hidden = false;
}

function showSubmitError(err) {
  if (err instanceof ApiError && err.status === 400) {
    const field = err.message.split(":")[0].trim();
    if (form.showError(field, err.message)) {
      form.focus(field);
      return;
    }
  }
  $("#form-error").textContent = explain(err);
}

async function generate(event) {
  event.preventDefault();
  $("#form-error").textContent = "";
  const body = form.values();
  if (!body) return;
  if (!getKey()) {
    $("#form-error").textContent = "Paste an API key above first.";
    $("#api-key").focus();
    return;
  }
  if (job) job.controller.abort();
  resetOutput();
  const button = $("#generate");
  button.disabled = true;
  let submitted;
  try {
    submitted = (await api(`v2/${model}`, { method: "POST", body })).data;
  } catch (err) {
    button.disabled = false;
    showSubmitError(err);
    return;
  }
  const current = { id: submitted.request_id, controller: new AbortController() };
  job = current;
  $("#job").hidden = false;
  $("#cancel").disabled = false;
  $("#job-state").textContent = "Queued";
  $("#job").dataset.request = current.id;
  button.disabled = false;
  // the progress (and, on a phone, everything below the form) where the eye is
  // (one column on a phone: the job to the top, with room below for the preview that comes)
  $("#job").scrollIntoView({ block: matchMedia("(max-width: 760px)").matches ? "start" : "nearest" });
  try {
    await follow(current.id, (name, data) => { if (job === current) onEvent(name, data); }, current.controller.signal);
  } catch (err) {
    if (!current.controller.signal.aborted) showFailure(explain(err));
  } finally {
    if (job === current) job = null;
    checkKey(); // the header's credits as they are now: charged, or refunded
  }
}

async function cancel() {
  if (!job) return;
  $("#cancel").disabled = true;
  $("#job-state").textContent = "Cancelling…";
  try {
    await api(`v2/requests/${encodeURIComponent(job.id)}/cancel`, { method: "POST" });
  } catch (err) {
    $("#job-state").textContent = explain(err);
    $("#cancel").disabled = false;
  }
}

async function loadModels() {
  try {
    const r = await fetch("v1/models");
    const data = await r.json();
    models = data.data;
    const select = $("#model");
    select.replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
    select.value = model;
    useModel(model);
    select.addEventListener("change", () => useModel(select.value));
    if (models.some((m) => m.random_weights)) {
      // test weights: the pictures are noise by design, not a broken server
      $("#model-note").textContent = "This server runs a test model with random weights (tiny): it draws noise, "
        + "not pictures. Start it with --model Kwai-Kolors/Kolors-diffusers for real images.";
      $("#model-note").hidden = false;
    }
    $("#gen-form").dataset.ready = "true";
  } catch (err) {
    $("#fields").textContent = `Cannot load the model list: ${err.message || err}`;
  }
}

/** Build the form for model `id` (its JSON Schema: pictures get a picker, `form.js`). */
function useModel(id) {
  const chosen = models.find((m) => m.id === id) || models[0];
  model = chosen.id;
  form = new ParamsForm($("#fields"), chosen.parameters);
  updateCode();
}

function main() {
  setupKey();
  setupCode();
  setupKeys();
  for (const button of document.querySelectorAll("nav .tab[data-tab]")) {
    button.addEventListener("click", () => show(button.dataset.tab));
  }
  $("#history-refresh").addEventListener("click", () => loadHistory(rerun));
  $("#history-more").addEventListener("click", () => loadHistory(rerun, true));
  $("#gen-form").addEventListener("submit", generate);
  $("#gen-form").addEventListener("input", updateCode);
  $("#gen-form").addEventListener("change", updateCode);
  $("#gen-form").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#gen-form").requestSubmit();
  });
  $("#reset").addEventListener("click", () => { form.reset(); updateCode(); });
  $("#cancel").addEventListener("click", cancel);
  document.addEventListener("kolors:account", checkKey);
  loadModels();
  checkKey();
}

main();
