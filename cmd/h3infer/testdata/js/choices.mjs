// Asks the gateway for several choices with the official openai npm
// package, unmodified, over HTTPS/TCP: chat and text completions, whole
// and streamed, seeded. Prints each choice as the SDK handed it over, by
// the index the SDK read, for choices_e2e_test.go to judge.
//
// Usage: NODE_EXTRA_CA_CERTS=ca.pem node choices.mjs '{"url":..., "prompt":..., "maxTokens":N, "n":N, "seed":N}'
import OpenAI from 'openai';

const cfg = JSON.parse(process.argv[2]);
const client = new OpenAI({ baseURL: cfg.url + '/v1', apiKey: cfg.apiKey || 'unused', maxRetries: 0 });
const chat = {
  model: 'demo',
  messages: [{ role: 'user', content: cfg.prompt }],
  max_tokens: cfg.maxTokens,
  temperature: 1,
  seed: cfg.seed,
  n: cfg.n,
  logprobs: true,
};
const out = {};

// choice is what a whole answer's choice says.
const whole = (c, text) => ({ index: c.index, text, finish: c.finish_reason, logprobs: (c.logprobs?.content ?? c.logprobs?.tokens ?? []).length });

const full = await client.chat.completions.create(chat);
out.chat = { choices: full.choices.map((c) => whole(c, c.message.content)), usage: full.usage };

// Streamed: each chunk's choices by their index, a choice's finish as it
// comes (ended lists the order the choices ended in).
async function streamed(req, textOf) {
  const s = { choices: [], ended: [], usage: null, chunks: 0 };
  for await (const chunk of req) {
    s.chunks++;
    for (const c of chunk.choices) {
      const got = (s.choices[c.index] ??= { index: c.index, text: '', finish: null, logprobs: 0 });
      got.text += textOf(c) ?? '';
      got.logprobs += (c.logprobs?.content ?? c.logprobs?.tokens ?? []).length;
      if (c.finish_reason) {
        got.finish = c.finish_reason;
        s.ended.push(c.index);
      }
    }
    if (chunk.usage) s.usage = chunk.usage;
  }
  return s;
}
out.chatStream = await streamed(
  await client.chat.completions.create({ ...chat, stream: true, stream_options: { include_usage: true } }),
  (c) => c.delta.content,
);

const text = { model: 'demo', prompt: cfg.prompt, max_tokens: cfg.maxTokens, temperature: 1, seed: cfg.seed, n: cfg.n, logprobs: 1 };
const tfull = await client.completions.create(text);
out.text = { choices: tfull.choices.map((c) => whole(c, c.text)), usage: tfull.usage };
out.textStream = await streamed(
  await client.completions.create({ ...text, stream: true, stream_options: { include_usage: true } }),
  (c) => c.text,
);

// Out of range: the SDK's typed error, naming n.
try {
  await client.chat.completions.create({ ...chat, n: 17 });
  out.refused = null;
} catch (e) {
  out.refused = { status: e.status, param: e.param ?? e.error?.param ?? null };
}

console.log(JSON.stringify(out));
