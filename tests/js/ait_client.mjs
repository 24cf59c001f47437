// The real Ably AI Transport client (npm `@ably/ai-transport` 0.8.0, its Vercel
// `ChatTransport` over a core client session, with ably-js 2.x) against the local Ably and a
// running worker in WIRE_PROTOCOL=ait. Run by tests/test_ait.py, one scenario a process:
//
//   node tests/js/ait_client.mjs answer|stop|failure|hydrate
//
// Prints one JSON line on stdout, {"scenario", "ok", "detail"}, and exits 1 if it failed.
//
// Environment:
//   ABLY_ENDPOINT   http://HOST:PORT of the local Ably (Sockudo)
//   ABLY_API_KEY    APP.KEYID:SECRET (clients use token auth, as clientId CLIENT_ID)
//   CHANNEL         the conversation channel (the worker serves it: LISTEN_CHANNELS)
//   API_URL         where the ChatTransport POSTs the invocation (the app's backend)
//   PROMPT          the user's message
//   EXPECTED        the model's whole answer to it
//   CLIENT_ID       the user (default alice)
//   TIMEOUT_MS      for the whole scenario (default 40000)

import process from 'node:process';
import * as Ably from 'ably';
import { createChatTransport, createClientSession } from '@ably/ai-transport/vercel';

const env = process.env;
const TIMEOUT_MS = Number(env.TIMEOUT_MS || 40000);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class Failure extends Error {
  constructor(message, detail) {
    super(message);
    this.detail = detail;
  }
}

function expect(condition, message, detail) {
  if (!condition) throw new Failure(message, detail);
}

async function waitFor(predicate, what, timeoutMs = TIMEOUT_MS / 2) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Failure(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

function clientOptions() {
  const url = new URL(env.ABLY_ENDPOINT);
  const tls = url.protocol === 'https:';
  const port = url.port ? Number(url.port) : tls ? 443 : 80;
  return {
    endpoint: url.hostname,
    tls,
    ...(tls ? { tlsPort: port } : { port }),
    fallbackHosts: [],
    key: env.ABLY_API_KEY,
    useTokenAuth: true, // the token names the user: Ably stamps it on what they publish
    clientId: env.CLIENT_ID || 'alice',
    logLevel: 1,
    logHandler: (msg) => process.stderr.write(`[ably-js] ${msg}\n`),
  };
}

const opened = [];

/** A user's client: an Ably connection and an AI Transport session on the channel. */
async function openSession() {
  const client = new Ably.Realtime(clientOptions());
  const session = createClientSession({ client, channelName: env.CHANNEL });
  opened.push({ client, session });
  await session.connect();
  return session;
}

/** What the user sees of the answer: the assistant message's text in the session's view. */
function answer(session) {
  const assistant = session.view.getMessages().filter((m) => m.message.role === 'assistant');
  const text = assistant
    .flatMap((m) => m.message.parts)
    .filter((part) => part.type === 'text')
    .map((part) => part.text)
    .join('');
  return { text, messages: assistant.length, run: session.view.runs().at(-1) };
}

function runSummary(run) {
  if (!run) return undefined;
  return { status: run.status, code: run.error?.code, message: run.error?.message };
}

/** Send the prompt the way useChat does: through the ChatTransport, which publishes the
 * `ai-input` and POSTs the invocation to the backend. Returns the UIMessageChunk stream. */
async function ask(session, abortSignal) {
  const transport = createChatTransport(session, { api: env.API_URL });
  return transport.sendMessages({
    trigger: 'submit-message',
    chatId: env.CHANNEL,
    messageId: undefined,
    messages: [{ id: `ui-${Date.now()}`, role: 'user', parts: [{ type: 'text', text: env.PROMPT }] }],
    abortSignal,
  });
}

/** Read the chunks useChat would read; returns them and the error that ended them, if any. */
async function drain(stream) {
  const chunks = [];
  const reader = stream.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return { chunks };
      chunks.push(value);
    }
  } catch (error) {
    return { chunks, error: { code: error.code, message: error.message } };
  }
}

/** Open a session that hydrates from history (what the React hooks do: loadOlder). */
async function hydratedSession() {
  const session = await openSession();
  while (session.view.hasOlder()) {
    const page = await session.view.loadOlder(50);
    if (page.length === 0) break;
  }
  return session;
}

// ---------------------------------------------------------------------------------------

const scenarios = {
  /** An input sent through the client is answered: exactly the model's text, complete. */
  async answer() {
    const session = await openSession();
    const { chunks, error } = await drain(await ask(session));
    expect(!error, 'the answer stream errored', error);
    const deltas = chunks.filter((c) => c.type === 'text-delta').map((c) => c.delta).join('');
    await waitFor(() => answer(session).run?.status === 'complete', 'the run to complete');
    const seen = answer(session);
    const detail = { text: seen.text, run: runSummary(seen.run), streamed: deltas, chunks: chunks.length };
    expect(seen.text === env.EXPECTED, "the view's answer is not the model's text", detail);
    expect(deltas === env.EXPECTED, "the useChat stream's deltas are not the model's text", detail);
    expect(seen.messages === 1, 'not one assistant message', detail);
    const user = session.view.getMessages().filter((m) => m.message.role === 'user');
    expect(user.length === 1 && user[0].message.parts[0].text === env.PROMPT, 'the user message', detail);
    return detail;
  },

  /** Stop through the client (useChat's abort): cancelled, the partial text kept. */
  async stop() {
    const session = await openSession();
    const controller = new AbortController();
    const stream = await ask(session, controller.signal);
    const drained = drain(stream);
    await waitFor(() => answer(session).text.length > 20, 'some of the answer');
    controller.abort();
    await drained;
    await waitFor(() => answer(session).run?.status === 'cancelled', 'the run to end cancelled');
    await sleep(500); // anything after the close would show now
    const seen = answer(session);
    const detail = { text: seen.text, run: runSummary(seen.run), expected: env.EXPECTED };
    expect(seen.text.length > 20, 'the partial text was not kept', detail);
    expect(env.EXPECTED.startsWith(seen.text), 'the kept text is not the start of the answer', detail);
    expect(seen.text !== env.EXPECTED, 'the answer was not stopped', detail);
    // A client opened afterwards sees the same.
    const late = answer(await hydratedSession());
    expect(late.text === seen.text, 'a later client sees other text', { ...detail, late: late.text });
    expect(late.run?.status === 'cancelled', 'a later client sees another status', runSummary(late.run));
    return detail;
  },

  /** A model failure: the run ends in error, with the worker's code and message. */
  async failure() {
    const session = await openSession();
    const errors = [];
    session.on('error', (error) => errors.push({ code: error.code, message: error.message }));
    const { error } = await drain(await ask(session));
    await waitFor(() => answer(session).run?.status === 'error', 'the run to end in error');
    const seen = answer(session);
    const detail = { run: runSummary(seen.run), streamError: error, sessionErrors: errors };
    expect(seen.run.error?.code === 104008, 'the run has not the error code', detail);
    expect(error?.code === 104008, 'the useChat stream did not error with it', detail);
    const late = answer(await hydratedSession());
    expect(late.run?.status === 'error' && late.run.error?.message === seen.run.error.message,
      'a later client does not see the error', { ...detail, late: runSummary(late.run) });
    return detail;
  },

  /** A client opened mid-answer and one opened after it end with the live one's text. */
  async hydrate() {
    const live = await openSession();
    const drained = drain(await ask(live));
    await waitFor(() => answer(live).text.length > 10, 'the answer under way');
    const midway = await hydratedSession();
    const atJoin = answer(midway).text;
    const { error } = await drained;
    expect(!error, 'the answer stream errored', error);
    await waitFor(() => answer(live).run?.status === 'complete', 'the run to complete');
    await waitFor(() => answer(midway).run?.status === 'complete', 'the mid-answer client to see the end');
    const after = await hydratedSession();
    const texts = { live: answer(live).text, midway: answer(midway).text, after: answer(after).text };
    const detail = { texts, atJoin, expected: env.EXPECTED, runs: {
      live: runSummary(answer(live).run), midway: runSummary(answer(midway).run),
      after: runSummary(answer(after).run) } };
    expect(atJoin.length < env.EXPECTED.length, 'the second client joined after the end', detail);
    expect(texts.live === env.EXPECTED, "the live client's text is not the model's", detail);
    expect(texts.midway === texts.live, 'the mid-answer client ends with other text', detail);
    expect(texts.after === texts.live, 'the later client has other text', detail);
    expect(detail.runs.after.status === 'complete', 'the later client sees another status', detail);
    const users = (s) => s.view.getMessages().filter((m) => m.message.role === 'user').length;
    expect(users(midway) === 1 && users(after) === 1, 'the prompt is not shown once', detail);
    return detail;
  },
};

async function main() {
  const name = process.argv[2];
  const scenario = scenarios[name];
  if (!scenario) {
    process.stderr.write(`usage: node ait_client.mjs ${Object.keys(scenarios).join('|')}\n`);
    process.exit(2);
  }
  let result;
  try {
    const detail = await Promise.race([
      scenario(),
      sleep(TIMEOUT_MS).then(() => {
        throw new Failure(`scenario ran over ${TIMEOUT_MS} ms`);
      }),
    ]);
    result = { scenario: name, ok: true, detail };
  } catch (error) {
    result = { scenario: name, ok: false, error: String(error?.message ?? error), detail: error?.detail,
      stack: error instanceof Failure ? undefined : error?.stack };
  }
  for (const { session, client } of opened) {
    await Promise.race([session.close().catch(() => {}), sleep(2000)]);
    client.close();
  }
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(result.ok ? 0 : 1);
}

await main();
