// A hostile page in the Debian chromium against the gateway's admin
// listener, as admin_browser_test.go sets it up: a page from another local
// origin sends the model admin's state changes the ways a page can without
// the user's help, and a page on a name rebound to 127.0.0.1 reads
// /debug/state. Prints what the browser saw as JSON; the Go test judges
// by what the gateway did.
//
// Usage: node adminattack.mjs '{"chromium":..., "page":URL, "admin":URL,
//                               "model":NAME, "actions":[{...}], "rebound":URL}'
import { chromium } from 'playwright-core';

const cfg = JSON.parse(process.argv[2]);
const rebound = new URL(cfg.rebound).hostname;

const browser = await chromium.launch({
  executablePath: cfg.chromium,
  headless: true,
  args: [
    '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run',
    // The rebinding attacker's name now resolves to this machine; every
    // other name stays unresolved so no query leaves it.
    `--host-resolver-rules=MAP ${rebound} 127.0.0.1 , MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost`,
  ],
});
const out = { pageErrors: [], attempts: [], seen: [] };
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  page.on('pageerror', (e) => out.pageErrors.push(String(e)));
  // What the admin listener answered, as the browser's network stack saw it
  // (the page itself gets an opaque response in no-cors mode).
  page.on('response', (r) => {
    if (r.url().startsWith(cfg.admin)) out.seen.push({ url: r.url(), method: r.request().method(), status: r.status() });
  });
  await page.goto(cfg.page);
  out.pageOrigin = await page.evaluate(() => location.origin);
  out.attempts = await page.evaluate(async ({ admin, model, actions }) => {
    const url = `${admin}/admin/models/${model}`;
    const res = [];
    const attempt = async (how, init) => {
      try {
        const r = await fetch(url, init);
        res.push({ how, type: r.type, status: r.status });
      } catch (e) {
        res.push({ how, error: String(e) });
      }
    };
    for (const a of actions) {
      // A "simple" request: no preflight, the body is JSON in all but name.
      await attempt(`no-cors text/plain ${a.action}`, {
        method: 'POST', mode: 'no-cors', headers: { 'Content-Type': 'text/plain' }, body: JSON.stringify(a),
      });
    }
    // Asking for JSON outright needs a preflight the listener must refuse.
    await attempt(`cors json ${actions[0].action}`, {
      method: 'POST', mode: 'cors', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(actions[0]),
    });
    return res;
  }, { admin: cfg.admin, model: cfg.model, actions: cfg.actions });

  // After DNS rebinding the attacker's page and the admin listener share an
  // origin; what the browser loads from that URL, a script there reads.
  const reb = await context.newPage();
  const resp = await reb.goto(cfg.rebound);
  out.rebound = { status: resp.status(), body: (await resp.text()).slice(0, 2000) };
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out) + '\n');
