// Drive the demo page (proxy/demo/static/) in a real headless Chromium.
//
//   node browser-demo.mjs <page-url> <screenshot.png> [prompt]
//   node browser-demo.mjs --empty-prompt <page-url> <screenshot.png>
//
// Default mode: type the prompt, click Generate, wait (30 s) for #result-image to be
// loaded (naturalWidth > 0), recording every value #status takes on the way.
// --empty-prompt: click Generate with an empty prompt and wait for the fal
// ValidationError (HTTP 422) to show in #error.
//
// Uses playwright-core (no bundled browser) with Debian's Chromium: /usr/bin/chromium, or
// $CHROMIUM_PATH. Prints ONE JSON object on stdout: { ok, mode, statuses, logs, requestId,
// image, error, consoleErrors, pageErrors, requests, ... }. Exits 0 when the mode's
// expectation held, 1 otherwise (the JSON then has `ok: false` and `failure`), 2 on bad usage.


import { CHROMIUM, closeChromium, launchChromium } from "./chromium.mjs";

const WAIT_MS = 30000;

const argv = process.argv.slice(2);
const emptyPrompt = argv.includes("--empty-prompt");
const positional = argv.filter((a) => a !== "--empty-prompt");
const [pageUrl, screenshotPath, promptArg] = positional;
if (!pageUrl || !screenshotPath || positional.length > 3) {
  console.error(
    "usage: node browser-demo.mjs <page-url> <screenshot.png> [prompt]\n" +
      "       node browser-demo.mjs --empty-prompt <page-url> <screenshot.png>",
  );
  process.exit(2);
}
const prompt = emptyPrompt ? "" : (promptArg ?? "a red fox in the snow, watercolor");

const report = {
  ok: false,
  mode: emptyPrompt ? "empty-prompt" : "generate",
  url: pageUrl,
  prompt,
  chromium: CHROMIUM,
  browserVersion: null,
  statuses: [],
  finalStatus: null,
  logs: [],
  requestId: "",
  image: null,
  error: null,
  bannerText: null,
  consoleErrors: [],
  pageErrors: [],
  requests: [],
  screenshot: null,
  elapsedMs: null,
};

/** Wait for the page to settle: the image loaded, or the error box shown. */
async function waitForOutcome(page) {
  await page.waitForFunction(
    () => {
      const img = document.getElementById("result-image");
      const error = document.getElementById("error");
      return (img?.complete && img.naturalWidth > 0) || (error && !error.hidden);
    },
    null,
    { timeout: WAIT_MS, polling: 100 },
  );
}

async function collect(page) {
  Object.assign(
    report,
    await page.evaluate(() => {
      const img = document.getElementById("result-image");
      const error = document.getElementById("error");
      return {
        statuses: window.__statusHistory ?? [],
        finalStatus: document.getElementById("status")?.textContent ?? null,
        logs: [...document.querySelectorAll("#logs li")].map((li) => ({
          level: li.querySelector(".level")?.textContent ?? "",
          message: li.querySelector(".message")?.textContent ?? li.textContent,
        })),
        requestId: document.getElementById("request-id")?.textContent.trim() ?? "",
        image:
          img && img.getAttribute("src")
            ? { src: img.currentSrc || img.src, complete: img.complete, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight, alt: img.alt }
            : null,
        error: error && !error.hidden ? error.innerText.trim() : null,
        bannerText: document.getElementById("demo-banner")?.innerText.trim() ?? null,
      };
    }),
  );
}

async function main() {
  const started = Date.now();
  let launched;
  try {
    launched = await launchChromium("fal-demo-chromium-", WAIT_MS);
    const { browser } = launched;
    report.browserVersion = browser.version();
    const context = await browser.newContext({ viewport: { width: 1000, height: 800 } });
    const page = await context.newPage();
    page.on("console", (msg) => {
      if (msg.type() === "error") report.consoleErrors.push(msg.text());
    });
    page.on("pageerror", (error) => report.pageErrors.push(String(error?.stack ?? error)));
    const byRequest = new Map();
    page.on("request", (request) => {
      const entry = { method: request.method(), url: request.url(), status: null };
      byRequest.set(request, entry);
      report.requests.push(entry);
    });
    page.on("response", (response) => {
      const entry = byRequest.get(response.request());
      if (entry) entry.status = response.status();
    });
    page.on("requestfailed", (request) => {
      const entry = byRequest.get(request);
      if (entry) entry.failure = request.failure()?.errorText ?? "failed";
    });

    const response = await page.goto(pageUrl, { waitUntil: "load", timeout: WAIT_MS });
    if (!response || !response.ok()) throw new Error(`GET ${pageUrl} answered ${response?.status()}`);
    // demo.js is a module: it marks the page ready once it ran (the SDK bundle loaded).
    await page.waitForFunction(() => document.documentElement.dataset.ready === "true", null, { timeout: WAIT_MS });

    // Record every status the page shows, however briefly.
    await page.evaluate(() => {
      const el = document.getElementById("status");
      window.__statusHistory = [];
      const record = () => {
        const value = el.textContent.trim();
        const history = window.__statusHistory;
        if (history[history.length - 1] !== value) history.push(value);
      };
      new MutationObserver(record).observe(el, { childList: true, characterData: true, subtree: true });
    });

    await page.getByLabel("Prompt").fill(prompt);
    await page.click("#generate");
    await waitForOutcome(page);
    await collect(page);

    if (emptyPrompt) {
      if (!report.error) throw new Error("no error shown for an empty prompt");
      if (!/422/.test(report.error)) throw new Error(`the error box does not mention HTTP 422: ${report.error}`);
      if (!/ValidationError/.test(report.error)) throw new Error(`the error box does not name ValidationError: ${report.error}`);
      if (report.image) throw new Error("an image appeared for an empty prompt");
    } else {
      if (report.error) throw new Error(`the page shows an error: ${report.error}`);
      if (!(report.image?.naturalWidth > 0)) throw new Error("the result image did not load");
    }
    report.ok = true;
    await page.screenshot({ path: screenshotPath, fullPage: true });
    report.screenshot = screenshotPath;
  } catch (error) {
    report.ok = false;
    report.failure = String(error?.stack ?? error);
    // Best effort: state and a screenshot of where it got stuck.
    try {
      const [page] = browser?.contexts()[0]?.pages() ?? [];
      if (page) {
        await collect(page);
        await page.screenshot({ path: screenshotPath, fullPage: true });
        report.screenshot = screenshotPath;
      }
    } catch {
      // keep the original failure
    }
  } finally {
    report.elapsedMs = Date.now() - started;
    await closeChromium(launched);
  }
  process.stdout.write(JSON.stringify(report) + "\n");
  process.exit(report.ok ? 0 : 1);
}

main();
