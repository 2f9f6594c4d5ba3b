// The prompt a model directory's own files make of a request, by the
// reference implementations: the chat template from tokenizer_config.json
// rendered by @huggingface/jinja, then encoded by Hugging Face tokenizers'
// native binding. A chat's rendered text carries its own special tokens,
// so it is encoded without adding any; a raw prompt gets them added, as
// transformers' apply_chat_template and a plain encode do.
//
// stdin:  {"dir": "...", "requests": [{"messages": [...]} | {"prompt": "..."}]}
// stdout: [{"text": "...", "ids": [...]} | {"error": "..."}]
'use strict';
const fs = require('fs');
const path = require('path');
const { Template } = require('@huggingface/jinja');
const { Tokenizer } = require('@anush008/tokenizers');

function tokenText(t) {
  return t && typeof t === 'object' ? t.content : t;
}

async function main() {
  const req = JSON.parse(fs.readFileSync(0, 'utf8'));
  const cfg = JSON.parse(fs.readFileSync(path.join(req.dir, 'tokenizer_config.json'), 'utf8'));
  const tok = Tokenizer.fromFile(path.join(req.dir, 'tokenizer.json'));
  const out = [];
  for (const r of req.requests) {
    try {
      let text = r.prompt;
      let special = true;
      if (r.messages) {
        const tmpl = new Template(cfg.chat_template);
        text = tmpl.render({
          messages: r.messages,
          add_generation_prompt: true,
          bos_token: tokenText(cfg.bos_token) ?? '',
          eos_token: tokenText(cfg.eos_token) ?? '',
        });
        special = false;
      }
      const enc = await tok.encode(text, null, { addSpecialTokens: special });
      out.push({ text, ids: Array.from(enc.getIds()) });
    } catch (e) {
      out.push({ error: String(e && e.message ? e.message : e) });
    }
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
