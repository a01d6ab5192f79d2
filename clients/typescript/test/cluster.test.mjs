// Several endpoints (a cluster's nodes): a request one cannot answer moves to
// the next with the same idempotency key; and a real three-node cluster losing
// its leader under a client that counts every call once.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";

import { QuotadClient } from "../dist/index.js";
import { Daemon, FAST, Proxy, freePort, quotadBin, uniqueSubject } from "./helpers.mjs";

const daemon = new Daemon();
const proxies = [];
before(async () => {
  await daemon.start();
});
after(async () => {
  for (const p of proxies) await p.close();
  await daemon.cleanup();
});

async function proxy(script, upstream = daemon.url) {
  const p = await new Proxy(upstream, script).start();
  proxies.push(p);
  return p;
}

test("a dead endpoint is skipped", async () => {
  const dead = `http://127.0.0.1:${await freePort()}`;
  const q = new QuotadClient({ url: [dead, daemon.url], ...FAST });
  assert.equal(q.retries, 8, "several URLs retry long enough for a failover");
  const s = uniqueSubject();
  assert.ok((await q.consume({ subject: s })).allowed);
  assert.ok((await q.consume({ subject: s })).allowed);
  const view = await q.subject(s);
  q.close();
  assert.equal(view.counters.find((c) => c.limit === "requests-per-day").used, 2);
});

test("a 503 moves to the next endpoint with the same key", async () => {
  const down = await proxy(["503"]);
  const up = await proxy(["pass"]);
  const q = new QuotadClient({ url: [down.url, up.url], ...FAST });
  const d = await q.consume({ subject: uniqueSubject(), amounts: { tokens: 5 } });
  q.close();
  assert.ok(d.allowed);
  const keys = [...down.bodies(), ...up.bodies()].map((b) => b.idempotency_key);
  assert.equal(keys.length, 2);
  assert.equal(new Set(keys).size, 1);
});

test("an empty list of URLs is refused", () => {
  assert.throws(() => new QuotadClient({ url: [] }), /empty list/);
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function getJson(url) {
  return new Promise((resolve) => {
    const req = http.get(url, { timeout: 1000, agent: false }, (res) => {
      let body = "";
      res.on("data", (c) => (body += c));
      res.on("end", () => {
        try {
          resolve(JSON.parse(body));
        } catch {
          resolve(null);
        }
      });
    });
    req.on("timeout", () => req.destroy());
    req.on("error", () => resolve(null));
  });
}

test("a cluster losing its leader counts every call once", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "quotad-ts-cluster-"));
  fs.writeFileSync(path.join(dir, "secret"), "typescript-cluster-secret-0123456789");
  const ports = [];
  for (let i = 0; i < 3; i++) ports.push([await freePort(), await freePort()]);
  const peers = ports.map(([api, raft], i) => `{ id = ${i + 1}, raft = "127.0.0.1:${raft}", api = "http://127.0.0.1:${api}" }`).join(", ");
  const urls = ports.map(([api]) => `http://127.0.0.1:${api}`);
  const children = ports.map(([api, raft], i) => {
    const cfg = path.join(dir, `node${i + 1}.toml`);
    fs.writeFileSync(
      cfg,
      `[server]
listen = ["127.0.0.1:${api}"]
[storage]
data_dir = "${path.join(dir, `node${i + 1}`)}"
[policy]
source = "api"
[log]
level = "warn"
[cluster]
node_id = ${i + 1}
raft_listen = "127.0.0.1:${raft}"
secret_file = "${path.join(dir, "secret")}"
peers = [${peers}]
heartbeat = "50ms"
election_timeout = "500ms"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "calls"
  algorithm = "lifetime"
  max = 1000
`,
    );
    const log = fs.openSync(path.join(dir, `node${i + 1}.log`), "a");
    const child = spawn(quotadBin(), ["serve", "--config", cfg], { stdio: ["ignore", log, log] });
    fs.closeSync(log);
    return child;
  });
  const alive = [true, true, true];
  const leader = async () => {
    const deadline = Date.now() + 30000;
    while (Date.now() < deadline) {
      for (let i = 0; i < 3; i++) {
        if (!alive[i]) continue;
        const v = await getJson(`${urls[i]}/v1/cluster`);
        if (v && v.serving) return i;
      }
      await sleep(50);
    }
    throw new Error("no leader within 30 s");
  };
  try {
    await leader();
    const q = new QuotadClient({ url: urls, backoffMs: 50, maxBackoffMs: 1000, retries: 20 });
    const s = uniqueSubject();
    for (let i = 0; i < 10; i++) assert.ok((await q.consume({ subject: s })).allowed);
    const l = await leader();
    children[l].kill("SIGKILL");
    alive[l] = false;
    for (let i = 0; i < 10; i++) assert.ok((await q.consume({ subject: s })).allowed);
    const view = await q.subject(s);
    q.close();
    assert.equal(view.counters.find((c) => c.limit === "calls").used, 20);
  } finally {
    for (const c of children) c.kill("SIGKILL");
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
