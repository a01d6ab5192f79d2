// Test helpers: real quotad daemons (from $QUOTAD_BIN, default target/debug/quotad
// in the repository) on a free 127.0.0.1 port and a Unix socket in a temp dir,
// and a small scriptable HTTP proxy for retry and SSE tests.

import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { NotFound, InvalidRequest, QuotadClient } from "../dist/index.js";

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, "../../..");
export const ADMIN_TOKEN = "admin-token-for-tests-0123456789";
export const CLIENT_TOKEN = "client-token-for-tests-0123456789";
export const FAST = { backoffMs: 10, maxBackoffMs: 50 };

export function quotadBin() {
  const raw = process.env.QUOTAD_BIN;
  const bin = raw ? path.resolve(raw) : path.join(REPO, "target", "debug", "quotad");
  try {
    fs.accessSync(bin, fs.constants.X_OK);
  } catch {
    throw new Error(`quotad binary not found at ${bin}: build it (cargo build) or set QUOTAD_BIN`);
  }
  return bin;
}

const AUTH = `
[auth]
tokens = [{ role = "admin", token = "${ADMIN_TOKEN}" }, { role = "client", token = "${CLIENT_TOKEN}" }]
`;

// The policy is changed through the API (PUT /v1/policy, /v1/plans/{name}, …);
// the file's policy only seeds version 1 of the empty data directory.
const POLICY_FROM_API = `
[policy]
source = "api"
`;

function historySection(dimensions) {
  if (!dimensions) return "";
  return `[history]\ndimensions = [${dimensions.map((d) => JSON.stringify(d)).join(", ")}]\n`;
}

function config({ listen, dataDir, auth, policyApi, dimensions, extra }) {
  return `
metrics = ["cost_micros"]

[server]
listen = [${listen}]

[storage]
data_dir = "${dataDir}"
durability = "batch"
flush_interval_ms = 2

[engine]
reservation_ttl_default = "60s"
reservation_ttl_max = "1h"

[log]
level = "warn"

${auth ? AUTH : ""}

${policyApi ? POLICY_FROM_API : ""}

${historySection(dimensions)}

[[limits]]
name = "global-tokens"
metric = "tokens"
scope = "global"
algorithm = "token_bucket"
max = 1000000
refill = 1000000
period = "1m"

[[plans]]
name = "free"
default = true

  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 10000

  [[plans.limits]]
  name = "requests-per-day"
  period = "1d"
  max = 1000

  [[plans.limits]]
  name = "gpt4o-tokens-per-hour"
  metric = "tokens"
  match = { event = "llm.*", attributes = { model = "gpt-4o" } }
  algorithm = "sliding"
  period = "1h"
  max = 5000
  mode = "degrade"

  [[plans.limits]]
  name = "image-credits"
  match = { event = "image.render" }
  algorithm = "lifetime"
  max = 3

[[plans]]
name = "pro"

  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 100000

  [[plans.limits]]
  name = "requests-per-day"
  period = "1d"
  max = 10000

  [[plans.limits]]
  name = "image-credits"
  match = { event = "image.render" }
  algorithm = "lifetime"
  max = 100
${extra ?? ""}`;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function get(url, timeoutMs) {
  return new Promise((resolve) => {
    const req = http.get(url, { timeout: timeoutMs, agent: false }, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode));
    });
    req.on("timeout", () => req.destroy());
    req.on("error", () => resolve(0));
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const running = new Set();
process.on("exit", () => {
  for (const child of running) {
    try {
      child.kill("SIGKILL");
    } catch {}
  }
});

/**
 * One quotad on 127.0.0.1:<free port> and <tmp>/quotad.sock. `policyApi`:
 * `[policy] source = "api"` (policy writes allowed). `dimensions`: `[history]
 * dimensions` (usage kept per value of these attributes, for groupBy).
 * `extra`: TOML appended to the config (more `[[limits]]`).
 */
export class Daemon {
  constructor({ auth = false, policyApi = false, dimensions = null, extra = "" } = {}) {
    this.auth = auth;
    this.policyApi = policyApi;
    this.dimensions = dimensions;
    this.extra = extra;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), "quotad-ts-"));
    this.socket = path.join(this.dir, "quotad.sock");
    this.logPath = path.join(this.dir, "quotad.log");
    this.port = 0;
    this.child = null;
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    const bin = quotadBin();
    for (let attempt = 0; attempt < 5; attempt++) {
      this.port = await freePort();
      const cfg = path.join(this.dir, "quotad.toml");
      fs.writeFileSync(
        cfg,
        config({
          listen: `"127.0.0.1:${this.port}", "unix:${this.socket}"`,
          dataDir: path.join(this.dir, "data"),
          auth: this.auth,
          policyApi: this.policyApi,
          dimensions: this.dimensions,
          extra: this.extra,
        }),
      );
      const log = fs.openSync(this.logPath, "a");
      const child = spawn(bin, ["serve", "--config", cfg], { cwd: this.dir, stdio: ["ignore", log, log] });
      fs.closeSync(log);
      this.child = child;
      running.add(child);
      child.on("exit", () => running.delete(child));
      if (await this.#waitReady(30000)) return this;
      const code = child.exitCode;
      await this.stop();
      if (code !== 3) break; // 3: the address could not be bound; try another port
    }
    throw new Error(`quotad did not become ready; log:\n${this.log()}`);
  }

  async #waitReady(timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (!this.child || this.child.exitCode !== null || this.child.signalCode !== null) return false;
      if ((await get(`${this.url}/readyz`, 1000)) === 200) return true;
      await sleep(50);
    }
    return false;
  }

  log() {
    try {
      return fs.readFileSync(this.logPath, "utf8").slice(-4000);
    } catch {
      return "(no log)";
    }
  }

  async stop() {
    const child = this.child;
    this.child = null;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 20000);
    await exited;
    clearTimeout(timer);
  }

  async cleanup() {
    await this.stop();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  client(transport, options = {}) {
    return transport === "unix" ? new QuotadClient({ socketPath: this.socket, ...options }) : new QuotadClient({ url: this.url, ...options });
  }
}

export function uniqueSubject(prefix = "test") {
  return `${prefix}:${randomUUID().replace(/-/g, "").slice(0, 16)}`;
}

export const SKIPPED = Symbol("skipped");

/** Runs `fn`; skips the test when the daemon answers 404 not_found (an endpoint it does not serve yet). */
export async function served(t, fn, what) {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof NotFound && e.code === "not_found") {
      t.skip(`${what}: not served by this quotad yet (404 not_found)`);
      return SKIPPED;
    }
    throw e;
  }
}

/** Runs `fn`; skips when the daemon rejects the request field as unknown (not accepted yet). */
export async function accepted(t, fn, field) {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof InvalidRequest && (e.detail.includes(`unknown field "${field}"`) || e.detail.includes(`unknown field \`${field}\``))) {
      t.skip(`request field \`${field}\`: not accepted by this quotad yet (400 unknown field)`);
      return SKIPPED;
    }
    throw e;
  }
}

/**
 * An HTTP server on 127.0.0.1 answering each request by the next step of
 * `script`: "503", "drop" (close without answering), "pass" (forward to
 * `upstream`), or a string starting with "sse:" (served as text/event-stream).
 */
export class Proxy {
  constructor(upstream, script = []) {
    this.upstream = upstream;
    this.script = [...script];
    this.requests = [];
    this.sockets = new Set();
    this.server = http.createServer((req, res) => this.#handle(req, res));
    this.server.on("connection", (s) => {
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
    });
  }

  async start() {
    await new Promise((r) => this.server.listen(0, "127.0.0.1", r));
    this.url = `http://127.0.0.1:${this.server.address().port}`;
    return this;
  }

  bodies() {
    return this.requests.filter((r) => r.body.length).map((r) => JSON.parse(r.body));
  }

  async #handle(req, res) {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const body = Buffer.concat(chunks);
    this.requests.push({ method: req.method, path: req.url, headers: req.headers, body: body.toString("utf8") });
    const step = this.script.length ? this.script.shift() : "pass";
    if (step === "drop") {
      req.socket.destroy();
      return;
    }
    if (step === "503") {
      const data = JSON.stringify({ error: { code: "unavailable", message: "scripted outage" } });
      res.writeHead(503, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(data) });
      res.end(data);
      return;
    }
    if (typeof step === "string" && step.startsWith("sse:")) {
      res.writeHead(200, { "Content-Type": "text/event-stream", Connection: "close" });
      res.end(step.slice(4));
      return;
    }
    const u = new URL(this.upstream);
    const headers = { ...req.headers };
    delete headers.host;
    const up = http.request(
      { hostname: u.hostname, port: u.port, method: req.method, path: req.url, headers, agent: false },
      (ur) => {
        const out = [];
        ur.on("data", (c) => out.push(c));
        ur.on("end", () => {
          const h = {};
          for (const [k, v] of Object.entries(ur.headers)) {
            if (/^(content-type|x-ratelimit-|retry-after|idempotent-replayed)/.test(k)) h[k] = v;
          }
          const data = Buffer.concat(out);
          h["content-length"] = data.length;
          res.writeHead(ur.statusCode, h);
          res.end(data);
        });
      },
    );
    up.on("error", () => req.socket.destroy());
    up.end(body);
  }

  async close() {
    for (const s of this.sockets) s.destroy();
    await new Promise((r) => this.server.close(r));
  }
}

export function sse(...events) {
  let out = "sse:";
  for (const [seq, type, data] of events) out += `id: ${seq}\nevent: ${type}\ndata: ${JSON.stringify(data)}\n\n`;
  return out;
}
