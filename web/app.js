// The demo page: a chat front end for the AI Transport worker, in one module.
//
// It talks to Ably directly; its server (worker/devstack/demo_server.py) only hands out
// tokens and starts conversations, as a product's backend would. Read top to bottom:
//
//   1. connect      a Realtime client whose token comes from /auth (authUrl)
//   2. agents       who is online, from presence on the agents channel
//   3. transcript   the wire contract's rule: one text per message serial, create sets,
//                   append adds, update replaces, and each version applied once
//   4. open         hydrate a conversation: subscribe, then history up to the attach point
//   5. render       prompts, and answers (only from agents) under the prompt they answer
//   6. send, stop   `prompt` and `cancel` messages; a new conversation goes through the
//                   server, which enqueues its first prompt
//
// URL parameters: `user` (the demo's sign-in), `c` (the open conversation's channel, kept
// so a reload reopens it), `model` (sent with each prompt, e.g. `local-slow`).

/* global Ably */

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

const state = {
  config: null, // from /config: user, ably options, agentsChannel, agentIds
  realtime: null,
  agents: new Map(), // clientId -> presence data { inFlight, capacity, version }
  agentsSeen: new Set(), // every clientId ever seen in agents presence: trusted authors
  conversations: [], // [{ channel, title, created }]
  open: null, // the open conversation: { name, channel, transcript, catchingUp }
};

// -- 1. connect ------------------------------------------------------------------------

async function connect() {
  const config = await getJSON(`/config?${userQuery()}`);
  state.config = config;
  $('user').textContent = config.user;
  const realtime = new Ably.Realtime({
    ...(config.ably ?? {}), // the local Ably in development; Ably's defaults otherwise
    authUrl: '/auth', // a JWT naming this user's channels; fetched again before expiry
    authParams: { user: config.user },
  });
  state.realtime = realtime;
  realtime.connection.on((change) => {
    $('connection').dataset.state = change.current;
    $('connection').textContent = change.current;
  });
  return realtime;
}

// -- 2. agents: presence on the agents channel -------------------------------------------

async function watchAgents() {
  // The token gives this channel `subscribe` only: enough to read presence, never to enter.
  const channel = state.realtime.channels.get(state.config.agentsChannel);
  const refresh = async () => {
    const members = await channel.presence.get(); // the synced presence set
    state.agents = new Map(members.map((m) => [m.clientId, m.data ?? {}]));
    for (const id of state.agents.keys()) state.agentsSeen.add(id);
    renderAgents();
    scheduleRender(); // an answer from an agent seen only now becomes visible
  };
  await channel.presence.subscribe(() => refresh().catch(showError));
  await refresh();
}

function isAgent(clientId) {
  // A user can publish a `response` on their own channel: only agents' answers count.
  return state.config.agentIds.includes(clientId) || state.agentsSeen.has(clientId);
}

// -- 3. the transcript: one entry per message serial -----------------------------------

class Transcript {
  constructor() {
    this.entries = new Map(); // serial -> { serial, version, name, id, clientId, text, headers, wasInterrupted }
  }

  // Apply one message; false if it changed nothing. Live delivery, rewind and history can
  // each bring the same version of a message (history returns a streaming answer as it
  // stands when read, which may include appends also delivered live): each message keeps
  // the newest version applied, and anything not newer is dropped. Version serials sort
  // in publish order, so there is no gap and no repeat, in whatever order they come.
  apply(msg) {
    if (msg.name !== 'prompt' && msg.name !== 'response') return false;
    const version = msg.version?.serial || msg.serial;
    const known = this.entries.get(msg.serial);
    if (known && known.version >= version) return false;
    const entry = known ?? {
      serial: msg.serial, name: msg.name, id: msg.id, clientId: msg.clientId,
      text: '', headers: {}, wasInterrupted: false,
    };
    if (msg.action === 'message.append') entry.text += msg.data ?? '';
    else if (msg.data != null) entry.text = String(msg.data); // create, update (an update without data keeps the text)
    if (msg.extras?.headers) entry.headers = msg.extras.headers; // each message carries all of them
    if (entry.headers.status === 'interrupted') entry.wasInterrupted = true;
    entry.version = version;
    this.entries.set(msg.serial, entry);
    return true;
  }

  // Prompts and answers in channel order, each answer right after the prompt it answers
  // (its responseId is the prompt's message id: it is created after later prompts may
  // have been published); an answer to a backend's job stands at its own place.
  items() {
    const all = [...this.entries.values()].sort((a, b) => (a.serial < b.serial ? -1 : 1));
    const answers = new Set(all.filter((e) => e.name === 'response' && isAgent(e.clientId)));
    const byResponseId = new Map([...answers].map((a) => [a.headers.responseId, a]));
    const promptIds = new Set(all.filter((e) => e.name === 'prompt').map((p) => p.id));
    const out = [];
    for (const entry of all) {
      if (entry.name === 'prompt') {
        out.push(entry);
        const answer = byResponseId.get(entry.id);
        if (answer) out.push(answer);
      } else if (answers.has(entry) && !promptIds.has(entry.headers.responseId)) {
        out.push(entry);
      }
    }
    return out;
  }
}

// -- 4. open a conversation: hydrate from the channel, then live -------------------------

async function openConversation(name) {
  if (state.open?.name === name) return;
  await closeConversation();
  const channel = state.realtime.channels.get(name);
  const open = { name, channel, transcript: new Transcript(), catchingUp: false };
  state.open = open;
  params.set('c', name);
  history.replaceState(null, '', `?${params}`);
  renderHeader();
  $('transcript').replaceChildren();
  $('transcript').dataset.hydrated = 'false';
  scheduleRender();

  // Live first: subscribing attaches the channel; messages apply as they come.
  open.listener = (msg) => { if (open.transcript.apply(msg)) scheduleRender(); };
  await channel.subscribe(open.listener);
  // Then everything before the attach point, however long ago: `untilAttach` ends history
  // exactly where the live subscription starts.
  await catchUp(open);
  // Attached again without continuity (offline for longer than Ably can resume): read
  // history up to the new attach point; the versions drop what we already have.
  open.onAttach = (change) => { if (!change.resumed && state.open === open) catchUp(open).catch(showError); };
  channel.on('attached', open.onAttach);
  channel.on('update', open.onAttach);
}

async function catchUp(open) {
  if (open.catchingUp) return;
  open.catchingUp = true;
  try {
    let page = await open.channel.history({ untilAttach: true, limit: 100 }); // newest first
    for (let pages = 1; page; pages += 1) {
      for (const msg of page.items) open.transcript.apply(msg);
      page = page.hasNext() && pages < 50 ? await page.next() : null;
    }
  } finally {
    open.catchingUp = false;
  }
  $('transcript').dataset.hydrated = 'true';
  scheduleRender();
}

async function closeConversation() {
  const open = state.open;
  if (!open) return;
  state.open = null;
  open.channel.unsubscribe(open.listener);
  if (open.onAttach) { open.channel.off('attached', open.onAttach); open.channel.off('update', open.onAttach); }
  await open.channel.detach().catch(() => {});
}

// -- 5. render ---------------------------------------------------------------------------

const STATUS_TEXT = {
  streaming: 'streaming…',
  complete: 'complete',
  cancelled: 'cancelled',
  failed: 'failed',
  interrupted: 'interrupted: the worker stopped; the answer resumes when one takes it back',
};

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; renderTranscript(); });
}

function renderTranscript() {
  const list = $('transcript');
  const items = state.open ? state.open.transcript.items() : [];
  $('empty').hidden = items.length > 0;
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const keep = new Set();
  items.forEach((entry, i) => {
    const key = entry.serial;
    keep.add(key);
    let el = list.querySelector(`:scope > li[data-serial="${CSS.escape(key)}"]`);
    if (!el) el = entry.name === 'prompt' ? promptElement(entry) : answerElement(entry);
    if (entry.name === 'response') updateAnswer(el, entry);
    if (list.children[i] !== el) list.insertBefore(el, list.children[i] ?? null);
  });
  for (const el of [...list.children]) if (!keep.has(el.dataset.serial)) el.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function promptElement(entry) {
  const el = document.createElement('li');
  el.className = 'prompt';
  el.dataset.serial = entry.serial;
  const mine = entry.clientId === state.config.user;
  el.innerHTML = '<span class="author"></span><div class="text"></div>';
  el.querySelector('.author').textContent = mine ? 'you' : entry.clientId ?? 'someone';
  el.querySelector('.text').textContent = entry.text;
  return el;
}

function answerElement(entry) {
  const el = document.createElement('li');
  el.className = 'answer';
  el.dataset.serial = entry.serial;
  el.dataset.responseId = entry.headers.responseId ?? '';
  el.innerHTML = `<span class="author"></span><div class="text"></div>
    <div class="meta"><span class="status"></span><span class="model"></span>
    <button type="button" class="stop">Stop</button></div>`;
  el.querySelector('.author').textContent = entry.clientId;
  el.querySelector('.stop').addEventListener('click', (event) => stop(event.currentTarget, el.dataset.responseId));
  return el;
}

function updateAnswer(el, entry) {
  const status = entry.headers.status ?? 'streaming';
  el.dataset.status = status;
  el.dataset.responseId = entry.headers.responseId ?? '';
  el.querySelector('.text').textContent = entry.text;
  let label = STATUS_TEXT[status] ?? status;
  if (status === 'failed' && entry.headers.error) label = `failed: ${entry.headers.error}`;
  if (entry.wasInterrupted && status !== 'interrupted') label += ' (resumed after an interruption)';
  el.querySelector('.status').textContent = label;
  el.querySelector('.model').textContent = entry.headers.model ?? '';
  const button = el.querySelector('.stop');
  button.hidden = status !== 'streaming' && status !== 'interrupted';
}

function renderAgents() {
  const list = $('agent-list');
  list.replaceChildren();
  if (state.agents.size === 0) {
    list.innerHTML = '<li class="none">none online</li>';
    return;
  }
  for (const [clientId, data] of [...state.agents].sort(([a], [b]) => a.localeCompare(b))) {
    const li = document.createElement('li');
    li.dataset.agentId = clientId;
    const load = Number(data.inFlight ?? 0);
    const capacity = Number(data.capacity ?? 0);
    li.innerHTML = '<span class="dot"></span><span class="name"></span><span class="load"></span><meter></meter>';
    li.querySelector('.name').textContent = clientId;
    li.querySelector('.load').textContent = capacity ? `${load}/${capacity}` : `${load}`;
    Object.assign(li.querySelector('meter'), { min: 0, max: capacity || 1, value: load });
    li.title = `version ${data.version ?? '?'}: ${load} answers in flight of ${capacity}`;
    list.append(li);
  }
}

function renderHeader() {
  const conv = state.conversations.find((c) => c.channel === state.open?.name);
  $('title').textContent = state.open ? conv?.title ?? state.open.name : 'New conversation';
  $('channel-name').textContent = state.open?.name ?? '';
  for (const li of $('conversations').children) li.classList.toggle('active', li.dataset.channel === state.open?.name);
}

async function loadConversations() {
  state.conversations = await getJSON(`/conversations?${userQuery()}`);
  const list = $('conversations');
  list.replaceChildren();
  for (const conv of state.conversations) {
    const li = document.createElement('li');
    li.dataset.channel = conv.channel;
    li.textContent = conv.title || conv.channel;
    li.title = conv.channel;
    li.addEventListener('click', () => openConversation(conv.channel).catch(showError));
    list.append(li);
  }
  renderHeader();
}

// -- 6. send and stop --------------------------------------------------------------------

async function send(text) {
  const model = params.get('model');
  if (!state.open) {
    // A new conversation: the server records its channel and enqueues the first prompt
    // (the backend's path). A fresh token then names the new channel, and the prompt goes
    // on the channel under the job's id, so the transcript holds it (one job: same id).
    const { channel, promptId } = await postJSON(`/conversations?${userQuery()}`, { prompt: text, model });
    await state.realtime.auth.authorize();
    await loadConversations();
    await openConversation(channel);
    await state.open.channel.publish({ name: 'prompt', id: promptId, data: text, extras: headers({ model }) });
    return;
  }
  // A follow-up: a `prompt` message on the channel; the worker serving it answers.
  await state.open.channel.publish({ name: 'prompt', data: text, extras: headers({ model }) });
}

async function stop(button, responseId) {
  button.disabled = true;
  button.textContent = 'Stopping…';
  // Only this answer's user (Ably stamps our clientId) or an allowed role may cancel it.
  await state.open.channel.publish({ name: 'cancel', extras: { headers: { responseId } } })
    .catch(showError);
}

function headers(values) {
  const set = Object.fromEntries(Object.entries(values).filter(([, v]) => v));
  return Object.keys(set).length ? { headers: set } : undefined;
}

// -- plumbing ----------------------------------------------------------------------------

function userQuery() {
  return new URLSearchParams(params.get('user') ? { user: params.get('user') } : {}).toString();
}

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${await response.text()}`);
  return response.json();
}

async function postJSON(url, body) {
  const response = await fetch(url, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
  return response.json();
}

function showError(err) {
  console.error(err);
  $('error').hidden = false;
  $('error').textContent = err?.message ?? String(err);
}

function wireUp() {
  const prompt = $('prompt');
  $('composer').addEventListener('submit', async (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    $('send').disabled = true;
    $('error').hidden = true;
    try {
      await send(text);
      prompt.value = '';
    } catch (err) {
      showError(err);
    } finally {
      $('send').disabled = false;
      prompt.focus();
    }
  });
  prompt.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey) {
      event.preventDefault();
      $('composer').requestSubmit();
    }
  });
  $('new-conversation').addEventListener('click', async () => {
    await closeConversation();
    params.delete('c');
    history.replaceState(null, '', `?${params}`);
    renderHeader();
    scheduleRender();
    prompt.focus();
  });
}

async function main() {
  wireUp();
  await connect();
  await loadConversations();
  await watchAgents();
  const wanted = params.get('c') ?? state.conversations[0]?.channel;
  if (wanted && state.conversations.some((c) => c.channel === wanted)) await openConversation(wanted);
  document.body.dataset.ready = 'true';
}

main().catch(showError);
