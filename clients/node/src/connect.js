// How the client reaches a sidecar: the proto it speaks (loaded at run time), TLS, and the
// address of another worker of the same sidecar.

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
export const DedupService = grpc.loadPackageDefinition(definition).dedup.v1.DedupService;

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

/**
 * The target with its port replaced: another worker on the host the client dialled.
 * @param {string} target
 * @param {number} port
 */
export function withPort(target, port) {
  const i = target.lastIndexOf(":");
  return i >= 0 && !target.slice(0, i).endsWith(":") ? `${target.slice(0, i)}:${port}` : `${target}:${port}`;
}
