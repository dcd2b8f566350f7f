// A client that hangs up in the middle of a stalled prefill cancels its job:
// the engine is free for the next request at once, and what the cancelled
// job left in the KV cache does not change anyone's output.

import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { fetch } from 'undici';
import {
  anthropicBody, assertCompleteAnthropic, longPrompt, secs, startServer, startStream, strictAgent,
  summarizeAnthropic, withLogs,
} from './helpers.mjs';

const STALL_S = 30;
const servers = [];
after(() => Promise.all(servers.map((s) => s.stop())));

// Small prefill chunks, so the stall (in the second chunk) begins well
// before the third ping, when we hang up; both servers use the same chunking
// so their greedy outputs are comparable.
async function start(env = {}) {
  const s = await startServer({ args: ['--heartbeat-secs', '1', '--batch', '64'], env });
  servers.push(s);
  return s;
}

/** Stream `body` and hang up after the third ping (inside the stall). */
async function streamAndHangUp(server, body) {
  const agent = strictAgent();
  const controller = new AbortController();
  let pings = 0;
  const { rec, done } = startStream(server.url + '/v1/messages', body, {
    dispatcher: agent,
    signal: controller.signal,
    onEvent(ev) {
      if (ev.event === 'ping' && ++pings === 3) controller.abort();
      if (ev.event === 'content_block_delta') throw new Error('text arrived before the stall: no fault injected?');
    },
  });
  await assert.rejects(done, (e) => e.name === 'AbortError', 'the stream should end by our abort');
  await agent.close();
  assert.ok(rec.status === 200 && pings === 3, `status ${rec.status}, ${pings} pings before hanging up`);
  return rec;
}

/** Stream `body` to completion; returns { text, ms, ttft } (ms: the whole
 * request; ttft: until its first text). */
async function timed(server, body) {
  const agent = strictAgent();
  try {
    const rec = await startStream(server.url + '/v1/messages', body, { dispatcher: agent }).done;
    assert.equal(rec.status, 200, rec.text ?? '');
    const s = summarizeAnthropic(rec);
    assertCompleteAnthropic(s);
    return { text: s.text, ms: rec.endAt - rec.t0, ttft: s.firstTextAt - rec.t0 };
  } finally {
    await agent.close();
  }
}

/** A non-streaming greedy completion's text. */
async function complete(server, body) {
  const res = await fetch(server.url + '/v1/messages', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ ...body, stream: false }),
  });
  const json = await res.json();
  assert.equal(res.status, 200, JSON.stringify(json));
  return json.content.filter((b) => b.type === 'text').map((b) => b.text).join('');
}

const STALLED = anthropicBody(longPrompt());
const NEXT = anthropicBody('Name three colours.', { max_tokens: 16 });

test('hanging up mid-stall frees the engine for the next request', { timeout: 120_000 }, async () => {
  const server = await start({ HEARTH_FAULT: `prefill_stall:${STALL_S}:1` });
  await withLogs([server], async () => {
    await streamAndHangUp(server, STALLED);
    const next = await timed(server, NEXT); // sent the moment we hung up
    const normal = await timed(server, NEXT); // the same work with nothing before it
    // The engine is free once the next request's first text comes: compare
    // times to first text, which a busy CPU skews far less than whole decodes.
    assert.ok(next.ttft <= 3000 + 2 * normal.ttft,
      `the request after the hang-up got its first text after ${secs(next.ttft)}; a normal one after ${secs(normal.ttft)}`);
    // And the rest of the 30 s stall was certainly not waited out.
    assert.ok(next.ms < (STALL_S * 1000) / 2, `the request after the hang-up took ${secs(next.ms)}`);
    assert.ok(next.text.length > 0 && normal.text.length > 0);
  });
});

test('greedy output after a cancelled request equals a fresh server\'s', { timeout: 120_000 }, async () => {
  const cancelled = await start({ HEARTH_FAULT: `prefill_stall:${STALL_S}:1` });
  const fresh = await start();
  await withLogs([cancelled, fresh], async () => {
    await streamAndHangUp(cancelled, STALLED);
    // The same prompt again: whatever the cancelled job had prefilled may be reused.
    // It resumes from the chunks computed before the hang-up, which were
    // computed exactly as a fresh server computes them.
    const again = await complete(cancelled, STALLED);
    assert.equal(again, await complete(fresh, STALLED), 'the cancelled prompt, resent');
    // And once more, now served from the live sequence it left behind.
    assert.equal(await complete(cancelled, STALLED), again, 'the same request twice');
    assert.ok(again.length > 0);
  });
});
