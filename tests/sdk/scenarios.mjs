// Drive the unmodified @fal-ai/client (pinned in package.json) through the proxy.
//
//   node scenarios.mjs <proxy-url> <scenario|all>
//
// The client is created exactly as an app would create it outside a browser:
// createFalClient({ proxyUrl: { url: `${proxy}/api/fal/proxy`, when: "always" } }),
// with no credentials (FAL_KEY & co. are removed from the environment first). The only
// addition is a `fetch` wrapper that records what the SDK sent to the proxy (method,
// URL, headers) before delegating to Node's fetch; it changes nothing on the wire.
//
// Prints ONE JSON object on stdout: { "<scenario>": { ok, sent, ...outcome } }.
// `ok` is false when the scenario threw something it did not expect; the outcome then
// has `error`. Expected SDK errors (ValidationError, ApiError) are outcomes, not failures.
//
// The upstream is the product's offline emulator (`python -m proxy emulator`, see
// proxy/emulator): its `emulator/*` apps (echo, fault injection) and a real queue whose
// jobs move IN_QUEUE -> IN_PROGRESS -> COMPLETED on the emulator's (scaled) clock.
//
// Some scenarios step outside that setup on purpose, and say so: the signed-URL upload
// PUTs go straight to the emulator (recorded in `sent` too, with their own URL); the
// realtime ones install a stub `globalThis.WebSocket` (Node 20 has none) that records the
// URL the SDK opens and the frames it sends, without any network; `node_string_proxy_url`
// answers from a canned fetch (fal itself would be called); `browser_string_proxy_url`
// fakes a browser with `globalThis.window`.
//
// Environment, set by tests/e2e/test_sdk_node.py:
//   EMULATOR_URL     the emulator's base URL; the gated scenarios release the emulator's
//                    gates (POST /_emulator/gates/<name>) themselves, one after each event
//                    received; `stream_abort` reads its events (GET /_emulator/events); the
//                    queue scenarios that must see a state hold the emulator's queue
//                    (POST /_emulator/queue/hold) and release each held state once the SDK
//                    has reported it (POST /_emulator/queue/release), whatever the speed.
//   QUEUE_JOB_MS     how long an emulated fal-ai/flux/dev job takes from submit to
//                    COMPLETED (queue wait + generation, times the emulator's time scale).
//   AUDIO_CHUNK_BYTES  the size of each chunk `emulator/audio` sends.

import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";

for (const name of ["FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET"]) {
  delete process.env[name];
}

const [proxyBase, wanted = "all"] = process.argv.slice(2);
if (!proxyBase) {
  console.error("usage: node scenarios.mjs <proxy-url> <scenario|all>");
  process.exit(2);
}
const PROXY_URL = `${proxyBase.replace(/\/$/, "")}/api/fal/proxy`;
const SCENARIO_TIMEOUT_MS = 15000;
const QUEUE_APP = "fal-ai/flux/dev"; // an emulated text-to-image app; needs a non-empty prompt
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function requireEnv(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`this scenario needs ${name}`);
  }
  return value;
}

/**
 * A fetch that records what the SDK asks for (method, URL as given, headers) and the
 * answer's status, then delegates to Node's fetch; `base` resolves relative URLs the way a
 * browser resolves them against the page.
 */
function recordingFetch(sent, base = undefined) {
  return (url, init = {}) => {
    const entry = {
      method: init.method ?? "GET",
      url: String(url),
      headers: Object.fromEntries(new Headers(init.headers).entries()),
      hasBody: init.body !== undefined && init.body !== null,
    };
    sent.push(entry);
    return fetch(base === undefined ? url : new URL(url, base), init).then((response) => {
      entry.status = response.status;
      return response;
    });
  };
}

/** A client configured like an app would, plus a fetch that records what it sends. */
function makeClient(extra = {}) {
  const sent = [];
  const fal = createFalClient({
    proxyUrl: { url: PROXY_URL, when: "always" },
    fetch: recordingFetch(sent),
    ...extra,
  });
  return { fal, sent };
}

/** Run `fn` with `globalThis[name]` set to `value`, then put the old value back. */
async function withGlobal(name, value, fn) {
  const had = Object.prototype.hasOwnProperty.call(globalThis, name);
  const previous = globalThis[name];
  globalThis[name] = value;
  try {
    return await fn();
  } finally {
    if (had) {
      globalThis[name] = previous;
    } else {
      delete globalThis[name];
    }
  }
}

/** A control call to the emulator (straight, not through the proxy); its JSON answer. */
async function emulatorControl(path, method = "POST") {
  const response = await fetch(`${requireEnv("EMULATOR_URL")}/_emulator/${path}`, { method });
  if (!response.ok) {
    throw new Error(`${method} /_emulator/${path}: HTTP ${response.status}`);
  }
  return response.json();
}

/**
 * For a job submitted while the emulator's queue holds: `seen(status)` releases IN_QUEUE,
 * then IN_PROGRESS, each the first time the SDK reports it (an SDK callback cannot wait, so
 * a poll or two may still see the state a release is leaving). `released()`: what each
 * release moved ({request id: status}), in order.
 */
function releaseEachHeldState() {
  const releases = new Map();
  return {
    seen(status) {
      if ((status === "IN_QUEUE" || status === "IN_PROGRESS") && !releases.has(status)) {
        releases.set(status, emulatorControl("queue/release").then((answer) => answer.released));
      }
    },
    released: () => Promise.all(releases.values()),
  };
}

/** Poll `check` every 10 ms until it returns true or `ms` have passed. */
async function waitFor(check, ms) {
  const deadline = Date.now() + ms;
  while (!(await check()) && Date.now() < deadline) {
    await sleep(10);
  }
}

/**
 * A stand-in for the browser's WebSocket: records the URL the SDK opens and the frames it
 * sends. It touches no network; it "opens" on the next turn so that the SDK sends its
 * queued message.
 */
function stubWebSocket() {
  const opened = [];
  const frames = [];
  class StubWebSocket {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSING = 2;
    static CLOSED = 3;

    constructor(url, protocols) {
      opened.push({ url: String(url), protocols: protocols ?? null });
      this.url = String(url);
      this.readyState = StubWebSocket.CONNECTING;
      setTimeout(() => {
        this.readyState = StubWebSocket.OPEN;
        this.onopen?.({ type: "open" });
      }, 0);
    }

    send(data) {
      frames.push({ binary: typeof data !== "string", b64: Buffer.from(data).toString("base64") });
    }

    close() {
      this.readyState = StubWebSocket.CLOSED;
    }
  }
  return { StubWebSocket, opened, frames };
}

// A small "PNG": the signature, then every byte value once.
const UPLOAD_BYTES = new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, ...Array(256).keys()]);
const b64 = (bytes) => Buffer.from(bytes).toString("base64");

function describeError(error) {
  const out = {
    name: error?.name,
    constructor: error?.constructor?.name,
    message: error?.message,
    isApiError: error instanceof ApiError,
    isValidationError: error instanceof ValidationError,
  };
  if (error instanceof ApiError) {
    Object.assign(out, {
      status: error.status,
      body: error.body ?? null,
      requestId: error.requestId,
      timeoutType: error.timeoutType ?? null,
      isUserTimeout: error.isUserTimeout,
    });
  }
  if (error instanceof ValidationError) {
    out.fieldErrors = error.fieldErrors;
    out.promptErrors = error.getFieldErrors("prompt");
  }
  if (!(error instanceof ApiError)) {
    out.stack = error?.stack;
    out.cause = error?.cause ? String(error.cause) : null;
  }
  return out;
}

/** Run `fn`, returning { thrown } instead of throwing. */
async function capture(fn) {
  try {
    return { result: await fn() };
  } catch (error) {
    return { thrown: describeError(error) };
  }
}

function summarizeResult(result) {
  // run()/queue.result() give { data, requestId }; keep them as they are.
  return { data: result.data, requestId: result.requestId };
}

// fal.realtime.connect to the emulator's realtime app, recording results and errors;
// sends one frame, which is what makes the SDK fetch its token.
function connectRealtime(fal) {
  const results = [];
  const errors = [];
  const connection = fal.realtime.connect("fal-ai/fast-lcm-diffusion/image-to-image", {
    onResult: (result) => results.push(result),
    onError: (error) => errors.push(describeError(error)),
  });
  connection.send({ prompt: "cat" });
  return { connection, results, errors };
}

const scenarios = {
  async run_post() {
    const { fal, sent } = makeClient();
    const result = await fal.run("emulator/echo", { input: { prompt: "cat" } });
    return { sent, ...summarizeResult(result) };
  },

  async run_get() {
    const { fal, sent } = makeClient();
    const result = await fal.run("emulator/echo", { method: "get", input: { prompt: "cat", n: 2 } });
    return { sent, ...summarizeResult(result) };
  },

  async run_query() {
    // `query` on a POST run: the input stays in the body, the query string rides along.
    const { fal, sent } = makeClient();
    const result = await fal.run("emulator/echo", { input: { prompt: "cat" }, query: { q: "1" } });
    return { sent, ...summarizeResult(result) };
  },

  async run_path() {
    // `path` addresses one of the app's own endpoints; the echo app has no `/custom`, and
    // says so (fal's 404): proof that the sub-path reached the app unchanged.
    const { fal, sent } = makeClient();
    const { result, thrown } = await capture(() =>
      fal.run("emulator/echo", { input: { prompt: "cat" }, path: "/custom", query: { q: "1" } }),
    );
    return { sent, result: result ?? null, thrown: thrown ?? null };
  },

  async queue_submit() {
    const { fal, sent } = makeClient();
    const submitted = await fal.queue.submit(QUEUE_APP, {
      input: { prompt: "cat" },
      webhookUrl: "https://example.com/hook?a=b",
      priority: "low",
      hint: "h1",
      startTimeout: 30,
      headers: { "X-Custom": "v" },
    });
    return { sent, submitted };
  },

  async queue_status_result_cancel() {
    // The emulator's queue is real: status/result/cancel need a request id it issued.
    // Waiting QUEUE_JOB_MS after the submit answer is enough for COMPLETED: the job's
    // clock started when the emulator received the submit, before it answered.
    const jobMs = Number(requireEnv("QUEUE_JOB_MS"));
    const { fal, sent } = makeClient();
    const submitted = await fal.queue.submit(QUEUE_APP, { input: { prompt: "cat" } });
    const requestId = submitted.request_id;
    await sleep(jobMs);
    const status = await fal.queue.status(QUEUE_APP, { requestId, logs: true });
    const result = await fal.queue.result(QUEUE_APP, { requestId });
    // Cancel a job held in the queue (only that one): still waiting to run, however slow.
    await emulatorControl("queue/hold");
    const fresh = await fal.queue.submit(QUEUE_APP, { input: { prompt: "dog" } });
    await emulatorControl("queue/hold", "DELETE");
    const cancelled = await fal.queue.cancel(QUEUE_APP, { requestId: fresh.request_id });
    return {
      sent,
      submitted,
      status,
      result: summarizeResult(result),
      fresh,
      cancelled: cancelled === undefined ? "undefined" : cancelled,
    };
  },

  async subscribe_polling() {
    // Held: each state stays until the SDK has reported it.
    await emulatorControl("queue/hold");
    const hold = releaseEachHeldState();
    const { fal, sent } = makeClient();
    const enqueued = [];
    const updates = [];
    const result = await fal.subscribe(QUEUE_APP, {
      input: { prompt: "cat" },
      logs: true,
      pollInterval: 20,
      onEnqueue: (requestId) => enqueued.push(requestId),
      onQueueUpdate: (update) => {
        updates.push({ status: update.status, logs: (update.logs ?? []).map((log) => log.message) });
        hold.seen(update.status);
      },
    });
    return { sent, enqueued, updates, released: await hold.released(), ...summarizeResult(result) };
  },

  async subscribe_streaming() {
    await emulatorControl("queue/hold");
    const hold = releaseEachHeldState();
    const { fal, sent } = makeClient();
    const enqueued = [];
    const updates = [];
    const result = await fal.subscribe(QUEUE_APP, {
      input: { prompt: "cat" },
      mode: "streaming",
      onEnqueue: (requestId) => enqueued.push(requestId),
      onQueueUpdate: (update) => {
        updates.push(update.status);
        hold.seen(update.status);
      },
    });
    return { sent, enqueued, updates, released: await hold.released(), ...summarizeResult(result) };
  },

  async stream() {
    const { fal, sent } = makeClient();
    const stream = await fal.stream("emulator/sse", {
      input: { prompt: "cat" },
      queryParams: { n: "3", gated: "0" },
    });
    const events = [];
    for await (const event of stream) {
      events.push(event);
    }
    const done = await stream.done();
    return { sent, events, done, requestId: stream.requestId };
  },

  async stream_incremental() {
    // The emulator produces event i (i > 1) only after gate sse-i is released, and this
    // script releases sse-(i+1) only once it has *received* event i. So the stream can
    // only finish if every event travelled through the proxy on its own, unbuffered.
    const emulator = requireEnv("EMULATOR_URL");
    const { fal, sent } = makeClient();
    const n = 3;
    const stream = await fal.stream("emulator/sse", {
      input: { prompt: "cat" },
      queryParams: { n: String(n) },
    });
    const events = [];
    const releases = [];
    const started = Date.now();
    stream.on("data", (event) => {
      events.push({ event, atMs: Date.now() - started });
      const next = event.n + 1;
      if (next <= n) {
        releases.push(
          fetch(`${emulator}/_emulator/gates/sse-${next}`, { method: "POST" }).then((r) => r.status),
        );
      }
    });
    const done = await stream.done();
    return { sent, events, done, releaseStatuses: await Promise.all(releases), requestId: stream.requestId };
  },

  async error_422() {
    const { fal, sent } = makeClient();
    const { result, thrown } = await capture(() => fal.run("emulator/status/422", { input: { foo: 1 } }));
    return { sent, result: result ?? null, thrown: thrown ?? null };
  },

  async error_500() {
    const { fal, sent } = makeClient();
    const { result, thrown } = await capture(() => fal.run("emulator/status/500", { input: { foo: 1 } }));
    return { sent, result: result ?? null, thrown: thrown ?? null };
  },

  async error_504_user_timeout() {
    const { fal, sent } = makeClient();
    const { result, thrown } = await capture(() =>
      fal.run("emulator/status/504", { input: { foo: 1 }, startTimeout: 5 }),
    );
    return { sent, result: result ?? null, thrown: thrown ?? null };
  },

  async error_text404() {
    const { fal, sent } = makeClient();
    const { result, thrown } = await capture(() => fal.run("emulator/text404", { input: { foo: 1 } }));
    return { sent, result: result ?? null, thrown: thrown ?? null };
  },

  async retry_503() {
    // The emulator answers 503 twice, then 200: the SDK's own retry must get through.
    const { fal, sent } = makeClient();
    const result = await fal.run("emulator/flaky", { input: { prompt: "cat" }, query: { fail: "2" } });
    return { sent, ...summarizeResult(result) };
  },

  async gzip() {
    const { fal, sent } = makeClient();
    const result = await fal.run("emulator/gzip", { input: { prompt: "cat" } });
    return { sent, ...summarizeResult(result) };
  },

  async stream_binary() {
    // `emulator/audio` answers audio/mpeg, not SSE: the SDK emits the raw Uint8Array
    // chunks. Chunk i+1 leaves the emulator only once this script holds all of chunk i (it
    // then releases gate audio-(i+1)), so the stream can only finish if the proxy passed
    // each chunk on as it came.
    const emulator = requireEnv("EMULATOR_URL");
    const chunkBytes = Number(requireEnv("AUDIO_CHUNK_BYTES"));
    const { fal, sent } = makeClient();
    const n = 3;
    const stream = await fal.stream("emulator/audio", {
      input: { prompt: "cat" },
      queryParams: { chunks: String(n) },
      accept: "audio/mpeg",
    });
    const chunks = [];
    const releases = [];
    let received = 0;
    let released = 1;
    stream.on("data", (chunk) => {
      chunks.push({ isUint8Array: chunk instanceof Uint8Array, b64: b64(chunk) });
      received += chunk.byteLength;
      while (released < n && received >= released * chunkBytes) {
        released += 1;
        releases.push(fetch(`${emulator}/_emulator/gates/audio-${released}`, { method: "POST" }).then((r) => r.status));
      }
    });
    const done = await stream.done();
    return {
      sent,
      chunks,
      done: { isUint8Array: done instanceof Uint8Array, b64: b64(done) },
      releaseStatuses: await Promise.all(releases),
      requestId: stream.requestId,
    };
  },

  async stream_abort() {
    // `emulator/stall` sends one event, then waits for its gate or for the client to leave,
    // and notes `disconnected:stall:<request id>` when it leaves. This process stays alive
    // while it looks for that note: only the abort (through the proxy) can have caused it.
    const emulator = requireEnv("EMULATOR_URL");
    const { fal, sent } = makeClient();
    const stream = await fal.stream("emulator/stall", { input: { prompt: "cat" } });
    const events = [];
    await new Promise((resolve) =>
      stream.on("data", (event) => {
        events.push(event);
        resolve();
      }),
    );
    const abortedAt = Date.now();
    stream.abort();
    const done = await stream.done();
    const wanted = `disconnected:stall:${stream.requestId}`;
    let disconnectSeenAfterMs = null;
    await waitFor(async () => {
      const seen = await (await fetch(`${emulator}/_emulator/events`)).json();
      if (seen.includes(wanted)) {
        disconnectSeenAfterMs = Date.now() - abortedAt;
      }
      return disconnectSeenAfterMs !== null;
    }, 10000);
    return { sent, events, done, requestId: stream.requestId, disconnectSeenAfterMs };
  },

  async workflow_subscribe() {
    // A workflow id keeps its `workflows/` namespace in every queue URL. Held, as above.
    await emulatorControl("queue/hold");
    const hold = releaseEachHeldState();
    const { fal, sent } = makeClient();
    const enqueued = [];
    const updates = [];
    const result = await fal.subscribe("workflows/fal-ai/sdxl-sticker", {
      input: { prompt: "cat" },
      pollInterval: 20,
      onEnqueue: (requestId) => enqueued.push(requestId),
      onQueueUpdate: (update) => {
        updates.push(update.status);
        hold.seen(update.status);
      },
    });
    return { sent, enqueued, updates, released: await hold.released(), ...summarizeResult(result) };
  },

  async storage_upload() {
    // Initiation goes through the proxy (it needs the key); the bytes go to the signed URL.
    const { fal, sent } = makeClient();
    const fileUrl = await fal.storage.upload(new Blob([UPLOAD_BYTES], { type: "image/png" }));
    return { sent, fileUrl, bytes: b64(UPLOAD_BYTES) };
  },

  async storage_upload_lifecycle() {
    const { fal, sent } = makeClient();
    const fileUrl = await fal.storage.upload(new Blob([UPLOAD_BYTES], { type: "image/png" }), {
      lifecycle: { expiresIn: "1h" },
    });
    return { sent, fileUrl, bytes: b64(UPLOAD_BYTES) };
  },

  async storage_upload_multipart() {
    // The SDK goes multipart when file.size > 90 * 1024 * 1024 (storage.js) and PUTs
    // file.slice(start, end) for each 10 MiB part. Where each request goes (the initiation
    // through the proxy, the parts straight to the signed URL) does not depend on the
    // bytes, so none are made: the file says it holds 90 MiB + 1 byte, the smallest size the
    // SDK uploads in parts, and each slice the SDK asks for is a short line naming its range
    // (a part out of order or cut elsewhere changes what the emulator joins). `slices`:
    // what the SDK asked for, and what it got.
    const size = 90 * 1024 * 1024 + 1;
    const slices = [];
    class SizedFile extends Blob {
      get size() {
        return size;
      }

      slice(start, end) {
        const piece = Buffer.from(`bytes ${start}-${end} of ${size}\n`);
        slices.push({ start, end, b64: b64(piece) });
        return new Blob([piece]);
      }
    }
    const { fal, sent } = makeClient();
    const fileUrl = await fal.storage.upload(new SizedFile([], { type: "application/octet-stream" }));
    return { sent, fileUrl, size, slices };
  },

  async auto_upload() {
    // A Blob in the input is uploaded first and replaced by its file URL.
    const { fal, sent } = makeClient();
    const result = await fal.run("emulator/echo", {
      input: { prompt: "cat", image_url: new Blob([UPLOAD_BYTES], { type: "image/png" }) },
    });
    return { sent, bytes: b64(UPLOAD_BYTES), ...summarizeResult(result) };
  },

  async realtime_token() {
    // The default token provider asks the proxy for a token; the socket itself goes to
    // wss://fal.run directly (here: to the stub, which records it).
    const { fal, sent } = makeClient();
    const ws = stubWebSocket();
    return withGlobal("WebSocket", ws.StubWebSocket, async () => {
      const { connection, results, errors } = connectRealtime(fal);
      await waitFor(() => ws.frames.length > 0, 5000);
      connection.close();
      return { sent, opened: ws.opened, frames: ws.frames, results, errors };
    });
  },

  async realtime_token_refused() {
    // Same, against a proxy that refuses the token: wait for its answer, then long enough
    // for the SDK to have opened a socket had it got a token.
    const { fal, sent } = makeClient();
    const ws = stubWebSocket();
    return withGlobal("WebSocket", ws.StubWebSocket, async () => {
      const { connection, results, errors } = connectRealtime(fal);
      await waitFor(() => sent.length > 0 && sent[0].status !== undefined, 5000);
      await sleep(200);
      connection.close();
      return { sent, opened: ws.opened, frames: ws.frames, results, errors };
    });
  },

  async node_string_proxy_url() {
    // Outside a browser the SDK ignores a *string* proxyUrl and calls fal itself. This fetch
    // answers in fal's place (the run stays offline) and records where the call went.
    const sent = [];
    const cannedFetch = async (url, init = {}) => {
      sent.push({
        method: init.method ?? "GET",
        url: String(url),
        headers: Object.fromEntries(new Headers(init.headers).entries()),
      });
      return new Response(JSON.stringify({ canned: true }), {
        status: 200,
        headers: { "content-type": "application/json", "x-fal-request-id": "canned-request-id" },
      });
    };
    const fal = createFalClient({ proxyUrl: PROXY_URL, fetch: cannedFetch });
    const result = await fal.run("emulator/echo", { input: { prompt: "cat" } });
    return { sent, ...summarizeResult(result) };
  },

  async browser_string_proxy_url() {
    // In a browser (faked: window.document exists) the same string proxyUrl is used; the
    // relative URL is resolved against the page, whose origin here is the proxy's.
    const sent = [];
    const fal = createFalClient({ proxyUrl: "/api/fal/proxy", fetch: recordingFetch(sent, new URL(PROXY_URL).origin) });
    return withGlobal("window", { document: {} }, async () => {
      const result = await fal.run("emulator/echo", { input: { prompt: "cat" } });
      return { sent, ...summarizeResult(result) };
    });
  },

  async client_key() {
    // An app that (wrongly) ships a key to the client: the proxy must replace it.
    const { fal, sent } = makeClient({ credentials: "client-key" });
    const run = await fal.run("emulator/echo", { input: { prompt: "cat" } });
    const submitted = await fal.queue.submit(QUEUE_APP, { input: { prompt: "cat" } });
    return { sent, run: summarizeResult(run), submitted };
  },
};

async function runOne(name) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`scenario ${name} did not finish within ${SCENARIO_TIMEOUT_MS} ms`)),
      SCENARIO_TIMEOUT_MS,
    );
  });
  const started = Date.now();
  try {
    const outcome = await Promise.race([scenarios[name](), timeout]);
    return { ok: true, elapsedMs: Date.now() - started, ...outcome };
  } catch (error) {
    return { ok: false, elapsedMs: Date.now() - started, error: describeError(error) };
  } finally {
    clearTimeout(timer);
  }
}

const names = wanted === "all" ? Object.keys(scenarios) : wanted.split(",");
const unknown = names.filter((name) => !(name in scenarios));
if (unknown.length > 0) {
  console.error(`unknown scenario(s): ${unknown.join(", ")}; known: ${Object.keys(scenarios).join(", ")}`);
  process.exit(2);
}
const report = {};
for (const name of names) {
  report[name] = await runOne(name);
}
process.stdout.write(`${JSON.stringify(report)}\n`);
// Nothing should keep the process alive, but a stuck socket must not hang the test.
process.exit(0);
