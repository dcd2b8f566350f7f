// Shared helpers for the end-to-end tests: start the real `hearth serve`
// binary, stream a request through undici while timing every chunk of bytes,
// and parse what came back as Server-Sent Events.

import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createWriteStream, existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { Agent, fetch } from 'undici';

export { sleep };

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const HEARTH_BIN = process.env.HEARTH_BIN ?? join(REPO, 'target', 'release', 'hearth');
export const MODELS_DIR = join(process.env.HEARTH_HOME ?? join(homedir(), '.cache', 'hearth'), 'models');
export const SMOLLM2 = join(MODELS_DIR, 'SmolLM2-135M-Instruct.Q4_1.gguf');
export const GEMMA = join(MODELS_DIR, 'gemma-3-270m-q4_k_m.gguf');

const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 10_000;
const LISTENING = /listening on (http:\/\/\S+)/;

let logDir;
let started = 0;
const live = new Set();
// Never leave a server behind, whatever happens to the test process.
process.on('exit', () => {
  for (const s of live) s.proc.kill('SIGKILL');
});

/** The client from the seed report: any 3 s of silence is fatal. */
export function strictAgent() {
  return new Agent({ bodyTimeout: 3000, headersTimeout: 3000 });
}

/**
 * Start `hearth serve --port 0` and wait for its listening line.
 * Returns { url, proc, logPath, logTail(), stop() }.
 */
export async function startServer({ args = [], env = {}, model = SMOLLM2 } = {}) {
  if (!existsSync(HEARTH_BIN)) {
    throw new Error(`${HEARTH_BIN} not found: run scripts/setup.sh (or cargo build --release)`);
  }
  if (!existsSync(model)) throw new Error(`${model} not found: run scripts/fetch-models.sh --all`);
  logDir ??= mkdtempSync(join(tmpdir(), 'hearth-node-'));
  const logPath = join(logDir, `hearth-${String(started++).padStart(2, '0')}.log`);
  const childEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith('HEARTH_') || k === 'HEARTH_HOME') childEnv[k] = v;
  }
  childEnv.NO_COLOR = '1'; // plain logs
  // One sequence at a time unless a test asks for more (HEARTH_TEST_PARALLEL
  // runs the suite with more).
  childEnv.HEARTH_PARALLEL = process.env.HEARTH_TEST_PARALLEL ?? '1';
  Object.assign(childEnv, env);
  const argv = ['serve', '--port', '0', '--model', model, ...args];
  const proc = spawn(HEARTH_BIN, argv, { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  const log = createWriteStream(logPath);
  proc.stderr.pipe(log);
  const exited = once(proc, 'exit');

  const server = {
    proc,
    logPath,
    url: '',
    logTail(lines = 40) {
      let text = '';
      try {
        text = readFileSync(logPath, 'utf8');
      } catch (e) {
        return `(no log: ${e.message})`;
      }
      const tail = text.replace(/\x1b\[[0-9;]*m/g, '').split('\n').slice(-lines).join('\n');
      return `--- hearth ${argv.join(' ')}\n--- ${logPath} (last ${lines} lines)\n${tail}`;
    },
    async stop() {
      live.delete(server);
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGTERM');
        const timer = sleep(STOP_TIMEOUT_MS).then(() => 'timeout');
        if ((await Promise.race([exited, timer])) === 'timeout') {
          proc.kill('SIGKILL');
          await exited;
        }
      }
      await new Promise((r) => log.end(r));
    },
  };
  live.add(server);

  let stdout = '';
  const url = await new Promise((resolveUrl, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`hearth did not print its listening line within ${START_TIMEOUT_MS / 1000} s`)),
      START_TIMEOUT_MS,
    );
    proc.stdout.setEncoding('utf8');
    proc.stdout.on('data', (d) => {
      stdout += d;
      const m = LISTENING.exec(stdout);
      if (m) {
        clearTimeout(timer);
        resolveUrl(m[1].replace(/\/$/, ''));
      }
    });
    proc.on('exit', (code, sig) => {
      clearTimeout(timer);
      reject(new Error(`hearth exited (${code ?? sig}) before listening; stdout: ${JSON.stringify(stdout)}`));
    });
  }).catch(async (e) => {
    await server.stop();
    e.message += `\n${server.logTail()}`;
    throw e;
  });
  server.url = url;
  return server;
}

/** Run `fn`; if it fails, append the servers' log tails to the error. */
export async function withLogs(servers, fn) {
  try {
    return await fn();
  } catch (e) {
    const tails = servers.filter(Boolean).map((s) => s.logTail()).join('\n');
    if (e && typeof e === 'object' && 'message' in e) {
      try {
        e.message += `\n${tails}`;
        // Reporters print the stack, which V8 may have formatted already.
        if (typeof e.stack === 'string' && !e.stack.includes(tails)) e.stack += `\n${tails}`;
      } catch {
        // some errors have a read-only message; the original still matters most
      }
    }
    throw e;
  }
}

/**
 * POST `body` as JSON and read the response as a stream, timing every chunk
 * of bytes as it arrives and parsing the SSE events it carries.
 *
 * Returns { rec, headers, done }: `rec` fills in while the stream runs,
 * `headers` resolves when the response headers arrive, `done` when the body
 * ends (or rejects with the client's error, e.g. undici's body timeout).
 *
 * rec = { t0, headersAt, endAt, status, chunks: [ms...], events: [{ t, event,
 * data, comments }], aborted, error }; times are performance.now() values.
 */
export function startStream(url, body, { dispatcher, signal, onEvent } = {}) {
  const rec = { t0: performance.now(), headersAt: null, endAt: null, status: null, chunks: [], events: [], aborted: false, error: null, text: null };
  let resolveHeaders;
  let rejectHeaders;
  const headers = new Promise((res, rej) => {
    resolveHeaders = res;
    rejectHeaders = rej;
  });
  const done = (async () => {
    let res;
    try {
      res = await fetch(url, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'anthropic-version': '2023-06-01', 'x-api-key': 'x' },
        body: JSON.stringify(body),
        dispatcher,
        signal,
      });
    } catch (e) {
      rec.error = explainTimeout(e, rec);
      rec.aborted = e?.name === 'AbortError';
      rejectHeaders(rec.error);
      throw rec.error;
    }
    rec.headersAt = performance.now();
    rec.status = res.status;
    rec.contentType = res.headers.get('content-type');
    resolveHeaders(rec);
    if (!res.ok || !rec.contentType?.startsWith('text/event-stream')) {
      rec.text = await res.text();
      rec.endAt = performance.now();
      return rec;
    }
    const decoder = new TextDecoder();
    let buf = '';
    try {
      for await (const chunk of res.body) {
        const t = performance.now();
        rec.chunks.push(t);
        buf += decoder.decode(chunk, { stream: true }).replace(/\r\n?/g, '\n');
        let at;
        while ((at = buf.indexOf('\n\n')) >= 0) {
          const ev = parseEvent(buf.slice(0, at), t);
          buf = buf.slice(at + 2);
          if (!ev) continue;
          rec.events.push(ev);
          onEvent?.(ev, rec);
        }
      }
    } catch (e) {
      rec.endAt = performance.now();
      rec.error = explainTimeout(e, rec);
      rec.aborted = e?.name === 'AbortError';
      throw rec.error;
    }
    rec.endAt = performance.now();
    if (buf.trim()) rec.trailing = buf;
    return rec;
  })();
  // Callers that only await `done` must not see an unhandled `headers` rejection.
  headers.catch(() => {});
  return { rec, headers, done };
}

/** undici reports its idle timeouts as "terminated"; say what happened. */
function explainTimeout(e, rec) {
  const code = e?.cause?.code ?? e?.code;
  if (code !== 'UND_ERR_BODY_TIMEOUT' && code !== 'UND_ERR_HEADERS_TIMEOUT') return e;
  const at = secs(performance.now() - rec.t0);
  return new Error(`the client gave up (${code}: 3 s of silence), ${at} into the request; ${describeGaps(rec)}`, { cause: e });
}

function parseEvent(block, t) {
  const ev = { t, event: null, data: null, comments: [] };
  const data = [];
  for (const line of block.split('\n')) {
    if (line === '') continue;
    if (line.startsWith(':')) {
      ev.comments.push(line.slice(1));
      continue;
    }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') ev.event = value;
    else if (field === 'data') data.push(value);
  }
  if (data.length) ev.data = data.join('\n');
  if (ev.event === null && ev.data === null && ev.comments.length === 0) return null;
  return ev;
}

/** Largest silence, in ms, between the headers and the end of the body. */
export function maxGap(rec) {
  const times = [rec.headersAt, ...rec.chunks, rec.endAt].filter((t) => t !== null);
  let gap = 0;
  for (let i = 1; i < times.length; i++) gap = Math.max(gap, times[i] - times[i - 1]);
  return gap;
}

/** Where the largest gap was, for failure messages. */
export function describeGaps(rec) {
  if (rec.headersAt === null) return 'no response headers';
  const times = [rec.headersAt, ...rec.chunks, rec.endAt].filter((t) => t !== null);
  const gaps = [];
  for (let i = 1; i < times.length; i++) {
    gaps.push(`${((times[i - 1] - rec.t0) / 1000).toFixed(2)}s+${((times[i] - times[i - 1]) / 1000).toFixed(2)}`);
  }
  return `headers after ${((rec.headersAt - rec.t0) / 1000).toFixed(2)} s; gaps: ${gaps.join(' ')}`;
}

/** Anthropic's keepalive is `event: ping` with data {"type": "ping"}. */
export function isAnthropicPing(ev) {
  return ev.event === 'ping';
}

/** OpenAI streams carry heartbeats as SSE comment lines. */
export function isOpenAIHeartbeat(ev) {
  return ev.comments.length > 0 && ev.data === null;
}

/** The whole prompt: Anthropic's input_tokens leaves out cached tokens. */
function promptTokens(usage) {
  if (usage?.input_tokens == null) return null;
  return usage.input_tokens + (usage.cache_read_input_tokens ?? 0) + (usage.cache_creation_input_tokens ?? 0);
}

/**
 * Check an Anthropic Messages stream's event sequence and pull out its
 * results: { text, stopReason, inputTokens, outputTokens, firstTextAt,
 * pings, pingTimes }. Throws when the stream breaks the protocol.
 */
export function summarizeAnthropic(rec) {
  const out = { text: '', stopReason: null, inputTokens: null, outputTokens: null, firstTextAt: null, lastTextAt: null, pingTimes: [], kinds: [], error: null };
  for (const ev of rec.events) {
    if (ev.event === null && ev.data === null) continue; // a comment: allowed, not expected
    if (isAnthropicPing(ev)) {
      const d = JSON.parse(ev.data);
      if (d.type !== 'ping') throw new Error(`ping event with data ${ev.data}`);
      out.pingTimes.push(ev.t);
      continue;
    }
    const d = JSON.parse(ev.data);
    if (d.type !== ev.event) throw new Error(`event ${ev.event} carries data of type ${d.type}`);
    out.kinds.push(ev.event);
    switch (ev.event) {
      case 'message_start':
        out.inputTokens = promptTokens(d.message?.usage);
        break;
      case 'content_block_delta':
        if (d.delta?.type === 'text_delta') {
          out.text += d.delta.text;
          out.firstTextAt ??= ev.t;
          out.lastTextAt = ev.t;
        }
        break;
      case 'message_delta':
        out.stopReason = d.delta?.stop_reason ?? null;
        out.outputTokens = d.usage?.output_tokens ?? null;
        if (d.usage?.input_tokens != null) out.inputTokens = promptTokens(d.usage);
        break;
      case 'error':
        out.error = d.error;
        break;
      default:
        break;
    }
  }
  out.pings = out.pingTimes.length;
  return out;
}

/** Throws unless the Anthropic stream ran its whole protocol to message_stop. */
export function assertCompleteAnthropic(summary) {
  const k = summary.kinds;
  const expectFirst = ['message_start', 'content_block_start'];
  const expectLast = ['content_block_stop', 'message_delta', 'message_stop'];
  const ok = k.length >= 5
    && expectFirst.every((x, i) => k[i] === x)
    && expectLast.every((x, i) => k[k.length - 3 + i] === x)
    && k.slice(2, -3).every((x) => x === 'content_block_delta');
  if (!ok) throw new Error(`bad Anthropic event sequence: ${k.join(', ')}${summary.error ? ` (error: ${JSON.stringify(summary.error)})` : ''}`);
  if (!['end_turn', 'max_tokens'].includes(summary.stopReason)) {
    throw new Error(`stop_reason ${summary.stopReason}, want end_turn or max_tokens`);
  }
}

/**
 * Check an OpenAI chat completion stream and pull out its results:
 * { text, finishReason, usage, done, firstTextAt, heartbeats, heartbeatTimes }.
 */
export function summarizeOpenAI(rec) {
  const out = { text: '', finishReason: null, usage: null, done: false, role: null, firstTextAt: null, lastTextAt: null, heartbeatTimes: [], chunks: 0, error: null };
  for (const ev of rec.events) {
    if (isOpenAIHeartbeat(ev)) {
      out.heartbeatTimes.push(ev.t);
      continue;
    }
    if (ev.data === null) continue;
    if (out.done) throw new Error(`data after [DONE]: ${ev.data}`);
    if (ev.data === '[DONE]') {
      out.done = true;
      continue;
    }
    const d = JSON.parse(ev.data);
    if (d.error) {
      out.error = d.error;
      continue;
    }
    if (d.object !== 'chat.completion.chunk') throw new Error(`chunk object ${d.object}`);
    if (out.chunks++ === 0) out.role = d.choices?.[0]?.delta?.role ?? null;
    const choice = d.choices?.[0];
    if (choice?.delta?.content) {
      out.text += choice.delta.content;
      out.firstTextAt ??= ev.t;
      out.lastTextAt = ev.t;
    }
    if (choice?.finish_reason) {
      if (out.finishReason) throw new Error('two finish_reason chunks');
      out.finishReason = choice.finish_reason;
    }
    if (d.usage) out.usage = d.usage;
  }
  out.heartbeats = out.heartbeatTimes.length;
  return out;
}

/** Throws unless the OpenAI stream opened with the role and ended with [DONE]. */
export function assertCompleteOpenAI(summary) {
  if (summary.error) throw new Error(`stream carried an error: ${JSON.stringify(summary.error)}`);
  if (summary.role !== 'assistant') throw new Error(`first chunk's delta.role is ${summary.role}, want assistant`);
  if (!summary.done) throw new Error('stream ended without data: [DONE]');
  if (!['stop', 'length'].includes(summary.finishReason)) {
    throw new Error(`finish_reason ${summary.finishReason}, want stop or length`);
  }
}

/**
 * A prompt of about 36 tokens per sentence (SmolLM2's tokenizer): the default
 * 20 sentences make ~750 tokens, two prefill chunks at the default 512. Prompts
 * with different `topic`s differ from their first line, so one cannot reuse
 * another's KV cache.
 */
export function longPrompt(topic = 'boats', sentences = 20) {
  const colours = ['red', 'blue', 'green', 'yellow', 'white', 'black', 'grey'];
  const goods = ['apples', 'copper wire', 'salted fish', 'wool blankets', 'glass jars'];
  const lines = [`These are the harbour master's notes about ${topic}.`];
  for (let i = 0; i < sentences; i++) {
    lines.push(
      `Note ${i + 1}: the ${colours[i % colours.length]} boat left the harbour at ${(i % 12) + 1} o'clock `
      + `carrying ${(i * 37) % 100 + 3} crates of ${goods[i % goods.length]} to the island of Vell${i}.`,
    );
  }
  lines.push('Summarize these notes in one sentence.');
  return lines.join('\n');
}

export const STORY_PROMPT = 'Write a long story about a lighthouse keeper and a storm.';

export function anthropicBody(prompt, extra = {}) {
  return { model: 'any', max_tokens: 24, temperature: 0, stream: true, messages: [{ role: 'user', content: prompt }], ...extra };
}

export function openaiBody(prompt, extra = {}) {
  return {
    model: 'any', max_tokens: 24, temperature: 0, stream: true, stream_options: { include_usage: true },
    messages: [{ role: 'user', content: prompt }], ...extra,
  };
}

/** Seconds, for messages. */
export function secs(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}
