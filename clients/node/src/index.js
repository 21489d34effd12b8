// Node.js client of the Kafka dedup sidecar.
//
// The sidecar runs next to the application, owns the Kafka consumer and the idempotent
// producer, and streams de-duplicated deliveries over gRPC; it commits an offset only once
// every record before it is acked. This module adds what every application needs on top of
// the proto (loaded at run time: from the repository's protos/, or in a packed module from the
// copy that `npm pack` puts in proto/):
//
//   - frames() and subscribe() iterate a Subscribe stream (a frame is the deliveries the
//     sidecar sent together);
//   - message.ack() is cheap: acks are gathered for a few milliseconds or up to a number of
//     ids and sent as one Ack call; its promise settles with that ack's own result;
//   - publish() and publishBatch() produce through the sidecar's idempotent producer.
//
// This file holds DedupClient and Message; connect.js the proto and TLS, gather.js the ack
// gathering, pubstream.js the shared publish stream, results.js what calls answer.

import * as grpc from "@grpc/grpc-js";
import { DedupService, tlsCredentials, withPort } from "./connect.js";
import { AckBatcher } from "./gather.js";
import { PublishStream } from "./pubstream.js";
import { AckError, PublishError, publishRequest, publishResult, results, unhandledIsFine } from "./results.js";

export { PROTO_PATH, tlsCredentials } from "./connect.js";
export { AckError, AckResult, PublishError, deriveKey } from "./results.js";

/** How long a worker may stay unreachable while another worker's stream is open (see frames()). */
export const WORKER_RETRY_MS = 60_000;

/** One delivery. Call ack() once its side effects are done, or nack(). */
export class Message {
  /**
   * @param {DedupClient} client
   * @param {any} d the Delivery as decoded
   */
  constructor(client, d) {
    this.client = client;
    /** @type {string} */ this.deliveryId = d.deliveryId;
    /** @type {string} */ this.idempotencyKey = d.idempotencyKey;
    /** @type {string} */ this.topic = d.topic;
    /** @type {number} */ this.partition = d.partition;
    /** @type {number} */ this.offset = d.offset;
    /** The record key; null for a keyless record. @type {Buffer | null} */
    this.key = d._key === "key" ? d.key : null;
    /** @type {Buffer} */ this.value = d.value;
    /** @type {{key: string, value: Buffer}[]} */ this.headers = d.headers;
    /** @type {number} */ this.timestampMs = d.timestampMs;
    /** 1 on first delivery; more after redeliveries. @type {number} */ this.attempt = d.attempt;
    /** @type {number} */ this.deadlineMs = d.deadlineMs;
  }

  /**
   * Queue an ack; the promise settles with its result. Ignoring the promise is safe: a failed
   * ack is not an unhandled rejection, and the message is redelivered after its deadline.
   * @returns {Promise<string>} one of AckResult
   */
  ack() {
    return this.client.ack(this.deliveryId, this.deadlineMs);
  }

  /**
   * Give the message back for redelivery, or dead-letter it.
   * @param {NackOptions} [options]
   */
  async nack(options) {
    const [result] = await this.client.nack([this.deliveryId], options);
    return result;
  }
}

/**
 * @typedef {object} NackOptions
 * @property {number} [delaySeconds] before redelivery; unset: the sidecar's exponential backoff
 * @property {boolean} [deadLetter] send to the dead-letter topic instead of redelivering
 * @property {string} [reason] travels with a dead-lettered record
 *
 * @typedef {object} PublishRecord
 * @property {string} topic
 * @property {Buffer | string} value
 * @property {Buffer | string | null} [key] unset or null: a keyless record
 * @property {{key: string, value: Buffer | string}[]} [headers]
 * @property {string} [idempotencyKey] empty: the sidecar generates a unique one
 * @property {number} [partition] unset: the producer's partitioner chooses
 *
 * @typedef {object} PublishResult
 * @property {string} idempotencyKey
 * @property {string} topic
 * @property {number} partition
 * @property {number} offset
 * @property {boolean} duplicate the key was published before; partition and offset are the first write's
 *
 * @typedef {object} SubscribeOptions
 * @property {string[]} [topics] a subset of the sidecar's kafka.topics; empty: all
 * @property {number} [maxInFlight] most un-acked deliveries on the stream; 0: the sidecar's default
 * @property {number} [maxInFlightBytes] most un-acked payload bytes on the stream; 0: the default
 * @property {number} [maxBatch] most deliveries per frame; 0: the default
 * @property {"unordered"|"key"|"partition"} [ordering] narrows the sidecar's delivery.ordering for
 *   these topics; unset: the sidecar's
 *
 * @typedef {object} ClientOptions
 * @property {string} [token] sent as "authorization: Bearer <token>" (server.auth_token)
 * @property {number} [ackLingerMs] how long acks are gathered before one Ack call (5)
 * @property {number} [ackMaxIds] most ids per gathered Ack call (1000; at most server.max_ids_per_call)
 * @property {boolean} [plainAcks] one Ack call per ack(): the simplest protocol use, and the slowest
 * @property {number} [ackRetryMs] an Ack call that fails with UNAVAILABLE (the store or Kafka
 *   unreachable, the sidecar restarting) is made again, with a growing pause, for up to this long,
 *   never past the message's ack deadline; a repeat answers ALREADY_ACKED (10000; 0: no retry)
 * @property {boolean} [streaming] publish() writes on one StreamingPublish call per worker,
 *   shared by concurrent calls, instead of a Publish call each (the sidecar pays a stream message,
 *   not a call); a failed record then rejects with a PublishError
 * @property {number} [timeoutMs] deadline of each unary call (60000)
 * @property {TlsOptions} [tls] dial with TLS (server.tls_cert_file), and mTLS with certFile/keyFile
 * @property {grpc.ChannelCredentials} [credentials] overrides tls; default: plaintext, for a sidecar
 *   on loopback or a Unix socket
 * @property {grpc.ChannelOptions} [channelOptions]
 * @property {boolean} [targetOnly] use the target alone with a sidecar of several worker processes
 *   (server.workers), which then delivers only that worker's partitions. By default the client
 *   lists the workers (ListWorkers) when the first stream opens, subscribes on every one, sends
 *   each ack to the worker that delivered it, and spreads publishes over them.
 *
 * @typedef {object} TlsOptions
 * @property {string} [caFile] the CA that signed the sidecar's certificate (PEM); unset: the system's
 * @property {string} [certFile] client certificate for mTLS (PEM), with keyFile
 * @property {string} [keyFile] client key for mTLS (PEM), with certFile
 * @property {string} [serverName] name to check the sidecar's certificate against, when it is not
 *   the target's host
 */

export class DedupClient {
  /**
   * @param {string} target the sidecar's server.listen: "host:port", or "unix:///run/dedup/sidecar.sock"
   * @param {ClientOptions} [options]
   */
  constructor(target, options = {}) {
    this.options = {
      ackLingerMs: 5,
      ackMaxIds: 1000,
      plainAcks: false,
      ackRetryMs: 10_000,
      streaming: false,
      timeoutMs: 60_000,
      ...options,
    };
    const secured = this.options.tls ? tlsCredentials(this.options.tls) : null;
    this.target = target;
    this.credentials = this.options.credentials ?? secured?.credentials ?? grpc.credentials.createInsecure();
    this.channelOptions = {
      "grpc.max_receive_message_length": 64 * 1024 * 1024,
      ...secured?.channelOptions,
      ...this.options.channelOptions,
    };
    this.stub = new DedupService(target, this.credentials, this.channelOptions);
    this.metadata = new grpc.Metadata();
    if (this.options.token) this.metadata.set("authorization", `Bearer ${this.options.token}`);
    /** One per worker process once ListWorkers answered; the target's alone until then. */
    this.workers = [this.worker(this.stub)];
    /** @type {Map<string, Worker>} delivery id prefix (one worker process) -> its worker */
    this.routes = new Map();
    this.turn = 0;
    /** @type {Promise<number> | null} */
    this.discovery = null;
  }

  /**
   * @typedef {{stub: any, acks: AckBatcher, publishes: PublishStream}} Worker
   * @param {any} stub
   * @returns {Worker}
   */
  worker(stub) {
    /** @type {Worker} */
    const w = { stub, acks: /** @type {any} */ (null), publishes: new PublishStream(stub, this.metadata) };
    w.acks = new AckBatcher((ids) => this.ackOn(w, ids), this.options.ackLingerMs, this.options.ackMaxIds);
    return w;
  }

  /**
   * List the sidecar's workers (ListWorkers) and connect to each one, once; resolves to how many
   * there are. A sidecar without ListWorkers counts as one worker.
   * @returns {Promise<number>}
   */
  listWorkers() {
    if (this.options.targetOnly) return Promise.resolve(1);
    this.discovery ??= this.call("ListWorkers", {}).then(
      (resp) => {
        if (resp.workers.length <= 1) return 1;
        this.workers = resp.workers.map((/** @type {any} */ w) => {
          if (w.index === resp.thisWorker) return this.workers[0];
          const target = w.unixSocket ? `unix://${w.unixSocket}` : withPort(this.target, w.port);
          return this.worker(new DedupService(target, this.credentials, this.channelOptions));
        });
        return this.workers.length;
      },
      (err) => {
        if (err.code === grpc.status.UNIMPLEMENTED) return 1;
        this.discovery = null;
        throw err;
      },
    );
    return this.discovery;
  }

  /**
   * One unary call; rejects with the grpc.ServiceError (code, details) when it fails.
   * @param {string} method
   * @param {object} request
   * @param {any} [stub] the worker's; default: the target's
   * @returns {Promise<any>}
   */
  call(method, request, stub = this.stub) {
    const deadline = Date.now() + this.options.timeoutMs;
    return new Promise((resolve, reject) => {
      stub[method](request, this.metadata, { deadline }, (/** @type {any} */ err, /** @type {any} */ resp) =>
        err ? reject(err) : resolve(resp),
      );
    });
  }

  /**
   * @param {string} deliveryId
   * @returns {Worker} the worker that delivered it (the target's when not known)
   */
  workerOf(deliveryId) {
    if (this.workers.length === 1) return this.workers[0];
    return this.routes.get(deliveryId.split(".", 1)[0]) ?? this.workers[0];
  }

  /** The worker whose turn it is to publish. */
  nextStub() {
    if (this.workers.length === 1) return this.stub;
    this.turn = (this.turn + 1) % this.workers.length;
    return this.workers[this.turn].stub;
  }

  /**
   * Frames of messages until the stream ends; leaving the loop closes the stream, and its
   * un-acked messages are redelivered. With several workers there is one stream per worker,
   * merged; maxInFlight and maxInFlightBytes are shared out among them (each gets its share,
   * rounded up). A worker that is restarting is waited for while the others deliver (see
   * WORKER_RETRY_MS); any other failure of a worker's stream ends the iteration with its error.
   * @param {SubscribeOptions} [options]
   * @returns {AsyncGenerator<Message[]>}
   */
  async *frames(options = {}) {
    const n = await this.listWorkers();
    const request = {
      topics: options.topics ?? [],
      maxInFlight: Math.ceil((options.maxInFlight ?? 0) / n),
      maxInFlightBytes: Math.ceil((options.maxInFlightBytes ?? 0) / n),
      maxBatch: options.maxBatch ?? 0,
      ordering: options.ordering ? `ORDERING_${options.ordering.toUpperCase()}` : "ORDERING_UNSPECIFIED",
    };
    const workers = this.workers;
    const calls = workers.map((w) => w.stub.Subscribe(request, this.metadata));
    if (calls.length === 1) {
      try {
        for await (const frame of calls[0]) {
          yield frame.deliveries.map((/** @type {any} */ d) => new Message(this, d));
        }
      } finally {
        calls[0].cancel();
      }
      return;
    }
    /** @type {({frame: any} | {error: Error} | {end: true})[]} */
    const queue = [];
    /** @type {(() => void) | null} */
    let wake = null;
    const push = (/** @type {any} */ item) => {
      queue.push(item);
      if (wake) wake();
    };
    // Per worker, while its stream is open: when it opened (0: closed), and whether a frame came
    // on it. A stream is alive once a frame came or it has been open a second; a retry of a
    // worker that is going away opens for a moment only, and proves nothing.
    const opened = workers.map(() => 0);
    const fed = workers.map(() => false);
    const alive = (/** @type {number} */ j) => opened[j] !== 0 && (fed[j] || Date.now() - opened[j] >= 1000);
    let closed = false;
    // A worker that becomes unreachable (UNAVAILABLE: it died and its supervisor is starting it
    // again) is subscribed to again, with a growing pause, while another worker's stream is
    // alive, for up to WORKER_RETRY_MS: ending every stream instead would hand the other
    // workers' in-flight records back and count an attempt on each, once per reconnect.
    const watch = (/** @type {any} */ call, /** @type {number} */ i, /** @type {any} */ retry) => {
      opened[i] = Date.now();
      fed[i] = false;
      call.on("data", (/** @type {any} */ frame) => {
        fed[i] = true;
        retry.pause = 100;
        retry.downSince = 0;
        if (frame.deliveries.length > 0) this.routes.set(frame.deliveries[0].deliveryId.split(".", 1)[0], workers[i]);
        push({ frame });
      });
      call.on("error", (/** @type {any} */ error) => {
        opened[i] = 0;
        if (closed) return;
        retry.downSince ||= Date.now();
        if (error.code !== grpc.status.UNAVAILABLE) {
          push({ error });
          return;
        }
        // Open it again once another stream proves alive; give up when none is open (the
        // sidecar is stopping, or gone) or after WORKER_RETRY_MS. A stream still unproven
        // (just opened, as at a sidecar's start) is waited for.
        const decide = () => {
          if (closed) return;
          const others = workers.map((_, j) => j).filter((j) => j !== i && opened[j] !== 0);
          if (others.length === 0 || Date.now() - retry.downSince > WORKER_RETRY_MS) {
            push({ error });
          } else if (others.some(alive)) {
            setTimeout(() => {
              if (closed) return;
              calls[i] = workers[i].stub.Subscribe(request, this.metadata);
              watch(calls[i], i, retry);
            }, retry.pause);
            retry.pause = Math.min(2 * retry.pause, 2000);
          } else {
            setTimeout(decide, 50);
          }
        };
        decide();
      });
      call.on("end", () => {
        opened[i] = 0;
        push({ end: true });
      });
    };
    calls.forEach((call, i) => watch(call, i, { pause: 100, downSince: 0 }));
    let open = calls.length;
    try {
      while (open > 0) {
        if (queue.length === 0) await new Promise((resolve) => (wake = () => resolve(undefined)));
        wake = null;
        const item = /** @type {any} */ (queue.shift());
        if (item.error) throw item.error;
        if (item.end) open -= 1;
        else yield item.frame.deliveries.map((/** @type {any} */ d) => new Message(this, d));
      }
    } finally {
      closed = true;
      for (const call of calls) call.cancel();
    }
  }

  /**
   * Messages one at a time; see frames().
   * @param {SubscribeOptions} [options]
   * @returns {AsyncGenerator<Message>}
   */
  async *subscribe(options = {}) {
    for await (const frame of this.frames(options)) yield* frame;
  }

  /**
   * Queue an ack for one delivery id (gathered unless plainAcks); see Message.ack().
   * @param {string} deliveryId
   * @param {number} [deadlineMs] the delivery's ack deadline: retries stop there
   * @returns {Promise<string>}
   */
  ack(deliveryId, deadlineMs = 0) {
    if (!this.options.plainAcks) return this.workerOf(deliveryId).acks.add(deliveryId);
    return unhandledIsFine(
      this.perWorker([deliveryId], (w, mine) => this.ackOn(w, mine, deadlineMs)).then(
        ([r]) => r,
        (err) => Promise.reject(new AckError(err)),
      ),
    );
  }

  /**
   * One Ack call for these ids, not gathered with others. Rejects with the call's
   * grpc.ServiceError (UNAVAILABLE when the sidecar's store is down: nothing was acked).
   * @param {string[]} ids
   * @returns {Promise<string[]>}
   */
  async ackMany(ids) {
    return this.perWorker(ids, (w, mine) => this.ackOn(w, mine));
  }

  /**
   * One Ack call, made again while it fails with UNAVAILABLE for up to ackRetryMs, never past
   * deadlineMs (the earliest ack deadline of the ids; 0: unknown).
   * @param {Worker} w
   * @param {string[]} ids
   * @param {number} [deadlineMs]
   * @returns {Promise<string[]>}
   */
  async ackOn(w, ids, deadlineMs = 0) {
    let until = Date.now() + this.options.ackRetryMs;
    if (deadlineMs > 0) until = Math.min(until, deadlineMs);
    let pause = 50;
    for (;;) {
      try {
        return results(await this.call("Ack", { deliveryIds: ids }, w.stub), ids.length);
      } catch (err) {
        const e = /** @type {grpc.ServiceError} */ (err);
        if (e.code !== grpc.status.UNAVAILABLE || this.options.ackRetryMs <= 0 || Date.now() + pause >= until) {
          throw err;
        }
      }
      await new Promise((resolve) => setTimeout(resolve, pause));
      pause = Math.min(2 * pause, 1000);
    }
  }

  /**
   * One call per worker that delivered some of ids; the results in the order of ids.
   * @param {string[]} ids
   * @param {(w: Worker, ids: string[]) => Promise<string[]>} call
   * @returns {Promise<string[]>}
   */
  async perWorker(ids, call) {
    if (this.workers.length === 1) return call(this.workers[0], ids);
    /** @type {Map<Worker, number[]>} */
    const groups = new Map();
    ids.forEach((id, i) => {
      const w = this.workerOf(id);
      groups.set(w, [...(groups.get(w) ?? []), i]);
    });
    /** @type {string[]} */
    const out = new Array(ids.length);
    await Promise.all(
      [...groups].map(async ([w, positions]) => {
        const answers = await call(
          w,
          positions.map((i) => ids[i]),
        );
        positions.forEach((i, j) => (out[i] = answers[j]));
      }),
    );
    return out;
  }

  /** Send the acks gathered so far and wait for the answers to every Ack call sent. */
  async flushAcks() {
    await Promise.all(this.workers.map((w) => w.acks.drain()));
  }

  /**
   * @param {string[]} ids
   * @param {NackOptions} [options]
   * @returns {Promise<string[]>}
   */
  async nack(ids, options = {}) {
    return this.perWorker(ids, async (w, mine) => {
      /** @type {Record<string, unknown>} */
      const request = { deliveryIds: mine, deadLetter: options.deadLetter ?? false, reason: options.reason ?? "" };
      if (options.delaySeconds !== undefined) request.delaySeconds = options.delaySeconds;
      return results(await this.call("Nack", request, w.stub), mine.length);
    });
  }

  /**
   * @param {string[]} ids
   * @param {number} seconds
   * @returns {Promise<string[]>}
   */
  async extendDeadline(ids, seconds) {
    return this.perWorker(ids, async (w, mine) =>
      results(await this.call("ExtendDeadline", { deliveryIds: mine, seconds }, w.stub), mine.length),
    );
  }

  /**
   * Publish one record and wait for Kafka's acknowledgement. Rejects with the call's
   * grpc.ServiceError: INVALID_ARGUMENT for a bad record, ALREADY_EXISTS for a key published
   * before with another payload, DEADLINE_EXCEEDED or UNAVAILABLE when the outcome is unknown
   * (retry with the same idempotency key).
   * @param {PublishRecord} record
   * @returns {Promise<PublishResult>}
   */
  async publish(record) {
    if (this.options.streaming) {
      const w = this.workers.length === 1 ? this.workers[0] : this.workers[(this.turn = (this.turn + 1) % this.workers.length)];
      const r = await w.publishes.publish(publishRequest(record), this.options.timeoutMs);
      if (r.code !== 0) throw new PublishError(r.code, r.message);
      return publishResult(r.response);
    }
    return publishResult(await this.call("Publish", publishRequest(record), this.nextStub()));
  }

  /**
   * Publish many records in one call. Rejects when the call fails as a whole (nothing is
   * known of any entry: retry with the same keys); otherwise each entry gets its
   * PublishResult or a PublishError, in order.
   * @param {PublishRecord[]} records
   * @returns {Promise<(PublishResult | PublishError)[]>}
   */
  async publishBatch(records) {
    const resp = await this.call("PublishBatch", { entries: records.map(publishRequest) }, this.nextStub());
    if (resp.results.length !== records.length) {
      throw new Error(`the sidecar answered ${resp.results.length} results for ${records.length} records`);
    }
    return resp.results.map((/** @type {any} */ r) =>
      r.code === 0 ? publishResult(r.response) : new PublishError(r.code, r.message),
    );
  }

  /** Send the gathered acks, wait for their answers, and close the channels. */
  async close() {
    await this.flushAcks();
    for (const w of this.workers) {
      await w.publishes.close();
      w.stub.close();
    }
  }
}
