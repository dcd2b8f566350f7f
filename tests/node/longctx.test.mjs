// No fault injected: a real long prompt on the long-context model (Gemma 3
// 270M), whose 512-token prefill chunks can each take longer than the
// client's 3 s idle timeout on a small CPU. Only a wall-clock heartbeat keeps
// such a client connected.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { after, before, test } from 'node:test';
import {
  anthropicBody, assertCompleteAnthropic, describeGaps, GEMMA, longPrompt, maxGap, secs, startServer,
  startStream, strictAgent, summarizeAnthropic, withLogs,
} from './helpers.mjs';

const haveGemma = existsSync(GEMMA);
let server;

before(async () => {
  if (haveGemma) server = await startServer({ model: GEMMA, args: ['--ctx', '8192', '--heartbeat-secs', '1'] });
});
after(() => server?.stop());

test('a long real prefill never goes silent', {
  timeout: 180_000,
  skip: haveGemma ? false : `${GEMMA} missing: run scripts/fetch-models.sh --all`,
}, (t) => withLogs([server], async () => {
  const agent = strictAgent();
  try {
    const body = anthropicBody(longPrompt('the winter fleet', 60), { max_tokens: 8 });
    const rec = await startStream(server.url + '/v1/messages', body, { dispatcher: agent }).done;
    assert.equal(rec.status, 200, rec.text ?? '');
    const s = summarizeAnthropic(rec);
    assertCompleteAnthropic(s);
    assert.ok(s.inputTokens > 1536, `prompt has ${s.inputTokens} tokens: want several prefill chunks`);
    assert.ok(maxGap(rec) < 2000, `a ${secs(maxGap(rec))} silence; ${describeGaps(rec)}`);
    const prefill = s.firstTextAt - rec.headersAt;
    const during = s.pingTimes.filter((p) => p < s.firstTextAt).length;
    assert.ok(during >= Math.floor(prefill / 1000) - 2, `${during} pings in a ${secs(prefill)} prefill`);
    if (prefill < 3000) t.diagnostic(`prefill took only ${secs(prefill)}: this machine never needed the heartbeat`);
  } finally {
    await agent.close();
  }
}));
