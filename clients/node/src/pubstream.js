// One StreamingPublish call shared by concurrent publish() calls of one worker.

import * as grpc from "@grpc/grpc-js";
import { PublishError } from "./results.js";

/**
 * The StreamingPublish call that concurrent publish() calls of one worker share (the streaming
 * option): each record carries a request id, and each answer settles its caller's promise. The
 * call is opened on first use, and again after it ended.
 */
export class PublishStream {
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
