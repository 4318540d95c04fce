"use strict";
// The chat page of `lfm2vl serve` (docs/serving.md): a client of this server's OpenAI-compatible
// POST /v1/chat/completions, like any other. The server keeps no conversation, so every request
// carries the whole history, images included (its image and prefix caches make the repeat cheap).
// Plain DOM code, no framework and no build step; text is only ever set with textContent.

const KEY_STORAGE = "lfm2vl.apiKey"; // sessionStorage: gone when the tab closes, never sent elsewhere
// Request fields the controls edit; each control's id is its field's name.
const IMAGE_FIELDS = ["max_image_tokens", "do_image_splitting", "max_tiles", "use_thumbnail"];
const SAMPLING_FIELDS = ["temperature", "min_p", "repetition_penalty", "max_tokens"];
const PRESET_FIELDS = ["temperature", "min_p", "repetition_penalty"]; // what a preset sets

const $ = (id) => document.getElementById(id);
const state = {
  config: null, // GET /ui/config: the checkpoint's defaults and the server's limits
  turns: [], // {images: [{name, url}], text, answer, status: "streaming" | "done" | "stopped" | "failed"}
  pending: [], // images attached to the next message
  controller: null, // the AbortController of the request in flight (one at a time)
};

// -- settings ---------------------------------------------------------------------------------------
function readControl(id, fallback) {
  const el = $(id);
  if (el.type === "checkbox") return el.checked;
  return el.value === "" ? fallback : Number(el.value); // an emptied field means "the default"
}

function writeControls(values) {
  for (const [id, value] of Object.entries(values)) {
    const el = $(id);
    if (!el) continue;
    if (el.type === "checkbox") el.checked = value;
    else el.value = String(value);
  }
}

function resetControls() {
  writeControls(state.config.image);
  writeControls(state.config.sampling.default);
  syncPreset();
}

// The preset menu names the preset the three sampling fields match, else "custom".
function syncPreset() {
  const { sampling } = state.config;
  const matches = (name) => PRESET_FIELDS.every((f) => readControl(f, sampling.default[f]) === sampling[name][f]);
  $("preset").value = matches("default") ? "default" : matches("recommended") ? "recommended" : "custom";
}

// Only the fields that differ from the checkpoint's defaults are sent: the server applies the defaults
// itself (and, with max_tokens unset, fits the answer into what the context leaves).
function requestOptions() {
  const { image, sampling } = state.config;
  const out = {};
  for (const f of IMAGE_FIELDS) {
    const v = readControl(f, image[f]);
    if (v !== image[f]) out[f] = v;
  }
  // A maximum under the checkpoint's minimum lowers the minimum too (the server refuses min > max).
  if (out.max_image_tokens !== undefined && out.max_image_tokens < image.min_image_tokens) {
    out.min_image_tokens = out.max_image_tokens;
  }
  if (out.max_tiles !== undefined && out.max_tiles < image.min_tiles) out.min_tiles = out.max_tiles;
  for (const f of SAMPLING_FIELDS) {
    const v = readControl(f, sampling.default[f]);
    if (v !== sampling.default[f]) out[f] = v;
  }
  return out;
}

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// -- the conversation as OpenAI messages ------------------------------------------------------------
function userMessage(turn) {
  if (!turn.images.length) return { role: "user", content: turn.text };
  const parts = turn.images.map((im) => ({ type: "image_url", image_url: { url: im.url } }));
  if (turn.text) parts.push({ type: "text", text: turn.text });
  return { role: "user", content: parts };
}

// A failed turn stays on screen but is not context: the model never answered it. A stopped answer
// is kept as far as it got, as the user saw it.
function history() {
  const messages = [];
  for (const t of state.turns) {
    if (t.status === "done" || (t.status === "stopped" && t.answer)) {
      messages.push(userMessage(t), { role: "assistant", content: t.answer });
    }
  }
  return messages;
}

// -- talking to the server --------------------------------------------------------------------------
// Server-Sent Events from a fetch body: yields each `data:` JSON object; returns at [DONE].
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the connection closed before the answer was complete");
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// An error response -> {status, code, message}, the message being the server's own (OpenAI's shape).
async function httpError(response) {
  const err = { status: response.status, code: null, message: response.statusText || "request failed" };
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) Object.assign(err, { message: body.error.message, code: body.error.code });
  } catch (_) { /* not JSON: keep the status text */ }
  err.retryAfter = response.headers.get("Retry-After");
  return err;
}

function describeError(e) {
  if (e instanceof TypeError) return `Could not reach the server (${e.message}).`;
  const where = [e.status, e.code].filter(Boolean).join(" ");
  let text = `Error${where ? ` (${where})` : ""}: ${e.message}`;
  if (e.status === 401) text += "\nEnter the server's API key under Settings, then send again.";
  if (e.status === 503 && e.retryAfter) text += `\nThe server is busy: try again in ${e.retryAfter} s.`;
  return text;
}

async function send() {
  if (state.controller || !state.config) return;
  const text = $("prompt").value.trim();
  if (!text && !state.pending.length) return;
  const turn = { images: state.pending, text, answer: "", status: "streaming" };
  const body = {
    model: state.config.model, messages: [...history(), userMessage(turn)], stream: true,
    stream_options: { include_usage: true }, ...requestOptions(),
  };
  state.pending = [];
  renderAttachments();
  $("prompt").value = "";
  state.turns.push(turn);
  const view = renderTurn(turn);

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  // Timing as this page sees it: sent -> first token (TTFT), first -> last token (tokens/s).
  const timing = { sent: performance.now(), first: null, last: null };
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw await httpError(response);
    for await (const event of sseEvents(response.body)) {
      if (event.error) throw { code: event.error.code, message: event.error.message };
      if (event.usage) usage = event.usage;
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        timing.last = performance.now();
        if (timing.first === null) timing.first = timing.last;
        turn.answer += delta.content;
        view.text.textContent = turn.answer;
        scrollToEnd();
      }
    }
    turn.status = "done";
  } catch (e) {
    // Stop (or New chat) aborts the fetch; the server sees the connection close and cancels the request.
    if (e && e.name === "AbortError") turn.status = "stopped";
    else Object.assign(turn, { status: "failed", error: describeError(e) });
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
    }
  }
  finishTurn(view, turn, usage, timing);
}

// -- rendering --------------------------------------------------------------------------------------
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function thumbnail(image, onRemove) {
  const li = el("li");
  const img = el("img");
  img.src = image.url;
  img.alt = image.name;
  img.title = image.name;
  img.addEventListener("error", () => img.classList.add("broken"), { once: true }); // not decodable: the alt text shows
  li.append(img);
  if (onRemove) {
    const remove = el("button", "remove", "\u00d7");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove ${image.name}`);
    remove.addEventListener("click", onRemove);
    li.append(remove);
  }
  return li;
}

function renderTurn(turn) {
  const user = el("li", "msg user");
  user.setAttribute("aria-label", "You");
  if (turn.images.length) {
    const thumbs = el("ul", "thumbs");
    thumbs.setAttribute("aria-label", "Attached images");
    for (const image of turn.images) thumbs.append(thumbnail(image));
    user.append(thumbs);
  }
  if (turn.text) user.append(el("p", "text", turn.text));
  const assistant = el("li", "msg assistant streaming");
  assistant.setAttribute("aria-label", "Model");
  assistant.setAttribute("aria-busy", "true");
  const text = el("p", "text");
  assistant.append(text);
  $("log").append(user, assistant);
  $("empty").hidden = true;
  scrollToEnd();
  return { user, assistant, text };
}

function usageLine(usage, timing) {
  const n = usage.completion_tokens;
  const parts = [`prompt ${usage.prompt_tokens} tokens (image tokens included)`, `completion ${n}`];
  if (timing.first !== null) parts.push(`first token ${((timing.first - timing.sent) / 1000).toFixed(2)} s`);
  // Decode speed needs two tokens to measure; a one-token answer has none to show.
  const span = (timing.last - timing.first) / 1000;
  parts.push(n >= 2 && span > 0 ? `${((n - 1) / span).toFixed(1)} tokens/s` : "\u2013 tokens/s (one token)");
  return parts.join(" \u00b7 ");
}

function finishTurn(view, turn, usage, timing) {
  view.assistant.classList.remove("streaming");
  view.assistant.removeAttribute("aria-busy");
  view.assistant.dataset.status = turn.status;
  if (turn.status === "failed") {
    view.user.classList.add("failed");
    view.assistant.classList.add("failed");
    view.assistant.append(el("p", "error", turn.error));
    view.assistant.append(el("p", "note", "This turn is not sent as context with later messages."));
  } else if (turn.status === "stopped") {
    view.assistant.append(el("p", "note", "Stopped."));
  } else if (usage) {
    const line = el("p", "usage", usageLine(usage, timing));
    line.dataset.promptTokens = usage.prompt_tokens;
    line.dataset.completionTokens = usage.completion_tokens;
    view.assistant.append(line);
  }
  scrollToEnd();
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren(...state.pending.map((image, i) => thumbnail(image, () => {
    state.pending.splice(i, 1);
    renderAttachments();
    $("prompt").focus();
  })));
}

function scrollToEnd() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.turns = [];
  $("log").replaceChildren();
  $("empty").hidden = false;
  showBanner("");
  $("prompt").focus();
}

// -- attaching images -------------------------------------------------------------------------------
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// Files are sent as data: URLs, the one image source a server accepts by default. Whether the bytes
// decode is for the server to say (its message then shows in the conversation).
async function addFiles(files) {
  const skipped = [];
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      skipped.push(file.name || "(pasted item)");
      continue;
    }
    state.pending.push({ name: file.name || "pasted image", url: await readAsDataURL(file) });
  }
  renderAttachments();
  showBanner(skipped.length ? `Not an image, not attached: ${skipped.join(", ")}` : "");
}

// -- start ------------------------------------------------------------------------------------------
async function loadConfig() {
  try {
    const response = await fetch("/ui/config");
    if (!response.ok) throw await httpError(response);
    state.config = await response.json();
  } catch (e) {
    showBanner(`Could not load the server's settings. ${describeError(e)}`);
    return;
  }
  const c = state.config;
  $("model-name").textContent = `${c.model} \u00b7 context ${c.max_model_len} tokens`;
  resetControls();
  if (c.api_key_required) {
    $("api-key").placeholder = "required by this server";
    if (!$("api-key").value) $("settings").open = true;
  }
}

function wire() {
  const form = $("composer");
  const prompt = $("prompt");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { // Shift+Enter: a new line
      e.preventDefault();
      form.requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", async (e) => {
    await addFiles([...e.target.files]);
    e.target.value = ""; // the same file can be attached again
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  const zone = $("drop-zone");
  const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
  // A file dropped anywhere on the page is attached rather than opened in place of the page.
  window.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    zone.classList.add("dragging");
  });
  window.addEventListener("dragleave", (e) => {
    if (e.relatedTarget === null) zone.classList.remove("dragging");
  });
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    zone.classList.remove("dragging");
    addFiles([...e.dataTransfer.files]);
  });
  for (const f of PRESET_FIELDS) $(f).addEventListener("input", () => state.config && syncPreset());
  $("preset").addEventListener("change", (e) => {
    if (state.config && e.target.value in state.config.sampling) {
      const preset = state.config.sampling[e.target.value];
      writeControls(Object.fromEntries(PRESET_FIELDS.map((f) => [f, preset[f]])));
    }
  });
  $("reset").addEventListener("click", () => state.config && resetControls());
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => {
    if (key.value) sessionStorage.setItem(KEY_STORAGE, key.value);
    else sessionStorage.removeItem(KEY_STORAGE);
  });
  if (window.matchMedia("(max-width: 48rem)").matches) $("settings").open = false; // a narrow window: folded
}

wire();
loadConfig();
