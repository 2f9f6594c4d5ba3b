// Drives the Debian chromium through the chat page, as a user would, and
// prints what the page measured as JSON. The Go test browser_test.go starts
// the gateway, runs this script and judges the result.
//
// Usage: node browser.mjs '{"chromium":..., "url":..., "spki":..., "turns":[...],
//                           "maxTokens":N, "screenshot":PATH, "token":BEARER}'
import { chromium } from 'playwright-core';

const cfg = JSON.parse(process.argv[2]);
const origin = new URL(cfg.url).host;

// Chromium speaks h3 to a private root only when QUIC is forced for the
// origin; the SPKI pin trusts the dev leaf without touching any trust store,
// and the resolver rule keeps every DNS query on the machine.
const browser = await chromium.launch({
  executablePath: cfg.chromium,
  headless: true,
  args: [
    '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run',
    '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost',
    '--enable-quic', `--origin-to-force-quic-on=${origin}`,
    `--ignore-certificate-errors-spki-list=${cfg.spki}`,
  ],
});
const out = { pageErrors: [], turns: [] };
try {
  const context = await browser.newContext({
    viewport: { width: 400, height: 760 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true,
  });
  // The token a user once typed into Settings lives in localStorage.
  if (cfg.token) {
    await context.addInitScript((t) => localStorage.setItem('h3infer.token', t), cfg.token);
  }
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  page.on('pageerror', (e) => out.pageErrors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') out.pageErrors.push(`${m.text()} (${m.location().url})`); });
  const requests = [];
  page.on('request', (r) => {
    if (r.url().endsWith('/v1/chat/completions')) requests.push(JSON.parse(r.postData() || 'null'));
  });

  await page.goto(cfg.url + '/');
  await page.waitForSelector('#model option', { state: 'attached' });
  out.models = await page.$$eval('#model option', (os) => os.map((o) => o.value));
  // A page still busy with its first layout would read the whole answer at
  // once; let it go quiet, as it would be by the time a person types.
  await page.waitForLoadState('networkidle');
  await page.click('#settings-toggle');
  await page.fill('#max-tokens', String(cfg.maxTokens));
  await page.fill('#temperature', '0');
  await page.click('#settings-toggle');
  for (const [i, prompt] of cfg.turns.entries()) {
    await page.fill('#prompt', prompt);
    await page.press('#prompt', 'Enter');
    await page.waitForFunction((n) => window.h3infer.runs.length > n && window.h3infer.runs[n].done, i, { timeout: 60000 });
    out.turns.push(await page.evaluate((n) => {
      const bubbles = document.querySelectorAll('.msg.assistant');
      return {
        run: window.h3infer.runs[n],
        shown: bubbles[n] ? bubbles[n].firstChild.data : null,
        stats: {
          proto: document.getElementById('stat-proto').textContent,
          ttft: document.getElementById('stat-ttft').textContent,
          rate: document.getElementById('stat-rate').textContent,
        },
      };
    }, i));
  }
  out.navigationProtocol = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
  out.requests = requests;
  if (cfg.screenshot) await page.screenshot({ path: cfg.screenshot });
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out) + '\n');
