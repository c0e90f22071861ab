// The per-RPC metrics every server of the mesh exports, with the Python servers' names,
// labels, buckets and code spelling (services/core/rpc_metrics.py), so one dashboard reads
// every container; and the process' own (CPU, RSS, the event loop's lag) from prom-client's
// default collectors. Served on RDV_MODEL_METRICS_HOST:RDV_MODEL_METRICS_PORT.
import { ServerInterceptingCall, status as Status, type ServerInterceptor } from "@grpc/grpc-js";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";
import type { Logger } from "./log";

/** services/core/telemetry.py's SLA_BUCKETS_S: milliseconds around a 50 ms SLA. */
export const SLA_BUCKETS_S = [
  0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.045, 0.05, 0.055, 0.06,
  0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];

const LABELS = ["grpc_service", "grpc_method", "grpc_type"] as const;

export interface RpcMetrics {
  readonly registry: Registry;
  /** Counts, times and gauges every call; grpc-js calls it for registered methods only. */
  readonly interceptor: ServerInterceptor;
}

/** "/pkg.Service/Method" -> ["pkg.Service", "Method"]. */
export function splitPath(path: string): [string, string] {
  const slash = path.lastIndexOf("/");
  return [path.slice(path.startsWith("/") ? 1 : 0, Math.max(slash, 0)), path.slice(slash + 1)];
}

export function rpcMetrics(): RpcMetrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  const handled = new Counter({
    name: "rdv_grpc_server_handled_total",
    help: "gRPC calls completed by the server, by status code",
    labelNames: [...LABELS, "grpc_code"],
    registers: [registry],
  });
  const handling = new Histogram({
    name: "rdv_grpc_server_handling_seconds",
    help: "Time a gRPC call spent in the server (a stream: its whole life)",
    labelNames: LABELS,
    buckets: SLA_BUCKETS_S,
    registers: [registry],
  });
  const inFlight = new Gauge({
    name: "rdv_grpc_server_in_flight",
    help: "gRPC calls (and open streams) in progress",
    labelNames: LABELS,
    registers: [registry],
  });
  const interceptor: ServerInterceptor = (method, call) => {
    const [service, name] = splitPath(method.path);
    const type = method.requestStream
      ? method.responseStream
        ? "bidi_stream"
        : "client_stream"
      : method.responseStream
        ? "server_stream"
        : "unary";
    const labels = { grpc_service: service, grpc_method: name, grpc_type: type };
    const started = process.hrtime.bigint();
    inFlight.inc(labels);
    let finished = false;
    const finish = (code: string): void => {
      if (finished) return;
      finished = true;
      handling.observe(labels, Number(process.hrtime.bigint() - started) / 1e9);
      inFlight.dec(labels);
      handled.inc({ ...labels, grpc_code: code });
    };
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          // A cancel after the deadline is the deadline's (grpc-js sends that status itself).
          onCancel: () => {
            const deadline = call.getDeadline();
            const expired = deadline !== Infinity && new Date(deadline).getTime() <= Date.now();
            finish(expired ? "DEADLINE_EXCEEDED" : "CANCELLED");
          },
        }),
      sendStatus: (status, next) => {
        finish(Status[status.code ?? Status.OK] ?? "UNKNOWN");
        next(status);
      },
    });
  };
  return { registry, interceptor };
}

export interface MetricsServer {
  /** host:port it listens on. */
  readonly address: string;
  close(): Promise<void>;
}

/** Serve /metrics on host:port (none when port is 0). */
export async function serveMetrics(
  registry: Registry,
  options: { host: string; port: number; log: Logger },
): Promise<MetricsServer | undefined> {
  if (options.port === 0) return undefined;
  const server: Server = createServer((request, response) => {
    if (request.url !== "/metrics") {
      response.writeHead(404).end();
      return;
    }
    registry.metrics().then(
      (text) => response.writeHead(200, { "Content-Type": registry.contentType }).end(text),
      (err: unknown) => {
        options.log.error("cannot collect the metrics", {}, err);
        response.writeHead(500).end();
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port, options.host.replace(/^\[(.*)\]$/, "$1"), () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return {
    address: `${options.host}:${port}`,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
