// The README's Vite recipe ("Behind your app's dev server"): the SDK's route and the
// realtime sockets forwarded to the proxy. FAL_PROXY_URL: where the proxy listens.
const proxy = process.env.FAL_PROXY_URL ?? "http://127.0.0.1:8787";

export default {
  server: {
    proxy: {
      // An object, not the string shorthand: that one sets changeOrigin, so the proxy would
      // see its own Host, not the page's, and refuse the page's Origin (403 origin_refused).
      "/api/fal": { target: proxy },
      "^/fal-ai/.*/realtime$": { target: proxy.replace(/^http/, "ws"), ws: true },
    },
  },
};
