// js-validate: a Sandpipe plugin in JavaScript (componentize-js).
//
// Validates the message's data object, a JSON document read through `blob`
// in bounded chunks, against the JSON schema in its config (`schema`), then
// emits the valid document to the output named by `output` and dead-letters
// an invalid one with the validation errors as the reason.
//
// Config:
//   schema     a JSON schema (a YAML map in the grant, or JSON text)
//   output     the output valid documents are emitted to (must be granted)
//   max_bytes  the largest document accepted (default 1048576); larger ones
//              are dead-lettered
//
// The validator is a small subset of JSON Schema written here, so the
// component needs no bundler: `type` (a name or a list of names), `enum`,
// `const`, `required`, `properties`, `additionalProperties` (false or a
// schema), `items`, `minItems`/`maxItems`, `minLength`/`maxLength`,
// `minimum`/`maximum`, `pattern`. Unknown keywords are ignored, as JSON
// Schema says.
//
// Build: `just js-plugin` (see ../componentize-js.sh).

import { write } from "sandpipe:connector/log@1.2.0";
import { get } from "sandpipe:connector/config@1.2.0";
import { openData } from "sandpipe:connector/blob@1.2.0";
import { publish } from "sandpipe:connector/emit@1.2.0";

const VERSION = "0.1.0";
const CHUNK = 64 * 1024;
const MAX_ERRORS = 10;

export function describe() {
  return {
    name: "js-validate",
    version: VERSION,
    mimeTypes: ["application/json"],
    capabilities: ["log", "config", "blob", "emit"],
  };
}

export function execute(msg) {
  const schemaText = get("schema");
  const output = get("output");
  if (schemaText === undefined || output === undefined) {
    throw fail("invalid", "config needs `schema` (a JSON schema) and `output` (an output name)");
  }
  let schema;
  try {
    schema = JSON.parse(schemaText);
  } catch (e) {
    throw fail("invalid", `config \`schema\` is not JSON: ${e.message}`);
  }
  if (typeof schema !== "object" || schema === null || Array.isArray(schema)) {
    throw fail("invalid", "config `schema` must be a JSON object");
  }
  const maxBytes = positive(get("max_bytes"), 1024 * 1024, "max_bytes");

  // Close the reader when done, rather than leaving it to the garbage
  // collector: an instance that ends a message with a reader open is not
  // reused (a grant's `reuse`).
  const reader = openData();
  let bytes;
  try {
    bytes = readAll(reader, maxBytes);
  } finally {
    reader[Symbol.dispose ?? Symbol.for("dispose")]?.();
  }
  if (bytes === null) {
    return deadLetter(`${msg.dataLocation}: larger than max_bytes (${maxBytes})`);
  }
  let doc;
  try {
    doc = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (e) {
    return deadLetter(`${msg.dataLocation}: not a JSON document: ${e.message}`);
  }
  const errors = [];
  validate(schema, doc, "$", errors);
  if (errors.length > 0) {
    const more = errors.length > MAX_ERRORS ? ` (and ${errors.length - MAX_ERRORS} more)` : "";
    return deadLetter(
      `${msg.dataLocation}: invalid: ${errors.slice(0, MAX_ERRORS).join("; ")}${more}`,
    );
  }
  publish(output, bytes, [
    ["content-type", "application/json"],
    ["sandpipe-source", msg.id],
  ]);
  write("info", `${msg.dataLocation}: valid (${bytes.length} bytes), emitted to ${output}`);
  return { tag: "done" };
}

function deadLetter(reason) {
  write("warn", reason);
  return { tag: "dead-letter", val: reason };
}

// An `error` of the WIT package, thrown from `execute` (a plain object: the
// bindings turn it into the result's `err`).
function fail(tag, text) {
  return { tag, val: text };
}

function positive(text, fallback, key) {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) {
    throw fail("invalid", `config \`${key}\` must be a positive integer, not ${text}`);
  }
  return n;
}

// Read a `blob` reader to its end in CHUNK-byte reads; null past `max` bytes.
function readAll(reader, max) {
  const chunks = [];
  let total = 0;
  for (;;) {
    const chunk = reader.read(CHUNK);
    if (chunk.length === 0) break;
    total += chunk.length;
    if (total > max) return null;
    chunks.push(chunk);
  }
  const all = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  return all;
}

function typeOf(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  if (typeof value === "number") return Number.isInteger(value) ? "integer" : "number";
  return typeof value; // string, boolean, object
}

function hasType(value, type) {
  const actual = typeOf(value);
  return actual === type || (type === "number" && actual === "integer");
}

function show(value) {
  return JSON.stringify(value);
}

function equal(a, b) {
  return show(a) === show(b);
}

// Push one "path: problem" per violation of `schema` by `value`.
export function validate(schema, value, path, errors) {
  if (schema === true || schema === undefined) return;
  if (schema === false) {
    errors.push(`${path}: not allowed`);
    return;
  }
  if (schema.type !== undefined) {
    const types = Array.isArray(schema.type) ? schema.type : [schema.type];
    if (!types.some((t) => hasType(value, t))) {
      errors.push(`${path}: expected ${types.join(" or ")}, got ${typeOf(value)}`);
      return;
    }
  }
  if (schema.enum !== undefined && !schema.enum.some((e) => equal(e, value))) {
    errors.push(`${path}: ${show(value)} is not one of ${schema.enum.map(show).join(", ")}`);
  }
  if (schema.const !== undefined && !equal(schema.const, value)) {
    errors.push(`${path}: must be ${show(schema.const)}`);
  }
  if (typeof value === "string") {
    if (schema.minLength !== undefined && value.length < schema.minLength) {
      errors.push(`${path}: shorter than ${schema.minLength} characters`);
    }
    if (schema.maxLength !== undefined && value.length > schema.maxLength) {
      errors.push(`${path}: longer than ${schema.maxLength} characters`);
    }
    if (schema.pattern !== undefined && !new RegExp(schema.pattern, "u").test(value)) {
      errors.push(`${path}: does not match /${schema.pattern}/`);
    }
  }
  if (typeof value === "number") {
    if (schema.minimum !== undefined && value < schema.minimum) {
      errors.push(`${path}: ${value} is less than ${schema.minimum}`);
    }
    if (schema.maximum !== undefined && value > schema.maximum) {
      errors.push(`${path}: ${value} is greater than ${schema.maximum}`);
    }
  }
  if (Array.isArray(value)) {
    if (schema.minItems !== undefined && value.length < schema.minItems) {
      errors.push(`${path}: fewer than ${schema.minItems} items`);
    }
    if (schema.maxItems !== undefined && value.length > schema.maxItems) {
      errors.push(`${path}: more than ${schema.maxItems} items`);
    }
    if (schema.items !== undefined) {
      value.forEach((item, i) => validate(schema.items, item, `${path}[${i}]`, errors));
    }
  } else if (typeOf(value) === "object") {
    for (const key of schema.required ?? []) {
      if (!Object.hasOwn(value, key)) errors.push(`${path}: missing required property "${key}"`);
    }
    const properties = schema.properties ?? {};
    for (const [key, item] of Object.entries(value)) {
      const at = /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(key) ? `${path}.${key}` : `${path}[${show(key)}]`;
      if (Object.hasOwn(properties, key)) {
        validate(properties[key], item, at, errors);
      } else if (schema.additionalProperties === false) {
        errors.push(`${at}: unexpected property`);
      } else if (typeof schema.additionalProperties === "object") {
        validate(schema.additionalProperties, item, at, errors);
      }
    }
  }
}
