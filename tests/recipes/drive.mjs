// Drive a recipe page (vite-app/ or next-app/, served by its own dev server) in Debian's
// headless Chromium: the three calls of shared/recipe-page.js, in order.
//
//   node drive.mjs <spec.json>
//
// spec.json: { pageUrl, emulatorUrl, screenshot,
//              run: { app, input }, subscribe: { app, input },
//              sockets: [ { name, path, inputs, origin? } ],
//              realtime?: { app, inputs }, chromiumArgs?: [...], keepBodiesOf?: [path, ...] }
//
// The subscription is released step by step: the emulator holds the queue (the test posted
// /_emulator/queue/hold), and this script posts /_emulator/queue/release only once the page
// has *reported* the status before it (IN_QUEUE, then IN_PROGRESS). A proxy or dev server that
// delivered the status stream all at the end would leave the page with nothing to report,
// and the step times out.
//
// `realtime`: fal.realtime.connect with the README's tokenProvider, last; the SDK opens
// wss://fal.run itself, so `chromiumArgs` map that name to the test's TLS front
// (--host-resolver-rules) and trust its certificate (--ignore-certificate-errors-spki-list).
// The screenshot (full page) is taken once every image the page shows has loaded.
//
// Prints ONE JSON object: { ok, browserVersion, run, subscribe: { steps, subscription },
// sockets, realtime, images, requests, websockets, consoleErrors, pageErrors, failure? }.
// `requests` is every request the page made (URL, method, status, request and response
// headers; the response body too for a path in `keepBodiesOf`); `websockets` every socket
// the page opened (URL, frames sent and received, in order); `images` every image shown.
import { readFileSync } from "node:fs";

import { closeChromium, launchChromium } from "../sdk/chromium.mjs";

const [specPath] = process.argv.slice(2);
const spec = JSON.parse(readFileSync(specPath, "utf8"));
const WAIT_MS = spec.waitMs ?? 20000;
const READY_MS = spec.readyMs ?? 120000; // a dev server compiles the page on first request

const report = {
  ok: false, browserVersion: null, run: null, subscribe: null, sockets: {}, realtime: null,
  images: [], requests: [], websockets: [], consoleErrors: [], pageErrors: [], timings: {},
};
const started = Date.now();
const mark = (name) => (report.timings[name] = Date.now() - started);

const socketClosed = new Map(); // URL → a promise of that socket's close

function withTimeout(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), WAIT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function release() {
  const sentAt = Date.now();
  const answer = await fetch(`${spec.emulatorUrl}/_emulator/queue/release`, { method: "POST" });
  return { status: answer.status, body: await answer.json(), sentAt, answeredAt: Date.now() };
}

async function main() {
  let launched;
  try {
    launched = await launchChromium("fal-recipe-chromium-", WAIT_MS, spec.chromiumArgs ?? []);
    report.browserVersion = launched.browser.version();
    const context = await launched.browser.newContext();
    const page = await context.newPage();
    page.on("console", (msg) => msg.type() === "error" && report.consoleErrors.push(msg.text()));
    page.on("pageerror", (error) => report.pageErrors.push(String(error?.stack ?? error)));
    page.on("requestfinished", async (request) => {
      const response = await request.response();
      const entry = {
        method: request.method(), url: request.url(), status: response?.status() ?? null,
        requestHeaders: await request.allHeaders(), responseHeaders: (await response?.allHeaders()) ?? {},
      };
      if ((spec.keepBodiesOf ?? []).includes(new URL(request.url()).pathname)) {
        entry.responseBody = (await response?.text()) ?? null;
      }
      report.requests.push(entry);
    });
    page.on("requestfailed", (request) => {
      report.requests.push({ method: request.method(), url: request.url(), status: null, failed: request.failure()?.errorText ?? "failed" });
    });
    page.on("websocket", (ws) => {
      const entry = { url: ws.url(), frames: [], closed: false };
      report.websockets.push(entry);
      socketClosed.set(ws.url(), new Promise((resolve) => ws.on("close", resolve)));
      const frame = (dir) => (f) => entry.frames.push({ dir, bytes: typeof f.payload === "string" ? null : f.payload.length });
      ws.on("framesent", frame("sent"));
      ws.on("framereceived", frame("received"));
      ws.on("close", () => (entry.closed = true));
    });

    const response = await page.goto(spec.pageUrl, { waitUntil: "load", timeout: READY_MS });
    if (!response?.ok()) throw new Error(`GET ${spec.pageUrl} answered ${response?.status()}`);
    await page.waitForFunction(() => document.documentElement.dataset.ready === "true", null, { timeout: READY_MS });
    mark("ready");

    // (a) fal.run
    report.run = await page.evaluate(({ app, input }) => window.recipe.run(app, input), spec.run);
    mark("run");

    // (b) fal.subscribe, each held state released only after the page reported it
    const steps = [];
    await page.evaluate(({ app, input }) => window.recipe.subscribe(app, input), spec.subscribe);
    for (const status of ["IN_QUEUE", "IN_PROGRESS"]) {
      await page.waitForFunction(
        (s) => window.recipe.subscription.statuses.some((u) => u.status === s) || window.recipe.subscription.done,
        status, { timeout: WAIT_MS },
      ).catch((error) => {
        // The emulator holds the job in this state until released: a stream delivered late
        // (buffered by the dev server or the proxy) never shows it to the page.
        throw new Error(`the page never reported ${status} while the job was held in it: ${error.message}`);
      });
      const seen = await page.evaluate(() => window.recipe.subscription.statuses.map((u) => u.status));
      steps.push({ waitedFor: status, pageHad: seen, release: await release() });
    }
    await page.waitForFunction(() => window.recipe.subscription.done, null, { timeout: WAIT_MS });
    report.subscribe = { steps, subscription: await page.evaluate(() => window.recipe.subscription) };
    mark("subscribe");

    // (c) realtime sockets
    for (const { name, path, inputs, origin } of spec.sockets ?? []) {
      report.sockets[name] = await page.evaluate(
        ({ path, inputs, origin }) => window.recipe.socket(path, inputs, origin ?? undefined),
        { path, inputs, origin: origin ?? null },
      );
    }
    mark("sockets");

    // (d) fal.realtime.connect with the tokenProvider, straight to wss://fal.run
    if (spec.realtime) {
      await page.evaluate(({ app, inputs }) => window.recipe.realtime(app, inputs), spec.realtime);
      await page.waitForFunction(() => window.recipe.realtimeRun.done, null, { timeout: WAIT_MS }).catch(async (error) => {
        const had = await page.evaluate(() => window.recipe.realtimeRun);
        throw new Error(`fal.realtime.connect never answered every input: ${error.message}\npage had: ${JSON.stringify(had)}`);
      });
      const direct = [...socketClosed].filter(([url]) => url.startsWith("wss://fal.run/"));
      await withTimeout(Promise.all(direct.map(([, closed]) => closed)), "the SDK's socket to close");
      report.realtime = await page.evaluate(() => window.recipe.realtimeRun);
      mark("realtime");
    }

    // What the page shows, loaded (the screenshot's content), then the screenshot.
    await page.waitForFunction(() => [...document.images].every((i) => i.complete), null, { timeout: WAIT_MS });
    report.images = await page.evaluate(() =>
      [...document.images].map((i) => ({ src: i.src, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight })));
    await page.waitForTimeout(100); // let the last requestfinished events land
    if (spec.screenshot) await page.screenshot({ path: spec.screenshot, fullPage: true });
    await context.close();
    report.ok = true;
  } catch (error) {
    report.failure = String(error?.stack ?? error);
  } finally {
    await closeChromium(launched);
  }
  process.stdout.write(JSON.stringify(report) + "\n");
  process.exit(report.ok ? 0 : 1);
}

main();
