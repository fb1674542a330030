// Debian's Chromium, driven by playwright-core (which downloads no browser of its own), with
// the flags this machine needs: background networking off (the network is closed and
// Chromium would retry its own hosts), no sandbox as root, no GPU. Shared by the browser tests.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { chromium } from "playwright-core";

export const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** Launch headless Chromium with a throwaway HOME and cache; pair with closeChromium().
 * `extraArgs`: more command-line flags (e.g. --host-resolver-rules for a test's own hosts). */
export async function launchChromium(prefix, timeout, extraArgs = []) {
  // launch() uses its own fresh temporary profile; the extra dir keeps Chromium's
  // crash/cache files out of $HOME too.
  const userDataDir = mkdtempSync(join(tmpdir(), prefix));
  try {
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: [...CHROMIUM_ARGS, `--disk-cache-dir=${join(userDataDir, "cache")}`, ...extraArgs],
      env: { ...process.env, HOME: userDataDir },
      timeout,
    });
    return { browser, userDataDir };
  } catch (error) {
    rmSync(userDataDir, { recursive: true, force: true });
    throw error;
  }
}

export async function closeChromium(launched) {
  if (!launched) return;
  await launched.browser.close().catch(() => {});
  rmSync(launched.userDataDir, { recursive: true, force: true });
}
