/**
 * page.js — the page at `/`: chat, bulk and status, built on sluice.js.
 *
 * Text from the gateway only ever goes into `textContent`, never into HTML.
 * The API key lives in sessionStorage (this tab, until it closes) and in the
 * client's memory; it goes out in the socket's `auth` frame and the status
 * request's `Authorization` header.
 */

import { SluiceClient } from "./sluice.js";

const KEY_STORAGE = "sluice.key";
const STATUS_EVERY_MS = 2000;

const $ = (id) => document.getElementById(id);
const fmtMs = (ms) => (ms === null || ms === undefined ? "–" : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(ms < 10 ? 1 : 0)} ms`);
const fmtS = (s) => (s >= 60 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.ceil(s)} s`);

let client = null;
let key = null;

// -- rendering: at most once per frame per view ---------------------------------
const dirty = new Set();
let frameRequested = false;
function schedule(render) {
  dirty.add(render);
  if (frameRequested) return;
  frameRequested = true;
  requestAnimationFrame(() => {
    frameRequested = false;
    const renders = [...dirty];
    dirty.clear();
    for (const r of renders) r();
  });
}

// -- notices ----------------------------------------------------------------------
let noticeTimer = null;
function notice(text, { kind = "info", action = null, forMs = 0 } = {}) {
  clearTimeout(noticeTimer);
  const box = $("notice");
  box.hidden = !text;
  box.dataset.kind = kind;
  $("notice-text").textContent = text;
  const button = $("notice-action");
  button.hidden = !action;
  if (action) {
    button.textContent = action.label;
    button.onclick = action.run;
  }
  if (forMs) noticeTimer = setTimeout(() => notice(""), forMs);
}

function explain(error) {
  switch (error.code) {
    case "rate_limited":
      return error.retryAfter !== null
        ? `Rate limited — this key may send again in ${fmtS(error.retryAfter)}. (${error.message})`
        : `Rate limited. (${error.message})`;
    case "concurrency_limit": {
      const limit = error.limits?.limit_concurrent_jobs;
      return `Too many answers running at once for this key${limit ? ` (its limit is ${limit})` : ""}: wait for one to finish.`;
    }
    case "unauthorized":
      return "The gateway refused the API key.";
    case "cancelled":
      return "Cancelled.";
    case "too_large":
    case "model_not_allowed":
    case "unknown_model":
      return error.message;
    default:
      return `${error.code}: ${error.message}`;
  }
}

// -- one answer on screen, bound to a job ------------------------------------------------
class AnswerView {
  constructor(element, onGrow = null) {
    this.el = element;
    this.onGrow = onGrow;
    this.textEl = element.querySelector(".answer-text");
    this.metaEl = element.querySelector(".meta");
    this.cancelButton = element.querySelector(".cancel");
    this.retryButton = element.querySelector(".retry");
    this.cancelButton.addEventListener("click", () => this.job?.cancel());
    this.render = () => this.draw();
    this.ticker = null;
  }

  bind(job) {
    this.job = job;
    job.on("update", () => schedule(this.render));
    if (this.onGrow) job.on("token", this.onGrow);
    job.on("queued", () => (this.el.dataset.jobId = job.id));
    // The end is drawn at once: it is what people (and tests) wait for.
    job.on("done", () => this.draw());
    job.on("error", () => this.draw());
    this.draw();
  }

  draw() {
    const job = this.job;
    const m = job.metrics;
    this.el.dataset.state = job.status;
    this.el.dataset.tokens = String(job.tokenFrames);
    if (this.textEl.textContent !== job.text) this.textEl.textContent = job.text;
    this.cancelButton.hidden = job.ended;
    if (this.retryButton) this.retryButton.hidden = !job.ended || job.status === "done";
    const parts = [];
    if (job.status === "sending") parts.push(client?.state === "open" ? "sending…" : "waiting for the connection…");
    if (job.status === "queued" && job.held) {
      parts.push(`held: ${job.held.position ? `${job.held.position} ahead` : "starts next"}`
        + (job.held.etaS !== null ? `, in about ${fmtS(job.held.etaS)}` : ""));
    } else if (job.status === "queued") {
      parts.push(`queued${job.queued?.position ? ` (${job.queued.position} ahead)` : ""}`);
    }
    if (job.status === "waiting") {
      const at = job.waiting.retryAt;
      parts.push(at ? `${explain(job.error)} Retrying in ${fmtS(Math.max(0, (at - Date.now()) / 1000))}.`
        : `${explain(job.error)} It goes out as soon as one does.`);
    }
    if (m.ttftMs !== null) parts.push(`TTFT ${fmtMs(m.ttftMs)}`);
    if (m.tpotMs !== null) parts.push(`TPOT ${fmtMs(m.tpotMs)}`);
    if (m.tokens) parts.push(`${m.tokens} tokens`);
    if (job.status === "done") {
      const s = job.final.metrics ?? {};
      parts.push(job.final.finish_reason ?? "done");
      if (s.provider_ttft_ms !== undefined) {
        parts.push(`server: queue ${fmtMs(s.queue_wait_ms)}, model TTFT ${fmtMs(s.provider_ttft_ms)}, TPOT ${fmtMs(s.tpot_ms)}`);
      }
    }
    if (job.status === "error" || job.status === "cancelled") parts.push(explain(job.error));
    this.metaEl.textContent = parts.join(" · ");
    this.el.classList.toggle("failed", job.status === "error");
    // A waiting answer counts down.
    if (job.status === "waiting" && job.waiting.retryAt && !this.ticker) {
      this.ticker = setInterval(() => schedule(this.render), 500);
    } else if (job.status !== "waiting" && this.ticker) {
      clearInterval(this.ticker);
      this.ticker = null;
    }
  }
}

// -- chat --------------------------------------------------------------------------
function chatRequest() {
  const request = {};
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(maxTokens)) request.max_tokens = maxTokens;
  const temperature = parseFloat($("temperature").value);
  if (Number.isFinite(temperature)) request.temperature = temperature;
  const model = $("model").value.trim();
  if (model) request.model = model;
  return request;
}

function sendChat(prompt) {
  if (!client || client.state === "unauthorized") {
    notice(client ? "The gateway refused this API key: paste a valid one first." : "Paste an API key first.",
      { kind: "error" });
    $("key").focus();
    return false;
  }
  const turn = $("turn-template").content.firstElementChild.cloneNode(true);
  turn.querySelector(".user").textContent = prompt;
  const transcript = $("transcript");
  const stick = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 40;
  transcript.append(turn);
  // Keep following the answers while they grow, unless the reader scrolled up.
  const follow = () => {
    if (transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 80) {
      schedule(() => (transcript.scrollTop = transcript.scrollHeight));
    }
  };
  const view = new AnswerView(turn.querySelector(".answer"), follow);
  const request = { ...chatRequest(), prompt };
  const submit = () => view.bind(client.generate(request));
  view.retryButton.addEventListener("click", submit);
  submit();
  if (stick) transcript.scrollTop = transcript.scrollHeight;
  return true;
}

$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const box = $("prompt");
  const prompt = box.value.trim();
  if (!prompt) return;
  // The box never locks: the next prompt may follow at once.
  if (sendChat(prompt)) {
    box.value = "";
    box.focus();
  }
});

$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("chat-form").requestSubmit();
  }
});

// -- bulk ---------------------------------------------------------------------------
$("bulk-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!client || client.state === "unauthorized") {
    notice("Paste a valid API key first.", { kind: "error" });
    return;
  }
  const lines = $("bulk-prompts").value.split("\n").map((l) => l.trim()).filter(Boolean);
  if (!lines.length) return;
  const run = $("run-template").content.firstElementChild.cloneNode(true);
  const grid = run.querySelector(".grid");
  const progress = run.querySelector(".progress");
  $("bulk-runs").prepend(run);
  const started = performance.now();
  const request = {};
  const maxTokens = parseInt($("bulk-max-tokens").value, 10);
  if (Number.isFinite(maxTokens)) request.max_tokens = maxTokens;
  const showProgress = ({ total, done, failed }) => {
    const running = total - done - failed;
    progress.textContent = `${done} / ${total} done · ${failed} failed`
      + (running ? ` · ${running} to go` : ` · finished in ${fmtMs(performance.now() - started)}`);
    run.dataset.done = String(done);
    run.dataset.failed = String(failed);
    run.dataset.total = String(total);
  };
  const { jobs, result } = client.bulk(lines, { ...request, onProgress: showProgress });
  showProgress({ total: jobs.length, done: 0, failed: 0 });
  jobs.forEach((job, i) => {
    const cell = $("cell-template").content.firstElementChild.cloneNode(true);
    cell.querySelector(".cell-prompt").textContent = `${i + 1}. ${lines[i]}`;
    grid.append(cell);
    new AnswerView(cell).bind(job);
  });
  result.then((counts) => {
    showProgress(counts);
    run.dataset.finished = "true";
  });
});

// -- connection --------------------------------------------------------------------
function showState({ state, delayMs, attempt, code }) {
  const badge = $("conn");
  badge.dataset.state = state;
  const running = client ? client.unfinished.length : 0;
  switch (state) {
    case "connecting":
      badge.textContent = "connecting…";
      break;
    case "open":
      badge.textContent = `connected${client.identity?.tier ? ` · ${client.identity.tier}` : ""}`;
      if ($("notice").dataset.kind === "warn") {
        notice(running ? `Reconnected — resuming ${running} unfinished answer${running === 1 ? "" : "s"} where they stopped.`
          : "Reconnected.", { forMs: 4000 });
      }
      break;
    case "reconnecting": {
      badge.textContent = "reconnecting…";
      if (delayMs === undefined) break;
      const why = code === 1001 ? "The front end is restarting" : "Connection lost";
      notice(`${why} (code ${code}). Reconnecting in ${fmtS(delayMs / 1000)} (attempt ${attempt})`
        + (running ? `; ${running} answer${running === 1 ? "" : "s"} will resume without losing text.` : "."),
      { kind: "warn", action: { label: "Retry now", run: () => client.reconnectNow() } });
      break;
    }
    case "unauthorized":
      badge.textContent = "key refused";
      sessionStorage.removeItem(KEY_STORAGE);
      notice("The gateway refused this API key (invalid or revoked). Paste a valid key and connect again.",
        { kind: "error" });
      $("key").focus();
      break;
    case "closed":
      badge.textContent = "not connected";
      break;
    default:
      badge.textContent = state;
  }
}

function useKey(newKey) {
  client?.close();
  key = newKey;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("intro").hidden = true;
  notice("");
  client = new SluiceClient({ key });
  client.on("state", showState);
  client.on("error", (error) => notice(explain(error), { kind: "error", forMs: 10000 }));
  client.connect();
  pollStatus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("key").value.trim();
  if (value) useKey(value);
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  client?.close();
  client = null;
  key = null;
  $("key").value = "";
  $("conn").dataset.state = "idle";
  $("conn").textContent = "no key yet";
  $("intro").hidden = false;
  notice("The key is forgotten.", { forMs: 3000 });
});

// -- status -----------------------------------------------------------------------
let statusTimer = null;

function percentiles(figures) {
  if (!figures || figures.p50 === null) return "–";
  return [figures.p50, figures.p90, figures.p99].map(fmtMs).join(" / ");
}

function percentileNote(figures) {
  if (!figures) return "";
  const window = figures.window_s ? `last ${Math.round(figures.window_s)} s` : "since start";
  const n = figures.count;
  return `${n ? n : "no"} answer${n === 1 ? "" : "s"}, ${window}`;
}

async function pollStatus() {
  clearTimeout(statusTimer);
  if (!key) return;
  if (!document.hidden) {
    const askedWith = key;
    try {
      const response = await fetch("/v1/status", {
        headers: { Authorization: `Bearer ${askedWith}` }, cache: "no-store",
      });
      if (askedWith !== key) return; // the key changed while we waited
      if (response.status === 401) {
        $("status-note").textContent = "— the key was refused";
      } else if (!response.ok) {
        $("status-note").textContent = `— unavailable (HTTP ${response.status})`;
      } else {
        const s = await response.json();
        const show = (id, value) => ($(id).textContent = value ?? "–");
        show("st-sockets", s.front_end?.open_sockets);
        show("st-running", s.jobs_running);
        show("st-queue", s.queue_depth);
        show("st-workers", s.workers_online ?? (s.problems?.workers ? "?" : "…"));
        show("st-ttft", percentiles(s.ttft_ms));
        show("st-tpot", percentiles(s.tpot_ms));
        $("st-ttft-note").textContent = percentileNote(s.ttft_ms);
        $("st-tpot-note").textContent = percentileNote(s.tpot_ms);
        const problems = Object.keys(s.problems ?? {});
        $("status-note").textContent = problems.length ? `— cannot reach ${problems.join(", ")}`
          : `— updated ${new Date(s.updated_at_ms).toLocaleTimeString()}`;
        $("status").dataset.loaded = "true";
      }
    } catch {
      $("status-note").textContent = "— the gateway does not answer";
    }
  }
  statusTimer = setTimeout(pollStatus, STATUS_EVERY_MS);
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden) pollStatus();
});

// -- start ----------------------------------------------------------------------------
const stored = sessionStorage.getItem(KEY_STORAGE);
if (stored) {
  $("key").value = stored;
  useKey(stored);
}
