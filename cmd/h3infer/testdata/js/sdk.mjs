// Talks to the gateway with the official openai npm package, unmodified, over
// HTTPS/TCP; Node trusts the dev CA through NODE_EXTRA_CA_CERTS. Prints JSON
// for sdk_test.go to judge.
//
// Usage: NODE_EXTRA_CA_CERTS=ca.pem node sdk.mjs '{"url":..., "prompt":..., "maxTokens":N}'
import Ajv from 'ajv';
import OpenAI from 'openai';

const cfg = JSON.parse(process.argv[2]);
const client = new OpenAI({ baseURL: cfg.url + '/v1', apiKey: cfg.apiKey || 'unused', maxRetries: 0 });
const params = {
  model: 'demo',
  messages: [{ role: 'user', content: cfg.prompt }],
  max_tokens: cfg.maxTokens,
  temperature: 0,
};
const out = {};

const models = await client.models.list();
out.models = models.data.map((m) => m.id);

const { data: full, response } = await client.chat.completions.create(params).withResponse();
out.full = { text: full.choices[0].message.content, finish: full.choices[0].finish_reason, usage: full.usage, object: full.object };
out.altSvc = response.headers.get('alt-svc');

const stream = await client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
out.stream = { text: '', chunks: 0, finish: null, usage: null };
for await (const chunk of stream) {
  out.stream.chunks++;
  for (const c of chunk.choices) {
    out.stream.text += c.delta.content || '';
    if (c.finish_reason) out.stream.finish = c.finish_reason;
  }
  if (chunk.usage) out.stream.usage = chunk.usage;
}

const text = await client.completions.create({ model: 'demo', prompt: cfg.prompt, max_tokens: cfg.maxTokens, temperature: 0 });
out.text = { text: text.choices[0].text, finish: text.choices[0].finish_reason };

// The sampling parameters: OpenAI's as the SDK's own fields, vLLM's as
// any extra body field; streamed and whole.
const sampling = {
  ...params, temperature: 0.8, seed: 5, presence_penalty: 0.5, frequency_penalty: 1,
  logit_bias: { 3: -100, 9: 3 }, top_k: 30, repetition_penalty: 1.2,
};
const sampled = await client.chat.completions.create(sampling);
out.sampling = { full: sampled.choices[0].message.content, stream: '' };
for await (const chunk of await client.chat.completions.create({ ...sampling, stream: true })) {
  for (const c of chunk.choices) out.sampling.stream += c.delta.content || '';
}
// A json_schema response_format through the SDK's structured-output
// helpers: parse() for the whole answer and stream() for the streamed
// one, each of which parses the document the way an application would
// receive it; ajv, not the server, judges each against the schema. No free
// strings: the demo model, which writes prose, would fill one to
// max_tokens.
const schema = {
  type: 'object',
  properties: {
    n: { type: 'integer' },
    ok: { type: 'boolean' },
    color: { enum: ['red', 'green', 'blue'] },
    xs: { type: 'array', items: { type: ['integer', 'null'] }, maxItems: 3 },
  },
  required: ['n', 'ok', 'color', 'xs'],
  additionalProperties: false,
};
const validate = new Ajv({ allErrors: true, strict: true }).compile(schema);
const judge = (content, parsed) => {
  let doc;
  try {
    doc = JSON.parse(content);
  } catch (e) {
    return { valid: false, errors: [`does not parse: ${e.message}`] };
  }
  const valid = validate(doc);
  const errors = valid ? [] : validate.errors.map((e) => `${e.instancePath} ${e.message}`);
  if (JSON.stringify(parsed) !== JSON.stringify(doc)) errors.push(`the SDK parsed ${JSON.stringify(parsed)}`);
  return { valid: valid && errors.length === 0, errors };
};
out.format = [];
for (const seed of [0, 1, 2]) {
  const formatted = {
    ...params,
    max_tokens: 200,
    temperature: 1,
    seed,
    response_format: { type: 'json_schema', json_schema: { name: 'answer', strict: true, schema } },
  };
  const full = await client.chat.completions.parse(formatted);
  const message = full.choices[0].message;
  const entry = { seed, full: message.content, finish: full.choices[0].finish_reason, ...judge(message.content, message.parsed) };
  const stream = client.chat.completions.stream(formatted);
  let chunks = 0;
  for await (const chunk of stream) if (chunk.choices.some((c) => c.delta.content)) chunks++;
  const final = await stream.finalChatCompletion();
  const streamed = final.choices[0].message;
  const verdict = judge(streamed.content, streamed.parsed ?? JSON.parse(streamed.content));
  entry.stream = { text: streamed.content, finish: final.choices[0].finish_reason, chunks, ...verdict };
  out.format.push(entry);
}
// A schema outside the subset is refused by name.
try {
  await client.chat.completions.create({
    ...params,
    response_format: {
      type: 'json_schema',
      json_schema: { name: 'answer', schema: { type: 'object', properties: { s: { type: 'string', pattern: '^a+$' } }, required: ['s'] } },
    },
  });
  out.refused = null;
} catch (e) {
  out.refused = { status: e.status, param: e.param ?? e.error?.param ?? null, message: e.error?.message ?? e.message };
}

// Embeddings: the SDK asks for base64 unless told otherwise and decodes
// it into numbers itself; the float answer must be the same numbers.
if (cfg.embedInputs) {
  const b64 = await client.embeddings.create({ model: 'encoder', input: cfg.embedInputs });
  const floats = await client.embeddings.create({ model: 'encoder', input: cfg.embedInputs, encoding_format: 'float' });
  const short = await client.embeddings.create({ model: 'encoder', input: cfg.embedInputs[0], dimensions: 8, encoding_format: 'float' });
  out.embeddings = {
    base64: b64.data.map((d) => d.embedding),
    float: floats.data.map((d) => d.embedding),
    indexes: floats.data.map((d) => d.index),
    usage: floats.usage,
    short: short.data[0].embedding,
  };
  try {
    await client.embeddings.create({ model: 'demo', input: 'x' });
    out.embeddings.refused = null;
  } catch (e) {
    out.embeddings.refused = { status: e.status, param: e.param ?? e.error?.param ?? null };
  }
}

process.stdout.write(JSON.stringify(out) + '\n');
