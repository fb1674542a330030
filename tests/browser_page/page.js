// The cross-origin test page's only script (driven by tests/sdk/browser-cors.mjs).
//
// It uses the real fal JS SDK (@fal-ai/client, bundled at test time into ./fal-client.js)
// the way a web app on another origin would: a *string*, absolute proxyUrl pointing at
// the proxy, no fal credentials, and, when the test gives it one, the caller token added
// by the SDK's requestMiddleware in the proxy's caller header.
//
// window.runSubscribe({ proxyUrl, prompt, token, endpoint, size, pollInterval }) runs one
// fal.subscribe, shows status, logs, request id, error and image on the page, and
// resolves with a plain summary (it never rejects: an SDK failure is part of the summary).

import { ApiError, createFalClient } from "./fal-client.js";

const CALLER_HEADER = "x-proxy-authorization";

const $ = (id) => document.getElementById(id);
const statusHistory = [];

function setStatus(status) {
  const el = $("status");
  el.textContent = status;
  el.dataset.status = status;
  if (statusHistory[statusHistory.length - 1] !== status) statusHistory.push(status);
  $("status-history").textContent = statusHistory.join(" → ");
}

const seenLogs = new Set();
function addLogs(logs) {
  for (const log of logs ?? []) {
    const key = `${log.timestamp}\u0000${log.level}\u0000${log.message}`;
    if (seenLogs.has(key)) continue;
    seenLogs.add(key);
    const li = document.createElement("li");
    li.textContent = `[${log.level ?? "INFO"}] ${log.message ?? ""}`;
    $("logs").append(li);
  }
}

function describeError(error) {
  const out = {
    name: error?.name ?? "Error",
    message: error?.message ?? String(error),
    isApiError: error instanceof ApiError,
    status: null,
    body: null,
    requestId: null,
  };
  if (error instanceof ApiError) {
    out.status = error.status;
    out.body = error.body ?? null;
    out.requestId = error.requestId || null;
  }
  return out;
}

function showError(info) {
  const box = $("error");
  box.replaceChildren();
  const title = document.createElement("strong");
  title.textContent = info.status !== null ? `${info.name} (HTTP ${info.status})` : info.name;
  const detail = document.createElement("p");
  detail.textContent = info.message;
  box.append(title, detail);
  if (info.body?.detail) {
    const more = document.createElement("p");
    more.textContent = String(info.body.detail);
    box.append(more);
  }
  box.hidden = false;
}

function loadImage(first) {
  const img = $("result-image");
  return new Promise((resolve) => {
    img.onload = () => resolve({ loaded: true });
    img.onerror = () => resolve({ loaded: false });
    img.alt = "generated image";
    img.src = first.url;
    $("result-caption").textContent = `${first.width ?? "?"}×${first.height ?? "?"} from ${first.url}`;
    $("result").hidden = false;
    $("result-empty").hidden = true;
  }).then(({ loaded }) => ({
    src: img.currentSrc || img.src,
    loaded,
    complete: img.complete,
    naturalWidth: img.naturalWidth,
    naturalHeight: img.naturalHeight,
  }));
}

window.runSubscribe = async function runSubscribe({
  proxyUrl,
  prompt,
  token = null,
  endpoint = "fal-ai/flux/schnell",
  size = 64,
  pollInterval = 25,
}) {
  $("page-origin").textContent = location.origin;
  $("proxy-url").textContent = proxyUrl;
  $("caller-token").textContent = token ? `Bearer ${token.slice(0, 4)}… via requestMiddleware` : "none";
  $("endpoint").textContent = endpoint;

  const config = { proxyUrl };
  if (token) {
    // The documented way to send the proxy's caller credential from the browser.
    config.requestMiddleware = async (request) => ({
      ...request,
      headers: { ...request.headers, [CALLER_HEADER]: `Bearer ${token}` },
    });
  }
  const fal = createFalClient(config);

  const summary = {
    ok: false,
    origin: location.origin,
    enqueuedRequestId: null,
    requestId: null,
    statuses: [],
    logs: [],
    data: null,
    image: null,
    error: null,
  };
  setStatus("SUBMITTING");
  try {
    const result = await fal.subscribe(endpoint, {
      input: { prompt, image_size: { width: size, height: size } },
      logs: true,
      pollInterval, // short, so that the emulated job's short IN_QUEUE/IN_PROGRESS phases are seen
      onEnqueue: (requestId) => {
        summary.enqueuedRequestId = requestId; // from the submit's JSON body
        $("request-id").textContent = requestId;
      },
      onQueueUpdate: (update) => {
        setStatus(update.status);
        if ("logs" in update) addLogs(update.logs);
      },
    });
    // result.requestId is read from the result response's x-fal-request-id header: empty
    // unless the proxy's CORS answer exposes that header to this origin.
    summary.requestId = result.requestId;
    summary.data = result.data;
    $("request-id").textContent = result.requestId || "(x-fal-request-id not readable)";
    setStatus("COMPLETED");
    const first = result.data?.images?.[0];
    if (!first?.url) throw new Error("the result has no image");
    summary.image = await loadImage(first);
    summary.ok = summary.image.loaded;
  } catch (error) {
    summary.error = describeError(error);
    setStatus("FAILED");
    $("result-empty").textContent = "No image.";
    showError(summary.error);
  }
  summary.statuses = [...statusHistory];
  summary.logs = [...$("logs").querySelectorAll("li")].map((li) => li.textContent);
  return summary;
};

// window.runDriveBy({ proxyBase }) does what any web page can do to a proxy the user can
// reach, with no fal SDK and no CORS: an <img> and no-cors fetches that would each run a
// model. It resolves once the browser has settled every one (no response is readable).
window.runDriveBy = async ({ proxyBase }) => {
  const settle = (promise) => promise.then(() => "settled", (error) => `rejected: ${error}`);
  const image = new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve("load");
    img.onerror = () => resolve("error");
    img.src = `${proxyBase}/fal-ai/flux/schnell?prompt=drive-by-image`;
    document.body.append(img);
  });
  const results = await Promise.all([
    image,
    settle(fetch(`${proxyBase}/fal-ai/flux/schnell?prompt=drive-by-get`, { mode: "no-cors" })),
    settle(fetch(`${proxyBase}/fal-ai/flux/schnell`, {
      mode: "no-cors", method: "POST", headers: { "content-type": "text/plain" }, body: '{"prompt":"drive-by-post"}',
    })),
    settle(fetch(`${proxyBase}/fal-ai/flux/schnell?prompt=drive-by-no-referrer`, {
      mode: "no-cors", referrerPolicy: "no-referrer",
    })),
  ]);
  return { origin: location.origin, results };
};

document.documentElement.dataset.ready = "true";
