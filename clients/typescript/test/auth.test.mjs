// Bearer tokens: 401 without or with a wrong token, 403 for a client token on
// admin endpoints (a daemon started with [auth] tokens).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Forbidden, Unauthorized } from "../dist/index.js";
import { ADMIN_TOKEN, CLIENT_TOKEN, Daemon, uniqueSubject } from "./helpers.mjs";

const daemon = new Daemon({ auth: true });
before(async () => {
  await daemon.start();
});
after(async () => {
  await daemon.cleanup();
});

for (const transport of ["tcp", "unix"]) {
  describe(`auth over ${transport}`, () => {
    test("no token or a wrong one is 401; probes need none", async () => {
      const q = daemon.client(transport);
      await assert.rejects(q.consume({ subject: uniqueSubject() }), (e) => {
        assert.ok(e instanceof Unauthorized);
        assert.deepEqual([e.status, e.code], [401, "unauthorized"]);
        assert.match(e.detail, /Authorization/);
        return true;
      });
      assert.equal(await q.health(), true);
      assert.equal(await q.ready(), true);
      q.close();
      const w = daemon.client(transport, { token: "not-a-valid-token-at-all" });
      await assert.rejects(w.check({ subject: "x" }), Unauthorized);
      w.close();
    });

    test("401 is not turned into a fallback", async () => {
      const q = daemon.client(transport, { onUnavailable: "allow" });
      await assert.rejects(q.consume({ subject: "x" }), Unauthorized);
      q.close();
    });

    test("a client token decides but cannot administer", async () => {
      const q = daemon.client(transport, { token: CLIENT_TOKEN });
      const s = uniqueSubject();
      assert.ok((await q.consume({ subject: s, amounts: { tokens: 5 } })).allowed);
      await q.withReservation({ subject: s, amounts: { tokens: 5 } }, (h) => {
        h.actual = { tokens: 3 };
      });
      assert.equal((await q.subject(s)).counter("tokens-per-day").used, 8);
      assert.ok((await q.plans()).plans.length);
      assert.match(await q.metrics(), /quotad_/);
      for (const call of [
        () => q.subjects(),
        () => q.setPlan(s, { plan: "pro" }),
        () => q.reset(s),
        () => q.credit(s, "image-credits", 1),
        () => q.deleteSubject(s),
        () => q.reload(),
      ]) {
        await assert.rejects(call(), (e) => e instanceof Forbidden && e.status === 403 && e.code === "forbidden" && /admin/.test(e.detail));
      }
      q.close();
    });

    test("an admin token may do everything", async () => {
      const q = daemon.client(transport, { token: ADMIN_TOKEN });
      const s = uniqueSubject();
      assert.ok((await q.consume({ subject: s })).allowed);
      assert.equal((await q.setPlan(s, { plan: "pro" })).plan, "pro");
      assert.ok((await q.subjects({ limit: 1000 })).subjects.some((e) => e.subject === s));
      assert.equal((await q.reload()).tokens, 2);
      assert.equal((await q.deleteSubject(s)).deleted, true);
      q.close();
    });
  });
}
