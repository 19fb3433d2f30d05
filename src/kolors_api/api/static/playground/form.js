// The generation form, built from the JSON Schema that GET /v1/models serves, so it never drifts
// from the API: one field per property, with its range, default and choices, and checks that
// mirror the server's (the server stays the judge: its 400 is shown next to the field it names).
import { el } from "./dom.js";

const LABELS = { cfg: "CFG (guidance)", number_of_images: "Images", output_format: "Format",
  output_quality: "Quality", negative_prompt: "Negative prompt" };

function label(name) {
  return LABELS[name] || name.charAt(0).toUpperCase() + name.slice(1).replace(/_/g, " ");
}

export class ParamsForm {
  constructor(container, schema) {
    this.schema = schema;
    this.props = schema.properties;
    this.inputs = {};
    this.errors = {};
    container.replaceChildren();
    for (const [name, prop] of Object.entries(this.props)) {
      container.append(this.field(name, prop));
    }
    this.reset();
  }

  field(name, prop) {
    const id = `f-${name}`;
    let input;
    const help = [];
    if (prop.enum) {
      input = el("select", { id, name });
      for (const choice of prop.enum) input.append(el("option", { value: choice }, choice));
    } else if (prop.type === "string") {
      input = el("textarea", { id, name, rows: name === "prompt" ? 3 : 2 });
      if (prop.maxLength) input.maxLength = prop.maxLength;
      if ((this.schema.required || []).includes(name)) input.required = true;
    } else {
      input = el("input", { id, name, type: "number", inputmode: prop.type === "integer" ? "numeric" : "decimal" });
      if (prop.minimum !== undefined) input.min = prop.minimum;
      if (prop.maximum !== undefined) input.max = prop.maximum;
      input.step = prop.multipleOf || (prop.type === "integer" ? 1 : "any");
      const range = `${prop.minimum}–${prop.maximum}`;
      help.push(prop.multipleOf ? `${range}, multiple of ${prop.multipleOf}` : range);
    }
    if (prop.description) help.push(prop.description);
    const error = el("span", { class: "field-error", id: `err-${name}`, role: "alert" });
    const hint = el("small", { class: "muted", id: `hint-${name}` }, help.join(" · "));
    input.setAttribute("aria-describedby", `hint-${name} err-${name}`);
    this.inputs[name] = input;
    this.errors[name] = error;
    const wide = prop.type === "string" && !prop.enum;
    return el("div", { class: wide ? "field wide" : "field", "data-field": name },
      el("label", { for: id }, label(name)), input, hint, error);
  }

  reset() {
    for (const [name, prop] of Object.entries(this.props)) {
      const input = this.inputs[name];
      if (name === "prompt") continue;
      input.value = prop.default === undefined ? "" : String(prop.default);
    }
    this.clearErrors();
  }

  clearErrors() {
    for (const [name, span] of Object.entries(this.errors)) {
      span.textContent = "";
      this.inputs[name].removeAttribute("aria-invalid");
    }
  }

  /** Show `message` under field `name`; false when no such field (the caller shows it elsewhere). */
  showError(name, message) {
    const span = this.errors[name];
    if (!span) return false;
    span.textContent = message;
    this.inputs[name].setAttribute("aria-invalid", "true");
    return true;
  }

  /** Put the parameters of an earlier request back (re-run). */
  fill(values) {
    for (const [name, value] of Object.entries(values || {})) {
      if (this.inputs[name] && value !== null && value !== undefined) this.inputs[name].value = String(value);
    }
    this.clearErrors();
  }

  /** The request body, or null after showing the client-side errors. Defaults are left out. */
  values() {
    this.clearErrors();
    const body = {};
    let ok = true;
    for (const [name, prop] of Object.entries(this.props)) {
      const raw = this.inputs[name].value;
      const problem = check(name, prop, raw, this.schema.required || []);
      if (problem) {
        this.showError(name, `${name}: ${problem}`);
        ok = false;
        continue;
      }
      if (raw.trim() === "" && name !== "prompt") continue;
      let value = raw;
      if (prop.type === "integer" || prop.type === "number") value = Number(raw);
      if (name === "prompt") value = raw.trim();
      if (value !== prop.default) body[name] = value;
    }
    if (!ok) {
      const first = Object.keys(this.props).find((n) => this.inputs[n].getAttribute("aria-invalid"));
      if (first) this.inputs[first].focus();
      return null;
    }
    return body;
  }
}

/** What is wrong with `raw` for `prop`, in the server's words, or "". */
export function check(name, prop, raw, required) {
  const text = raw.trim();
  if (prop.enum) return prop.enum.includes(raw) ? "" : `must be one of ${prop.enum.join(", ")}`;
  if (prop.type === "string") {
    if (required.includes(name) && !text) return "must not be empty";
    if (prop.maxLength && raw.length > prop.maxLength) return `must be at most ${prop.maxLength} characters`;
    return "";
  }
  if (text === "") return "";
  const value = Number(text);
  if (!Number.isFinite(value)) return `must be ${prop.type === "integer" ? "an integer" : "a number"}`;
  if (prop.type === "integer" && !Number.isInteger(value)) return "must be an integer";
  const lo = prop.minimum;
  const hi = prop.maximum;
  if (!(name === "seed" && value === -1) && ((lo !== undefined && value < lo) || (hi !== undefined && value > hi))) {
    return `must be between ${lo} and ${hi}, got ${value}`;
  }
  if (prop.multipleOf && value % prop.multipleOf) {
    const below = value - (value % prop.multipleOf);
    return `must be a multiple of ${prop.multipleOf}, got ${value} (nearest valid: ${below} or ${below + prop.multipleOf})`;
  }
  return "";
}
