// Bundle the pinned @fal-ai/client (tests/sdk/package-lock.json) into ONE browser ES
// module for the demo page: proxy/demo/static/fal-client.js.
//
//   node build-demo-bundle.mjs [output-path]
//
// Without an argument it writes the vendored file; tests/e2e/test_demo_bundle.py passes
// a temporary path and checks the result is byte-identical to the committed file, so the
// vendored copy cannot drift from the lockfile. The output depends only on the installed
// packages and the pinned esbuild: no timestamps, no absolute paths, no source map.
//
// The bundle carries a banner naming the package, its version and license, and a footer
// with the license text of every package that ended up in it (MIT/ISC/BSD all ask for
// the notice to travel with the code).

import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

import * as esbuild from "esbuild";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..", "..");
const DEFAULT_OUT = join(ROOT, "proxy", "demo", "static", "fal-client.js");
const SCRIPT = "tests/sdk/build-demo-bundle.mjs";

// What the demo page imports. Keep this list small: everything re-exported is kept.
const ENTRY = `export { ApiError, ValidationError, createFalClient, fal } from "@fal-ai/client";\n`;

function readPackage(dir) {
  return JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
}

/** The package directory (under node_modules) that holds an esbuild input path. */
function packageDirOf(inputPath) {
  const parts = inputPath.split(/[\\/]/);
  const at = parts.lastIndexOf("node_modules");
  if (at < 0) return null;
  const scoped = parts[at + 1]?.startsWith("@");
  const name = scoped ? `${parts[at + 1]}/${parts[at + 2]}` : parts[at + 1];
  return { name, dir: join(HERE, ...parts.slice(0, at + 1), ...name.split("/")) };
}

// Packages whose npm tarball ships no license file: the notice from their repository.
const MISSING_LICENSE_FILES = {
  robot3: `BSD 2-Clause License (from https://github.com/matthewp/robot; the npm package ships no LICENSE file)

Copyright (c) 2019, Matthew Phillips
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.`,
};

function licenseText(name, dir) {
  for (const file of ["LICENSE", "LICENSE.md", "LICENSE.txt", "license", "LICENCE"]) {
    try {
      return readFileSync(join(dir, file), "utf8").trim();
    } catch {
      // try the next name
    }
  }
  return MISSING_LICENSE_FILES[name] ?? null;
}

function fail(message) {
  throw new Error(message);
}

/** Make text safe inside a block comment. */
function commentSafe(text) {
  return text.replaceAll("*/", "* /").replaceAll("\r\n", "\n");
}

async function build(outPath) {
  const client = readPackage(join(HERE, "node_modules", "@fal-ai", "client"));
  const options = {
    stdin: { contents: ENTRY, resolveDir: HERE, sourcefile: "demo-entry.js", loader: "js" },
    bundle: true,
    format: "esm",
    platform: "browser",
    target: "es2020",
    minify: true,
    legalComments: "none", // the footer carries the full license texts instead
    charset: "utf8",
    metafile: true,
    write: false,
    logLevel: "warning",
    absWorkingDir: HERE,
  };

  // First pass: find out which packages end up in the bundle.
  const probe = await esbuild.build(options);
  const packages = new Map();
  for (const input of Object.keys(probe.metafile.inputs).sort()) {
    const found = packageDirOf(input);
    if (found && !packages.has(found.name)) packages.set(found.name, found.dir);
  }
  const included = [...packages.entries()]
    .map(([name, dir]) => {
      const pkg = readPackage(dir);
      return { name, version: pkg.version, license: pkg.license, text: licenseText(name, dir) };
    })
    .sort((a, b) => (a.name === client.name ? -1 : b.name === client.name ? 1 : a.name.localeCompare(b.name)));

  const others = included.filter((p) => p.name !== client.name);
  const banner = [
    "/*!",
    ` * ${client.name} ${client.version} (${client.license} License), https://github.com/fal-ai/fal-js`,
    ...(others.length
      ? [` * bundled with: ${others.map((p) => `${p.name} ${p.version} (${p.license})`).join(", ")}`]
      : []),
    " * License texts: see the comment at the end of this file.",
    ` * Browser ES module generated by ${SCRIPT} with esbuild ${esbuild.version}, do not edit.`,
    " * Rebuild: npm ci --prefix tests/sdk && node tests/sdk/build-demo-bundle.mjs",
    " */",
  ].join("\n");
  const footer = [
    "/*!",
    ...included.flatMap((p) => [
      ` * ---- ${p.name} ${p.version} (${p.license}) ----`,
      ...commentSafe(p.text ?? fail(`${p.name} ships no license file; add its notice to MISSING_LICENSE_FILES`))
        .split("\n")
        .map((line) => (line ? ` * ${line}` : " *")),
    ]),
    " */",
  ].join("\n");

  const result = await esbuild.build({ ...options, metafile: false, banner: { js: banner }, footer: { js: footer } });
  const [file] = result.outputFiles;
  writeFileSync(outPath, file.contents);
  const shown = relative(process.cwd(), outPath) || outPath;
  console.error(
    `wrote ${shown.split(sep).join("/")} (${file.contents.length} bytes; ${included
      .map((p) => `${p.name}@${p.version}`)
      .join(", ")})`,
  );
}

const out = resolve(process.argv[2] ?? DEFAULT_OUT);
build(out).catch((error) => {
  console.error(error);
  process.exit(1);
});
