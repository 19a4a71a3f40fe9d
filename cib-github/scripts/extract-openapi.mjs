#!/usr/bin/env node
// Extracts the operations of GitHub's REST API that cib calls from the pinned `@octokit/openapi`
// package into cib-github/tests/fixtures/openapi/operations.json, which the fake GitHub
// (`cib_github::testing`) checks every request and answer against.
//
// Usage (from anywhere): node cib-github/scripts/extract-openapi.mjs
//
// The package is installed into a temporary directory, never into the repository. The output
// keeps, per operation, the method, the path template, the path and query parameters, the JSON
// request body schema and the JSON response schema of each status, plus the component schemas
// those refer to, and nothing else (descriptions and examples are dropped), so the committed file
// stays small and a diff after a version bump shows only what matters to cib.
//
// Two rewrites make the OpenAPI 3.0 schemas usable by a JSON Schema validator:
// - `nullable: true` becomes an explicit `null` alternative, since JSON Schema has no `nullable`;
// - request bodies get `additionalProperties: false` at their top level. GitHub ignores unknown
//   fields, so this is stricter than GitHub on purpose: a misspelt field (`desciption`) would
//   otherwise be dropped silently by GitHub and pass the fake as well.

import { execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const PACKAGE = "@octokit/openapi";
// Pinned exactly: a new description may change a schema cib relies on, which must show up as a
// reviewed diff of operations.json rather than silently.
const VERSION = "23.0.2";
// Every operation cib-github sends; the fake refuses anything else as unknown.
const OPERATIONS = [
  ["get", "/repos/{owner}/{repo}/contents/{path}"],
  ["get", "/repos/{owner}/{repo}/tarball/{ref}"],
  ["get", "/repos/{owner}/{repo}/compare/{basehead}"],
  ["get", "/repos/{owner}/{repo}/commits/{ref}"],
  ["patch", "/repos/{owner}/{repo}/git/refs/{ref}"],
  ["get", "/repos/{owner}/{repo}/collaborators/{username}/permission"],
  ["get", "/repos/{owner}/{repo}/pulls/{pull_number}/reviews"],
  ["post", "/repos/{owner}/{repo}/statuses/{sha}"],
  ["post", "/repos/{owner}/{repo}/issues/{issue_number}/comments"],
  ["post", "/app/installations/{installation_id}/access_tokens"],
  ["get", "/repos/{owner}/{repo}/installation"],
  ["post", "/repos/{owner}/{repo}/check-runs"],
  ["patch", "/repos/{owner}/{repo}/check-runs/{check_run_id}"],
  ["get", "/orgs/{org}/teams/{team_slug}/memberships/{username}"],
];

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "tests", "fixtures", "openapi");

const work = mkdtempSync(join(tmpdir(), "cib-openapi-"));
try {
  // --ignore-scripts: an install must never run code we did not read.
  execFileSync(
    "npm",
    ["install", "--prefix", work, "--no-save", "--ignore-scripts", "--no-audit", "--no-fund", `${PACKAGE}@${VERSION}`],
    { stdio: ["ignore", "ignore", "inherit"] },
  );
  const root = join(work, "node_modules", ...PACKAGE.split("/"));
  const manifest = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
  if (manifest.version !== VERSION) throw new Error(`installed ${manifest.version}, expected ${VERSION}`);
  if (manifest.license !== "MIT") throw new Error(`licence changed to ${manifest.license}: review before use`);
  const licence = readFileSync(join(root, "LICENSE"), "utf8");
  const description = JSON.parse(readFileSync(join(root, "generated", "api.github.com.json"), "utf8"));

  const deref = (node) => {
    // Parameters, request bodies and responses may be `$ref`s into `components`; schemas are
    // kept as references (resolved by the validator) so shared ones are stored once.
    while (node && node.$ref && !node.$ref.startsWith("#/components/schemas/")) {
      const [, , kind, name] = node.$ref.split("/");
      node = description.components[kind][name];
    }
    return node;
  };

  const needed = new Set();
  const operations = OPERATIONS.map(([method, path]) => {
    const op = description.paths[path]?.[method];
    if (!op) throw new Error(`${method.toUpperCase()} ${path} is not in the description`);
    const parameters = [...(description.paths[path].parameters ?? []), ...(op.parameters ?? [])]
      .map(deref)
      .filter((p) => p.in === "path" || p.in === "query")
      .map((p) => ({
        name: p.name,
        in: p.in,
        required: p.required === true,
        multi_segment: p["x-multi-segment"] === true,
        schema: clean(p.schema ?? {}, needed),
      }));
    const body = deref(op.requestBody);
    const bodySchema = body?.content?.["application/json"]?.schema;
    const request_body = bodySchema
      ? { required: body.required === true, schema: closeTopLevel(clean(bodySchema, needed)) }
      : null;
    const responses = {};
    for (const [status, response] of Object.entries(op.responses)) {
      const schema = deref(response)?.content?.["application/json"]?.schema;
      responses[status] = schema ? clean(schema, needed) : null;
    }
    return { id: op.operationId, method: method.toUpperCase(), path, parameters, request_body, responses };
  });

  // The component schemas reachable from the operations, and those reachable from them.
  const schemas = {};
  const queue = [...needed];
  while (queue.length > 0) {
    const name = queue.pop();
    if (name in schemas) continue;
    const found = new Set();
    schemas[name] = clean(description.components.schemas[name], found);
    for (const next of found) if (!(next in schemas)) queue.push(next);
  }
  const sorted = Object.fromEntries(Object.keys(schemas).sort().map((k) => [k, schemas[k]]));

  const integrity = JSON.parse(readFileSync(join(work, "node_modules", ".package-lock.json"), "utf8")).packages[
    `node_modules/${PACKAGE}`
  ].integrity;
  const document = {
    source: { package: PACKAGE, version: VERSION, file: "generated/api.github.com.json", openapi: description.openapi },
    operations,
    components: { schemas: sorted },
  };
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, "operations.json"), JSON.stringify(document, null, 1) + "\n");
  writeFileSync(join(out, "SOURCE.md"), sourceNote(manifest, integrity, description, operations, sorted, licence));
  process.stderr.write(`${operations.length} operations, ${Object.keys(sorted).length} component schemas\n`);
} finally {
  rmSync(work, { recursive: true, force: true });
}

// A copy of a schema without documentation, with `nullable` rewritten, noting every component
// schema it refers to in `needed`.
function clean(schema, needed) {
  if (Array.isArray(schema)) return schema.map((s) => clean(s, needed));
  if (schema === null || typeof schema !== "object") return schema;
  const copy = {};
  for (const [key, value] of Object.entries(schema)) {
    if (["description", "example", "examples", "externalDocs", "title", "nullable"].includes(key)) continue;
    if (key.startsWith("x-")) continue;
    if (key === "$ref") {
      needed.add(value.replace("#/components/schemas/", ""));
      copy[key] = value;
    } else if (key === "properties" || key === "patternProperties") {
      copy[key] = Object.fromEntries(Object.entries(value).map(([k, v]) => [k, clean(v, needed)]));
    } else if (["items", "additionalProperties", "not"].includes(key) && typeof value === "object") {
      copy[key] = clean(value, needed);
    } else if (["allOf", "anyOf", "oneOf"].includes(key)) {
      copy[key] = value.map((s) => clean(s, needed));
    } else {
      copy[key] = value;
    }
  }
  if (schema.nullable === true) {
    if (typeof copy.type === "string" && Object.keys(copy).every((k) => k !== "allOf" && k !== "anyOf" && k !== "oneOf")) {
      copy.type = [copy.type, "null"];
      if (Array.isArray(copy.enum) && !copy.enum.includes(null)) copy.enum = [...copy.enum, null];
    } else {
      return { anyOf: [copy, { type: "null" }] };
    }
  }
  return copy;
}

function closeTopLevel(schema) {
  if (schema.type === "object" && schema.properties && schema.additionalProperties === undefined) {
    return { ...schema, additionalProperties: false };
  }
  return schema;
}

function sourceNote(manifest, integrity, description, operations, schemas, licence) {
  const rows = operations.map((op) => `| \`${op.id}\` | \`${op.method} ${op.path}\` | ${Object.keys(op.responses).join(", ")} |`);
  return `# GitHub REST API operations used by cib

Generated by \`node cib-github/scripts/extract-openapi.mjs\` (run it again to regenerate); do not edit by hand.

- Package: \`${manifest.name}\` version \`${manifest.version}\` from the npm registry
  (integrity \`${integrity}\`), file \`generated/api.github.com.json\` (OpenAPI ${description.openapi},
  API ${description.info.version}).
- Upstream: ${typeof manifest.repository === "object" ? manifest.repository.url : manifest.repository}.
- Licence: ${manifest.license}; the package's LICENSE file is reproduced below.
- Selection: the ${operations.length} operations cib-github sends, with their path and query parameters,
  JSON request body schema and JSON response schema per status, and the ${Object.keys(schemas).length}
  component schemas they refer to. Descriptions, examples and \`x-\` extensions are dropped.
- Rewrites: \`nullable: true\` becomes a \`null\` alternative (JSON Schema has no \`nullable\`); request
  bodies get \`additionalProperties: false\` at the top level, stricter than GitHub on purpose, so
  that a misspelt field fails the tests instead of being ignored.

| operation | request | response statuses |
|---|---|---|
${rows.join("\n")}

## Licence

${licence.trim()}
`;
}
