// The ably-js half of the conformance suite: the unmodified npm `ably` SDK against the
// local Ably (Sockudo with `ably-compat`), checking what a user of the SDK sees.
//
//   ABLY_ENDPOINT=http://127.0.0.1:PORT ABLY_API_KEY=app.key:secret \
//   CHANNEL_PREFIX=test:abc node tests/js/conformance.mjs [check ...]
//
// Prints one JSON line per check on stdout, {"check", "ok", "detail"}, and exits 1 if any
// check failed (2 on bad usage). The SDK's own log lines go to stderr. With no argument
// every check runs; `--list` prints the check names, one a line.
//
// Environment:
//   ABLY_ENDPOINT        http://HOST:PORT of the local server (https:// turns TLS on)
//   ABLY_API_KEY         APP.KEYID:SECRET
//   CHANNEL_PREFIX       prefix of every channel name used (default: conformance-js:<random>)
//   CHECK_TIMEOUT_MS     per-check timeout (default 20000)
//   ABLY_USE_TOKEN_AUTH  "1" to make every key-holding client use token auth instead of
//                        Basic auth (ably-js 2.x, unlike ably-python, does not refuse
//                        Basic auth over plain HTTP, so the default is Basic auth)
//   ABLY_LOG_LEVEL       ably-js logLevel, 0..4 (default 1: errors), written to stderr
//
// Differences between Sockudo and Ably's documentation that these checks observed are
// written next to the check that sees them, each starting with "DIFFERENCE".

import { randomBytes } from 'node:crypto';
import process from 'node:process';
import * as Ably from 'ably';

const env = process.env;
const TIMEOUT_MS = Number(env.CHECK_TIMEOUT_MS || 20000);
const SETTLE_MS = 400; // quiet time after the expected state, to catch anything extra or late
const FRAGMENTS = ['Hé', 'llo ', '世界', ' 🚀', ' ñandú ', 'çà ', '…done'];

// ---------------------------------------------------------------------------------------
// Client options. ably-js 2.x: `endpoint` is the current option (`restHost` and
// `realtimeHost` are deprecated); a value holding a dot, "::" or equal to "localhost" is
// taken as a host name as-is (no routing-policy expansion, no fallback hosts). `port`
// is used when `tls` is false, `tlsPort` when it is true.

function serverOptions() {
  const raw = env.ABLY_ENDPOINT;
  if (!raw) throw new Error('ABLY_ENDPOINT is not set (e.g. http://127.0.0.1:8080)');
  const url = new URL(raw);
  const tls = url.protocol === 'https:';
  const port = url.port ? Number(url.port) : tls ? 443 : 80;
  const options = { endpoint: url.hostname, tls, fallbackHosts: [] };
  if (tls) options.tlsPort = port;
  else options.port = port;
  return options;
}

function apiKey() {
  const key = env.ABLY_API_KEY;
  if (!key) throw new Error('ABLY_API_KEY is not set (e.g. dev.local:devsecret)');
  return key;
}

const useTokenAuth = env.ABLY_USE_TOKEN_AUTH === '1' || env.ABLY_USE_TOKEN_AUTH === 'true';

function logOptions() {
  return {
    logLevel: Number(env.ABLY_LOG_LEVEL ?? 1),
    logHandler: (msg) => process.stderr.write(`[ably-js] ${msg}\n`),
  };
}

/** Options for a client that holds the API key. */
function keyOptions(extra = {}) {
  const options = { ...serverOptions(), ...logOptions(), key: apiKey(), ...extra };
  if (useTokenAuth && !('useTokenAuth' in extra)) options.useTokenAuth = true;
  return options;
}

// ---------------------------------------------------------------------------------------
// Helpers

const prefix = env.CHANNEL_PREFIX || `conformance-js:${randomBytes(6).toString('hex')}`;
let channelCounter = 0;
/** A channel name of its own for each use, under CHANNEL_PREFIX. */
function channelName(label) {
  channelCounter += 1;
  return `${prefix}-${label}-${channelCounter}`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class CheckFailure extends Error {
  constructor(message, detail) {
    super(message);
    this.detail = detail;
  }
}

function expect(condition, message, detail) {
  if (!condition) throw new CheckFailure(message, detail);
}

/** Resolve when `predicate()` holds, polling; throw with `what` after `timeoutMs`. */
async function waitFor(predicate, what, timeoutMs = TIMEOUT_MS / 2, everyMs = 25) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new CheckFailure(`timed out waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** Every client a check makes, closed when the check ends whatever happens. */
class Clients {
  constructor() {
    this.all = [];
  }

  realtime(options) {
    const client = new Ably.Realtime(options);
    this.all.push(client);
    return client;
  }

  rest(options) {
    return new Ably.Rest(options);
  }

  async closeAll() {
    await Promise.all(
      this.all.map(async (client) => {
        const state = client.connection.state;
        if (state === 'closed' || state === 'failed') return;
        client.close();
        await Promise.race([client.connection.once('closed'), sleep(2000)]);
      }),
    );
  }
}

/** Resolve once connected; throw with the SDK's reason if the connection fails instead. */
async function connected(client) {
  const connection = client.connection;
  while (connection.state !== 'connected') {
    if (['failed', 'suspended', 'closed'].includes(connection.state)) {
      throw new CheckFailure(`connection ${connection.state}`, {
        reason: errorDetail(connection.errorReason),
      });
    }
    await Promise.race([connection.once(), sleep(250)]);
  }
  return client;
}

function errorDetail(err) {
  if (!err || typeof err !== 'object') return String(err);
  const out = { message: err.message };
  for (const field of ['code', 'statusCode', 'cause']) {
    if (err[field] !== undefined) out[field] = err[field] instanceof Error ? err[field].message : err[field];
  }
  return out;
}

function short(message) {
  return {
    action: message.action,
    name: message.name,
    serial: message.serial,
    data: message.data,
    version: message.version?.serial,
    headers: message.extras?.headers,
  };
}

/**
 * The subscriber's rule for one message per response, keyed by serial:
 * create sets the text, append adds its fragment, update replaces the text.
 */
class TextRebuilder {
  constructor() {
    this.texts = new Map();
    this.actions = [];
    this.seen = [];
  }

  onMessage(message) {
    this.actions.push(message.action);
    this.seen.push(short(message));
    const data = typeof message.data === 'string' ? message.data : '';
    switch (message.action) {
      case 'message.create':
      case 'message.update':
        this.texts.set(message.serial, data);
        break;
      case 'message.append':
        this.texts.set(message.serial, (this.texts.get(message.serial) ?? '') + data);
        break;
      default:
        break;
    }
  }

  text(serial) {
    return this.texts.get(serial);
  }
}

/** Count of each action, in order of first appearance: {"message.create": 1, ...}. */
function actionCounts(actions) {
  const counts = {};
  for (const action of actions) counts[action] = (counts[action] ?? 0) + 1;
  return counts;
}

const headersFor = (responseId, status) => ({ responseId, status });

/**
 * What the worker does for one response: publish a `message.create` with empty data and
 * keep its serial, then start every append without awaiting it, then await them all.
 */
async function streamResponse(channel, fragments = FRAGMENTS) {
  const responseId = `resp-${randomBytes(4).toString('hex')}`;
  const published = await channel.publish({
    name: 'response',
    data: '',
    extras: { headers: headersFor(responseId, 'streaming') },
  });
  const serial = published?.serials?.[0];
  expect(typeof serial === 'string' && serial.length > 0, 'publish() did not resolve with a serial', {
    published,
  });
  const resolvedOrder = [];
  const pending = fragments.map((fragment, index) => {
    const last = index === fragments.length - 1;
    return channel
      .appendMessage({
        serial,
        data: fragment,
        extras: { headers: headersFor(responseId, last ? 'complete' : 'streaming') },
      })
      .then((result) => {
        resolvedOrder.push(index);
        return result;
      });
  });
  const results = await Promise.all(pending);
  const versionSerials = results.map((result) => result?.versionSerial ?? null);
  return { serial, responseId, text: fragments.join(''), versionSerials, resolvedOrder };
}

/** Same keys and values, in any order (Sockudo's key order varies from one read to the next). */
function sameHeaders(a, b) {
  const sorted = (h) =>
    JSON.stringify(Object.entries(h ?? {}).sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0)));
  return sorted(a) === sorted(b);
}

function isAscending(values) {
  return values.every((value, i) => i === 0 || values[i - 1] < value);
}

// ---------------------------------------------------------------------------------------
// The checks. Each returns a detail object on success and throws on failure.

async function checkConnect(clients, useBinaryProtocol) {
  const client = clients.realtime(keyOptions({ useBinaryProtocol }));
  await connected(client);
  const { id, key } = client.connection;
  expect(typeof id === 'string' && id.length > 0, 'connection.id is not set', { id });
  // A round trip on the connection, not only the CONNECTED frame.
  const channel = client.channels.get(channelName('connect'));
  await channel.attach();
  const serverTime = await client.time();
  expect(Number.isFinite(serverTime) && Math.abs(serverTime - Date.now()) < 60_000, 'time() is off', {
    serverTime,
  });
  return {
    protocol: useBinaryProtocol ? 'msgpack' : 'json',
    connectionId: id,
    connectionKey: key,
    channelState: channel.state,
    auth: useTokenAuth ? 'token' : 'basic',
  };
}

async function checkConnectTokenAuth(clients) {
  const client = clients.realtime(keyOptions({ useTokenAuth: true }));
  await connected(client);
  expect(client.auth.tokenDetails?.token, 'no token obtained with useTokenAuth', {});
  const channel = client.channels.get(channelName('connect-token'));
  await channel.attach();
  const rest = clients.rest(keyOptions({ useTokenAuth: true }));
  const time = await rest.time();
  return {
    connectionId: client.connection.id,
    tokenExpiresInS: Math.round((client.auth.tokenDetails.expires - Date.now()) / 1000),
    restTimeOk: Number.isFinite(time),
  };
}

// Publish + un-awaited appends, rebuilt live by a JSON and a MessagePack subscriber.
//
// Ably's docs ("Message per response", Subscribing to token streams): `message.append`
// "contains only the new token, not the full concatenated response"; `message.update`
// "Contains the complete response up to that point ... This action occurs when the channel
// needs to resynchronize the full message state". Observed with Sockudo 5.2.0 and ably-js:
// a subscriber attached before the create gets exactly the create and one
// `message.append` per append, fragment only, in order (no `message.update` after each
// append); on an `ai:` channel (Sockudo's `[ai_transport]` prefix in our configuration)
// appends inside the 40 ms rollup window arrive as one concatenated `message.append`.
// The subscriber rule used here (create sets, append adds, update replaces) is the one
// the docs give, and is right in every case.
async function checkAppendsLive(clients) {
  const name = channelName('appends');
  const subscribers = {
    json: clients.realtime(keyOptions({ useBinaryProtocol: false })),
    msgpack: clients.realtime(keyOptions({ useBinaryProtocol: true })),
  };
  const rebuilders = {};
  for (const [label, client] of Object.entries(subscribers)) {
    const rebuilder = new TextRebuilder();
    rebuilders[label] = rebuilder;
    await client.channels.get(name).subscribe((message) => rebuilder.onMessage(message));
  }
  const publisher = clients.realtime(keyOptions());
  const stream = await streamResponse(publisher.channels.get(name));

  for (const [label, rebuilder] of Object.entries(rebuilders)) {
    await waitFor(() => rebuilder.text(stream.serial) === stream.text, `${label} subscriber's text`).catch(
      (err) => {
        throw new CheckFailure(err.message, {
          subscriber: label,
          expected: stream.text,
          got: rebuilder.text(stream.serial),
          seen: rebuilder.seen,
        });
      },
    );
  }
  await sleep(SETTLE_MS);
  const detail = {
    serial: stream.serial,
    expected: stream.text,
    appendsAcknowledged: stream.versionSerials.length,
    ackResolutionOrder: stream.resolvedOrder,
    versionSerials: stream.versionSerials,
    versionSerialsAscending: isAscending(stream.versionSerials),
  };
  for (const [label, rebuilder] of Object.entries(rebuilders)) {
    const first = rebuilder.seen[0];
    detail[label] = {
      finalText: rebuilder.text(stream.serial),
      liveActions: actionCounts(rebuilder.actions),
      sequence: rebuilder.seen.map((m) => `${m.action}:${JSON.stringify(m.data)}`),
      createHeaders: first?.headers,
      createVersionSerial: first?.version,
      lastHeaders: rebuilder.seen.at(-1)?.headers,
    };
    expect(rebuilder.text(stream.serial) === stream.text, `${label} text changed after settling`, detail);
    expect(
      first?.action === 'message.create',
      `${label} subscriber's first message is not message.create`,
      detail,
    );
    expect(first?.name === 'response', `${label} subscriber's create lost its name`, detail);
    expect(first?.headers?.responseId === stream.responseId, `${label} create lost its headers`, detail);
    const appends = rebuilder.seen.filter((m) => m.action === 'message.append');
    expect(
      appends.map((m) => m.data).join('') === stream.text,
      `${label} subscriber's message.append fragments do not concatenate to the text`,
      detail,
    );
    expect(
      rebuilder.seen.every((m) => m.serial === stream.serial),
      `${label} subscriber saw a message with another serial`,
      detail,
    );
  }
  expect(
    stream.resolvedOrder.every((v, i) => v === i),
    'append acknowledgements resolved out of order',
    detail,
  );
  expect(
    stream.versionSerials.every((s) => typeof s === 'string' && s.length > 0),
    'an append resolved without a versionSerial',
    detail,
  );
  expect(
    new Set(stream.versionSerials).size === stream.versionSerials.length,
    'versionSerials repeat',
    detail,
  );
  // Docs ("Version ordering"): `serial` and `version.serial` "are lexicographically sortable".
  expect(
    detail.versionSerialsAscending,
    'versionSerials of appends sent in order do not sort in order',
    detail,
  );
  expect(
    stream.versionSerials[0] > stream.serial,
    'an append version does not sort after the create',
    detail,
  );
  return detail;
}

// A subscriber that attaches (without rewind) after the create and some appends: it
// never saw the start of the text, so the first thing it gets must carry the text so far.
// Ably's docs ("Message per response", Subscribing): `message.update` "Contains the
// complete response up to that point ... This action occurs when the channel needs to
// resynchronize the full message state". Observed with Sockudo: the joiner gets the first
// append it would have seen as one `message.update` with the whole text so far, then plain
// `message.append` fragments.
async function checkAppendsMidStream(clients) {
  const name = channelName('midstream');
  const publisher = clients.realtime(keyOptions());
  const channel = publisher.channels.get(name);
  const responseId = `resp-${randomBytes(4).toString('hex')}`;
  const headers = headersFor(responseId, 'streaming');
  const { serials } = await channel.publish({ name: 'response', data: '', extras: { headers } });
  const serial = serials[0];
  const half = Math.ceil(FRAGMENTS.length / 2);
  await Promise.all(
    FRAGMENTS.slice(0, half).map((data) => channel.appendMessage({ serial, data, extras: { headers } })),
  );

  const joiner = clients.realtime(keyOptions());
  const rebuilder = new TextRebuilder();
  await joiner.channels.get(name).subscribe((message) => rebuilder.onMessage(message));
  await Promise.all(
    FRAGMENTS.slice(half).map((data) => channel.appendMessage({ serial, data, extras: { headers } })),
  );

  const expected = FRAGMENTS.join('');
  const detail = { serial, expected, joinedAfterFragments: half };
  await waitFor(() => rebuilder.text(serial) === expected, "the joiner's text").catch((err) => {
    throw new CheckFailure(err.message, { ...detail, got: rebuilder.text(serial), seen: rebuilder.seen });
  });
  await sleep(SETTLE_MS);
  detail.finalText = rebuilder.text(serial);
  detail.liveActions = actionCounts(rebuilder.actions);
  detail.sequence = rebuilder.seen.map((m) => `${m.action}:${JSON.stringify(m.data)}`);
  expect(detail.finalText === expected, "the joiner's text changed after settling", detail);
  return detail;
}

// Headers on appends. Ably's docs ("Message per response", Header superseding behavior):
// "When you include headers in an append operation, they completely replace all previous
// headers on the message" and "Append without headers - previous headers are retained".
// The worker resends every header on every append, so it relies only on the first rule.
async function checkAppendHeaders(clients) {
  const name = channelName('headers');
  const watcher = clients.realtime(keyOptions());
  const rebuilder = new TextRebuilder();
  await watcher.channels.get(name).subscribe((message) => rebuilder.onMessage(message));
  const publisher = clients.realtime(keyOptions());
  const channel = publisher.channels.get(name);
  const first = { responseId: 'resp_123', model: 'gpt-4' };
  const { serials } = await channel.publish({
    name: 'ai-response',
    data: 'Hello',
    extras: { headers: first },
  });
  const serial = serials[0];
  await channel.appendMessage({ serial, data: ' world' });
  const rest = clients.rest(keyOptions());
  const afterBare = await rest.channels.get(name).getMessage(serial);
  const second = { responseId: 'resp_123', tokensUsed: '15' };
  await channel.appendMessage({ serial, data: '!', extras: { headers: second } });
  await waitFor(() => rebuilder.text(serial) === 'Hello world!', 'the watcher to see the text');
  const afterReplace = await rest.channels.get(name).getMessage(serial);
  const detail = {
    live: rebuilder.seen.map((m) => ({ action: m.action, data: m.data, headers: m.headers })),
    afterAppendWithoutHeaders: afterBare.extras?.headers ?? null,
    afterAppendWithHeaders: afterReplace.extras?.headers ?? null,
    name: afterReplace.name,
  };
  expect(
    sameHeaders(afterReplace.extras?.headers, second),
    'an append with headers did not replace all previous headers',
    detail,
  );
  expect(rebuilder.seen.at(-1)?.headers?.tokensUsed === '15', 'the live append lost its headers', detail);
  expect(afterReplace.name === 'ai-response', 'an append without a name dropped the name', detail);
  const bare = afterBare.extras?.headers ?? {};
  expect(
    Object.entries(first).every(([k, v]) => bare[k] === v),
    'an append without headers did not retain the previous headers',
    detail,
  );
  // DIFFERENCE: after an append WITHOUT headers, Sockudo's retained headers also carry its
  // own bookkeeping keys (`sockudo_action`, `sockudo_message_serial`,
  // `sockudo_version_serial`, `sockudo_version_timestamp_ms`, `sockudo_history_serial`),
  // both on the live `message.append` and in getMessage()/history. Ably's docs promise the
  // previous headers, nothing more. The worker resends every header on every append, so it
  // never sees them; a front end should ignore header keys it does not know.
  detail.extraHeaderKeys = Object.keys(bare).filter((k) => !(k in first));
  return detail;
}

// A client attaching after the response is complete, with `rewind: '1'`.
//
// Ably's docs ("Message per response", Client hydration): "Both rewind and history deliver
// concatenated responses as `message.update` events". Sockudo does: one `message.update`
// with the whole text, the original serial and name, and the last append's headers.
async function checkRewind(clients) {
  const name = channelName('rewind');
  const publisher = clients.realtime(keyOptions());
  const stream = await streamResponse(publisher.channels.get(name));
  const detail = { serial: stream.serial, expected: stream.text };
  for (const useBinaryProtocol of [false, true]) {
    const label = useBinaryProtocol ? 'msgpack' : 'json';
    const late = clients.realtime(keyOptions({ useBinaryProtocol }));
    const received = [];
    const channel = late.channels.get(name, { params: { rewind: '1' } });
    await channel.subscribe((message) => received.push(short(message)));
    await waitFor(() => received.length > 0, `${label} rewound message`).catch((err) => {
      throw new CheckFailure(err.message, { ...detail, [label]: { received } });
    });
    await sleep(SETTLE_MS);
    detail[label] = {
      received,
      action: received[0]?.action,
      count: received.length,
      attachParams: channel.params,
    };
    expect(received.length === 1, `${label}: rewind=1 gave ${received.length} messages, not one`, detail);
    expect(received[0].data === stream.text, `${label}: the rewound message is not the whole text`, detail);
    expect(received[0].serial === stream.serial, `${label}: the rewound message has another serial`, detail);
    expect(received[0].name === 'response', `${label}: the rewound message lost its name`, detail);
  }
  return detail;
}

// REST history, getMessage, getMessageVersions and updateMessage.
//
// Ably's docs ("Updates, deletes and appends"): an update "replaces the original message in
// message history, so history queries will see the latest version of the message (but in
// the place in history of the original)"; getMessageVersions returns "all versions of the
// message, including the original and all subsequent updates or delete operations, ordered
// by version". Observed with Sockudo: history holds one item per response (action
// `message.update`, the whole text); getMessageVersions lists the create and then EVERY
// append as a version of its own (action `message.append`, data the fragment), oldest
// first, so a response of N appends has N + 1 versions (N + 2 after a repair). How Ably
// lists appends there is not documented (its rollup may merge them): the worker must not
// rely on the count or on the shape of append versions. Serials are opaque strings of
// another form than Ably's (`00000001795598996128:<uuid>:00000000000000000001` against
// the docs' `01826232498871-001@abcdefghij:001`), still lexicographically sortable.
async function checkHistory(clients) {
  const name = channelName('history');
  const publisher = clients.realtime(keyOptions());
  const realtimeChannel = publisher.channels.get(name);
  const stream = await streamResponse(realtimeChannel);
  const rest = clients.rest(keyOptions());
  const channel = rest.channels.get(name);
  const detail = { serial: stream.serial, expected: stream.text, auth: useTokenAuth ? 'token' : 'basic' };

  const started = Date.now();
  const findIn = async () => {
    const page = await channel.history();
    return page.items.find((m) => m.serial === stream.serial && m.data === stream.text) ? page : null;
  };
  const page = await waitFor(findIn, 'the whole message in REST history').catch(async (err) => {
    const last = await channel.history().catch((e) => ({ items: [], error: errorDetail(e) }));
    throw new CheckFailure(err.message, { ...detail, history: last.items.map(short), error: last.error });
  });
  const item = page.items.find((m) => m.serial === stream.serial);
  detail.history = {
    items: page.items.length,
    action: item.action,
    name: item.name,
    headers: item.extras?.headers,
    version: item.version?.serial,
    msUntilVisible: Date.now() - started,
  };
  expect(page.items.length === 1, `history has ${page.items.length} items for one response, not one`, detail);

  const got = await channel.getMessage(stream.serial);
  detail.getMessage = {
    action: got.action,
    data: got.data,
    serial: got.serial,
    version: got.version?.serial,
  };
  expect(got.data === stream.text, 'getMessage(serial) is not the whole text', detail);
  expect(got.serial === stream.serial, 'getMessage(serial) returned another serial', detail);

  const versions = await channel.getMessageVersions(stream.serial);
  detail.versions = {
    count: versions.items.length,
    actions: versions.items.map((v) => v.action),
    data: versions.items.map((v) => v.data),
  };
  expect(versions.items.length >= 1, 'getMessageVersions(serial) listed no version', detail);

  // The worker's repair: one updateMessage with the full text, over the realtime channel.
  const updated = await realtimeChannel.updateMessage(
    {
      serial: stream.serial,
      data: 'replaced',
      extras: { headers: headersFor(stream.responseId, 'complete') },
    },
    { description: 'conformance repair' },
  );
  detail.update = { versionSerial: updated?.versionSerial };
  expect(
    typeof updated?.versionSerial === 'string',
    'updateMessage did not resolve with a versionSerial',
    detail,
  );

  await waitFor(
    async () => (await channel.getMessage(stream.serial)).data === 'replaced',
    'getMessage to show the update',
  ).catch(async (err) => {
    const now = await channel.getMessage(stream.serial);
    throw new CheckFailure(err.message, { ...detail, getMessageAfterUpdate: short(now) });
  });
  const after = await channel.getMessage(stream.serial);
  const afterPage = await waitFor(async () => {
    const p = await channel.history();
    return p.items.some((m) => m.serial === stream.serial && m.data === 'replaced') ? p : null;
  }, 'history to show the update');
  const versionsAfter = await channel.getMessageVersions(stream.serial);
  detail.afterUpdate = {
    getMessage: {
      action: after.action,
      name: after.name,
      data: after.data,
      version: after.version?.serial,
      description: after.version?.description,
    },
    historyItems: afterPage.items.length,
    historyAction: afterPage.items.find((m) => m.serial === stream.serial)?.action,
    versionCount: versionsAfter.items.length,
  };
  expect(afterPage.items.length === 1, 'history has more than one item after the update', detail);
  // Docs ("Mixin semantics"): fields left out of an update "remain as they were".
  expect(after.name === 'response', 'updateMessage without a name dropped the name', detail);
  expect(
    after.version?.description === 'conformance repair',
    'the update lost its operation description',
    detail,
  );
  expect(
    after.version?.serial === updated.versionSerial,
    "getMessage version.serial is not the update's",
    detail,
  );
  expect(
    versionsAfter.items.length > versions.items.length,
    'getMessageVersions did not list one more version after updateMessage',
    detail,
  );
  return detail;
}

// Presence: enter with data, update, a subscriber's events, get(), leave.
async function checkPresence(clients) {
  const name = channelName('presence');
  const watcher = clients.realtime(keyOptions());
  const events = [];
  const watched = watcher.channels.get(name);
  await watched.presence.subscribe((m) =>
    events.push({ action: m.action, clientId: m.clientId, data: m.data }),
  );

  const agent = clients.realtime(keyOptions({ clientId: 'agent-1' }));
  const agentChannel = agent.channels.get(name);
  await agentChannel.presence.enter({ capacity: 4 });
  const seen = (action, pred = () => true) =>
    events.find((e) => e.action === action && e.clientId === 'agent-1' && pred(e));
  const detail = { events };
  await waitFor(() => seen('enter'), 'the enter event').catch((e) => {
    throw new CheckFailure(e.message, detail);
  });
  await agentChannel.presence.update({ capacity: 4, inFlight: 1 });
  await waitFor(() => seen('update', (e) => e.data?.inFlight === 1), 'the update event').catch((e) => {
    throw new CheckFailure(e.message, detail);
  });

  const members = await watched.presence.get();
  detail.membersWhilePresent = members.map((m) => ({ clientId: m.clientId, action: m.action, data: m.data }));
  const member = members.find((m) => m.clientId === 'agent-1');
  expect(members.length === 1 && member, 'presence.get() does not list exactly agent-1', detail);
  expect(member.data?.capacity === 4 && member.data?.inFlight === 1, 'presence.get() has stale data', detail);
  expect(seen('enter').data?.capacity === 4, 'the enter event lost its data', detail);

  // A REST client sees the same member set.
  const restMembers = await clients.rest(keyOptions()).channels.get(name).presence.get();
  detail.restMembers = restMembers.items.map((m) => ({ clientId: m.clientId, data: m.data }));
  expect(
    restMembers.items.some((m) => m.clientId === 'agent-1'),
    'REST presence.get() does not list agent-1',
    detail,
  );

  await agentChannel.presence.leave();
  await waitFor(() => seen('leave'), 'the leave event').catch((e) => {
    throw new CheckFailure(e.message, detail);
  });
  const membersAfter = await waitFor(async () => {
    const m = await watched.presence.get();
    return m.length === 0 ? m : null;
  }, 'presence.get() to be empty').catch((e) => {
    throw new CheckFailure(e.message, detail);
  });
  detail.membersAfterLeave = membersAfter.length;
  detail.actions = events.map((e) => e.action);
  return detail;
}

// A token whose capability allows one namespace: attach there, refused elsewhere (40160).
async function checkCapabilityDenied(clients) {
  // Ably's resource wildcard is `namespace:*`; derive namespaces of our own from the prefix.
  const ns = `${prefix.replace(/[:?#[\]]/g, '-')}-${randomBytes(3).toString('hex')}`;
  const allowedNs = `${ns}-allowed`;
  const capability = { [`${allowedNs}:*`]: ['subscribe', 'publish'] };
  // requestToken with the key: ably-js signs a token request with the key secret and
  // POSTs it to /keys/{keyName}/requestToken.
  const rest = clients.rest(keyOptions());
  const tokenDetails = await rest.auth.requestToken({ capability, clientId: 'limited-user' });
  const detail = { capabilityRequested: capability, capabilityGranted: tokenDetails.capability };
  expect(tokenDetails.token, 'requestToken gave no token', detail);

  const { key: _key, useTokenAuth: _u, ...serverAndLog } = keyOptions();
  const client = clients.realtime({ ...serverAndLog, tokenDetails });
  await connected(client);
  detail.clientId = client.auth.clientId;

  const allowed = client.channels.get(`${allowedNs}:x`);
  await allowed.attach();
  detail.allowed = { channel: allowed.name, state: allowed.state };
  const published = await allowed.publish('hello', 'world');
  detail.allowed.publishSerial = published?.serials?.[0];

  const denied = client.channels.get(`${ns}-denied:x`);
  let refusal = null;
  try {
    await denied.attach();
  } catch (err) {
    refusal = err;
  }
  detail.denied = { channel: denied.name, state: denied.state, error: refusal && errorDetail(refusal) };
  expect(refusal, 'attach to a channel outside the capability succeeded', detail);
  expect(refusal.code === 40160, `refused with code ${refusal.code}, not 40160`, detail);
  expect(denied.state === 'failed', `denied channel is ${denied.state}, not failed`, detail);
  // A refused channel does not take the connection down.
  await sleep(100);
  detail.connectionAfter = client.connection.state;
  expect(client.connection.state === 'connected', 'the connection did not stay connected', detail);
  expect(allowed.state === 'attached', 'the allowed channel did not stay attached', detail);

  // Publishing outside the capability without attaching is refused too.
  let publishRefusal = null;
  try {
    await client.channels.get(`${ns}-denied:y`).publish('hello', 'world');
  } catch (err) {
    publishRefusal = err;
  }
  detail.deniedPublish = publishRefusal && errorDetail(publishRefusal);
  expect(publishRefusal?.code === 40160, 'publish outside the capability was not refused with 40160', detail);
  return detail;
}

const CHECKS = {
  'connect-json': (clients) => checkConnect(clients, false),
  'connect-msgpack': (clients) => checkConnect(clients, true),
  'connect-token-auth': checkConnectTokenAuth,
  'appends-live': checkAppendsLive,
  'appends-mid-stream': checkAppendsMidStream,
  'append-headers': checkAppendHeaders,
  rewind: checkRewind,
  history: checkHistory,
  presence: checkPresence,
  'capability-denied': checkCapabilityDenied,
};

// ---------------------------------------------------------------------------------------

async function runCheck(name) {
  const clients = new Clients();
  let timer;
  try {
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new CheckFailure(`timed out after ${TIMEOUT_MS} ms`)), TIMEOUT_MS);
    });
    const detail = await Promise.race([CHECKS[name](clients), timeout]);
    return { check: name, ok: true, detail };
  } catch (err) {
    const detail =
      err instanceof CheckFailure
        ? { error: err.message, ...(err.detail ?? {}) }
        : { error: errorDetail(err), stack: err?.stack };
    detail.connections = clients.all.map((client) => ({
      state: client.connection.state,
      id: client.connection.id,
      reason: client.connection.errorReason ? errorDetail(client.connection.errorReason) : undefined,
    }));
    return { check: name, ok: false, detail };
  } finally {
    clearTimeout(timer);
    await clients.closeAll().catch(() => {});
  }
}

async function main(argv) {
  if (argv.includes('--list')) {
    process.stdout.write(`${Object.keys(CHECKS).join('\n')}\n`);
    return 0;
  }
  const unknown = argv.filter((name) => !(name in CHECKS));
  if (unknown.length) {
    process.stderr.write(
      `unknown check(s): ${unknown.join(', ')}; known: ${Object.keys(CHECKS).join(', ')}\n`,
    );
    return 2;
  }
  try {
    serverOptions();
    apiKey();
  } catch (err) {
    process.stderr.write(`${err.message}\n`);
    return 2;
  }
  const names = argv.length ? argv : Object.keys(CHECKS);
  let failed = 0;
  for (const name of names) {
    const result = await runCheck(name);
    if (!result.ok) failed += 1;
    process.stdout.write(`${JSON.stringify(result)}\n`);
  }
  return failed ? 1 : 0;
}

// Exit explicitly: a client that failed to close must not keep the process alive.
main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`${err?.stack ?? err}\n`);
    process.exit(1);
  },
);
