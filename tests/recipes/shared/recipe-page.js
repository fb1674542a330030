// What both recipe pages do, with the unmodified @fal-ai/client and its *relative* proxyUrl:
// every call goes to the page's own origin, and the dev server forwards it to the proxy.
// The one exception is (d), the SDK's direct realtime path: only its token comes from the
// page's origin; the socket goes to wss://fal.run (the test maps that name to a local TLS
// front). The test's driver (../drive.mjs) calls window.recipe.* and reads what they report;
// each answer is also shown on the page (the driver's screenshot).
import { fal } from "@fal-ai/client";
import { decode, encode } from "@msgpack/msgpack";

fal.config({ proxyUrl: "/api/fal/proxy" });

// The README's tokenProvider ("For realtime, give the SDK a `tokenProvider`..."), verbatim.
const tokenProvider = async (app) => (await (await fetch("/api/fal/realtime-token",
  { method: "POST", body: JSON.stringify({ app }) })).json()).token;

/** Show one answer on the page: a heading, a line of text, its images. */
function show(title, text, images = []) {
  const article = document.createElement("article");
  const heading = document.createElement("h2");
  heading.textContent = title;
  const line = document.createElement("p");
  line.textContent = text;
  article.append(heading, line);
  for (const image of images ?? []) {
    const figure = document.createElement("figure");
    figure.style.cssText = "display: inline-block; margin: 0 12px 0 0";
    const img = document.createElement("img");
    Object.assign(img, { src: image.url, width: image.width, height: image.height, alt: title });
    const caption = document.createElement("figcaption");
    caption.textContent = image.url.replace(/^(.*\/_emulator\/files\/.{8}).*$/, "$1…");
    figure.append(img, caption);
    article.append(figure);
  }
  document.getElementById("recipe-results").append(article);
}

function summary(data) {
  if (data?.images) return `"${data.prompt ?? ""}": ${data.images.map((i) => `${i.width}×${i.height}`).join(", ")}`;
  return JSON.stringify(data);
}

function describe(error) {
  return {
    name: error?.name ?? null,
    message: String(error?.message ?? error),
    status: error?.status ?? null,
    body: error?.body ?? null,
  };
}

/** (a) fal.run */
async function run(app, input) {
  try {
    const { data, requestId } = await fal.run(app, { input });
    show(`fal.run("${app}")`, summary(data), data.images);
    return { data, requestId, error: null };
  } catch (error) {
    show(`fal.run("${app}") failed`, describe(error).message);
    return { data: null, requestId: null, error: describe(error) };
  }
}

/** (b) fal.subscribe with streamed status: each update is pushed to `subscription.statuses`
 * (with the time the page saw it) as it arrives; the driver watches that list. */
const subscription = { statuses: [], requestId: null, done: false, data: null, error: null };

function subscribe(app, input) {
  fal
    .subscribe(app, {
      input,
      mode: "streaming",
      onEnqueue: (requestId) => {
        subscription.requestId = requestId;
      },
      onQueueUpdate: (update) => {
        subscription.statuses.push({ status: update.status, at: Date.now() });
      },
    })
    .then(
      (result) => {
        subscription.data = result.data;
        subscription.resultRequestId = result.requestId;
        const seen = subscription.statuses.map((u) => u.status).join(" → ");
        show(`fal.subscribe("${app}", streaming)`, `${seen}; ${summary(result.data)}`, result.data.images);
      },
      (error) => {
        subscription.error = describe(error);
        show(`fal.subscribe("${app}") failed`, subscription.error.message);
      },
    )
    .finally(() => {
      subscription.done = true;
    });
}

/** (c) a realtime socket: one msgpack frame per input, each answered before the next.
 * `origin` defaults to the page's own (the dev server's proxy forwards the upgrade). */
function socket(path, inputs, origin = location.origin) {
  const url = origin.replace(/^http/, "ws") + path;
  return new Promise((resolve) => {
    const report = { url, opened: false, replies: [], close: null, error: null };
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    let next = 0;
    const sendNext = () => {
      if (next < inputs.length) ws.send(encode(inputs[next++]));
      else ws.close(1000, "done");
    };
    ws.onopen = () => {
      report.opened = true;
      sendNext();
    };
    ws.onmessage = (event) => {
      report.replies.push(
        typeof event.data === "string" ? { text: event.data } : decode(new Uint8Array(event.data)),
      );
      sendNext();
    };
    ws.onerror = () => {
      report.error = "error event";
    };
    ws.onclose = (event) => {
      report.close = { code: event.code, reason: event.reason, wasClean: event.wasClean };
      const replies = report.replies.map(summary).join("; ");
      show(`WebSocket ${path} (through the dev server)`, `${replies}; closed ${event.code}`,
           report.replies.flatMap((r) => r.images ?? []));
      resolve(report);
    };
  });
}

/** (d) fal.realtime.connect with the README's tokenProvider: the SDK asks it for a token
 * (a POST to the page's own origin, which the dev server forwards to the proxy's token route),
 * then opens wss://fal.run/<app>/realtime?fal_jwt_token=<token> itself. One input per result,
 * each sent once the one before is answered; closed after the last. The driver waits for
 * `realtimeRun.done`. */
const realtimeRun = { app: null, results: [], errors: [], done: false };

function realtime(app, inputs) {
  realtimeRun.app = app;
  let next = 0;
  const connection = fal.realtime.connect(app, {
    tokenProvider,
    onResult: (result) => {
      realtimeRun.results.push(result);
      if (next < inputs.length) {
        connection.send(inputs[next++]);
        return;
      }
      connection.close();
      realtimeRun.done = true;
      show(`fal.realtime.connect("${app}", { tokenProvider }): wss://fal.run`,
           realtimeRun.results.map(summary).join("; "),
           realtimeRun.results.flatMap((r) => r.images ?? []));
    },
    onError: (error) => {
      // After close(), SDK 1.10.1 reports its own close (no code: 1005) as an error.
      const afterClose = realtimeRun.done;
      realtimeRun.errors.push({ ...describe(error), afterClose });
      show(`fal.realtime.connect("${app}") onError${afterClose ? " after close()" : ""}`,
           `${describe(error).message} (status ${error?.status})` +
           (afterClose ? ": SDK 1.10.1 reports its own close(), sent with no code, as an error" : ""));
    },
  });
  connection.send(inputs[next++]);
}

export function installRecipe() {
  if (!document.getElementById("recipe-results")) {  // (React's dev mode runs effects twice)
    const results = document.createElement("section");
    results.id = "recipe-results";
    results.style.cssText = "font: 13px sans-serif";
    document.body.append(results);
  }
  window.recipe = { run, subscribe, subscription, socket, realtime, realtimeRun };
  document.documentElement.dataset.ready = "true";
}
