// Publishes records through a sidecar, publishes some of them again, then consumes and acks
// them all: the whole client surface against a real sidecar. Prints one JSON line of counts;
// tests/integration/test_other_clients.py checks them against Kafka.
//
//   node examples/roundtrip.js --target 127.0.0.1:50051 --topic orders --n 200
import { parseArgs } from "node:util";

import { AckResult, DedupClient, PublishError } from "../src/index.js";

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    topic: { type: "string" },
    n: { type: "string", default: "100" },
    again: { type: "string", default: "10" },
    token: { type: "string", default: "" },
    // one publish() per record, on a StreamingPublish call (the client's streaming option)
    streaming: { type: "boolean", default: false },
    "tls-ca": { type: "string" },
    "tls-cert": { type: "string" },
    "tls-key": { type: "string" },
    "tls-server-name": { type: "string" },
  },
});
if (!args.topic) {
  console.error("roundtrip: --topic is required");
  process.exit(2);
}
const n = Number(args.n);
const again = Number(args.again);

async function run() {
  const summary = { published: 0, duplicates: 0, received: 0, acked: 0 };
  const tls =
    args["tls-ca"] || args["tls-cert"]
      ? {
          caFile: args["tls-ca"],
          certFile: args["tls-cert"],
          keyFile: args["tls-key"],
          serverName: args["tls-server-name"],
        }
      : undefined;
  const client = new DedupClient(args.target, { token: args.token || undefined, tls, streaming: args.streaming });
  try {
    const records = Array.from({ length: n }, (_, i) => ({
      topic: args.topic,
      value: `value-${i}`,
      idempotencyKey: `node-${i}`,
    }));
    for (const batch of [records, records.slice(0, again)]) {
      const outcomes = args.streaming
        ? await Promise.all(batch.map((r) => client.publish(r).catch((e) => e)))
        : await client.publishBatch(batch);
      outcomes.forEach((o, i) => {
        if (o instanceof PublishError) throw new Error(`record ${i}: ${o.message}`);
        if (o.duplicate) summary.duplicates++;
        else summary.published++;
      });
    }
    const seen = new Set();
    const acks = [];
    for await (const frame of client.frames({ maxInFlight: 50 })) {
      for (const m of frame) {
        summary.received++;
        seen.add(m.idempotencyKey);
        acks.push(m.ack());
      }
      if (seen.size >= n) break; // leaving the loop closes the stream
    }
    await client.flushAcks();
    for (const r of await Promise.all(acks)) if (r === AckResult.OK) summary.acked++;
    return summary;
  } finally {
    await client.close();
  }
}

const timeout = setTimeout(() => {
  console.error("roundtrip: gave up after 60 s");
  process.exit(1);
}, 60_000);
run().then(
  (summary) => {
    clearTimeout(timeout);
    console.log(JSON.stringify(summary));
  },
  (err) => {
    clearTimeout(timeout);
    console.error("roundtrip:", err.message);
    process.exit(1);
  },
);
