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
// Environment, set by tests/e2e/test_sdk_node.py:
//   EMULATOR_URL     the emulator's base URL; `stream_incremental` releases its SSE gates
//                    (POST /_emulator/gates/sse-<i>) itself, one after each event received.
//   QUEUE_JOB_MS     how long an emulated fal-ai/flux/dev job takes from submit to
//                    COMPLETED (queue wait + generation, times the emulator's time scale).

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

/** A client configured like an app would, plus a fetch that records what it sends. */
function makeClient(extra = {}) {
  const sent = [];
  const recordingFetch = (url, init = {}) => {
    const headers = new Headers(init.headers);
    sent.push({
      method: init.method ?? "GET",
      url: String(url),
      headers: Object.fromEntries(headers.entries()),
      hasBody: init.body !== undefined && init.body !== null,
    });
    return fetch(url, init);
  };
  const fal = createFalClient({
    proxyUrl: { url: PROXY_URL, when: "always" },
    fetch: recordingFetch,
    ...extra,
  });
  return { fal, sent };
}

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
    // Cancel a job that has just been submitted, so it is still waiting to run.
    const fresh = await fal.queue.submit(QUEUE_APP, { input: { prompt: "dog" } });
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
    const { fal, sent } = makeClient();
    const enqueued = [];
    const updates = [];
    const result = await fal.subscribe(QUEUE_APP, {
      input: { prompt: "cat" },
      logs: true,
      pollInterval: 20,
      onEnqueue: (requestId) => enqueued.push(requestId),
      onQueueUpdate: (update) =>
        updates.push({ status: update.status, logs: (update.logs ?? []).map((log) => log.message) }),
    });
    return { sent, enqueued, updates, ...summarizeResult(result) };
  },

  async subscribe_streaming() {
    const { fal, sent } = makeClient();
    const enqueued = [];
    const updates = [];
    const result = await fal.subscribe(QUEUE_APP, {
      input: { prompt: "cat" },
      mode: "streaming",
      onEnqueue: (requestId) => enqueued.push(requestId),
      onQueueUpdate: (update) => updates.push(update.status),
    });
    return { sent, enqueued, updates, ...summarizeResult(result) };
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
