// Open the proxy's dashboard (proxy/dashboard/static/) in a real headless Chromium, wait until
// it shows a snapshot with the expected number of requests, and read its figures from the DOM.
//
//   node dashboard.mjs <page-url> <screenshot.png> <expected-requests-total> [user:password]
//
// Waits (on the page's DOM: body[data-updated] and body[data-requests-total]; no sleeps) until
// the page has drawn a snapshot whose request total is the expected one, then reads every
// [data-key] figure, the per-app, refusal and near-limit table rows (their data-* attributes:
// exact values), records console errors, page errors and CSP violations, and takes a
// full-page screenshot. Prints ONE JSON object on stdout; exits 0 when the page got there, 1
// otherwise, 2 on bad usage. With user:password, the browser answers the Basic challenge.

import { CHROMIUM, closeChromium, launchChromium } from "./chromium.mjs";

const WAIT_MS = 30000;
const [pageUrl, screenshotPath, expected, credentials] = process.argv.slice(2);
if (!pageUrl || !screenshotPath || expected === undefined) {
  console.error("usage: node dashboard.mjs <page-url> <screenshot.png> <expected-requests-total> [user:password]");
  process.exit(2);
}

const report = {
  ok: false,
  url: pageUrl,
  chromium: CHROMIUM,
  figures: {},
  body: {},
  apps: [],
  refusals: [],
  near: [],
  charts: 0,
  consoleErrors: [],
  pageErrors: [],
  cspViolations: [],
  screenshot: null,
};

async function read(page) {
  Object.assign(report, await page.evaluate(() => {
    const figures = {};
    for (const el of document.querySelectorAll("[data-key]")) figures[el.dataset.key] = el.dataset.value ?? null;
    const rows = (selector) => [...document.querySelectorAll(`${selector} tbody tr`)].map((tr) => ({ ...tr.dataset }));
    return {
      figures,
      body: { ...document.body.dataset },
      apps: rows("#apps"),
      refusals: rows("#refusals"),
      near: rows("#near"),
      charts: document.querySelectorAll(".chart svg polyline").length,
      connection: document.getElementById("connection")?.dataset.state ?? null,
      cspViolations: window.__csp ?? [],
    };
  }));
}

async function main() {
  let launched;
  try {
    launched = await launchChromium("fal-dashboard-chromium-", WAIT_MS);
    const options = { viewport: { width: 1280, height: 900 } };
    if (credentials) {
      const [username, ...rest] = credentials.split(":");
      options.httpCredentials = { username, password: rest.join(":") };
    }
    const context = await launched.browser.newContext(options);
    const page = await context.newPage();
    await page.addInitScript(() => {
      window.__csp = [];
      document.addEventListener("securitypolicyviolation", (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
    });
    page.on("console", (msg) => { if (msg.type() === "error") report.consoleErrors.push(msg.text()); });
    page.on("pageerror", (error) => report.pageErrors.push(String(error?.stack ?? error)));
    const response = await page.goto(pageUrl, { waitUntil: "load", timeout: WAIT_MS });
    if (!response || !response.ok()) throw new Error(`GET ${pageUrl} answered ${response?.status()}`);
    report.csp = response.headers()["content-security-policy"] ?? null;
    await page.waitForFunction(
      (want) => Number(document.body.dataset.updated) > 0 && document.body.dataset.requestsTotal === want,
      expected,
      { timeout: WAIT_MS, polling: "raf" },
    );
    await read(page);
    await page.screenshot({ path: screenshotPath, fullPage: true });
    report.screenshot = screenshotPath;
    report.ok = true;
  } catch (error) {
    report.failure = String(error?.stack ?? error);
    try {
      const [page] = launched?.browser.contexts()[0]?.pages() ?? [];
      if (page) {
        await read(page);
        await page.screenshot({ path: screenshotPath, fullPage: true });
        report.screenshot = screenshotPath;
      }
    } catch {
      // keep the original failure
    }
  } finally {
    await closeChromium(launched);
  }
  process.stdout.write(JSON.stringify(report) + "\n");
  process.exit(report.ok ? 0 : 1);
}

main();
