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

import { existsSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PACKED = fileURLToPath(new URL("../proto/dedup/v1/dedup.proto", import.meta.url));
/** The proto this client speaks: the packed copy, else the repository's single source. */
export const PROTO_PATH = existsSync(PACKED)
  ? PACKED
  : fileURLToPath(new URL("../../../protos/dedup/v1/dedup.proto", import.meta.url));

// int64 fields (offsets, timestamps) arrive as Numbers: exact below 2^53, which Kafka offsets
// and millisecond timestamps stay under.
const definition = protoLoader.loadSync(PROTO_PATH, { longs: Number, enums: String, defaults: true, oneofs: true });
const DedupService = grpc.loadPackageDefinition(definition).dedup.v1.DedupService;

/** The answers to ack, nack and extendDeadline, per id. */
export const AckResult = Object.freeze({
  /** Settled (for nack and extendDeadline: done). */
  OK: "OK",
  /** The partition moved to another consumer since the delivery; it is redelivered there. */
  STALE: "STALE",
  /** No such delivery id in this sidecar. */
  UNKNOWN: "UNKNOWN",
  /** Acked before; harmless. */
  ALREADY_ACKED: "ALREADY_ACKED",
});

const ACK_RESULT_PREFIX = "ACK_RESULT_";

/** How long a worker may stay unreachable while another worker's stream is open (see frames()). */
export const WORKER_RETRY_MS = 60_000;

/**
 * An ack's promise, guarded so that a caller who does not wait for it cannot crash the process
 * with an unhandled rejection (whoever awaits it still sees the rejection).
 * @template T
 * @param {Promise<T>} promise
 */
function unhandledIsFine(promise) {
  promise.catch(() => {});
  return promise;
}

/** An Ack call failed as a whole (for example UNAVAILABLE while the store is down): nothing in it was acked. */
export class AckError extends Error {
  /** @param {grpc.ServiceError} cause */
  constructor(cause) {
    super(`the Ack call failed, none of its ids was acked: ${cause.message}`, { cause });
    this.name = "AckError";
    /** The gRPC status code (a number of grpc.status). */
    this.code = cause.code;
  }
}

/** One PublishBatch entry failed: its gRPC status code and the sidecar's message, which names what to change. */
export class PublishError extends Error {
  /**
   * @param {number} code a grpc.status code
   * @param {string} details the sidecar's message
   */
  constructor(code, details) {
    super(`${grpc.status[code] ?? code}: ${details}`);
    this.name = "PublishError";
    this.code = code;
    this.details = details;
  }
}

/**
 * The idempotency key of the index-th record published while handling the delivery keyed
 * inputKey: a redelivered input republishes its outputs under the same keys, and the sidecar
 * writes each once. The Python and Go clients derive keys the same way.
 * @param {string} inputKey
 * @param {number} index
 */
export function deriveKey(inputKey, index) {
  return `${inputKey}/${index}`;
}

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

/**
 * Channel credentials and options for TLS options.
 * @param {TlsOptions} tls
 * @returns {{credentials: grpc.ChannelCredentials, channelOptions: grpc.ChannelOptions}}
 */
export function tlsCredentials(tls) {
  if (!tls.certFile !== !tls.keyFile) throw new TypeError("tls.certFile and tls.keyFile go together (mTLS)");
  const read = (path) => (path ? readFileSync(path) : null);
  return {
    credentials: grpc.credentials.createSsl(read(tls.caFile), read(tls.keyFile), read(tls.certFile)),
    channelOptions: tls.serverName ? { "grpc.ssl_target_name_override": tls.serverName } : {},
  };
}

/** Gathers ids for lingerMs or maxIds, then sends them in one call; each ack's promise gets its own result. */
class AckBatcher {
  /**
   * @param {(ids: string[]) => Promise<string[]>} send
   * @param {number} lingerMs
   * @param {number} maxIds
   */
  constructor(send, lingerMs, maxIds) {
    this.send = send;
    this.lingerMs = lingerMs;
    this.maxIds = maxIds;
    /** @type {string[]} */ this.ids = [];
    /** @type {{resolve: (r: string) => void, reject: (e: Error) => void}[]} */ this.waiting = [];
    /** @type {NodeJS.Timeout | null} */ this.timer = null;
    /** @type {Set<Promise<void>>} */ this.calls = new Set();
  }

  /** @param {string} id */
  add(id) {
    /** @type {Promise<string>} */
    const result = unhandledIsFine(
      new Promise((resolve, reject) => {
        this.ids.push(id);
        this.waiting.push({ resolve, reject });
      }),
    );
    if (this.ids.length >= this.maxIds) {
      this.flush();
    } else if (this.timer === null) {
      this.timer = setTimeout(() => this.flush(), this.lingerMs);
    }
    return result;
  }

  flush() {
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    if (this.ids.length === 0) return;
    const ids = this.ids;
    const waiting = this.waiting;
    this.ids = [];
    this.waiting = [];
    const call = this.send(ids).then(
      (results) => waiting.forEach((w, i) => w.resolve(results[i])),
      (err) => {
        const error = new AckError(err);
        waiting.forEach((w) => w.reject(error));
      },
    );
    this.calls.add(call);
    call.finally(() => this.calls.delete(call));
  }

  /** Send what is gathered and wait for every Ack call sent until now. */
  async drain() {
    this.flush();
    await Promise.all([...this.calls]);
  }
}

/**
 * The StreamingPublish call that concurrent publish() calls of one worker share (the streaming
 * option): each record carries a request id, and each answer settles its caller's promise. The
 * call is opened on first use, and again after it ended.
 */
class PublishStream {
  /**
   * @param {any} stub
   * @param {grpc.Metadata} metadata
   */
  constructor(stub, metadata) {
    this.stub = stub;
    this.metadata = metadata;
    /** @type {any} */ this.call = null;
    /** @type {Map<number, {resolve: (r: any) => void, reject: (e: Error) => void}>} */ this.waiting = new Map();
    this.next = 0;
  }

  open() {
    if (this.call !== null) return this.call;
    const call = this.stub.StreamingPublish(this.metadata);
    const waiting = new Map();
    this.waiting = waiting;
    call.on("data", (/** @type {any} */ resp) => {
      for (const r of resp.results) {
        const w = waiting.get(Number(r.requestId));
        if (w !== undefined) {
          waiting.delete(Number(r.requestId));
          w.resolve(r);
        }
      }
    });
    const end = (/** @type {any} */ err) => {
      if (this.call === call) this.call = null;
      const why = err ? `${grpc.status[err.code] ?? err.code}: ${err.details ?? err.message}` : "it ended";
      // The call's own status (UNAUTHENTICATED, say), else UNAVAILABLE: the outcome is unknown.
      const code = err && err.code !== grpc.status.OK && err.code !== undefined ? err.code : grpc.status.UNAVAILABLE;
      const error = new PublishError(
        code,
        `the publish stream closed before the answer (${why}); retry with the same idempotency key`,
      );
      for (const w of waiting.values()) w.reject(error);
      waiting.clear();
    };
    call.on("error", end);
    call.on("end", () => end(null));
    this.call = call;
    return call;
  }

  /**
   * The sidecar's answer for one record (a StreamingPublishResult).
   * @param {object} request a PublishRequest
   * @param {number} timeoutMs
   */
  publish(request, timeoutMs) {
    return new Promise((resolve, reject) => {
      const call = this.open();
      const id = ++this.next;
      const waiting = this.waiting;
      const timer = setTimeout(() => {
        waiting.delete(id);
        reject(
          new PublishError(
            grpc.status.DEADLINE_EXCEEDED,
            `no answer within ${timeoutMs} ms; the record may or may not be published: retry with the same idempotency key`,
          ),
        );
      }, timeoutMs);
      waiting.set(id, {
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      call.write({ requestId: id, publish: request });
    });
  }

  /** Half-close: the sidecar answers what it read, then ends the call. */
  async close() {
    const call = this.call;
    if (call === null) return;
    const ended = new Promise((resolve) => {
      call.on("end", resolve);
      call.on("error", resolve);
    });
    call.end();
    await Promise.race([ended, new Promise((resolve) => setTimeout(resolve, 10_000))]);
  }
}

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

/**
 * The target with its port replaced: another worker on the host the client dialled.
 * @param {string} target
 * @param {number} port
 */
function withPort(target, port) {
  const i = target.lastIndexOf(":");
  return i >= 0 && !target.slice(0, i).endsWith(":") ? `${target.slice(0, i)}:${port}` : `${target}:${port}`;
}

/**
 * @param {any} resp an Ack, Nack or ExtendDeadline response
 * @param {number} want
 */
function results(resp, want) {
  if (resp.results.length !== want) {
    throw new Error(`the sidecar answered ${resp.results.length} results for ${want} ids`);
  }
  return resp.results.map((/** @type {string} */ r) =>
    r.startsWith(ACK_RESULT_PREFIX) ? r.slice(ACK_RESULT_PREFIX.length) : r,
  );
}

/** @param {PublishRecord} r */
function publishRequest(r) {
  /** @type {Record<string, unknown>} */
  const request = {
    topic: r.topic,
    value: typeof r.value === "string" ? Buffer.from(r.value) : r.value,
    headers: (r.headers ?? []).map((h) => ({ key: h.key, value: Buffer.from(h.value) })),
    idempotencyKey: r.idempotencyKey ?? "",
  };
  if (r.key !== undefined && r.key !== null) request.key = typeof r.key === "string" ? Buffer.from(r.key) : r.key;
  if (r.partition !== undefined) request.partition = r.partition;
  return request;
}

/**
 * @param {any} r
 * @returns {PublishResult}
 */
function publishResult(r) {
  return {
    idempotencyKey: r.idempotencyKey,
    topic: r.topic,
    partition: r.partition,
    offset: r.offset,
    duplicate: r.duplicate,
  };
}
