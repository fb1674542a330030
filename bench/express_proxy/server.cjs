// fal's own proxy (@fal-ai/server-proxy, its Express handler, as its README sets it up) as
// the yardstick of bench/run.py: the same small POSTs, on the same pinned CPU, as ours.
//
// It can only send to https://fal.run and friends, so the one thing changed is fetch: a
// URL on fal.run goes to the bench's fake gateway (BENCH_GATEWAY_URL) instead, as our proxy
// turns https://fal.run/<path> into <gateway>/<path>. Listens on 127.0.0.1 (port from
// --port, 0 for any) and prints {"event": "listening", "port": N}.
"use strict";
const express = require("express");
const falProxy = require("@fal-ai/server-proxy/express");

const gateway = (process.env.BENCH_GATEWAY_URL || "").replace(/\/+$/, "");
if (!gateway || !process.env.FAL_KEY) {
  console.error("set BENCH_GATEWAY_URL and FAL_KEY");
  process.exit(2);
}
const realFetch = globalThis.fetch;
globalThis.fetch = (url, init) =>
  realFetch(String(url).replace(/^https:\/\/fal\.run(?=\/)/, gateway), init);

const portFlag = process.argv.indexOf("--port");
const port = portFlag > 0 ? Number(process.argv[portFlag + 1]) : 0;
const app = express();
app.use(express.json());
app.all(falProxy.route, falProxy.createHandler());
const server = app.listen(port, "127.0.0.1", () => {
  console.log(JSON.stringify({ event: "listening", port: server.address().port }));
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
