// Drive tests/browser_page/ (served from an origin that is NOT the proxy's) in a real
// headless Chromium, through the real fal JS SDK with a cross-origin, string proxyUrl.
//
//   node browser-cors.mjs <spec.json>
//
// spec.json: { "runs": [ { "name", "pageUrl", "proxyUrl", "prompt", "token"?, "screenshot", "kind"? } ] }
// kind "driveby" calls window.runDriveBy({ proxyBase: proxyUrl }) instead (no SDK, no CORS).
// Each run gets a fresh browser context (no shared cache, so no cached preflight), opens
// pageUrl, calls window.runSubscribe({ proxyUrl, prompt, token }) (tests/browser_page/page.js)
// and screenshots the page. The network is recorded at the Chrome DevTools Protocol level,
// which (unlike Playwright's request events) also shows CORS preflights, the raw headers
// of every request and response, and why the browser blocked a request (corsErrorStatus).
//
// Prints ONE JSON object on stdout: { ok, browserVersion, runs: [ { name, summary,
// network, consoleErrors, pageErrors, screenshot } ], failure? }. `ok` is about the
// harness (browser started, page loaded, the run finished), not about the SDK call:
// whether the call should have succeeded is for the Python test to judge. Exits 0 when
// ok, 1 otherwise, 2 on bad usage.
//
// Uses playwright-core (no bundled browser) with Debian's Chromium: /usr/bin/chromium,
// or $CHROMIUM_PATH; the launch options are in chromium.mjs.

import { readFileSync } from "node:fs";

import { CHROMIUM, closeChromium, launchChromium } from "./chromium.mjs";

const WAIT_MS = 20000;

const [specPath, ...extra] = process.argv.slice(2);
if (!specPath || extra.length) {
  console.error("usage: node browser-cors.mjs <spec.json>");
  process.exit(2);
}
const spec = JSON.parse(readFileSync(specPath, "utf8"));

const report = { ok: false, chromium: CHROMIUM, browserVersion: null, runs: [], elapsedMs: null };

const lower = (headers) => Object.fromEntries(Object.entries(headers ?? {}).map(([k, v]) => [k.toLowerCase(), v]));

/** Record the page's network traffic through a CDP session: one entry per request. */
async function recordNetwork(context, page) {
  const entries = [];
  const byId = new Map();
  const entry = (requestId) => {
    let found = byId.get(requestId);
    if (!found) {
      found = {
        cdpId: requestId, method: null, url: null, type: null, requestHeaders: {}, status: null,
        responseHeaders: {}, failed: null, finished: false,
      };
      byId.set(requestId, found);
      entries.push(found);
    }
    return found;
  };
  const cdp = await context.newCDPSession(page);
  cdp.on("Network.requestWillBeSent", (e) => {
    const found = entry(e.requestId);
    Object.assign(found, { method: e.request.method, url: e.request.url, type: e.type ?? found.type });
    Object.assign(found.requestHeaders, lower(e.request.headers));
  });
  cdp.on("Network.requestWillBeSentExtraInfo", (e) => {
    // The headers actually sent (Origin, Access-Control-Request-Headers on a preflight...).
    Object.assign(entry(e.requestId).requestHeaders, lower(e.headers));
  });
  cdp.on("Network.responseReceived", (e) => {
    const found = entry(e.requestId);
    found.status = e.response.status;
    found.type = e.type ?? found.type;
    found.url ??= e.response.url;
    Object.assign(found.responseHeaders, lower(e.response.headers));
  });
  cdp.on("Network.responseReceivedExtraInfo", (e) => {
    const found = entry(e.requestId);
    found.status ??= e.statusCode;
    found.rawStatus = e.statusCode;
    Object.assign(found.responseHeaders, lower(e.headers));
  });
  cdp.on("Network.loadingFinished", (e) => {
    entry(e.requestId).finished = true;
  });
  cdp.on("Network.loadingFailed", (e) => {
    entry(e.requestId).failed = {
      errorText: e.errorText,
      blockedReason: e.blockedReason ?? null,
      corsError: e.corsErrorStatus?.corsError ?? null,
      corsFailedParameter: e.corsErrorStatus?.failedParameter ?? null,
    };
  });
  await cdp.send("Network.enable");
  return { entries, cdp };
}

async function runOne(browser, run) {
  const result = {
    name: run.name, pageUrl: run.pageUrl, proxyUrl: run.proxyUrl, prompt: run.prompt, summary: null, network: [],
    consoleErrors: [], pageErrors: [], screenshot: null,
  };
  report.runs.push(result);
  const context = await browser.newContext({ viewport: { width: 900, height: 760 } });
  try {
    const page = await context.newPage();
    page.on("console", (msg) => {
      if (msg.type() === "error") result.consoleErrors.push(msg.text());
    });
    page.on("pageerror", (error) => result.pageErrors.push(String(error?.stack ?? error)));
    const { entries } = await recordNetwork(context, page);
    result.network = entries;

    const response = await page.goto(run.pageUrl, { waitUntil: "load", timeout: WAIT_MS });
    if (!response || !response.ok()) throw new Error(`GET ${run.pageUrl} answered ${response?.status()}`);
    // page.js is a module: it marks the page ready once it ran (the SDK bundle loaded).
    await page.waitForFunction(() => document.documentElement.dataset.ready === "true", null, { timeout: WAIT_MS });
    result.summary = run.kind === "driveby"
      ? await page.evaluate((args) => window.runDriveBy(args), { proxyBase: run.proxyUrl })
      : await page.evaluate(
        (args) => window.runSubscribe(args),
        { proxyUrl: run.proxyUrl, prompt: run.prompt, token: run.token ?? null },
      );
    // Let late network events (loadingFinished of the last poll, console messages) land.
    await page.waitForTimeout(100);
    await page.screenshot({ path: run.screenshot, fullPage: true });
    result.screenshot = run.screenshot;
  } finally {
    await context.close().catch(() => {});
  }
}

async function main() {
  const started = Date.now();
  let launched;
  try {
    launched = await launchChromium("fal-cors-chromium-", WAIT_MS);
    const { browser } = launched;
    report.browserVersion = browser.version();
    for (const run of spec.runs) await runOne(browser, run);
    report.ok = true;
  } catch (error) {
    report.ok = false;
    report.failure = String(error?.stack ?? error);
  } finally {
    report.elapsedMs = Date.now() - started;
    await closeChromium(launched);
  }
  process.stdout.write(JSON.stringify(report) + "\n");
  process.exit(report.ok ? 0 : 1);
}

main();
