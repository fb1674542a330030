// The README's Next.js recipe ("Behind your app's dev server"): the SDK's route and the
// realtime sockets rewritten to the proxy. FAL_PROXY_URL: where the proxy listens.
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";

const proxy = process.env.FAL_PROXY_URL ?? "http://127.0.0.1:8787";

export default {
  async rewrites() {
    return [
      { source: "/api/fal/:path*", destination: `${proxy}/api/fal/:path*` },
      { source: "/fal-ai/:path*/realtime", destination: `${proxy}/fal-ai/:path*/realtime` },
    ];
  },
  // Not part of the recipe: the page imports ../shared/ (outside this directory), and a
  // test run must leave the tree as it was (no AGENTS.md written by `next dev`).
  turbopack: { root: dirname(dirname(fileURLToPath(import.meta.url))) },
  agentRules: false,
  devIndicators: false, // its badge would cover part of the test's screenshot
  experimental: { agentUpgrade: false },
};
