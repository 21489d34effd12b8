// Unit tests against an in-process fake sidecar on 127.0.0.1.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

import { AckError, AckResult, DedupClient, PROTO_PATH, PublishError, deriveKey } from "../src/index.js";

const definition = protoLoader.loadSync(PROTO_PATH, { longs: Number, enums: String, defaults: true, oneofs: true });
const { DedupService } = grpc.loadPackageDefinition(definition).dedup.v1;

/** What the fake was asked, and how it answers. */
const fake = {
  ackCalls: [],
  auth: [],
  ackStatus: null,
  ackFails: 0,
  published: [],
  frames: [],
};

const server = new grpc.Server();
server.addService(DedupService.service, {
  Ack(call, callback) {
    fake.ackCalls.push(call.request.deliveryIds);
    fake.auth.push(...call.metadata.get("authorization"));
    if (fake.ackStatus !== null) {
      callback({ code: fake.ackStatus, details: "store unavailable" });
      return;
    }
    if (fake.ackFails > 0) {
      fake.ackFails--;
      callback({ code: grpc.status.UNAVAILABLE, details: "the dedup store is unreachable" });
      return;
    }
    callback(null, {
      results: call.request.deliveryIds.map((id) => (id === "unknown" ? "ACK_RESULT_UNKNOWN" : "ACK_RESULT_OK")),
    });
  },
  Subscribe(call) {
    if (call.request.maxInFlight !== 7) {
      call.emit("error", { code: grpc.status.INVALID_ARGUMENT, details: "expected max_in_flight 7" });
      return;
    }
    for (const frame of fake.frames) call.write(frame);
    call.end();
  },
  StreamingPublish(call) {
    call.on("data", (req) => {
      fake.published.push(req.publish);
      const r = { requestId: req.requestId };
      if (req.publish.topic === "missing") {
        Object.assign(r, { code: grpc.status.NOT_FOUND, message: "topic 'missing' does not exist" });
      } else {
        r.response = { idempotencyKey: req.publish.idempotencyKey, topic: req.publish.topic, offset: fake.published.length };
      }
      call.write({ results: [r] });
    });
    call.on("end", () => call.end());
  },
  PublishBatch(call, callback) {
    const results = call.request.entries.map((e, i) => {
      fake.published.push(e);
      if (e.topic === "missing") {
        return { code: grpc.status.NOT_FOUND, message: "topic 'missing' does not exist" };
      }
      return { response: { idempotencyKey: e.idempotencyKey, topic: e.topic, partition: 1, offset: 100 + i } };
    });
    callback(null, { results });
  },
});

let target = "";
before(async () => {
  const port = await new Promise((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  target = `127.0.0.1:${port}`;
});
after(() => server.forceShutdown());

function reset() {
  fake.ackCalls = [];
  fake.auth = [];
  fake.ackStatus = null;
  fake.ackFails = 0;
  fake.published = [];
}

test("acks are gathered into calls of at most ackMaxIds, each ack with its own result", async () => {
  reset();
  const client = new DedupClient(target, { ackLingerMs: 60_000, ackMaxIds: 100 });
  const pending = [];
  for (let i = 0; i < 250; i++) pending.push(client.ack(deriveKey("d", i)));
  pending.push(client.ack("unknown"));
  await client.flushAcks(); // two calls went at 100 ids; the last 51 wait for the linger or a flush
  assert.deepEqual(
    fake.ackCalls.map((c) => c.length),
    [100, 100, 51],
  );
  const results = await Promise.all(pending);
  assert.deepEqual(results.slice(0, 250), Array(250).fill(AckResult.OK));
  assert.equal(results[250], AckResult.UNKNOWN);
  await client.close();
});

test("acks within the linger share one call, and carry the token", async () => {
  reset();
  const client = new DedupClient(target, { ackLingerMs: 20, token: "s3cret" });
  const results = await Promise.all([0, 1, 2, 3, 4].map((i) => client.ack(deriveKey("d", i))));
  assert.deepEqual(results, Array(5).fill(AckResult.OK));
  assert.equal(fake.ackCalls.length, 1);
  assert.deepEqual(fake.auth, ["Bearer s3cret"]);
  await client.close();
});

test("a failed Ack call rejects each of its acks with the status, and an ignored ack does not crash", async () => {
  reset();
  fake.ackStatus = grpc.status.UNAVAILABLE;
  const client = new DedupClient(target, { ackRetryMs: 300 });
  client.ack("ignored"); // nobody waits for this one: must not become an unhandled rejection
  await assert.rejects(client.ack("x"), (err) => err instanceof AckError && err.code === grpc.status.UNAVAILABLE);
  assert.ok(fake.ackCalls.length >= 2, `the UNAVAILABLE ack was not retried: ${fake.ackCalls.length} calls`);
  await client.close();
});

test("an ack that fails with UNAVAILABLE is retried until it lands, not past its deadline", async () => {
  for (const plainAcks of [false, true]) {
    reset();
    fake.ackFails = 3;
    const client = new DedupClient(target, { plainAcks });
    assert.equal(await client.ack("x", Date.now() + 60_000), AckResult.OK);
    assert.equal(fake.ackCalls.length, 4);
    await client.close();
  }
  reset();
  fake.ackStatus = grpc.status.UNAVAILABLE;
  const client = new DedupClient(target, { plainAcks: true });
  const deadline = Date.now() + 300;
  await assert.rejects(client.ack("x", deadline), (err) => err instanceof AckError);
  assert.ok(Date.now() - deadline < 500, "retried past the delivery's deadline");
  await client.close();
});

test("streaming publishes share one StreamingPublish call and each gets its answer", async () => {
  reset();
  const client = new DedupClient(target, { streaming: true });
  const outcomes = await Promise.allSettled(
    Array.from({ length: 40 }, (_, i) =>
      client.publish({ topic: i === 7 ? "missing" : "t", value: "v", idempotencyKey: deriveKey("k", i) }),
    ),
  );
  outcomes.forEach((o, i) => {
    if (i === 7) {
      assert.equal(o.status, "rejected");
      assert.ok(o.reason instanceof PublishError && o.reason.code === grpc.status.NOT_FOUND);
    } else {
      assert.equal(o.status, "fulfilled");
      assert.equal(o.value.idempotencyKey, deriveKey("k", i));
    }
  });
  assert.equal(fake.published.length, 40);
  await client.close();
});

test("plain acks make one call each", async () => {
  reset();
  const client = new DedupClient(target, { plainAcks: true });
  for (let i = 0; i < 3; i++) assert.equal(await client.ack(deriveKey("d", i)), AckResult.OK);
  assert.equal(fake.ackCalls.length, 3);
  await client.close();
});

test("frames yield the stream's deliveries, with an absent key as null; a refused stream rejects", async () => {
  reset();
  fake.frames = [
    { deliveries: [{ deliveryId: "a", value: Buffer.from("1"), offset: 5 }, { deliveryId: "b" }] },
    { deliveries: [{ deliveryId: "c", key: Buffer.alloc(0) }] },
  ];
  const client = new DedupClient(target);
  const seen = [];
  for await (const frame of client.frames({ maxInFlight: 7 })) seen.push(...frame);
  assert.deepEqual(
    seen.map((m) => m.deliveryId),
    ["a", "b", "c"],
  );
  assert.equal(seen[0].offset, 5);
  assert.equal(seen[0].value.toString(), "1");
  assert.equal(seen[1].key, null);
  assert.deepEqual(seen[2].key, Buffer.alloc(0));

  await assert.rejects(
    (async () => {
      for await (const _ of client.subscribe({ maxInFlight: 1 })) {
        // nothing arrives
      }
    })(),
    (err) => err.code === grpc.status.INVALID_ARGUMENT,
  );
  await client.close();
});

test("publishBatch gives each entry its outcome and carries optional fields as given", async () => {
  reset();
  const client = new DedupClient(target);
  const out = await client.publishBatch([
    { topic: "orders", value: "a", idempotencyKey: "k1", partition: 0 },
    { topic: "missing", value: "b", idempotencyKey: "k2" },
    { topic: "orders", value: Buffer.from("c"), key: "user-1", idempotencyKey: "k3" },
  ]);
  assert.deepEqual(out[0], { idempotencyKey: "k1", topic: "orders", partition: 1, offset: 100, duplicate: false });
  assert.ok(out[1] instanceof PublishError);
  assert.equal(out[1].code, grpc.status.NOT_FOUND);
  assert.match(out[1].message, /NOT_FOUND: topic 'missing' does not exist/);
  assert.equal(out[2].offset, 102);
  const [first, second, third] = fake.published;
  assert.equal(first._partition, "partition"); // partition 0 was set, not left to the partitioner
  assert.equal(second._partition, undefined);
  assert.equal(first._key, undefined);
  assert.equal(third.key.toString(), "user-1");
  await client.close();
});

test("deriveKey matches the Python and Go clients", () => {
  assert.equal(deriveKey("order-7", 2), "order-7/2");
});
