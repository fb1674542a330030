// What both recipe pages do, with the unmodified @fal-ai/client and its *relative* proxyUrl:
// every call goes to the page's own origin, and the dev server forwards it to the proxy.
// The test's driver (../drive.mjs) calls window.recipe.* and reads what they report.
import { fal } from "@fal-ai/client";
import { decode, encode } from "@msgpack/msgpack";

fal.config({ proxyUrl: "/api/fal/proxy" });

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
    return { data, requestId, error: null };
  } catch (error) {
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
      },
      (error) => {
        subscription.error = describe(error);
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
      resolve(report);
    };
  });
}

export function installRecipe() {
  window.recipe = { run, subscribe, subscription, socket };
  document.documentElement.dataset.ready = "true";
}
