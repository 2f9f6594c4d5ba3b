// Reads one request as JSON on stdin and writes Hugging Face tokenizers'
// answers (the native Rust binding) as JSON on stdout, so that a Go test
// runs node once per tokenizer rather than once per text:
//
//   {"tokenizer": "path/tokenizer.json", "texts": ["..."], "decode": [[1, 2]],
//    "bench_rounds": 0}
//
// answers
//
//   {"encode": [[...]], "encode_special": [[...]], "decode": ["..."],
//    "decode_skip": ["..."], "texts_decoded": [{...}], "bench_mb_per_s": 0}
//
// texts_decoded holds, for each text, the decodes of its own encodings
// and of prefixes of its add_special_tokens encoding, cut where cuts()
// says (the Go test cuts at the same places).
// With bench_rounds > 0 it also encodes every text that many times, one
// text per call as a single request would, and reports the throughput.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const { Tokenizer } = require("@anush008/tokenizers");

const req = JSON.parse(readFileSync(0, "utf8"));
const tok = Tokenizer.fromFile(req.tokenizer);
const out = { encode: [], encode_special: [], decode: [], decode_skip: [], texts_decoded: [], bench_mb_per_s: 0 };

function cuts(n) {
  const ks = [1, Math.floor(n / 4), Math.floor(n / 2), Math.floor((3 * n) / 4), n - 1];
  return [...new Set(ks)].filter((k) => k > 0 && k < n).sort((a, b) => a - b);
}

for (const text of req.texts ?? []) {
  const plain = (await tok.encode(text, null, { addSpecialTokens: false })).getIds();
  const special = (await tok.encode(text, null, { addSpecialTokens: true })).getIds();
  out.encode.push(plain);
  out.encode_special.push(special);
  const d = {
    plain: await tok.decode(plain, false),
    plain_skip: await tok.decode(plain, true),
    special: await tok.decode(special, false),
    special_skip: await tok.decode(special, true),
    prefixes: [],
  };
  for (const k of cuts(special.length)) d.prefixes.push(await tok.decode(special.slice(0, k), false));
  out.texts_decoded.push(d);
}
for (const list of req.decode ?? []) {
  const ids = list ?? [];
  out.decode.push(await tok.decode(ids, false));
  out.decode_skip.push(await tok.decode(ids, true));
}
const rounds = req.bench_rounds ?? 0;
if (rounds > 0) {
  const bytes = (req.texts ?? []).reduce((n, t) => n + Buffer.byteLength(t, "utf8"), 0);
  for (const text of req.texts) await tok.encode(text, null, { addSpecialTokens: false }); // warm up
  const start = process.hrtime.bigint();
  for (let r = 0; r < rounds; r++) {
    for (const text of req.texts) await tok.encode(text, null, { addSpecialTokens: false });
  }
  const secs = Number(process.hrtime.bigint() - start) / 1e9;
  out.bench_mb_per_s = (bytes * rounds) / secs / 1e6;
}
process.stdout.write(JSON.stringify(out));
