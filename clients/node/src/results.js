// What the client answers with: ack results and errors, publish results and errors, the
// request a publish sends, and the key rule of consume-transform-produce.

import * as grpc from "@grpc/grpc-js";

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

/**
 * An ack's promise, guarded so that a caller who does not wait for it cannot crash the process
 * with an unhandled rejection (whoever awaits it still sees the rejection).
 * @template T
 * @param {Promise<T>} promise
 */
export function unhandledIsFine(promise) {
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

/**
 * @param {any} resp an Ack, Nack or ExtendDeadline response
 * @param {number} want
 */
export function results(resp, want) {
  if (resp.results.length !== want) {
    throw new Error(`the sidecar answered ${resp.results.length} results for ${want} ids`);
  }
  return resp.results.map((/** @type {string} */ r) =>
    r.startsWith(ACK_RESULT_PREFIX) ? r.slice(ACK_RESULT_PREFIX.length) : r,
  );
}

/** @param {PublishRecord} r */
export function publishRequest(r) {
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
export function publishResult(r) {
  return {
    idempotencyKey: r.idempotencyKey,
    topic: r.topic,
    partition: r.partition,
    offset: r.offset,
    duplicate: r.duplicate,
  };
}
