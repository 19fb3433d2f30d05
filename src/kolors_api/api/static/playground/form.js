// The generation form, built from the JSON Schema that GET /v1/models serves, so it never drifts
// from the API: one field per property, with its range, default and choices, and checks that
// mirror the server's (the server stays the judge: its 400 is shown next to the field it names).
// A string enum is a select, an array of enum strings a group of checkboxes (one per choice), any
// other string a text box, a number or an integer a number input.
import { el, withCode } from "./dom.js";

const LABELS = { cfg: "CFG (guidance)", number_of_images: "Images", output_format: "Format",
  output_quality: "Quality", negative_prompt: "Negative prompt" };

function label(name) {
  return LABELS[name] || name.charAt(0).toUpperCase() + name.slice(1).replace(/_/g, " ");
}

/** A picture field (`contentMediaType: image/*`): a file or a URL, with a preview. */
const isImage = (prop) => typeof prop.contentMediaType === "string" && prop.contentMediaType.startsWith("image/");
/** What a URL typed in shows as a preview: URLs of this server (the page's policy loads images from
 * here only; the server fetches other URLs itself, at submit), else nothing. */
const previewable = (text) => (text.startsWith(`${location.origin}/`) ? text : "");
/** An array whose items are choices: shown as checkboxes. */
const isChoices = (prop) => prop.type === "array" && Array.isArray(prop.items?.enum);
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

function range(prop) {
  const lo = prop.minimum;
  const hi = prop.maximum;
  if (lo === undefined && hi === undefined) return "";
  if (hi === undefined) return `at least ${lo}`;
  if (lo === undefined) return `at most ${hi}`;
  return `${lo}–${hi}`;
}

export class ParamsForm {
  constructor(container, schema) {
    this.schema = schema;
    this.props = schema.properties;
    this.inputs = {};
    this.errors = {};
    this.pictures = {}; // picture field -> the chosen file as a data URI
    this.previews = {};
    container.replaceChildren();
    for (const [name, prop] of Object.entries(this.props)) {
      container.append(this.field(name, prop));
    }
    this.reset();
  }

  field(name, prop) {
    if (isChoices(prop)) return this.choices(name, prop);
    if (isImage(prop)) return this.picture(name, prop);
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
      const span = range(prop);
      if (span || prop.multipleOf) help.push([span, prop.multipleOf && `multiple of ${prop.multipleOf}`].filter(Boolean).join(", "));
    }
    if (prop.description) help.push(prop.description);
    const error = el("span", { class: "field-error", id: `err-${name}`, role: "alert" });
    const hint = el("small", { class: "muted", id: `hint-${name}` }, ...withCode(help.join(" · ")));
    input.setAttribute("aria-describedby", `hint-${name} err-${name}`);
    this.inputs[name] = input;
    this.errors[name] = error;
    const wide = prop.type === "string" && !prop.enum;
    return el("div", { class: wide ? "field wide" : "field", "data-field": name },
      el("label", { for: id }, label(name)), input, hint, error);
  }

  /** A group of checkboxes, one per choice (`webhook_events_filter`: start, progress…). */
  choices(name, prop) {
    const legend = el("legend", {}, label(name));
    const help = [prop.description, prop.minItems ? "choose at least one" : ""].filter(Boolean).join(" · ");
    const hint = el("small", { class: "muted", id: `hint-${name}` }, ...withCode(help));
    const error = el("span", { class: "field-error", id: `err-${name}`, role: "alert" });
    const group = el("fieldset", { id: `f-${name}`, class: "choices", "data-field": name,
      "aria-describedby": `hint-${name} err-${name}` }, legend);
    for (const choice of prop.items.enum) {
      group.append(el("label", { class: "check" },
        el("input", { type: "checkbox", name, value: choice, id: `f-${name}-${choice}` }), choice));
    }
    group.append(hint, error);
    // a box ticked after "must be a non-empty list" answers it: the message goes
    group.addEventListener("change", () => {
      error.textContent = "";
      group.removeAttribute("aria-invalid");
    });
    this.inputs[name] = group;
    this.errors[name] = error;
    return el("div", { class: "field wide" }, group);
  }

  /** A picture: an http(s) URL typed in, or a file chosen (sent as a data URI), and its preview. */
  picture(name, prop) {
    const id = `f-${name}`;
    const url = el("input", { id, name, type: "url", inputmode: "url", spellcheck: "false",
      placeholder: "an http(s) URL, or choose a file" });
    const file = el("input", { id: `${id}-file`, type: "file", accept: "image/png,image/jpeg,image/webp",
      "aria-label": `${label(name)}: choose a file` });
    const preview = el("img", { id: `${id}-preview`, class: "picked", alt: `the chosen ${label(name).toLowerCase()}`,
      hidden: true });
    const show = (src) => {
      preview.hidden = !src;
      if (src) preview.src = src;
      else preview.removeAttribute("src");
    };
    file.addEventListener("change", () => {
      const chosen = file.files && file.files[0];
      if (!chosen) return;
      const reader = new FileReader();
      reader.onload = () => {
        this.pictures[name] = String(reader.result);
        url.value = "";
        show(this.pictures[name]);
        url.dispatchEvent(new Event("change", { bubbles: true })); // the code box follows
      };
      reader.readAsDataURL(chosen);
    });
    url.addEventListener("input", () => {
      delete this.pictures[name];
      file.value = "";
      show(previewable(url.value.trim()));
    });
    const error = el("span", { class: "field-error", id: `err-${name}`, role: "alert" });
    const hint = el("small", { class: "muted", id: `hint-${name}` }, prop.description || "");
    url.setAttribute("aria-describedby", `hint-${name} err-${name}`);
    this.inputs[name] = url;
    this.errors[name] = error;
    this.previews[name] = show;
    return el("div", { class: "field wide picture", "data-field": name },
      el("label", { for: id }, label(name)), url, file, preview, hint, error);
  }

  /** What field `name` holds now: a string, or for checkboxes the checked choices. */
  read(name) {
    if (this.pictures[name]) return this.pictures[name];
    const input = this.inputs[name];
    if (!isChoices(this.props[name])) return input.value;
    return [...input.querySelectorAll("input[type=checkbox]")].filter((box) => box.checked).map((box) => box.value);
  }

  write(name, value) {
    const input = this.inputs[name];
    if (this.previews[name]) {
      // a record carries a picture's sha256, not the picture: a re-run asks for it again
      delete this.pictures[name];
      const url = typeof value === "string" && /^https?:\/\//i.test(value) ? value : "";
      input.value = url;
      this.previews[name](previewable(url));
      return;
    }
    if (isChoices(this.props[name])) {
      const wanted = Array.isArray(value) ? value : [];
      for (const box of input.querySelectorAll("input[type=checkbox]")) box.checked = wanted.includes(box.value);
    } else {
      input.value = value === null || value === undefined ? "" : String(value);
    }
  }

  /** Move the focus to field `name` (a group: its first checkbox). */
  focus(name) {
    const input = this.inputs[name];
    (input.matches("fieldset") ? input.querySelector("input") : input).focus();
  }

  reset() {
    for (const [name, prop] of Object.entries(this.props)) {
      if (name === "prompt") continue;
      this.write(name, prop.default);
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
      if (this.inputs[name] && value !== null && value !== undefined) this.write(name, value);
    }
    this.clearErrors();
  }

  /** The request body, or null after showing the client-side errors. Defaults are left out. */
  values() {
    this.clearErrors();
    let ok = true;
    for (const [name, prop] of Object.entries(this.props)) {
      const problem = check(name, prop, this.read(name), this.schema.required || []);
      if (problem) {
        this.showError(name, `${name}: ${problem}`);
        ok = false;
      }
    }
    if (!ok) {
      const first = Object.keys(this.props).find((n) => this.inputs[n].getAttribute("aria-invalid"));
      if (first) this.focus(first);
      return null;
    }
    return this.current();
  }

  /** The parameters on the form as they are (unchecked), defaults and empty fields left out. */
  current() {
    const body = {};
    for (const [name, prop] of Object.entries(this.props)) {
      const raw = this.read(name);
      if (isChoices(prop)) {
        if (!same(raw, prop.default)) body[name] = raw;
        continue;
      }
      if (raw.trim() === "" && name !== "prompt") continue;
      let value = raw;
      if (prop.type === "integer" || prop.type === "number") value = Number(raw);
      if (name === "prompt") value = raw.trim();
      if (value !== prop.default) body[name] = value;
    }
    return body;
  }
}

/** What is wrong with `raw` for `prop`, in the server's words, or "". */
export function check(name, prop, raw, required) {
  if (isChoices(prop)) {
    const choices = prop.items.enum.join(", ");
    if (raw.length < (prop.minItems || 0)) return `must be a non-empty list of ${choices}, got []`;
    return raw.every((v) => prop.items.enum.includes(v)) ? "" : `must be a list of ${choices}`;
  }
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
