// Acks of concurrent callers gathered into one Ack call, each answered with its own result.

import { AckError, unhandledIsFine } from "./results.js";

/** Gathers ids for lingerMs or maxIds, then sends them in one call; each ack's promise gets its own result. */
export class AckBatcher {
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
