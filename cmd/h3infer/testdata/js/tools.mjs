// Asks for tool calls with the official openai npm package, unmodified,
// over HTTPS/TCP, and judges each call's arguments with ajv against its
// function's schema. Prints JSON for tools_e2e_test.go to judge.
//
// Usage: NODE_EXTRA_CA_CERTS=ca.pem node tools.mjs '{"url":..., "apiKey":..., "model":..., "schemas":{name: schema}, "seeds":N}'
import Ajv from 'ajv';
import OpenAI from 'openai';

const cfg = JSON.parse(process.argv[2]);
const client = new OpenAI({ baseURL: cfg.url + '/v1', apiKey: cfg.apiKey || 'unused', maxRetries: 0 });
const ajv = new Ajv({ strict: true, allErrors: true });
const validate = {};
const tools = [];
for (const [name, schema] of Object.entries(cfg.schemas)) {
  validate[name] = ajv.compile(schema);
  tools.push({ type: 'function', function: { name, description: `Does ${name}.`, parameters: schema, strict: true } });
}
const names = Object.keys(cfg.schemas);

const out = [];
for (let seed = 0; seed < cfg.seeds; seed++) {
  const named = seed % 2 === 1 ? names[seed % names.length] : null;
  const params = {
    model: cfg.model,
    messages: [{ role: 'user', content: 'Do what you can with the tools.' }],
    tools,
    tool_choice: named ? { type: 'function', function: { name: named } } : 'required',
    parallel_tool_calls: seed % 3 !== 0,
    max_tokens: 300,
    temperature: 1,
    seed,
  };
  const full = await client.chat.completions.create(params);
  const msg = full.choices[0].message;
  const call = (msg.tool_calls || [])[0] || { function: {} };
  const r = {
    seed,
    choice: named || 'required',
    finish: full.choices[0].finish_reason,
    name: call.function.name || '',
    args: call.function.arguments || '',
    contentNull: msg.content === null && (msg.tool_calls || []).length === 1,
    valid: false,
    errors: [],
  };
  try {
    const v = validate[r.name];
    if (!v) throw new Error(`no function ${r.name}`);
    r.valid = v(JSON.parse(r.args)) && (!named || r.name === named);
    r.errors = (v.errors || []).map((e) => `${e.instancePath} ${e.message}`);
  } catch (e) {
    r.errors = [String(e)];
  }

  // Streamed: the first delta opens the call, the next ones append to
  // its arguments.
  r.streamName = '';
  r.streamArgs = '';
  r.streamFinish = null;
  r.deltas = 0;
  r.streamedContent = false;
  for await (const chunk of await client.chat.completions.create({ ...params, stream: true })) {
    for (const c of chunk.choices) {
      if (c.delta.content) r.streamedContent = true;
      for (const d of c.delta.tool_calls || []) {
        if (r.deltas === 0) r.firstDelta = d;
        r.deltas++;
        if (d.function?.name) r.streamName += d.function.name;
        r.streamArgs += d.function?.arguments || '';
      }
      if (c.finish_reason) r.streamFinish = c.finish_reason;
    }
  }
  out.push(r);
}
process.stdout.write(JSON.stringify(out));
