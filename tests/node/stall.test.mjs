// The seed scenario: the computation stalls for 12 s inside one llama.cpp
// graph compute, and a client with a 3 s idle timeout must stay connected,
// because heartbeats keep coming on a wall-clock timer.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  anthropicBody, assertCompleteAnthropic, assertCompleteOpenAI, describeGaps, longPrompt, maxGap,
  openaiBody, secs, startServer, startStream, strictAgent, STORY_PROMPT, summarizeAnthropic,
  summarizeOpenAI, withLogs,
} from './helpers.mjs';

const STALL_S = 12;
const TEST_TIMEOUT_MS = 90_000;
// With a 1 s heartbeat, a 12 s stall must produce about a dozen; this leaves slack.
const MIN_HEARTBEATS = 6;

async function run(server, path, body) {
  const agent = strictAgent();
  try {
    const { done } = startStream(server.url + path, body, { dispatcher: agent });
    return await done;
  } finally {
    await agent.close();
  }
}

function assertNeverSilent(rec) {
  assert.ok(rec.headersAt - rec.t0 < 2000, `headers took ${secs(rec.headersAt - rec.t0)}`);
  assert.ok(maxGap(rec) < 2000, `a ${secs(maxGap(rec))} silence; ${describeGaps(rec)}`);
}

function assertStalled(rec) {
  const took = rec.endAt - rec.t0;
  assert.ok(took >= (STALL_S - 0.5) * 1000, `took ${secs(took)}: the injected ${STALL_S} s stall did not happen`);
}

describe(`prefill stall of ${STALL_S} s`, () => {
  let server;
  before(async () => {
    server = await startServer({ args: ['--heartbeat-secs', '1'], env: { HEARTH_FAULT: `prefill_stall:${STALL_S}` } });
  });
  after(() => server?.stop());

  test('Anthropic /v1/messages stays alive and completes', { timeout: TEST_TIMEOUT_MS }, () => withLogs([server], async () => {
    const rec = await run(server, '/v1/messages', anthropicBody(longPrompt('the spring fleet')));
    assert.equal(rec.status, 200, rec.text ?? '');
    const s = summarizeAnthropic(rec);
    assertCompleteAnthropic(s);
    assert.ok(s.inputTokens > 512, `prompt has ${s.inputTokens} tokens: too short for two prefill chunks`);
    assertStalled(rec);
    assertNeverSilent(rec);
    const early = s.pingTimes.filter((t) => t < s.firstTextAt).length;
    assert.ok(early >= MIN_HEARTBEATS, `${early} pings before the first text (of ${s.pings}); ${describeGaps(rec)}`);
  }));

  test('OpenAI /v1/chat/completions stays alive and completes', { timeout: TEST_TIMEOUT_MS }, () => withLogs([server], async () => {
    const rec = await run(server, '/v1/chat/completions', openaiBody(longPrompt('the autumn fleet')));
    assert.equal(rec.status, 200, rec.text ?? '');
    const s = summarizeOpenAI(rec);
    assertCompleteOpenAI(s);
    assert.ok(s.usage?.prompt_tokens > 512, `prompt has ${s.usage?.prompt_tokens} tokens: too short for two prefill chunks`);
    assertStalled(rec);
    assertNeverSilent(rec);
    const early = s.heartbeatTimes.filter((t) => t < s.firstTextAt).length;
    assert.ok(early >= MIN_HEARTBEATS, `${early} heartbeats before the first text (of ${s.heartbeats}); ${describeGaps(rec)}`);
  }));
});

describe(`decode stall of ${STALL_S} s`, () => {
  let server;
  before(async () => {
    server = await startServer({ args: ['--heartbeat-secs', '1'], env: { HEARTH_FAULT: `decode_stall:${STALL_S}` } });
  });
  after(() => server?.stop());

  test('Anthropic /v1/messages stays alive and completes', { timeout: TEST_TIMEOUT_MS }, () => withLogs([server], async () => {
    const rec = await run(server, '/v1/messages', anthropicBody(STORY_PROMPT));
    assert.equal(rec.status, 200, rec.text ?? '');
    const s = summarizeAnthropic(rec);
    assertCompleteAnthropic(s);
    assert.ok(s.outputTokens >= 6, `only ${s.outputTokens} tokens: the stall is at the fifth decode step`);
    assertStalled(rec);
    assertNeverSilent(rec);
    const mid = s.pingTimes.filter((t) => t > s.firstTextAt && t < s.lastTextAt).length;
    assert.ok(mid >= MIN_HEARTBEATS, `${mid} pings between text deltas (of ${s.pings}); ${describeGaps(rec)}`);
  }));

  test('OpenAI /v1/chat/completions stays alive and completes', { timeout: TEST_TIMEOUT_MS }, () => withLogs([server], async () => {
    const rec = await run(server, '/v1/chat/completions', openaiBody(STORY_PROMPT));
    assert.equal(rec.status, 200, rec.text ?? '');
    const s = summarizeOpenAI(rec);
    assertCompleteOpenAI(s);
    assert.ok(s.usage?.completion_tokens >= 6, `only ${s.usage?.completion_tokens} tokens: the stall is at the fifth decode step`);
    assertStalled(rec);
    assertNeverSilent(rec);
    const mid = s.heartbeatTimes.filter((t) => t > s.firstTextAt && t < s.lastTextAt).length;
    assert.ok(mid >= MIN_HEARTBEATS, `${mid} heartbeats between text chunks (of ${s.heartbeats}); ${describeGaps(rec)}`);
  }));
});
