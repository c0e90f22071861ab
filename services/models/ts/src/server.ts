// A grpc-js server with what every Rendezvous component has: the standard health service
// (NOT_SERVING until the owner says otherwise, and again while draining), server reflection
// (what grpcurl, ghz and probes expect) and the owner's interceptors, besides ModelService;
// plaintext unless given TLS credentials (tls.ts).
import { Server, ServerCredentials, type ServerInterceptor } from "@grpc/grpc-js";
import type { PackageDefinition } from "@grpc/proto-loader";
import { ReflectionService } from "@grpc/reflection";
import { HealthImplementation, type ServingStatus } from "grpc-health-check";
import { fileDescriptorProtos } from "../gen/descriptors";
import { ModelServiceService } from "../gen/rendezvous/v1/model";
import type { Listen } from "./config";
import type { Logger } from "./log";
import type { Model } from "./model";
import { modelService } from "./service";

/** rendezvous.v1.ModelService, from the generated method paths. */
export const MODEL_SERVICE = ModelServiceService.predict.path.split("/")[1] as string;
export const HEALTH_SERVICE = "grpc.health.v1.Health";
// Served in v1 and v1alpha; listed as the Python servers list it.
export const REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection";
const MAX_MESSAGE_BYTES = 4 * 1024 * 1024;

export interface ModelServer {
  /** host:port as clients reach it (the listen host, the bound port). */
  readonly endpoint: string;
  setServing(serving: boolean): void;
  /** NOT_SERVING, then let calls in flight finish for up to graceMs, then cut the rest. */
  shutdown(graceMs: number): Promise<void>;
}

export async function startModelServer(
  model: Model,
  options: {
    listen: Listen;
    version: string;
    log: Logger;
    credentials?: ServerCredentials;
    interceptors?: ServerInterceptor[];
  },
): Promise<ModelServer> {
  const server = new Server({
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    // Outermost first: the per-RPC metrics (metrics.ts), and whatever else the owner adds.
    interceptors: options.interceptors ?? [],
  });
  server.addService(ModelServiceService, modelService(model, options.version, options.log));
  const served = ["", MODEL_SERVICE];
  const health = new HealthImplementation(Object.fromEntries(served.map((name) => [name, "NOT_SERVING"])));
  health.addToServer(server);
  new ReflectionService(reflectionPackage(), {
    services: [MODEL_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE],
  }).addToServer(server);

  const { host, port: wanted } = options.listen;
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(`${host}:${wanted}`, options.credentials ?? ServerCredentials.createInsecure(), (err, bound) =>
      err ? reject(err) : resolve(bound),
    ),
  );
  const setStatus = (status: ServingStatus): void => served.forEach((name) => health.setStatus(name, status));
  let stopping: Promise<void> | undefined;
  return {
    endpoint: `${host}:${port}`,
    setServing: (serving) => setStatus(serving ? "SERVING" : "NOT_SERVING"),
    shutdown(graceMs) {
      stopping ??= new Promise<void>((resolve) => {
        setStatus("NOT_SERVING");
        const force = setTimeout(() => {
          options.log.warning("grace period over: cancelling the calls still in flight", { grace_ms: graceMs });
          server.forceShutdown();
          resolve();
        }, graceMs);
        server.tryShutdown(() => {
          clearTimeout(force);
          resolve();
        });
      });
      return stopping;
    },
  };
}

/**
 * What reflection serves, as @grpc/reflection reads a package definition: it only takes the
 * serialized FileDescriptorProtos of its entries. They come straight from protoc (see
 * tools/gen_ts.sh), not from re-serializing .proto files through protobufjs, whose
 * descriptors grpcurl rejects (unresolved well-known types, wrong map entry names).
 */
function reflectionPackage(): PackageDefinition {
  return {
    descriptors: { format: "Protocol Buffer 3 DescriptorProto", type: {}, fileDescriptorProtos: [...fileDescriptorProtos] },
  };
}
