// "Copy as code": the request on the page as a segmind SDK snippet, a curl command and an OpenAI
// SDK snippet, against this server's base URL. The key is read from KOLORS_API_KEY, never inlined.
const ENV = "KOLORS_API_KEY";
const MODEL = "kolors";
// Fields the OpenAI route takes under their Kolors names (the rest map to size, n, output_*).
const OPENAI_EXTRA = ["negative_prompt", "cfg", "seed", "steps", "scheduler"];

// JSON literals are Python literals for strings and numbers (the only types a request holds).
const py = (value) => JSON.stringify(value);
const shellQuote = (text) => `'${text.replace(/'/g, "'\\''")}'`;

function kwargs(params, indent) {
  return Object.entries(params).map(([k, v]) => `${k}=${py(v)}`).join(`,\n${indent}`);
}

export function segmindSnippet(base, params) {
  const indent = " ".repeat(20);
  return `import os

from segmind import SegmindClient

client = SegmindClient(api_key=os.environ["${ENV}"],
                       base_url=${py(`${base}/v1`)})
result = client.run(${py(MODEL)},
${indent}${kwargs(params, indent)})
print(result["output"])  # signed image URLs
`;
}

export function curlSnippet(base, params) {
  const ext = params.output_format || "webp";
  return `curl -s ${base}/v1/${MODEL} -H "x-api-key: $${ENV}" -H 'content-type: application/json' \\
  -d ${shellQuote(JSON.stringify(params))} -o out.${ext} -D -
`;
}

export function openaiSnippet(base, params, defaults) {
  const width = params.width ?? defaults.width;
  const height = params.height ?? defaults.height;
  const args = { model: MODEL, prompt: params.prompt, size: `${width}x${height}`, n: params.number_of_images ?? 1 };
  // the OpenAI route's own default is png: say the format, so it is the image the page makes
  args.output_format = params.output_format ?? defaults.output_format;
  if (params.output_quality !== undefined) args.output_compression = params.output_quality;
  const extra = Object.fromEntries(OPENAI_EXTRA.filter((k) => params[k] !== undefined).map((k) => [k, params[k]]));
  const indent = " ".repeat(29);
  const lines = Object.entries(args).map(([k, v]) => `${k}=${py(v)}`);
  if (Object.keys(extra).length) lines.push(`extra_body=${JSON.stringify(extra)}`);
  return `import base64
import os

from openai import OpenAI

client = OpenAI(api_key=os.environ["${ENV}"],
                base_url=${py(`${base}/v1`)})
img = client.images.generate(${lines.join(`,\n${indent}`)})
for i, image in enumerate(img.data):
    with open(f"out-{i}.${args.output_format}", "wb") as f:
        f.write(base64.b64decode(image.b64_json))
`;
}

export function snippet(lang, base, params, defaults) {
  if (lang === "curl") return curlSnippet(base, params);
  if (lang === "openai") return openaiSnippet(base, params, defaults);
  return segmindSnippet(base, params);
}
