// rgemma chat page: plain JavaScript, no framework and no build step. It talks only to the
// server that served it: /v1/models, streamed /v1/chat/completions and the /v1/states
// handles, which let a conversation branch at any turn without reading it again.
"use strict";

const SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed"];
const INTEGER_FIELDS = new Set(["top_k", "max_tokens", "seed"]);
const SETTINGS_KEY = "rgemma.chat.settings";
const API_KEY_KEY = "rgemma.chat.apiKey"; // sessionStorage: gone when the tab closes
const APP = "rgemma-chat"; // marks the metadata of the states this page saves
// The server keeps at most 64 KiB of metadata per state (as Python writes the JSON); stay
// well under it so that a long conversation never makes a chat request fail.
const METADATA_BUDGET = 48 * 1024;

const $ = (id) => document.getElementById(id);

// ==================================================================== the API
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let apiKey = sessionStorage.getItem(API_KEY_KEY) || "";
let keyPrompt = null;

/** fetch() on this server with the API key; a 401 asks the user for a key and retries. */
async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers);
    if (apiKey) headers.set("Authorization", `Bearer ${apiKey}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    const key = await askForKey();
    if (key === null) throw new ApiError(401, "this server needs an API key");
    apiKey = key;
    sessionStorage.setItem(API_KEY_KEY, key);
  }
}

function postJson(path, body, signal) {
  const headers = { "Content-Type": "application/json" };
  return api(path, { method: "POST", headers, body: JSON.stringify(body), signal });
}

/** The JSON of a successful answer; an ApiError with the server's message otherwise. */
async function jsonOf(response) {
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body.error && body.error.message) message = body.error.message;
  } catch {
    // not OpenAI's error JSON: the status line says enough
  }
  return new ApiError(response.status, message);
}

/** The key typed into the dialog, or null if it was cancelled. Requests that get a 401
 *  at the same time share one dialog. */
function askForKey() {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  keyPrompt = new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        keyPrompt = null;
        const key = $("key-input").value.trim();
        resolve(dialog.returnValue === "ok" && key ? key : null);
      },
      { once: true },
    );
  });
  $("key-input").value = "";
  dialog.returnValue = "";
  dialog.showModal();
  return keyPrompt;
}

/** The data of each Server-Sent Event of a streamed response, until "[DONE]". */
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = (buffer + value).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data === "[DONE]") return;
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ====================================================== the conversation tree
// A turn is a user message and its answer. Its children are the turns that follow it:
// more than one when the conversation was branched there; `active` picks the one shown.
// `stateId` is the server's handle of the state after the turn (null while answering,
// or when the answer was stopped or failed).
function newTurn(parent, user) {
  return {
    parent,
    children: [],
    active: 0,
    user,
    answer: "",
    system: "", // the system prompt, on turns that start a conversation
    status: "",
    error: "",
    finish: "",
    stateId: null,
    ownsState: false, // made by this page: deleted with the conversation
    view: null,
  };
}

let root = newTurn(null, "");
const ui = { model: "rgemma", running: null, editing: null };

/** The turns shown: from the first, following each turn's active branch. */
function activePath() {
  const path = [];
  for (let turn = root; turn.children.length; ) {
    turn = turn.children[turn.active];
    path.push(turn);
  }
  return path;
}

/** The turns before `turn`, the first one first. */
function turnsBefore(turn) {
  const list = [];
  for (let t = turn.parent; t && t !== root; t = t.parent) list.unshift(t);
  return list;
}

function* allTurns(turn = root) {
  for (const child of turn.children) {
    yield child;
    yield* allTurns(child);
  }
}

/** The conversation up to `turn` as chat messages (its answer too if `withAnswer`). */
function messagesUpTo(turn, withAnswer) {
  const turns = [...turnsBefore(turn), turn];
  const messages = turns[0].system ? [{ role: "system", content: turns[0].system }] : [];
  for (const t of turns) {
    messages.push({ role: "user", content: t.user });
    if (t !== turn || withAnswer) messages.push({ role: "assistant", content: t.answer });
  }
  return messages;
}

/** What a state of this page carries: the conversation as shown, and the handles of its
 *  turns (still usable to branch from while the same server keeps them). */
function sessionMetadata(turn, withAnswer) {
  const states = [...turnsBefore(turn), turn].map((t) => t.stateId);
  return { app: APP, messages: messagesUpTo(turn, withAnswer), states };
}

/** JSON size as Python's json.dumps counts it (non-ASCII characters as \uXXXX). */
function jsonSize(value) {
  return JSON.stringify(value).replace(/[^\x00-\x7f]/g, "uXXXXX").length * 1.1;
}

/** The /v1/chat/completions body that answers `turn`. When the turn before it has a state
 *  handle, only the new user message is sent and the server continues from that state:
 *  nothing earlier is read again. Otherwise (first turn, a stopped answer before, a loaded
 *  session whose handles are gone) the whole conversation is sent. */
function chatRequest(turn) {
  const before = turn.parent === root ? null : turn.parent;
  const body = {
    model: ui.model,
    stream: true,
    stream_options: { include_usage: true },
    save_state: true,
    ...samplingSettings(),
  };
  if (before && before.stateId) {
    body.state = before.stateId;
    body.messages = [{ role: "user", content: turn.user }];
  } else {
    body.messages = messagesUpTo(turn, false);
  }
  const metadata = sessionMetadata(turn, false);
  body.metadata = jsonSize(metadata) < METADATA_BUDGET ? metadata : { app: APP };
  return body;
}

// ============================================================= asking the model
/** Sends `text` as a new turn: after the last turn, or, while a turn is being edited, as a
 *  new branch beside it. */
async function send(text) {
  if (ui.running || !text.trim()) return;
  const parent = ui.editing ? ui.editing.parent : activePath().at(-1) || root;
  const turn = newTurn(parent, text);
  if (parent === root) turn.system = $("system").value.trim();
  parent.children.push(turn);
  parent.active = parent.children.length - 1;
  stopEditing();
  $("message").value = "";
  showError("");
  render();
  await answer(turn);
}

/** Streams the answer of `turn` into the page. */
async function answer(turn) {
  const controller = new AbortController();
  ui.running = { turn, controller };
  turn.status = "running";
  render();
  announce("Answering…");
  const timing = { start: performance.now(), first: 0, end: 0, chunks: 0, usage: null };
  try {
    let response = await postJson("/v1/chat/completions", chatRequest(turn), controller.signal);
    if (response.status === 404 && turn.parent.stateId) {
      // The handle is gone (deleted, or evicted under the server's memory budget): send
      // the whole conversation instead.
      turn.parent.stateId = null;
      response = await postJson("/v1/chat/completions", chatRequest(turn), controller.signal);
    }
    if (!response.ok) throw await errorOf(response);
    for await (const data of sseData(response.body)) readChunk(turn, JSON.parse(data), timing);
    turn.status = "done";
  } catch (e) {
    turn.status = controller.signal.aborted ? "stopped" : "error";
    if (!controller.signal.aborted) turn.error = e.message;
  } finally {
    timing.end = performance.now();
    ui.running = null;
    showSpeed(timing);
    render();
    announce(`${turn.status === "done" ? "Answer" : `Answer ${turn.status}`}: ${turn.answer}`);
  }
}

function readChunk(turn, chunk, timing) {
  if (chunk.error) throw new ApiError(500, chunk.error.message);
  const choice = chunk.choices && chunk.choices[0];
  const piece = choice && choice.delta && choice.delta.content;
  if (piece) {
    timing.first = timing.first || performance.now();
    timing.chunks += 1;
    turn.answer += piece;
    showAnswer(turn);
  }
  if (choice && choice.finish_reason) turn.finish = choice.finish_reason;
  if (chunk.state) {
    turn.stateId = chunk.state.id;
    turn.ownsState = true;
  }
  if (chunk.usage) timing.usage = chunk.usage;
}

function stop() {
  if (ui.running) ui.running.controller.abort(); // the server cancels the request
}

/** Tokens and decode speed of the last answer. The speed counts from the first token, so
 *  it is the decoding rate; the wait for the first token is shown beside it. A stopped
 *  answer has no usage: its streamed chunks (one per token) are counted instead. */
function showSpeed(timing) {
  if (!timing.first) {
    $("speed").textContent = "";
    return;
  }
  const tokens = timing.usage ? timing.usage.completion_tokens : timing.chunks;
  const seconds = (timing.end - timing.first) / 1000;
  let text = `last answer: ${timing.usage ? "" : "~"}${tokens} tokens`;
  if (tokens > 1 && seconds > 0) text += `, ${((tokens - 1) / seconds).toFixed(1)} tok/s`;
  text += ` (first after ${((timing.first - timing.start) / 1000).toFixed(2)} s)`;
  $("speed").textContent = text;
}

// ================================================================== branching
function startEditing(turn) {
  if (ui.running) return;
  ui.editing = turn;
  const index = turnsBefore(turn).length + 1;
  $("branch-text").textContent =
    `Editing message ${index}: sending it starts a new branch there ` +
    "(the current one stays reachable with ‹ ›).";
  $("branch-note").hidden = false;
  $("message").value = turn.user;
  render();
  $("message").focus();
}

function stopEditing() {
  if (!ui.editing) return;
  ui.editing = null;
  $("branch-note").hidden = true;
}

function cancelEditing() {
  stopEditing();
  $("message").value = "";
  render();
  $("message").focus();
}

/** Shows branch `index` of the turns after `parent`; keeps the keyboard focus on the
 *  branch button that was used. */
function switchBranch(parent, index, buttonClass) {
  if (ui.running || index < 0 || index >= parent.children.length) return;
  parent.active = index;
  stopEditing();
  render();
  const turn = parent.children[index];
  const buttons = turn.view && turn.view.item.querySelector(".branches");
  if (!buttons) return;
  const button = buttons.querySelector(`.${buttonClass}`);
  (button.disabled ? buttons.querySelector("button:not(:disabled)") : button).focus();
}

// ========================================================== saving and loading
/** Downloads the session as a state file: the state after the last turn, with the whole
 *  conversation in its metadata (a copy of the handle is made for that, since the handle
 *  itself was saved before its answer was known). */
async function saveSession() {
  const last = activePath().at(-1);
  if (!last || !last.stateId || ui.running) return;
  const metadata = sessionMetadata(last, true);
  const copy = await jsonOf(await postJson(`/v1/states/${last.stateId}/fork`, { metadata }));
  try {
    const blob = await (await fileResponse(copy.id)).blob();
    download(blob, `rgemma-chat-${timestamp()}.safetensors`);
  } finally {
    api(`/v1/states/${copy.id}`, { method: "DELETE" }).catch(() => {});
  }
}

async function fileResponse(id) {
  const response = await api(`/v1/states/${id}/file`);
  if (!response.ok) throw await errorOf(response);
  return response;
}

function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

function timestamp() {
  return new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
}

/** Uploads a state file and shows the conversation kept in its metadata; the next message
 *  continues from the uploaded state. */
async function loadSession(file) {
  const response = await api("/v1/states/file", {
    method: "POST",
    headers: { "Content-Type": "application/octet-stream" },
    body: await file.arrayBuffer(),
  });
  const state = await jsonOf(response);
  const loaded = newTurn(null, "");
  let turns;
  try {
    turns = turnsFromMetadata(loaded, state.metadata || {});
  } catch (e) {
    api(`/v1/states/${state.id}`, { method: "DELETE" }).catch(() => {});
    throw e;
  }
  discardConversation();
  root = loaded;
  const last = turns.at(-1);
  last.stateId = state.id;
  last.ownsState = true;
  await keepLiveHandles(turns.slice(0, -1), state.metadata.states);
  render();
}

/** The turns of a session's metadata.messages, linked as one branch under `top`. */
function turnsFromMetadata(top, metadata) {
  const messages = Array.isArray(metadata.messages) ? [...metadata.messages] : [];
  const valid = messages.every((m) => m && typeof m.content === "string");
  if (!valid || !messages.length) {
    throw new Error("this state file holds no conversation of the chat page");
  }
  const system = messages[0].role === "system" ? messages.shift().content : "";
  const turns = [];
  let parent = top;
  for (let i = 0; i < messages.length; i += 2) {
    const [user, reply] = [messages[i], messages[i + 1]];
    if (user.role !== "user" || (reply && reply.role !== "assistant")) {
      throw new Error("the conversation in this state file is not user/assistant turns");
    }
    const turn = newTurn(parent, user.content);
    turn.answer = reply ? reply.content : "";
    turn.status = reply ? "done" : "missing";
    parent.children.push(turn);
    turns.push(turn);
    parent = turn;
  }
  turns[0].system = system;
  return turns;
}

/** Keeps the handles of the earlier turns that this server still has (the same server
 *  and not deleted): branching there then needs no re-reading either. */
async function keepLiveHandles(turns, ids) {
  if (!Array.isArray(ids)) return;
  await Promise.all(
    turns.map(async (turn, i) => {
      if (typeof ids[i] !== "string") return;
      const response = await api(`/v1/states/${encodeURIComponent(ids[i])}`);
      if (response.ok) turn.stateId = ids[i]; // not ours: never deleted by this page
    }),
  );
}

/** Forgets the conversation, deleting the server-side states this page made for it. */
function discardConversation() {
  stop();
  for (const turn of allTurns()) {
    if (turn.ownsState && turn.stateId) {
      api(`/v1/states/${turn.stateId}`, { method: "DELETE" }).catch(() => {});
    }
  }
  root = newTurn(null, "");
  stopEditing();
  $("speed").textContent = "";
  render();
}

// ==================================================================== the view
function render() {
  const list = $("turns");
  const follow = nearBottom();
  const path = activePath();
  const editing = ui.editing ? path.indexOf(ui.editing) : -1;
  const items = path.map((turn, i) => turnItem(turn, i, editing));
  if (path.length && path[0].system) items.unshift(systemItem(path[0].system));
  list.replaceChildren(...items);
  $("empty-note").hidden = path.length > 0;
  updateControls(path);
  if (follow) scrollToEnd();
}

function systemItem(text) {
  const item = document.createElement("li");
  item.className = "turn";
  const message = element("div", "message system");
  const head = element("div", "message-head");
  head.append(element("span", "role", "System"));
  message.append(head, element("div", "text user-text", text));
  item.append(message);
  return item;
}

/** A new element; text goes in as text, never as HTML (messages are not markup). */
function element(tag, className, text = "") {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = text;
  return node;
}

function turnItem(turn, index, editing) {
  const item = $("turn-template").content.firstElementChild.cloneNode(true);
  item.dataset.turn = String(index + 1);
  item.classList.toggle("editing", index === editing);
  item.classList.toggle("after-edit", editing >= 0 && index > editing);
  item.querySelector(".user-text").textContent = turn.user;
  const answerBox = item.querySelector(".answer");
  answerBox.textContent = turn.answer;
  answerBox.setAttribute("aria-busy", String(turn.status === "running"));
  const status = item.querySelector(".turn-status");
  status.textContent = statusText(turn);
  status.className = `turn-status ${turn.status}`;
  const branch = item.querySelector(".branch");
  branch.setAttribute("aria-label", `Edit message ${index + 1} and branch from there`);
  branch.disabled = Boolean(ui.running);
  branch.addEventListener("click", () => startEditing(turn));
  showBranches(item, turn);
  turn.view = { item, answer: answerBox };
  return item;
}

function statusText(turn) {
  switch (turn.status) {
    case "running":
      return "answering…";
    case "stopped":
      return "stopped";
    case "error":
      return `error: ${turn.error}`;
    case "missing":
      return "(answer not in the file)";
    default:
      return turn.finish === "length" ? "(max tokens reached)" : "";
  }
}

/** The ‹ n / m › control of a turn that has siblings (other branches at that point). */
function showBranches(item, turn) {
  const siblings = turn.parent.children;
  if (siblings.length < 2) return;
  const index = siblings.indexOf(turn);
  const box = item.querySelector(".branches");
  box.hidden = false;
  box.querySelector(".branch-count").textContent = `${index + 1} / ${siblings.length}`;
  const prev = box.querySelector(".prev-branch");
  const next = box.querySelector(".next-branch");
  prev.disabled = index === 0 || Boolean(ui.running);
  next.disabled = index === siblings.length - 1 || Boolean(ui.running);
  prev.addEventListener("click", () => switchBranch(turn.parent, index - 1, "prev-branch"));
  next.addEventListener("click", () => switchBranch(turn.parent, index + 1, "next-branch"));
}

/** Appends streamed text to the answer on screen without rebuilding the page. */
function showAnswer(turn) {
  if (!turn.view) return;
  const follow = nearBottom();
  turn.view.answer.textContent = turn.answer;
  if (follow) scrollToEnd();
}

function nearBottom() {
  const box = $("conversation");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollToEnd() {
  const box = $("conversation");
  box.scrollTop = box.scrollHeight;
}

function updateControls(path = activePath()) {
  const running = Boolean(ui.running);
  $("send").disabled = running;
  $("stop").disabled = !running;
  const last = path.at(-1);
  const canSave = Boolean(last && last.stateId) && !running;
  $("save").disabled = !canSave;
  $("save").title = canSave ? "Download this conversation as a state file" : "Needs a finished answer";
}

function announce(text) {
  $("announcer").textContent = text;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// ================================================================== settings
function samplingSettings() {
  const settings = {};
  for (const name of SAMPLING_FIELDS) {
    const raw = $(name).value.trim();
    const value = Number(raw);
    if (raw === "" || !Number.isFinite(value)) continue; // empty: the server's default
    settings[name] = INTEGER_FIELDS.has(name) ? Math.trunc(value) : value;
  }
  return settings;
}

function restoreSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
  } catch {
    // a damaged entry: start from the defaults
  }
  for (const name of [...SAMPLING_FIELDS, "system"]) {
    if (typeof saved[name] === "string") $(name).value = saved[name];
  }
}

function storeSettings() {
  const values = {};
  for (const name of [...SAMPLING_FIELDS, "system"]) values[name] = $(name).value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
}

function toggleSettings() {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden) $("system").focus();
}

async function showModel() {
  try {
    const models = await jsonOf(await api("/v1/models"));
    ui.model = models.data[0].id;
    $("model-name").textContent = ui.model;
  } catch (e) {
    $("model-name").textContent = "unavailable";
    showError(`Cannot reach the server: ${e.message}`);
  }
}

// ======================================================================= wiring
/** Runs an async action from a button, showing its failure instead of losing it. */
function guarded(action) {
  return async (...args) => {
    try {
      await action(...args);
    } catch (e) {
      showError(e.message);
    }
  };
}

function onMessageKey(event) {
  // Enter sends, Shift+Enter is a new line; not while an input method composes a word.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send($("message").value);
  }
}

function onGlobalKey(event) {
  if (event.key !== "Escape" || $("key-dialog").open) return;
  if (ui.running) {
    event.preventDefault();
    stop();
  } else if (ui.editing) {
    event.preventDefault();
    cancelEditing();
  }
}

function onKeyDialogSubmit(event) {
  // The dialog closes from here: the page allows no form submissions (its CSP).
  event.preventDefault();
  $("key-dialog").close(event.submitter ? event.submitter.value : "ok");
}

function init() {
  restoreSettings();
  $("composer-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send($("message").value);
  });
  $("message").addEventListener("keydown", onMessageKey);
  document.addEventListener("keydown", onGlobalKey);
  $("stop").addEventListener("click", stop);
  $("branch-cancel").addEventListener("click", cancelEditing);
  $("new-chat").addEventListener("click", () => {
    discardConversation();
    $("message").focus();
  });
  $("save").addEventListener("click", guarded(saveSession));
  $("load-file").addEventListener(
    "change",
    guarded(async (event) => {
      const file = event.target.files[0];
      event.target.value = ""; // the same file can be chosen again
      if (file) await loadSession(file);
    }),
  );
  $("settings-toggle").addEventListener("click", toggleSettings);
  $("settings-form").addEventListener("input", storeSettings);
  $("settings-form").addEventListener("submit", (event) => event.preventDefault());
  $("key-form").addEventListener("submit", onKeyDialogSubmit);
  render();
  showModel();
  $("message").focus();
}

init();
