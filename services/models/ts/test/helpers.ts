// Shared by the tests: a real server on 127.0.0.1:0 with a real grpc-js client, promise
// wrappers for the calls, and decoding of the status details a failed call carried.
import {
  ChannelCredentials,
  credentials,
  loadPackageDefinition,
  makeClientConstructor,
  Metadata,
  type ServiceError,
} from "@grpc/grpc-js";
import { loadSync } from "@grpc/proto-loader";
import { service as healthService } from "grpc-health-check";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { Any } from "../gen/google/protobuf/any";
import { BadRequest, ErrorInfo } from "../gen/google/rpc/error_details";
import { ModelServiceClient, type PredictRequest } from "../gen/rendezvous/v1/model";
import { statusDetails } from "../src/errors";
import { Logger } from "../src/log";
import type { Model } from "../src/model";
import { startModelServer, type ModelServer } from "../src/server";

export const FIXTURE: {
  rows: Record<string, number>[];
  scores: Record<"ridge" | "linear", number[]>;
} = JSON.parse(readFileSync(resolve(__dirname, "..", "..", "test", "testdata", "diabetes-python-predictions.json"), "utf-8"));

export const TOLERANCE = 1e-9;

/** A PredictRequest with these features (and deadline), the rest empty. */
export function predictRequest(features: Record<string, unknown>, options: { requestId?: string; deadline?: Date } = {}): PredictRequest {
  const { requestId = "r", deadline } = options;
  return { requestId, objective: "diabetes", features, payload: undefined, subjectState: {}, deadline };
}

/** A logger that keeps its lines for assertions instead of writing them. */
export function memoryLogger(): { log: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  return { log: new Logger("model", "test", "DEBUG", (line) => lines.push(JSON.parse(line))), lines };
}

export interface Running {
  server: ModelServer;
  client: ModelServiceClient;
  lines: Record<string, unknown>[];
  close(): Promise<void>;
}

export async function serve(model: Model, version = "1"): Promise<Running> {
  const { log, lines } = memoryLogger();
  const server = await startModelServer(model, { listen: { host: "127.0.0.1", port: 0 }, version, log });
  server.setServing(true);
  const client = new ModelServiceClient(server.endpoint, credentials.createInsecure());
  return {
    server,
    client,
    lines,
    async close() {
      client.close();
      await server.shutdown(1000);
    },
  };
}

type Callback<Res> = (err: ServiceError | null, response: Res) => void;

/** A unary call as a promise; `timeoutMs` sets the call's deadline. */
export function call<Req, Res>(
  method: (request: Req, metadata: Metadata, options: { deadline?: Date }, callback: Callback<Res>) => unknown,
  request: Req,
  timeoutMs?: number,
): Promise<Res> {
  const options = timeoutMs === undefined ? {} : { deadline: new Date(Date.now() + timeoutMs) };
  return new Promise((resolve, reject) =>
    method(request, new Metadata(), options, (err, response) => (err ? reject(err) : resolve(response))),
  );
}

/** The call's failure, or a thrown error if it succeeded. */
export async function failure(promise: Promise<unknown>): Promise<ServiceError> {
  try {
    await promise;
  } catch (err) {
    return err as ServiceError;
  }
  throw new Error("the call succeeded");
}

/** The BadRequest and ErrorInfo details of a failed call's grpc-status-details-bin trailer. */
export function details(err: ServiceError): { code: number; badRequest?: BadRequest; errorInfo?: ErrorInfo } {
  const status = statusDetails(err.metadata);
  if (status === undefined) {
    throw new Error("no grpc-status-details-bin trailer");
  }
  const unpack = <T>(name: string, decode: (bytes: Uint8Array) => T): T | undefined => {
    const any: Any | undefined = status.details.find((d) => d.typeUrl === `type.googleapis.com/${name}`);
    return any && decode(any.value);
  };
  const result: { code: number; badRequest?: BadRequest; errorInfo?: ErrorInfo } = { code: status.code };
  const badRequest = unpack("google.rpc.BadRequest", (b) => BadRequest.decode(b));
  const errorInfo = unpack("google.rpc.ErrorInfo", (b) => ErrorInfo.decode(b));
  if (badRequest) result.badRequest = badRequest;
  if (errorInfo) result.errorInfo = errorInfo;
  return result;
}

/** grpc.health.v1.Health/Check for `service` ("" is the server as a whole), plaintext
 * unless given `channel` credentials. */
export async function healthStatus(
  endpoint: string,
  service = "",
  channel: ChannelCredentials = credentials.createInsecure(),
): Promise<string> {
  const Health = makeClientConstructor(healthService, "Health");
  const client = new Health(endpoint, channel) as unknown as {
    check(request: { service: string }, callback: Callback<{ status: string }>): void;
    close(): void;
  };
  try {
    const response = await new Promise<{ status: string }>((resolve, reject) =>
      client.check({ service }, (err, res) => (err ? reject(err) : resolve(res))),
    );
    return response.status;
  } finally {
    client.close();
  }
}

interface ReflectionResponse {
  listServicesResponse?: { service: { name: string }[] };
  fileDescriptorResponse?: { fileDescriptorProto: Buffer[] };
  errorResponse?: { errorCode: number; errorMessage: string };
}

/** One request on grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo. */
export async function reflect(endpoint: string, request: Record<string, string>): Promise<ReflectionResponse> {
  const proto = require.resolve("@grpc/reflection/build/proto/grpc/reflection/v1alpha/reflection.proto");
  const loaded = loadPackageDefinition(loadSync(proto, { keepCase: false })) as unknown as {
    grpc: { reflection: { v1alpha: { ServerReflection: new (address: string, creds: unknown) => ReflectionClient } } };
  };
  interface ReflectionClient {
    serverReflectionInfo(): {
      write(request: object): void;
      end(): void;
      on(event: "data", listener: (response: ReflectionResponse) => void): void;
      on(event: "error", listener: (err: Error) => void): void;
    };
    close(): void;
  }
  const client = new loaded.grpc.reflection.v1alpha.ServerReflection(endpoint, credentials.createInsecure());
  try {
    return await new Promise<ReflectionResponse>((resolve, reject) => {
      const stream = client.serverReflectionInfo();
      stream.on("data", (response) => {
        resolve(response);
        stream.end();
      });
      stream.on("error", reject);
      stream.write(request);
    });
  } finally {
    client.close();
  }
}

export const REPO_ROOT = resolve(__dirname, "..", "..", "..", "..", "..");

/** The loopback certificates a TLS mesh uses, made by the same tool (tools/certs.py, run by
 * the Python the Makefile exports as $PYTHON, else the repository's .venv) into `dir`. */
export interface Certs {
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
}

export function makeCerts(dir: string): Certs {
  const python = process.env["PYTHON"] || resolve(REPO_ROOT, ".venv", "bin", "python");
  execFileSync(python, ["-m", "tools.certs", "--out", dir, "--days", "1"], { cwd: REPO_ROOT, stdio: "ignore" });
  return {
    ca: resolve(dir, "ca.pem"),
    serverCert: resolve(dir, "server.pem"),
    serverKey: resolve(dir, "server-key.pem"),
    clientCert: resolve(dir, "client.pem"),
    clientKey: resolve(dir, "client-key.pem"),
  };
}

/** A TLS channel trusting `certs.ca`, presenting `client`'s certificate when given. */
export function tlsChannel(certs: Certs, client?: { cert: string; key: string }): ChannelCredentials {
  return credentials.createSsl(
    readFileSync(certs.ca),
    client ? readFileSync(client.key) : null,
    client ? readFileSync(client.cert) : null,
  );
}
