// The LocalMoE playground. Completion mode: submit a job, stream its tokens over the websocket,
// cancel it, list recent jobs. Chat mode: a conversation with the model through the OpenAI chat
// endpoint, each of its turns streamed (server-sent events read from fetch). Every call carries the
// API key. Job and model text reaches the page only through textContent / text nodes, never as HTML.
"use strict";

const KEY_STORAGE = "localmoe.playground.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 500;
// Our own words: statusText varies by server version and is empty over HTTP/2.
const REASONS = {
  400: "Bad Request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not Found",
  409: "Conflict",
  413: "Content Too Large",
  422: "Invalid Request",
  429: "Too Many Requests",
  500: "Internal Server Error",
  503: "Service Unavailable",
};
const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The job on screen: {id, ws, finished, sawToken}. A stale job's late events are ignored.
let current = null;

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// --- the API ------------------------------------------------------------------------------

function apiKey() {
  return $("api-key").value.trim();
}

function refusal(status, data) {
  let message = `${status} ${REASONS[status] ?? ""}`.trim();
  // FastAPI's `detail` (the job API) or OpenAI's `error.message` (the chat endpoint)
  const detail = data ? (data.error && data.error.message) || detailText(data.detail) : "";
  if (detail) message += `: ${detail}`; // a 429's detail already says when to come back
  return new ApiError(status, message);
}

// FastAPI's `detail`: a string, or a list of {loc, msg, type} for a 422.
function detailText(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((e) => (e && typeof e.msg === "string" ? `${(e.loc || []).join(".")}: ${e.msg}` : JSON.stringify(e)))
      .join("; ");
  }
  return detail === undefined || detail === null ? "" : JSON.stringify(detail);
}

async function api(method, path, body) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, `the API did not answer (${e.message})`);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw refusal(response.status, data);
  return data;
}

// --- what the page shows ------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

function setStatus(status) {
  $("status").textContent = status;
  $("status").dataset.state = status;
}

function resetJobView() {
  $("job-id").textContent = "—";
  $("finish-reason").textContent = "—";
  $("usage").textContent = "—";
  $("output").replaceChildren();
}

function numberOrNull(text) {
  return text.trim() === "" ? null : Number(text); // NaN and null both reach the API as null: a 422
}

// --- one job's life -----------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  if (current && !current.finished) return;
  clearError();
  resetJobView();
  const spec = {
    prompt: $("prompt").value,
    modality: $("modality").value,
    max_tokens: numberOrNull($("max-tokens").value),
    temperature: numberOrNull($("temperature").value),
  };
  if ($("ignore-eos").checked) spec.ignore_eos = true;
  $("submit").disabled = true;
  setStatus("submitting");
  let job;
  try {
    job = await api("POST", "/v1/jobs", spec);
  } catch (e) {
    setStatus("idle");
    $("submit").disabled = false;
    showError(e.message);
    return;
  }
  current = { id: job.id, ws: null, finished: false, sawToken: false };
  $("job-id").textContent = job.id;
  setStatus(job.status);
  $("cancel").disabled = false;
  openStream(current);
  watchUntilRunning(current);
}

function openStream(job) {
  const url = new URL(`/v1/jobs/${encodeURIComponent(job.id)}/stream`, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  try {
    // Browsers cannot set headers on a websocket: the key travels as a subprotocol.
    job.ws = new WebSocket(url, ["localmoe", `bearer.${apiKey()}`]);
  } catch (e) {
    showError(`cannot open the token stream (${e.message}); polling the job instead`);
    pollUntilDone(job);
    return;
  }
  job.ws.onmessage = (event) => {
    if (job !== current || job.finished) return;
    const message = JSON.parse(event.data);
    if (message.type === "token") {
      if (!job.sawToken) {
        job.sawToken = true;
        if ($("status").dataset.state === "queued") setStatus("running");
      }
      $("output").append(message.text); // a text node: never parsed as HTML
    } else if (message.type === "done") {
      finish(job, message);
    }
  };
  job.ws.onclose = (event) => {
    if (job !== current || job.finished) return;
    const why = event.reason ? `${event.code}: ${event.reason}` : `${event.code}`;
    showError(`the token stream closed before the job ended (${why}); polling the job instead`);
    pollUntilDone(job);
  };
}

// queued → running can come before the first token (a long prompt's prefill): poll until it shows.
async function watchUntilRunning(job) {
  while (job === current && !job.finished && !job.sawToken) {
    await sleep(POLL_MS);
    if (job !== current || job.finished || job.sawToken) return;
    let polled;
    try {
      polled = await api("GET", `/v1/jobs/${job.id}`);
    } catch {
      return; // the stream reports the end; this is only a nicety
    }
    if (polled.status !== "queued") {
      if (polled.status === "running" && !job.finished && $("status").dataset.state === "queued") {
        setStatus("running");
      }
      return;
    }
  }
}

// The fallback when the stream fails: the job record has the whole output once it ends.
async function pollUntilDone(job) {
  while (job === current && !job.finished) {
    let polled;
    try {
      polled = await api("GET", `/v1/jobs/${job.id}`);
    } catch (e) {
      showError(e.message);
      job.finished = true;
      $("cancel").disabled = true;
      $("submit").disabled = false;
      return;
    }
    if (TERMINAL.has(polled.status)) {
      $("output").textContent = polled.output ?? "";
      finish(job, polled);
      return;
    }
    setStatus(polled.status);
    await sleep(POLL_MS);
  }
}

// `done`: a stream's done message or a job record; both have status, finish_reason, usage, error.
function finish(job, done) {
  job.finished = true;
  if (job.ws && job.ws.readyState === WebSocket.OPEN) job.ws.close();
  setStatus(done.status);
  $("finish-reason").textContent = done.finish_reason ?? "—";
  const usage = done.usage || {};
  $("usage").textContent =
    `${usage.prompt_tokens ?? 0} prompt + ${usage.completion_tokens ?? 0} completion tokens`;
  if (done.error) showError(`the job failed: ${done.error}`);
  $("cancel").disabled = true;
  $("submit").disabled = false;
  refreshJobs();
}

async function cancel() {
  const job = current;
  if (!job || job.finished) return;
  $("cancel").disabled = true;
  try {
    const polled = await api("DELETE", `/v1/jobs/${job.id}`);
    if (!job.finished && !TERMINAL.has(polled.status)) setStatus("cancelling");
  } catch (e) {
    showError(e.message);
    if (!job.finished) $("cancel").disabled = false;
  }
}

// --- recent jobs --------------------------------------------------------------------------

function formatTime(seconds) {
  return typeof seconds === "number" ? new Date(seconds * 1000).toLocaleString() : "";
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.testid = "job-row";
  row.dataset.jobId = job.id;
  const cells = {
    id: job.id.slice(0, 8),
    status: job.status,
    modality: job.modality,
    created: formatTime(job.timings && job.timings.queued_at),
    output: (job.output ?? "").slice(0, 60),
  };
  for (const [column, text] of Object.entries(cells)) {
    const cell = document.createElement("td");
    cell.dataset.col = column;
    cell.textContent = text;
    row.append(cell);
  }
  row.firstChild.title = job.id;
  return row;
}

async function refreshJobs() {
  let page;
  try {
    page = await api("GET", "/v1/jobs?limit=10");
  } catch (e) {
    showError(`recent jobs: ${e.message}`);
    return;
  }
  $("jobs-body").replaceChildren(...page.jobs.map(jobRow));
}

// --- chat ---------------------------------------------------------------------------------

// The conversation so far ({role, content} as the chat endpoint takes them); `controller` aborts
// the turn being streamed (closing the stream cancels its job on the server).
const chat = { messages: [], controller: null, model: null };

function setMode() {
  const mode = $("mode").value;
  $("completion").hidden = mode !== "completion";
  $("chat").hidden = mode !== "chat";
  clearError();
}

function addTurn(role, text) {
  const item = document.createElement("li");
  item.dataset.role = role;
  item.dataset.testid = "turn";
  const who = document.createElement("strong");
  who.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.dataset.testid = "turn-content";
  content.textContent = text;
  item.append(who, content);
  $("conversation").append(item);
  return content;
}

async function servedModel() {
  if (!chat.model) chat.model = (await api("GET", "/v1/models")).data[0].id;
  return chat.model;
}

// The events of an OpenAI chat stream, read as they arrive: each `data:` line's JSON, until [DONE].
async function* chatEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function chatBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("new-chat").disabled = busy;
}

async function send(event) {
  event.preventDefault();
  if (chat.controller) return;
  const text = $("message").value;
  if (!text.trim()) return;
  clearError();
  chatBusy(true);
  let model;
  try {
    model = await servedModel();
  } catch (e) {
    showError(e.message);
    chatBusy(false);
    return;
  }
  const user = addTurn("user", text).parentElement;
  const reply = addTurn("assistant", "");
  $("message").value = "";
  $("chat-finish").textContent = "…";
  chat.messages.push({ role: "user", content: text });
  chat.controller = new AbortController();
  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  const body = {
    model,
    messages: chat.messages,
    stream: true,
    max_tokens: numberOrNull($("chat-max-tokens").value),
    temperature: numberOrNull($("chat-temperature").value),
  };
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(body), signal: chat.controller.signal,
    });
    if (!response.ok) throw refusal(response.status, await response.json().catch(() => null));
    for await (const chunk of chatEvents(response)) {
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) reply.append(choice.delta.content); // a text node
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      // refused or failed: the turn is taken back, the message returned to the box
      chat.messages.pop();
      user.remove();
      reply.parentElement.remove();
      $("message").value = text;
      showError(e instanceof ApiError ? e.message : `the chat stream failed (${e.message})`);
      finish = null;
    }
  }
  if (finish !== null) chat.messages.push({ role: "assistant", content: reply.textContent });
  $("chat-finish").textContent = finish ?? "—";
  chat.controller = null;
  chatBusy(false);
}

function stopChat() {
  if (chat.controller) chat.controller.abort();
}

function newChat() {
  if (chat.controller) return;
  chat.messages = [];
  $("conversation").replaceChildren();
  $("chat-finish").textContent = "—";
  clearError();
}

// --- start --------------------------------------------------------------------------------

function rememberKey() {
  try {
    if (apiKey()) window.localStorage.setItem(KEY_STORAGE, apiKey());
    else window.localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled: the key lives as long as the page
  }
}

function start() {
  try {
    $("api-key").value = window.localStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    // storage disabled
  }
  $("api-key").addEventListener("input", rememberKey);
  $("job-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("refresh-jobs").addEventListener("click", refreshJobs);
  $("mode").addEventListener("change", setMode);
  $("chat-form").addEventListener("submit", send);
  $("stop").addEventListener("click", stopChat);
  $("new-chat").addEventListener("click", newChat);
  setMode();
  if (apiKey()) refreshJobs();
}

start();
