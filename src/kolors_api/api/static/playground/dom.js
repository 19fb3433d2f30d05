// A small element builder: el("a", {href, class}, "text", child…). Text goes in as text, never HTML.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const $ = (selector) => document.querySelector(selector);

/** `text` with its `code` spans (between backticks) as <code> elements: the nodes to append. */
export function withCode(text) {
  return String(text).split("`").map((part, i) => (i % 2 ? el("code", {}, part) : part)).filter((p) => p !== "");
}

/** "1 credit", "1.2 credits". */
export function credits(amount) {
  return `${amount} credit${Number(amount) === 1 ? "" : "s"}`;
}

/** Copy `text` to the clipboard; falls back to a selected, hidden textarea where the API is missing. */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = el("textarea", { class: "offscreen", readonly: true });
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}
