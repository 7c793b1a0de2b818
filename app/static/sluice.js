/**
 * sluice.js — the browser client of Sluice's WebSocket protocol.
 *
 * One ES module, no dependencies, no build step: import it as it is.
 *
 *     import { SluiceClient } from "/static/sluice.js";
 *
 *     const client = new SluiceClient({ key: "sk-sluice-…" });   // url: ws(s)://<this host>/ws
 *     client.connect();
 *
 *     const job = client.generate({ prompt: "Tell me a story", max_tokens: 64 });
 *     job.on("token", ({ text }) => output.append(text));        // callbacks…
 *     job.on("restart", () => (output.textContent = ""));
 *     for await (const event of job) { … }                       // …or an async iterator
 *     const text = await job.result;                             // …or just the answer
 *     job.cancel();
 *
 *     const { jobs, result } = client.bulk(["one", "two", "three"], { max_tokens: 32 });
 *     jobs[2].on("held", ({ position, etaS }) => …);              // waiting its turn
 *     const { done, failed } = await result;
 *
 * What it guarantees
 * ------------------
 * - The key is sent in the first frame (`auth`), never in a URL: browsers
 *   cannot set an `Authorization` header on a WebSocket.
 * - The socket reconnects by itself, with exponential backoff and jitter, on
 *   any close but 4401 (the key was refused) or `close()`.  After
 *   re-authenticating it sends `resume` for every unfinished job from the last
 *   seq it holds, so a job's text has no gap and no repeat across a drop: every
 *   job tracks the next seq it expects and ignores anything below it.
 * - A `generate` sent but not yet answered by `queued` when the socket dropped
 *   is sent again on the next socket (the protocol has no way to ask whether
 *   it arrived): at most one extra job, never a lost prompt.
 * - `restart` (the job is re-run after its worker died) discards the job's text.
 * - A `reconnect` frame (the front end is shutting down) makes it reconnect at
 *   once, with a little jitter so that a whole front end's clients do not
 *   arrive together.
 *
 * - `bulk()` sends one `bulk` frame for all its prompts: the gateway holds
 *   them and starts them as the key's limits allow; each becomes a Job as
 *   `generate` makes, resumed and cancelled the same way.
 *
 * Job states: "sending" (no `queued` yet) → "queued" → "streaming" →
 * "done" | "error" | "cancelled"; "waiting" while a refused request waits to
 * be retried (see `retry` below).
 */

/** Close code of a refused key: the one close after which the client stays closed. */
export const UNAUTHORIZED = 4401;

/** An error frame, or a failure of the client itself, as an Error. */
export class SluiceError extends Error {
  /**
   * @param {string} code the protocol's error code (`rate_limited`, `cancelled`, …)
   * @param {string} message what went wrong, for people
   * @param {object} [details] `retryAfter` (seconds), `limits`, `jobId`, `frame`
   */
  constructor(code, message, details = {}) {
    super(message);
    this.name = "SluiceError";
    this.code = code;
    this.retryAfter = details.retryAfter ?? null;
    this.limits = details.limits ?? null;
    this.jobId = details.jobId ?? null;
    this.frame = details.frame ?? null;
  }
}

/** A tiny event emitter: `on(type, fn)` returns an unsubscribe function. */
class Emitter {
  constructor() {
    this._handlers = new Map();
  }

  /**
   * Call `fn(detail)` on every event of `type`; `"*"` gets every event as `(type, detail)`.
   * @returns {() => void} removes the handler
   */
  on(type, fn) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(fn);
    return () => this._handlers.get(type)?.delete(fn);
  }

  _emit(type, detail) {
    for (const fn of this._handlers.get(type) ?? []) this._call(fn, detail);
    for (const fn of this._handlers.get("*") ?? []) this._call(fn, type, detail);
  }

  _call(fn, ...args) {
    // One broken handler must not stop the stream for the others.
    try {
      fn(...args);
    } catch (e) {
      console.error("sluice: event handler failed", e);
    }
  }
}

const now = () => performance.now();

/**
 * One generation: its text so far, its events, its timings.
 *
 * Events (`job.on(type, fn)`): `queued` (the frame), `held` ({position, etaS}:
 * a bulk item, or a request held instead of refused, waiting its turn; position
 * 0 starts next), `token` ({text, seq}), `restart` ({seq, attempt}), `done` (the
 * frame), `error` (a SluiceError; code `cancelled` for a cancel), `waiting`
 * ({code, retryAt, message}), and `update` after any change.
 *
 * Async iteration yields `{type: "token", text, seq}`, `{type: "restart", …}`
 * and finally `{type: "done", …}` (the frames as received), from the first
 * event on whenever it starts; it throws the SluiceError if the job fails.
 */
export class Job extends Emitter {
  constructor(client, ref, request, retry) {
    super();
    this.client = client;
    /** Our ref for the `generate` frame (echoed in `queued` and request errors). */
    this.ref = ref;
    /** The request as given to `generate`. */
    this.request = request;
    this.retry = retry;
    /** The gateway's job id, once `queued` arrives. */
    this.id = null;
    this.status = "sending";
    /** The answer so far: the tokens after the last `restart`. */
    this.text = "";
    /** The next seq this job expects; anything below it is a repeat. */
    this.nextSeq = 0;
    /** The `queued` frame (position, limits), the `done` frame (usage, server metrics). */
    this.queued = null;
    this.final = null;
    /** The SluiceError the job ended with, or the one it is waiting out. */
    this.error = null;
    /** While held by the gateway (not started): `{position, etaS}`; else null. */
    this.held = null;
    /** When a waiting job will be sent again (epoch ms), and why. */
    this.waiting = null;
    this.cancelRequested = false;
    /** Client-side timings in ms (performance.now()): see `metrics`. */
    this.sentAt = null;
    this.firstTokenAt = null;
    this.lastTokenAt = null;
    /** Token frames of the current attempt (a frame may hold several tokens when a worker is behind). */
    this.tokenFrames = 0;
    this._log = [];
    this._wakeups = [];
    this._sentOn = null; // the socket the generate frame went out on
    this._resync = false;
    this._retryTimer = null;
    this.result = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.result.catch(() => {}); // failures are reported through events too
  }

  /** True once the job is done, failed or cancelled. */
  get ended() {
    return this.status === "done" || this.status === "error" || this.status === "cancelled";
  }

  /**
   * Client-side timings: `ttftMs` (sent → first token), `tpotMs` ((last − first)
   * / (tokens − 1), tokens from `done.usage` once known, token frames until
   * then), `tokens`, `elapsedMs`.  The server's own figures are in `final.metrics`.
   */
  get metrics() {
    const usage = this.final?.usage?.completion_tokens;
    const tokens = usage ?? this.tokenFrames;
    const first = this.firstTokenAt;
    const last = this.lastTokenAt;
    return {
      ttftMs: first !== null && this.sentAt !== null ? first - this.sentAt : null,
      tpotMs: first !== null && tokens > 1 ? (last - first) / (tokens - 1) : null,
      tokens,
      elapsedMs: this.sentAt !== null ? (this.ended && last !== null ? last : now()) - this.sentAt : null,
    };
  }

  /** Ask the gateway to stop this job; it ends with an `error` of code `cancelled`. */
  cancel() {
    this.client.cancel(this);
  }

  [Symbol.asyncIterator]() {
    let i = 0;
    return {
      next: async () => {
        for (;;) {
          if (i < this._log.length) return { value: this._log[i++], done: false };
          if (this.status === "done") return { value: undefined, done: true };
          if (this.ended) throw this.error;
          await new Promise((wake) => this._wakeups.push(wake));
        }
      },
      return: async () => ({ value: undefined, done: true }),
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  // -- fed by the client ----------------------------------------------------
  _changed(type, detail) {
    if (type) this._emit(type, detail);
    this._emit("update", this);
    for (const wake of this._wakeups.splice(0)) wake();
  }

  _onQueued(frame) {
    this.id = frame.job_id;
    this.queued = frame;
    this.status = "queued";
    this._changed("queued", frame);
  }

  /** One job event; returns false for a frame that is not the next one (a repeat or a gap). */
  _onEvent(frame) {
    if (this.ended || frame.seq < this.nextSeq) return true; // already have it: a resume overlaps
    if (frame.seq > this.nextSeq) return false;
    this.nextSeq = frame.seq + 1;
    this._resync = false;
    const t = now();
    switch (frame.type) {
      case "token":
        this.held = null;
        if (this.firstTokenAt === null) this.firstTokenAt = t;
        this.lastTokenAt = t;
        this.tokenFrames += 1;
        this.text += frame.text;
        this.status = "streaming";
        this._log.push(frame);
        this._changed("token", frame);
        break;
      case "restart":
        // The job runs again from scratch: what we have is not part of the answer.
        this.text = "";
        this.tokenFrames = 0;
        this.firstTokenAt = this.lastTokenAt = null;
        this._log.push(frame);
        this._changed("restart", frame);
        break;
      case "done":
        this.final = frame;
        this.status = "done";
        this._log.push(frame);
        this._resolve(this.text);
        this._changed("done", frame);
        break;
      case "error":
        this._fail(new SluiceError(frame.code, frame.message ?? frame.code,
          { jobId: this.id, frame }));
        break;
      default: // a newer server's event: keep the seq, show nothing
    }
    return true;
  }

  _fail(error) {
    if (this.ended) return;
    clearTimeout(this._retryTimer);
    this.error = error;
    this.waiting = null;
    this.status = error.code === "cancelled" ? "cancelled" : "error";
    this._reject(error);
    this._changed("error", error);
  }

  _wait(error, retryAt) {
    this.error = error;
    this.status = "waiting";
    this.waiting = { code: error.code, message: error.message, retryAt };
    this._changed("waiting", this.waiting);
  }
}

/** How long after one of its jobs ends a job refused for concurrency is sent again. */
const SLOT_RELEASE_MS = 100;

const DEFAULTS = {
  /** First reconnect delay; doubles per failed attempt up to `maxDelayMs`. */
  initialDelayMs: 250,
  maxDelayMs: 15000,
  /** A refused request waiting longer than this is failed rather than retried. */
  maxRetryWaitS: 120,
};

/**
 * A socket to a Sluice gateway that survives drops.
 *
 * Client events (`client.on(type, fn)`): `state` ({state, …}) on every change of
 * `client.state` — "idle", "connecting", "open", "reconnecting" (with `delayMs`,
 * `attempt`, `code`, `reason`), "unauthorized", "closed"; `authenticated` (the
 * frame: key_id, tier); `error` (a SluiceError not tied to a job); `job` (a new Job).
 */
export class SluiceClient extends Emitter {
  /**
   * @param {object} options
   * @param {string} [options.url] the WebSocket URL; default `ws(s)://<page host>/ws`
   * @param {string|null} [options.key] the API key (`null`: an anonymous gateway)
   * @param {number} [options.initialDelayMs] first reconnect delay (default 250)
   * @param {number} [options.maxDelayMs] longest reconnect delay (default 15000)
   * @param {number} [options.maxRetryWaitS] longest wait a retried request accepts (default 120)
   * @param {typeof WebSocket} [options.WebSocket] the WebSocket class (for tests)
   */
  constructor(options = {}) {
    super();
    this.url = options.url ?? defaultUrl();
    this.key = options.key ?? null;
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.state = "idle";
    /** What the last `authenticated` frame said: key_id and tier. */
    this.identity = null;
    this.ws = null;
    this._authed = false;
    this._attempt = 0; // failed connections since the last good one
    this._refs = 0;
    this._live = new Set(); // every unfinished Job
    this._jobs = new Map(); // job id -> unfinished Job that has one
    this._unqueued = new Map(); // ref -> Job waiting for its `queued`, in submission order
    this._bulks = new Map(); // ref -> Bulk not yet ended (see `bulk`)
    this._bulkLogs = new Map(); // log id -> Bulk: its `held` and `bulk_done` events
    this._slotWaiters = []; // jobs refused for concurrency, waiting for one of ours to end
    this._reconnectTimer = null;
    this._serverAsked = false;
    this._closedByUser = false;
    if (globalThis.addEventListener) {
      // Back online: try now rather than at the end of a long backoff.
      globalThis.addEventListener("online", () => this.reconnectNow());
    }
  }

  /** Open the socket (again); does nothing while one is open or opening. */
  connect() {
    this._closedByUser = false;
    if (this.ws || this.state === "unauthorized") return this;
    clearTimeout(this._reconnectTimer);
    this._open();
    return this;
  }

  /** Skip the rest of a reconnect delay. */
  reconnectNow() {
    if (this.state !== "reconnecting") return;
    clearTimeout(this._reconnectTimer);
    this._open();
  }

  /** Close for good; unfinished jobs keep running on the gateway and can be resumed by id. */
  close() {
    this._closedByUser = true;
    clearTimeout(this._reconnectTimer);
    if (this.ws) this.ws.close(1000, "client closed");
    this.ws = null;
    this._setState("closed");
  }

  /**
   * Submit one prompt.
   *
   * @param {object} request `prompt` or `messages`, and optional `model`,
   *   `max_tokens`, `temperature`, `seed`, `session` (as in the `generate` frame)
   * @param {object} [how]
   * @param {boolean} [how.retry] when the gateway refuses with `rate_limited`,
   *   wait `retry_after` and send again; with `concurrency_limit`, send again
   *   when one of this client's jobs ends.  Default false: the job fails.
   * @returns {Job}
   */
  generate(request, { retry = false } = {}) {
    if (this.state === "unauthorized") throw new SluiceError("unauthorized", "the API key was refused");
    const job = new Job(this, `g${++this._refs}`, { ...request }, retry);
    this._live.add(job);
    job.on("update", () => { if (job.ended) this._ended(job); });
    this._unqueued.set(job.ref, job);
    this._emit("job", job);
    this._sendGenerate(job);
    if (!this.ws && (this.state === "idle" || this.state === "closed")) this.connect();
    return job;
  }

  /**
   * Submit many prompts in one `bulk` frame.  The gateway holds what the key's
   * limits do not allow yet and starts it in order (each waiting job gets `held`
   * events); a frame the gateway only delayed (`rate_limited`) is sent again.
   *
   * @param {Array<string|object>} items prompts, or requests as for `generate`
   * @param {object} [defaults] fields every request gets (`max_tokens`, `model`, …),
   *   plus `onProgress({total, done, failed})`, called as each job ends
   * @returns {{jobs: Job[], result: Promise<{total: number, done: number, failed: number}>,
   *   cancel: () => void}}
   */
  bulk(items, { onProgress, ...defaults } = {}) {
    if (this.state === "unauthorized") throw new SluiceError("unauthorized", "the API key was refused");
    const bulk = { ref: `b${++this._refs}`, jobs: [], id: null, logId: null, nextSeq: 0,
      sentOn: null, retryTimer: null, cancelRequested: false };
    bulk.jobs = items.map((item) => {
      const request = typeof item === "string" ? { ...defaults, prompt: item } : { ...defaults, ...item };
      const job = new Job(this, `g${++this._refs}`, request, false);
      job.bulk = bulk;
      this._live.add(job);
      job.on("update", () => { if (job.ended) this._ended(job); });
      this._emit("job", job);
      return job;
    });
    const jobs = bulk.jobs;
    if (jobs.length) {
      this._bulks.set(bulk.ref, bulk);
      this._sendBulk(bulk);
      if (!this.ws && (this.state === "idle" || this.state === "closed")) this.connect();
    }
    const counts = { total: jobs.length, done: 0, failed: 0 };
    const result = new Promise((resolve) => {
      const settle = () => {
        onProgress?.({ ...counts });
        if (counts.done + counts.failed === counts.total) resolve({ ...counts });
      };
      if (!jobs.length) settle();
      for (const job of jobs) {
        job.result.then(() => { counts.done += 1; settle(); },
          () => { counts.failed += 1; settle(); });
      }
    });
    const cancel = () => {
      bulk.cancelRequested = true;
      for (const job of jobs) job.cancelRequested = true;
      if (bulk.id) this._send({ type: "cancel", bulk_id: bulk.id, ref: `c:${bulk.ref}` });
      else if (!bulk.sentOn) this._dropBulk(bulk, new SluiceError("cancelled", "cancelled before it was sent"));
      // else: sent but not queued yet; the cancel goes out when `queued` arrives.
    };
    return { jobs, result, cancel };
  }

  /** Cancel a job (a Job or a job id of this client). */
  cancel(jobOrId) {
    const job = typeof jobOrId === "string" ? this._jobs.get(jobOrId) : jobOrId;
    if (!job || job.ended) return;
    job.cancelRequested = true;
    if (job.bulk && !job.id) {
      // Its bulk has no `queued` yet: unsent, it is left out; sent, it is
      // cancelled when the `queued` names it.
      if (!job.bulk.sentOn) job._fail(new SluiceError("cancelled", "cancelled before it was sent"));
      else job._changed();
      return;
    }
    if (job.status === "waiting" || (job.status === "sending" && !job._sentOn)) {
      // Never reached the gateway: nothing to stop there.
      job._fail(new SluiceError("cancelled", "cancelled before it was sent"));
      return;
    }
    if (job.id) this._send({ type: "cancel", job_id: job.id, ref: `c:${job.ref}` });
    // else: sent but not queued yet; the cancel goes out when `queued` arrives.
    job._changed();
  }

  /** Jobs not yet ended, in submission order. */
  get unfinished() {
    return [...this._live];
  }

  // -- the socket -------------------------------------------------------------
  _open() {
    this._setState(this._attempt ? "reconnecting" : "connecting", { attempt: this._attempt });
    this._authed = false;
    this._serverAsked = false;
    let ws;
    try {
      ws = new this.WebSocket(this.url);
    } catch (e) {
      // A malformed URL: retrying will not help.
      this._setState("closed", { reason: String(e) });
      this._emit("error", new SluiceError("bad_url", `cannot open ${this.url}: ${e}`));
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.key === null) this._onAuthenticated(null);
      else ws.send(JSON.stringify({ type: "auth", ref: "auth", key: this.key }));
    };
    ws.onmessage = (e) => {
      if (ws !== this.ws) return;
      let frame;
      try {
        frame = JSON.parse(e.data);
      } catch {
        return;
      }
      this._onFrame(frame);
    };
    ws.onclose = (e) => this._onClose(ws, e);
    ws.onerror = () => {}; // a close event follows with the code
  }

  _onClose(ws, event) {
    if (ws !== this.ws) return;
    this.ws = null;
    this._authed = false;
    for (const job of this._unqueued.values()) job._sentOn = null;
    for (const bulk of this._bulks.values()) if (!bulk.id) bulk.sentOn = null;
    if (this._closedByUser) return;
    if (event.code === UNAUTHORIZED) {
      this._setState("unauthorized", { code: event.code, reason: event.reason });
      const error = new SluiceError("unauthorized", "the gateway refused the API key");
      for (const job of this.unfinished) job._fail(error);
      return;
    }
    const attempt = ++this._attempt;
    const base = this.options.initialDelayMs;
    // Asked to move (front end shutting down): come back at once, spread out a little.
    // Otherwise exponential backoff with "equal jitter": half fixed, half random.
    const ceiling = this._serverAsked ? base : Math.min(this.options.maxDelayMs, base * 2 ** (attempt - 1));
    const delayMs = Math.round(this._serverAsked ? Math.random() * ceiling : ceiling / 2 + Math.random() * ceiling / 2);
    this._setState("reconnecting", { delayMs, attempt, code: event.code, reason: event.reason,
      retryAt: Date.now() + delayMs });
    this._reconnectTimer = setTimeout(() => this._open(), delayMs);
  }

  _setState(state, detail = {}) {
    this.state = state;
    this._emit("state", { state, ...detail });
  }

  _send(frame) {
    if (!this._authed) return false; // resent from the job's state on the next socket
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  _sendGenerate(job) {
    if (!this._authed || job._sentOn === this.ws) return;
    job._sentOn = this.ws;
    job.sentAt = now();
    this._send({ type: "generate", ref: job.ref, ...job.request });
  }

  _sendBulk(bulk) {
    if (!this._authed || bulk.sentOn === this.ws) return;
    const jobs = bulk.jobs.filter((job) => !job.ended);
    if (!jobs.length) {
      this._bulks.delete(bulk.ref);
      return;
    }
    bulk.sentOn = this.ws;
    const t = now();
    for (const job of jobs) {
      job._sentOn = this.ws;
      job.sentAt = t;
    }
    this._send({ type: "bulk", ref: bulk.ref, items: jobs.map((job) => ({ ...job.request, ref: job.ref })) });
  }

  /** End every job of a bulk that got no `queued` with `error` (per item, if the frame says). */
  _dropBulk(bulk, error) {
    clearTimeout(bulk.retryTimer);
    this._bulks.delete(bulk.ref);
    const perItem = new Map((error.frame?.items ?? []).map((item) => [item.ref, item]));
    for (const job of bulk.jobs) {
      const item = perItem.get(job.ref);
      job._fail(item ? new SluiceError(item.code, item.message, { frame: item }) : error);
    }
  }

  _onAuthenticated(frame) {
    this._authed = true;
    this._attempt = 0;
    this.identity = frame;
    this._setState("open");
    if (frame) this._emit("authenticated", frame);
    // Pick every unfinished job up where we are, then send what never got a `queued`.
    for (const job of this._jobs.values()) {
      job._resync = false;
      this._resume(job);
      if (job.cancelRequested) this._send({ type: "cancel", job_id: job.id, ref: `c:${job.ref}` });
    }
    for (const bulk of this._bulks.values()) {
      if (bulk.logId) {
        this._send({ type: "resume", ref: `r:${bulk.ref}`, job_id: bulk.logId, after: bulk.nextSeq - 1 });
        if (bulk.cancelRequested) this._send({ type: "cancel", bulk_id: bulk.id, ref: `c:${bulk.ref}` });
      }
    }
    for (const job of [...this._unqueued.values()]) {
      if (job.cancelRequested) job._fail(new SluiceError("cancelled", "cancelled before it was sent"));
      else this._sendGenerate(job);
    }
    for (const bulk of [...this._bulks.values()]) {
      if (!bulk.id && !bulk.retryTimer) this._sendBulk(bulk);
    }
  }

  _resume(job) {
    this._send({ type: "resume", ref: `r:${job.ref}`, job_id: job.id, after: job.nextSeq - 1 });
  }

  // -- frames -------------------------------------------------------------------
  _onFrame(frame) {
    switch (frame.type) {
      case "authenticated":
        this._onAuthenticated(frame);
        return;
      case "queued":
        if (frame.items) this._onBulkQueued(frame);
        else this._onQueued(frame);
        return;
      case "held":
      case "bulk_done":
        this._onBulkEvent(frame);
        return;
      case "reconnect":
        // The front end is going away; its close (1001) follows.
        this._serverAsked = true;
        return;
      case "error":
        if (frame.seq === undefined) {
          this._onRefused(frame);
          return;
        }
      // fall through: a job's error event
      case "token":
      case "restart":
      case "done": {
        const job = this._jobs.get(frame.job_id);
        if (!job) return; // a job this client no longer follows
        if (!job._onEvent(frame)) this._gap(job);
        return;
      }
      default: // a frame type this client does not know: ignore it
    }
  }

  _onQueued(frame) {
    const job = this._unqueued.get(frame.ref);
    if (!job) return;
    this._unqueued.delete(frame.ref);
    this._jobs.set(frame.job_id, job);
    job._onQueued(frame);
    if (frame.log_id) {
      // Held instead of refused: its hold's log says where it stands.
      const hold = { ref: job.ref, jobs: [job], id: frame.bulk_id, logId: frame.log_id, nextSeq: 0 };
      job.bulk = hold;
      this._bulkLogs.set(hold.logId, hold);
    }
    if (job.cancelRequested) this._send({ type: "cancel", job_id: job.id, ref: `c:${job.ref}` });
  }

  /** The one `queued` frame of a `bulk`: per item its job id, or why it became none. */
  _onBulkQueued(frame) {
    const bulk = this._bulks.get(frame.ref);
    if (!bulk || bulk.id) return;
    bulk.id = frame.bulk_id;
    bulk.logId = frame.log_id;
    this._bulkLogs.set(bulk.logId, bulk);
    const byRef = new Map(bulk.jobs.map((job) => [job.ref, job]));
    for (const item of frame.items) {
      const job = byRef.get(item.ref);
      if (!job || job.ended) continue;
      if (!item.job_id) {
        job._fail(new SluiceError(item.code, item.message, { frame: item }));
        continue;
      }
      this._jobs.set(item.job_id, job);
      job._onQueued({ type: "queued", ref: job.ref, job_id: item.job_id, bulk_id: bulk.id, held: true });
      if (job.cancelRequested && !bulk.cancelRequested) {
        this._send({ type: "cancel", job_id: job.id, ref: `c:${job.ref}` });
      }
    }
    if (bulk.cancelRequested) this._send({ type: "cancel", bulk_id: bulk.id, ref: `c:${bulk.ref}` });
  }

  /** A `held` or `bulk_done` event of a bulk's own log. */
  _onBulkEvent(frame) {
    const bulk = this._bulkLogs.get(frame.job_id);
    if (!bulk || frame.seq < bulk.nextSeq) return;
    bulk.nextSeq = frame.seq + 1;
    if (frame.type === "bulk_done") {
      this._bulkLogs.delete(frame.job_id);
      this._bulks.delete(bulk.ref);
      return;
    }
    // Item i waits at position + (i - next_index); ETAs run from next_eta_s to last_eta_s.
    const span = Math.max(1, frame.held - 1);
    for (const job of bulk.jobs) {
      if (!job.id || job.status !== "queued") continue;
      const offset = parseInt(job.id.slice(24), 16) - frame.next_index;
      if (offset < 0) continue; // started: its events come
      const eta = frame.next_eta_s === null ? null
        : frame.next_eta_s + (frame.last_eta_s - frame.next_eta_s) * Math.min(1, offset / span);
      job.held = { position: frame.position + offset, etaS: eta === null ? null : Math.round(eta * 10) / 10 };
      job._changed("held", job.held);
    }
  }

  _gap(job) {
    // Within one socket the gateway sends a job's events in order, so this
    // should not happen; if it does, ask for the rest from what we hold.
    if (job._resync) return;
    job._resync = true;
    this._resume(job);
  }

  /** Forget an ended job (called from its `update` event). */
  _ended(job) {
    if (!this._live.delete(job)) return;
    this._unqueued.delete(job.ref);
    const i = this._slotWaiters.indexOf(job);
    if (i >= 0) this._slotWaiters.splice(i, 1);
    if (job.id === null || !this._jobs.delete(job.id)) return;
    // One of our slots is free: let a job refused for concurrency try again, a
    // moment later, as the worker releases the slot just after the job's last event.
    const waiter = this._slotWaiters.shift();
    if (waiter) setTimeout(() => this._retryNow(waiter), SLOT_RELEASE_MS);
  }

  /** An `error` frame without a seq: a request that was refused. */
  _onRefused(frame) {
    const error = new SluiceError(frame.code, frame.message ?? frame.code,
      { retryAfter: frame.retry_after, limits: frame.limits, frame });
    if (frame.code === "unauthorized") {
      this._emit("error", error); // the 4401 close follows
      return;
    }
    // Our refs: "g<n>" a job's generate, "r:g<n>" its resume, "c:g<n>" its cancel.
    const ref = typeof frame.ref === "string" ? frame.ref : "";
    const colon = ref.indexOf(":");
    const kind = colon < 0 ? "g" : ref.slice(0, colon);
    const own = ref.slice(colon + 1);
    if (own.startsWith("b")) {
      this._onBulkRefused(kind, this._bulks.get(own), frame, error);
      return;
    }
    const job = kind === "g" ? this._unqueued.get(ref)
      : [...this._jobs.values()].find((j) => j.ref === own);
    if (!job) {
      this._emit("error", error);
      return;
    }
    const waitS = frame.retry_after;
    if (kind === "r" || kind === "c") {
      // Our own bookkeeping frames: retry those the gateway only delayed.
      if (frame.code === "rate_limited" && typeof waitS === "number") {
        setTimeout(() => {
          if (job.ended) return;
          if (kind === "r") this._resume(job);
          else this._send({ type: "cancel", job_id: job.id, ref });
        }, waitS * 1000);
      } else if (kind === "r") {
        job._fail(error); // e.g. unknown_job: its log expired
      } else {
        this._emit("error", error);
      }
      return;
    }
    this._unqueued.delete(job.ref);
    if (job.retry && frame.code === "rate_limited" && typeof waitS === "number"
        && waitS <= this.options.maxRetryWaitS) {
      const delayMs = waitS * 1000 + Math.random() * 250;
      job._wait(error, Date.now() + delayMs);
      job._retryTimer = setTimeout(() => this._retryNow(job), delayMs);
    } else if (job.retry && frame.code === "concurrency_limit") {
      job._wait(error, null);
      this._slotWaiters.push(job);
      // Slots may be held elsewhere (another tab): also look again later.
      const look = () => {
        if (job.status !== "waiting") return;
        if (this._jobs.size === 0) this._retryNow(job);
        else job._retryTimer = setTimeout(look, 2000);
      };
      job._retryTimer = setTimeout(look, 2000);
    } else {
      job._fail(error);
    }
  }

  /** An `error` frame answering a `bulk` frame (`b<n>`), or its log's resume or cancel. */
  _onBulkRefused(kind, bulk, frame, error) {
    if (!bulk) {
      this._emit("error", error);
      return;
    }
    const waitS = frame.retry_after;
    const delayed = frame.code === "rate_limited" && typeof waitS === "number"
      && waitS <= this.options.maxRetryWaitS;
    if (kind === "g" && !bulk.id) {
      if (!delayed) {
        this._dropBulk(bulk, error);
        return;
      }
      const delayMs = waitS * 1000 + Math.random() * 250;
      for (const job of bulk.jobs) if (!job.ended) job._wait(error, Date.now() + delayMs);
      bulk.sentOn = null;
      bulk.retryTimer = setTimeout(() => {
        bulk.retryTimer = null;
        for (const job of bulk.jobs) {
          if (job.status === "waiting") {
            job.status = "sending";
            job.waiting = null;
            job._changed();
          }
        }
        this._sendBulk(bulk);
      }, delayMs);
    } else if (delayed) {
      setTimeout(() => {
        if (!this._bulks.has(bulk.ref)) return;
        if (kind === "r") this._send({ type: "resume", ref: frame.ref, job_id: bulk.logId, after: bulk.nextSeq - 1 });
        else this._send({ type: "cancel", bulk_id: bulk.id, ref: frame.ref });
      }, waitS * 1000);
    } else {
      this._emit("error", error);
    }
  }

  _retryNow(job) {
    if (job.status !== "waiting") return;
    clearTimeout(job._retryTimer);
    const i = this._slotWaiters.indexOf(job);
    if (i >= 0) this._slotWaiters.splice(i, 1);
    job.status = "sending";
    job.waiting = null;
    job._sentOn = null;
    this._unqueued.set(job.ref, job);
    job._changed();
    this._sendGenerate(job);
  }
}

/** `ws://` or `wss://` to `/ws` on the page's own host. */
export function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new SluiceError("bad_url", "no page location: pass `url`");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}
