// The status page in a real browser: Debian's headless Chromium driven by
// Playwright (playwright-core: no browser download; HEARTH_CHROMIUM points
// at another binary). The page loads without console errors, shows a
// request while it is prefilling (an injected stall keeps it there) and
// then as finished, and with --api-key shows nothing until the key is
// given. Screenshots go to tests/node/logs/.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { chromium } from 'playwright-core';
import { REPO, longPrompt, openaiBody, startServer, startStream, strictAgent, withLogs } from './helpers.mjs';

const CHROMIUM = process.env.HEARTH_CHROMIUM ?? '/usr/bin/chromium';
const LOGS = join(REPO, 'tests', 'node', 'logs');
const STALL_S = 8;
const KEY = 'sk-hearth-page-7c1';

let browser;
let profile;

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} not found: run scripts/setup.sh (it installs Debian's chromium)`);
  }
  mkdirSync(LOGS, { recursive: true });
  profile = mkdtempSync(join(tmpdir(), 'hearth-chromium-'));
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

/** A new tab that records console errors, page errors and every URL asked for. */
async function openTab() {
  const page = await browser.newPage();
  const errors = [];
  const urls = [];
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(`${m.text()} (${m.location().url})`);
  });
  page.on('pageerror', (e) => errors.push(`uncaught: ${e.message}`));
  page.on('request', (r) => urls.push(r.url()));
  return { page, errors, urls };
}

test('the page shows a request while it prefills and after it finished', { timeout: 120_000 }, async () => {
  const server = await startServer({
    args: ['--heartbeat-secs', '1'],
    env: { HEARTH_FAULT: `prefill_stall:${STALL_S}:1` },
  });
  const agent = strictAgent();
  const { page, errors } = await openTab();
  try {
    await withLogs([server], async () => {
      const resp = await page.goto(server.url + '/');
      assert.equal(resp.status(), 200);
      await page.locator('#status').waitFor({ state: 'visible', timeout: 10_000 });
      await page.locator('#facts').getByText('SmolLM2', { exact: false }).first().waitFor({ timeout: 10_000 });
      assert.equal(await page.locator('#requests tr.empty').count(), 1, 'nothing runs yet');

      const stream = startStream(server.url + '/v1/chat/completions',
        openaiBody(longPrompt('lanterns'), { max_tokens: 12 }), { dispatcher: agent });
      await stream.headers;
      const row = page.locator('#requests tr[data-phase="prefill"]');
      await row.waitFor({ timeout: (STALL_S - 2) * 1000 });
      const text = await row.innerText();
      assert.match(text, /chat_completions/);
      assert.match(text, /\d+ \/ \d+ \(\d+%\)/, `no prefill progress in ${JSON.stringify(text)}`);
      assert.match(text, /s ago/, `no time since the last byte in ${JSON.stringify(text)}`);
      assert.equal(await row.locator('[role="progressbar"]').count(), 1);
      // Heartbeats every second: the page never shows a silent stream.
      await page.waitForTimeout(2500);
      assert.equal(await page.locator('#requests tr[data-phase="prefill"] .silent').count(), 0,
        await page.locator('#requests').innerText());
      await page.screenshot({ path: join(LOGS, 'status-page-prefill.png'), fullPage: true });

      const done = await stream.done;
      assert.equal(done.status, 200);
      const finished = page.locator('#recent tr[data-outcome="finished"]');
      await finished.first().waitFor({ timeout: 10_000 });
      assert.match(await finished.first().innerText(), /chat_completions/);
      await page.locator('#requests tr.empty').waitFor({ timeout: 10_000 });
      await page.screenshot({ path: join(LOGS, 'status-page-finished.png'), fullPage: true });
      assert.deepEqual(errors, []);
    });
  } finally {
    await page.close();
    await agent.close();
    await server.stop();
  }
});

test('with --api-key the page shows nothing until the key is given', { timeout: 60_000 }, async () => {
  const server = await startServer({ args: ['--api-key', KEY] });
  const { page, errors, urls } = await openTab();
  try {
    await withLogs([server], async () => {
      const resp = await page.goto(server.url + '/');
      assert.equal(resp.status(), 401);
      await page.locator('#login').waitFor({ state: 'visible', timeout: 10_000 });
      assert.equal(await page.locator('#status').isVisible(), false);
      assert.equal(await page.locator('#facts').innerText(), '', 'server data before the key');
      assert.equal(await page.locator('#model-name').innerText(), '');

      await page.fill('#key', 'not-the-key');
      await page.click('#login-form button');
      await page.locator('#login-error').getByText('not accepted').waitFor({ timeout: 10_000 });
      assert.equal(await page.locator('#status').isVisible(), false);

      await page.fill('#key', KEY);
      await page.click('#login-form button');
      await page.locator('#status').waitFor({ state: 'visible', timeout: 10_000 });
      await page.locator('#facts').getByText('SmolLM2', { exact: false }).first().waitFor({ timeout: 10_000 });
      assert.equal(await page.evaluate(() => sessionStorage.getItem('hearth-api-key')), KEY);
      // A reload comes back to the page without asking again.
      await page.reload();
      await page.locator('#status').waitFor({ state: 'visible', timeout: 10_000 });
      await page.screenshot({ path: join(LOGS, 'status-page-key.png'), fullPage: true });

      for (const u of urls) assert.ok(!u.includes(KEY), `the key is in a URL: ${u}`);
      // Only the refusals this test asked for: the page itself without a
      // key (twice: first load and reload) and the wrong key.
      const unexpected = errors.filter((e) => !/status of 401/.test(e));
      assert.deepEqual(unexpected, []);
      assert.ok(errors.length <= 3, errors.join('\n'));
    });
  } finally {
    await page.close();
    await server.stop();
  }
});
