// Runs the JavaScript read side over every conformance vector: for each replica's saved
// document, loads it with @automerge/automerge, checks its heads, derives the view
// (view.mjs) and compares it with the vector's expected view, byte for byte in canonical JSON.
//
// Usage: node run.mjs [vectors directory]   (default: ../vectors next to this file)

import { readFileSync, readdirSync, statSync } from "node:fs";
import { join, dirname, relative } from "node:path";
import { fileURLToPath } from "node:url";
import * as A from "@automerge/automerge";
import { canonical, deriveView } from "./view.mjs";

const dir = process.argv[2] ?? join(dirname(fileURLToPath(import.meta.url)), "..", "vectors");

function files(d) {
  return readdirSync(d)
    .sort()
    .flatMap((f) => {
      const p = join(d, f);
      if (statSync(p).isDirectory()) return files(p);
      return p.endsWith(".json") ? [p] : [];
    });
}

let vectors = 0;
let views = 0;
let unreadable = 0;
const failures = [];
for (const file of files(dir)) {
  const v = JSON.parse(readFileSync(file, "utf8"));
  if (v.format !== "pos-conformance/1") {
    failures.push(`${relative(dir, file)}: format ${v.format}`);
    continue;
  }
  vectors++;
  for (const out of v.expected) {
    const where = `${v.name} [${out.replica}]`;
    try {
      const doc = A.load(new Uint8Array(Buffer.from(out.saved, "base64")));
      const heads = [...A.getHeads(doc)].sort();
      if (heads.join() !== out.heads.join()) throw new Error(`heads ${heads} != ${out.heads}`);
      if (out.view === null) {
        // The model does not read this document as an order (a forger's own copy, an empty
        // replica); format 1 asks readers only to load it.
        unreadable++;
        continue;
      }
      const got = canonical(deriveView(doc));
      const want = canonical(out.view);
      if (got !== want) throw new Error(`view differs\n  got  ${got}\n  want ${want}`);
      views++;
    } catch (e) {
      failures.push(`${where}: ${e.message}`);
    }
  }
}
for (const f of failures) console.error(`FAIL ${f}`);
console.log(
  `JavaScript reader (@automerge/automerge): ${vectors} vectors, ${views} views matched, ` +
    `${unreadable} documents the model does not read (loaded, heads checked), ${failures.length} failures`,
);
process.exit(failures.length === 0 && vectors > 0 ? 0 : 1);
