// One engine, FIFO queue: a request waiting behind a stalled one gets its
// headers at once and heartbeats for as long as it waits.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import {
  anthropicBody, assertCompleteAnthropic, describeGaps, longPrompt, maxGap, secs, startServer,
  startStream, strictAgent, summarizeAnthropic, withLogs,
} from './helpers.mjs';

const STALL_S = 12;
let server;

before(async () => {
  // Only the first request the server receives stalls.
  server = await startServer({ args: ['--heartbeat-secs', '1'], env: { HEARTH_FAULT: `prefill_stall:${STALL_S}:1` } });
});
after(() => server?.stop());

test('a queued request gets headers and heartbeats while the first is stalled', { timeout: 90_000 }, () => withLogs([server], async () => {
  const agent = strictAgent();
  try {
    const url = server.url + '/v1/messages';
    const first = startStream(url, anthropicBody(longPrompt()), { dispatcher: agent });
    await first.headers; // the first is surely received (and stalling) before the second is sent
    const second = startStream(url, anthropicBody('Name three colours.', { max_tokens: 16 }), { dispatcher: agent });
    await second.headers;
    const secondHeadersAt = performance.now();
    const [r1, r2] = await Promise.all([first.done, second.done]);

    assert.equal(r1.status, 200, r1.text ?? '');
    assert.equal(r2.status, 200, r2.text ?? '');
    const s1 = summarizeAnthropic(r1);
    const s2 = summarizeAnthropic(r2);
    assertCompleteAnthropic(s1);
    assertCompleteAnthropic(s2);

    const firstTook = r1.endAt - r1.t0;
    assert.ok(firstTook >= (STALL_S - 0.5) * 1000, `first took ${secs(firstTook)}: the stall did not happen`);
    assert.ok(r2.headersAt - r2.t0 < 2000, `second's headers took ${secs(r2.headersAt - r2.t0)}`);
    assert.ok(r1.endAt - secondHeadersAt > 8000,
      `second's headers came only ${secs(r1.endAt - secondHeadersAt)} before the first finished`);

    // FIFO: the second generates nothing until the first has its text.
    assert.ok(s2.firstTextAt > s1.firstTextAt, 'the queued request produced text before the stalled one');

    const waitingPings = s2.pingTimes.filter((t) => t < s1.firstTextAt).length;
    assert.ok(waitingPings >= 6, `the queued request got ${waitingPings} pings while it waited; ${describeGaps(r2)}`);
    assert.ok(maxGap(r2) < 2000, `queued request: a ${secs(maxGap(r2))} silence; ${describeGaps(r2)}`);
    assert.ok(maxGap(r1) < 2000, `stalled request: a ${secs(maxGap(r1))} silence; ${describeGaps(r1)}`);
  } finally {
    await agent.close();
  }
}));
