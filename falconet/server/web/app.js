// falconet's web app: sign in, chat (streamed, with Stop), conversations kept on the server,
// the model and its licence, a document library, answers with numbered sources.
// Plain JavaScript, no build step; every text from the server goes in as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  csrf: null, // the session's CSRF token (multi-user mode)
  bearer: null, // single-user mode with --api-key: the key, kept in this page only
  multiUser: false,
  collections: [],
  collection: null,
  model: null,
  context: 256,
  conversation: null, // {id, title, rag, messages: [...]}
  local: [], // single-user mode: conversations live in the page
  controller: null, // the AbortController of the answer being streamed
  ragOn: true, // whether the server has RAG (--rag-store)
};

// ---- HTTP --------------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.csrf) h["X-CSRF-Token"] = state.csrf;
  if (state.bearer) h["Authorization"] = "Bearer " + state.bearer;
  if (state.collection) h["X-Falconet-Collection"] = state.collection;
  return h;
}

function errorFrom(status, text, retryAfter) {
  let message = text || "HTTP " + status;
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: the text itself */ }
  return new HttpError(status, message, retryAfter);
}

async function errorOf(response) {
  return errorFrom(response.status, await response.text(), response.headers.get("Retry-After"));
}

async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  if (!r.ok) throw await errorOf(r);
  return r.json();
}

// What a user reads for an error: what happened in plain words, then the server's message.
function explain(err) {
  if (!(err instanceof HttpError)) return "Something went wrong: " + err.message;
  switch (err.status) {
    case 401: return "You are signed out: " + err.message;
    case 413: return "Too big: " + err.message;
    case 415: return "Unsupported file type: " + err.message;
    case 429: return "The server is busy" + (err.retryAfter ? ", try again in " + err.retryAfter + " s" : "") + ": " + err.message;
    case 503: return "The server is unavailable: " + err.message;
    default: return "Error " + err.status + ": " + err.message;
  }
}

function showError(err) {
  const box = $("alert");
  box.textContent = explain(err);
  box.hidden = false;
  if (err instanceof HttpError && err.status === 401 && state.multiUser) showSignIn();
}

function clearError() {
  $("alert").hidden = true;
  $("alert").textContent = "";
}

// The `data:` payloads of a server-sent event stream, up to [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ---- signing in ----------------------------------------------------------------------------

function showSignIn() {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("api-key").focus();
}

async function boot() {
  wire();
  const r = await fetch("/v1/auth/session", { headers: headers() });
  if (r.ok) return enter(await r.json());
  if (r.status === 404) { // single-user mode: no users; a key only with --api-key
    const models = await fetch("/v1/models");
    if (models.ok) return enter(null);
  }
  showSignIn();
}

async function signIn(event) {
  event.preventDefault();
  clearError();
  const key = $("api-key").value.trim();
  // The key also goes as a Bearer header: a single-user server with --api-key checks it
  // before answering that it has no sessions (404); a multi-user one reads the body.
  const r = await fetch("/v1/auth/session", {
    method: "POST", headers: { "Content-Type": "application/json", "Authorization": "Bearer " + key },
    body: JSON.stringify({ api_key: key }),
  });
  $("api-key").value = "";
  if (r.ok) return enter(await r.json());
  if (r.status === 404) { // single-user mode with --api-key: the key goes with each request
    state.bearer = key;
    const models = await fetch("/v1/models", { headers: headers() });
    if (models.ok) return enter(null);
    state.bearer = null;
    return showError(await errorOf(models));
  }
  showError(await errorOf(r));
}

async function signOut() {
  try {
    await api("DELETE", "/v1/auth/session");
  } catch (err) { /* signed out either way */ }
  window.location.reload();
}

async function enter(session) {
  state.multiUser = session !== null;
  if (session) {
    state.csrf = session.csrf_token || null;
    state.collections = session.collections || [];
    state.collection = state.collections[0] || null;
    $("who").textContent = "Signed in as " + session.user;
    $("signout").hidden = session.via !== "session";
  }
  const select = $("collection");
  select.replaceChildren(...state.collections.map((c) => new Option(c, c)));
  $("collection-field").hidden = state.collections.length < 2;
  $("signin").hidden = true;
  $("app").hidden = false;
  await Promise.all([loadModels(), loadConversations(), loadDocuments()]);
  newConversation();
  $("question").focus();
}

// ---- models --------------------------------------------------------------------------------

async function loadModels() {
  try {
    const list = await api("GET", "/v1/models");
    const select = $("model");
    select.replaceChildren(...list.data.map((m) => new Option(m.id, m.id)));
    const pick = () => {
      const m = list.data.find((x) => x.id === select.value) || list.data[0];
      state.model = m.id;
      state.context = m.max_model_len || 256;
      $("licence").textContent = "Licence: " + (m.licence ? m.licence.text : "not declared");
      const tokens = $("max-tokens");
      tokens.max = String(state.context - 1);
      if (tokens.value && Number(tokens.value) >= state.context) tokens.value = "";
    };
    select.onchange = pick;
    pick();
  } catch (err) {
    showError(err);
  }
}

// ---- conversations ---------------------------------------------------------------------------

async function loadConversations() {
  let list = state.local;
  if (state.multiUser) {
    try {
      list = (await api("GET", "/v1/conversations")).data;
    } catch (err) {
      return showError(err);
    }
  }
  const ul = $("conversation-list");
  ul.replaceChildren(...list.map((c) => {
    const li = document.createElement("li");
    li.className = "item";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    open.setAttribute("aria-current", String(state.conversation !== null && state.conversation.id === c.id));
    open.onclick = () => openConversation(c.id);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "danger";
    remove.textContent = "Delete";
    remove.setAttribute("aria-label", "Delete conversation " + c.title);
    remove.onclick = () => deleteConversation(c.id);
    li.append(open, remove);
    return li;
  }));
}

function newConversation() {
  state.conversation = null;
  $("conversation-title").textContent = "New conversation";
  $("messages").replaceChildren();
  $("rag").checked = state.ragOn;
  loadConversations();
}

async function openConversation(id) {
  clearError();
  try {
    const c = state.multiUser ? await api("GET", "/v1/conversations/" + id)
      : state.local.find((x) => x.id === id);
    state.conversation = c;
    $("conversation-title").textContent = c.title;
    $("rag").checked = c.rag;
    $("messages").replaceChildren();
    for (const m of c.messages) {
      const view = addMessage(m.role);
      view.show(m.content, m.sources || [], m.stopped);
    }
    loadConversations();
  } catch (err) {
    showError(err);
  }
}

async function deleteConversation(id) {
  clearError();
  try {
    if (state.multiUser) await api("DELETE", "/v1/conversations/" + id);
    else state.local = state.local.filter((x) => x.id !== id);
    if (state.conversation && state.conversation.id === id) newConversation();
    else loadConversations();
  } catch (err) {
    showError(err);
  }
}

async function ensureConversation(question) {
  if (state.conversation) return state.conversation;
  const fields = { title: question.slice(0, 80), rag: $("rag").checked, collection: state.collection };
  if (state.multiUser) {
    state.conversation = await api("POST", "/v1/conversations", fields);
  } else {
    state.conversation = Object.assign({ id: "local-" + Date.now(), messages: [] }, fields);
    state.local.unshift(state.conversation);
  }
  $("conversation-title").textContent = state.conversation.title;
  loadConversations();
  return state.conversation;
}

async function saveMessage(message) {
  state.conversation.messages.push(message);
  if (!state.multiUser) return;
  await api("POST", "/v1/conversations/" + state.conversation.id + "/messages", message);
}

async function setRag() {
  const c = state.conversation;
  if (!c) return;
  c.rag = $("rag").checked;
  if (!state.multiUser) return;
  try {
    await api("PATCH", "/v1/conversations/" + c.id, { rag: c.rag });
  } catch (err) {
    showError(err);
  }
}

// ---- messages and sources ----------------------------------------------------------------------

function baseName(path) {
  return String(path || "").split(/[\\/]/).pop();
}

function where(source) {
  const parts = ["file " + baseName(source.source)];
  if (source.page) parts.push("page " + source.page);
  if (source.section) parts.push("section " + source.section);
  return parts.join(", ");
}

function openSource(source) {
  $("source-title").textContent = "[" + source.number + "] " + baseName(source.source);
  $("source-where").textContent = where(source);
  $("source-text").textContent = source.text;
  const dialog = $("source-dialog");
  dialog.returnTo = document.activeElement;
  dialog.showModal();
  $("source-close").focus();
}

function citeButton(source) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "cite";
  b.textContent = "[" + source.number + "]";
  b.setAttribute("aria-label", "Source " + source.number + ": " + where(source));
  b.onclick = () => openSource(source);
  return b;
}

// A message in the list; `show` draws its text with each [n] as a button opening source n.
function addMessage(role) {
  const li = document.createElement("li");
  li.className = "message " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Answer";
  const body = document.createElement("div");
  body.className = "body";
  li.append(label, body);
  $("messages").append(li);
  const show = (text, sources, stopped) => {
    const numbered = new Map(sources.map((s) => [String(s.number), s]));
    const nodes = [];
    const cite = /\[(\d+)\]/g;
    let last = 0;
    let m;
    while ((m = cite.exec(text)) !== null) {
      nodes.push(document.createTextNode(text.slice(last, m.index)));
      const s = numbered.get(m[1]);
      nodes.push(s ? citeButton(s) : document.createTextNode(m[0]));
      last = cite.lastIndex;
    }
    nodes.push(document.createTextNode(text.slice(last)));
    body.replaceChildren(...nodes);
    if (stopped) {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = "Stopped";
      body.append(note);
    }
    if (sources.length) {
      const list = document.createElement("ol");
      list.className = "sources";
      list.setAttribute("aria-label", "Sources");
      for (const s of sources) {
        const item = document.createElement("li");
        const b = citeButton(s);
        item.append(b, document.createTextNode(" " + where(s)));
        list.append(item);
      }
      body.append(list);
    }
    li.scrollIntoView({ block: "end" });
  };
  return { li, show };
}

// ---- asking ------------------------------------------------------------------------------------

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("messages").setAttribute("aria-busy", String(on));
}

async function ask(event) {
  event.preventDefault();
  if (state.controller) return;
  clearError();
  const question = $("question").value.trim();
  if (!question) return;
  // Left blank, the length is the server's default, fitted to the model's context and the
  // prompt (up to the context for chat, as OpenAI's; up to 128 for answers from documents).
  const typed = $("max-tokens").value.trim();
  const maxTokens = typed ? Math.max(1, Math.min(Number(typed), state.context - 1)) : null;
  let conversation;
  try {
    conversation = await ensureConversation(question);
    await saveMessage({ role: "user", content: question });
  } catch (err) {
    return showError(err);
  }
  $("question").value = "";
  addMessage("user").show(question, [], false);
  const answer = addMessage("assistant");
  answer.li.setAttribute("data-streaming", "true");
  let text = "";
  let sources = [];
  let stopped = false;
  let failed = false;
  state.controller = new AbortController();
  busy(true);
  try {
    let path;
    let body;
    if ($("rag").checked) {
      path = "/v1/rag/query";
      body = { query: question, stream: true };
      if (state.collection) body.collection = state.collection;
    } else {
      path = "/v1/chat/completions";
      const history = conversation.messages.filter((m) => m.content).slice(-8)
        .map((m) => ({ role: m.role, content: m.content }));
      body = { model: state.model, messages: history, stream: true };
    }
    if (maxTokens !== null) body.max_tokens = maxTokens;
    const r = await fetch(path, {
      method: "POST", headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!r.ok) throw await errorOf(r);
    for await (const data of events(r)) {
      if (data.error) throw new HttpError(500, data.error.message);
      if (data.sources) sources = data.sources;
      if (typeof data.delta === "string") text += data.delta;
      if (data.choices && data.choices.length && data.choices[0].delta) text += data.choices[0].delta.content || "";
      answer.show(text, sources, false);
    }
  } catch (err) {
    if (err.name === "AbortError") stopped = true;
    else { failed = true; showError(err); }
  } finally {
    state.controller = null;
    busy(false);
    answer.li.setAttribute("data-streaming", "false");
    answer.li.setAttribute("data-stopped", String(stopped));
  }
  answer.show(text, sources, stopped);
  if (failed && !text) return;
  try {
    await saveMessage({ role: "assistant", content: text, sources, stopped });
  } catch (err) {
    showError(err);
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ---- documents ---------------------------------------------------------------------------------

async function loadDocuments() {
  let list;
  try {
    list = (await api("GET", "/v1/rag/documents")).data;
  } catch (err) {
    if (err instanceof HttpError && err.status === 404) { // no --rag-store, or no collection
      state.ragOn = false;
      $("rag").checked = false;
      $("upload-status").textContent = err.message;
      $("upload-form").hidden = true;
      return;
    }
    return showError(err);
  }
  state.ragOn = true;
  $("upload-form").hidden = false;
  const ul = $("document-list");
  ul.replaceChildren(...list.map((d) => {
    const li = document.createElement("li");
    li.className = "item";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = baseName(d.source) + " (" + d.chunks + " passages)";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "danger";
    remove.textContent = "Delete";
    remove.setAttribute("aria-label", "Delete document " + baseName(d.source));
    remove.onclick = () => deleteDocument(d);
    li.append(name, remove);
    return li;
  }));
}

async function deleteDocument(doc) {
  clearError();
  try {
    await api("DELETE", "/v1/rag/documents/" + encodeURIComponent(doc.id));
    $("upload-status").textContent = "Deleted " + baseName(doc.source) + ".";
  } catch (err) {
    showError(err);
  }
  loadDocuments();
}

// One file up, with its progress; the answer comes once the server has ingested it.
function uploadOne(file) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const progress = $("upload-progress");
    const status = $("upload-status");
    xhr.open("POST", "/v1/rag/documents");
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) progress.value = Math.round((100 * e.loaded) / e.total);
    };
    xhr.upload.onload = () => { progress.value = 100; status.textContent = "Ingesting " + file.name + "..."; };
    xhr.onload = () => {
      if (xhr.status === 200) resolve(JSON.parse(xhr.responseText));
      else reject(errorFrom(xhr.status, xhr.responseText, xhr.getResponseHeader("Retry-After")));
    };
    xhr.onerror = () => reject(new Error("the upload of " + file.name + " failed (network)"));
    const form = new FormData();
    form.append("file", file, file.name);
    progress.value = 0;
    progress.hidden = false;
    status.textContent = "Uploading " + file.name + "...";
    xhr.send(form);
  });
}

async function upload(event) {
  event.preventDefault();
  clearError();
  const files = Array.from($("upload").files);
  if (!files.length) return;
  $("upload-button").disabled = true;
  const done = [];
  for (const file of files) {
    try {
      const report = await uploadOne(file);
      const what = report.added.length ? "added" : report.updated.length ? "updated" : "unchanged";
      done.push(file.name + ": " + what + " (" + report.chunks_written + " passages written)");
    } catch (err) {
      showError(err);
      done.push(file.name + ": not added");
    }
  }
  $("upload-progress").hidden = true;
  $("upload-status").textContent = done.join("; ");
  $("upload").value = "";
  $("upload-button").disabled = false;
  loadDocuments();
}

// ---- wiring ------------------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", (e) => signIn(e).catch(showError));
  $("signout").addEventListener("click", signOut);
  $("ask").addEventListener("submit", ask);
  $("stop").addEventListener("click", stop);
  $("new-conversation").addEventListener("click", newConversation);
  $("rag").addEventListener("change", setRag);
  $("upload-form").addEventListener("submit", upload);
  $("collection").addEventListener("change", (e) => { state.collection = e.target.value; loadDocuments(); });
  $("source-close").addEventListener("click", () => $("source-dialog").close());
  $("source-dialog").addEventListener("close", () => {
    const back = $("source-dialog").returnTo;
    if (back && back.focus) back.focus();
  });
  $("question").addEventListener("keydown", (e) => { // Enter sends, Shift+Enter is a new line
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
  });
}

document.addEventListener("DOMContentLoaded", () => { boot().catch(showError); });
