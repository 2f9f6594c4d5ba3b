// Renders chat templates with @huggingface/jinja, the reference for
// tokenize's Jinja templates (chattemplate_reference_test.go). Reads a
// JSON list of {template, context, now} from stdin and prints a JSON list
// of {output} or {error}, one per case, in one node run.
//
// now (RFC 3339) fixes the clock of the library's own strftime_now, as
// the Go side fixes its own: the Date constructor without arguments
// returns it. The caller runs node with TZ=UTC, the zone of now.
import { Template } from "@huggingface/jinja";

const RealDate = Date;
let fixedNow = 0;
globalThis.Date = class extends RealDate {
  constructor(...args) {
    if (args.length === 0) super(fixedNow);
    else super(...args);
  }
  static now() {
    return fixedNow;
  }
};

const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const cases = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const compiled = new Map();
const results = cases.map(({ template, context, now }) => {
  try {
    let t = compiled.get(template);
    if (!t) {
      t = new Template(template);
      compiled.set(template, t);
    }
    fixedNow = RealDate.parse(now);
    return { output: t.render(context) };
  } catch (e) {
    return { error: String(e && e.message !== undefined ? e.message : e) };
  }
});
process.stdout.write(JSON.stringify(results));
