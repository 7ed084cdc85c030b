// js-enrich: a Sandpipe plugin in JavaScript (componentize-js) that calls a
// REST API with `fetch` (wasi:http, sent by the engine to the destinations
// of the grant's `http.allow` list only) and emits the message enriched
// with the answer.
//
// Config:
//   url     the API's URL, with `{id}` replaced by the message id, e.g.
//           `https://api.example.org/items/{id}`
//   output  the output the enriched document is emitted to (must be granted)
//
// 200: emits `{"id": <message id>, "found": <the API's JSON>}`; 404: skips
// the message; any other status: asks for a retry in 5 s. A destination
// outside `http.allow` makes `fetch` reject, and the message fails with the
// denial in the status log.
//
// Build: `just js-enrich` (componentize-js with `http` enabled:
// ../componentize-js.sh enrich.js OUT.wasm --http).

import { write } from "sandpipe:connector/log@1.2.0";
import { get } from "sandpipe:connector/config@1.2.0";
import { publish } from "sandpipe:connector/emit@1.2.0";

const VERSION = "0.1.0";

export function describe() {
  return {
    name: "js-enrich",
    version: VERSION,
    mimeTypes: ["application/json"],
    capabilities: ["log", "config", "emit"],
  };
}

export async function execute(msg) {
  const template = get("url");
  const output = get("output");
  if (template === undefined || output === undefined) {
    throw { tag: "invalid", val: "config needs `url` (with {id}) and `output`" };
  }
  const url = template.replaceAll("{id}", encodeURIComponent(msg.id));
  let response;
  try {
    response = await fetch(url, { headers: { accept: "application/json" } });
  } catch (e) {
    throw { tag: "unavailable", val: `GET ${url}: ${e}` };
  }
  if (response.status === 404) {
    return { tag: "skip", val: `${url}: not found` };
  }
  if (response.status !== 200) {
    return { tag: "retry", val: { delayMs: 5000n, reason: `${url} answered ${response.status}` } };
  }
  const found = await response.json();
  const doc = JSON.stringify({ id: msg.id, found });
  publish(output, new TextEncoder().encode(doc), [["content-type", "application/json"]]);
  write("info", `${msg.id}: enriched from ${url}`);
  return { tag: "done" };
}
