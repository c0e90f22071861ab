// The container as the supervisor starts it: `node dist/main.js` with the RDV_MODEL_* env
// contract writes its ready file, serves, and stops cleanly on SIGTERM; bad config exits
// non-zero with a clear message before anything listens.
import { credentials, Metadata, status } from "@grpc/grpc-js";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { createServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, test } from "node:test";
import { ModelServiceClient } from "../gen/rendezvous/v1/model";
import { call, failure, FIXTURE, healthStatus, makeCerts, predictRequest, TOLERANCE, tlsChannel } from "./helpers";

const MAIN = resolve(__dirname, "..", "main.js");
const dirs: string[] = [];
after(() => dirs.forEach((dir) => rmSync(dir, { recursive: true, force: true })));

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "rdv-model-ts-"));
  dirs.push(dir);
  return dir;
}

function start(env: Record<string, string>): { child: ChildProcess; stderr: () => string; exited: Promise<number | null> } {
  const child = spawn(process.execPath, [MAIN], { env: { PATH: process.env["PATH"] ?? "", ...env }, stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  return { child, stderr: () => stderr, exited };
}

/** The ready file's content once the container has written it. */
async function readyFile(path: string, timeoutMs = 10_000): Promise<{ pid: number; endpoint: string } & Record<string, unknown>> {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(path)) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${path}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return JSON.parse(readFileSync(path, "utf-8"));
}

test("started with the env contract: ready file, serves, SIGTERM drains and exits 0", async () => {
  const dir = tempDir();
  const readyPath = join(dir, "run", "model.ready.json");
  const proc = start({
    RDV_MODEL_LISTEN: "127.0.0.1:0",
    RDV_MODEL_NAME: "diabetes-node",
    RDV_MODEL_VERSION: "4",
    RDV_MODEL_ARGS: '{"algorithm": "linear"}',
    RDV_MODEL_READY_FILE: readyPath,
  });
  try {
    const ready = await readyFile(readyPath);
    assert.deepEqual(Object.keys(ready), ["pid", "endpoint", "model", "kind", "version"]);
    assert.equal(ready.pid, proc.child.pid);
    assert.match(ready.endpoint, /^127\.0\.0\.1:\d+$/);
    assert.deepEqual([ready.model, ready.kind, ready.version], ["diabetes-node", "diabetes", "4"]);
    assert.deepEqual(readdirSync(join(dir, "run")), ["model.ready.json"], "no temporary file left behind");

    assert.equal(await healthStatus(ready.endpoint), "SERVING");
    const client = new ModelServiceClient(ready.endpoint, credentials.createInsecure());
    try {
      const features = FIXTURE.rows[2] as Record<string, number>;
      const response = await call(client.predict.bind(client), predictRequest(features), 5000);
      assert.ok(Math.abs(response.score - (FIXTURE.scores.linear[2] as number)) <= TOLERANCE);
      assert.equal(response.modelVersion, "4");
      const metadata = await call(client.getModelMetadata.bind(client), {});
      assert.deepEqual([metadata.name, metadata.version, metadata.platform], ["diabetes-node", "4", "node"]);
    } finally {
      client.close();
    }

    const signalled = Date.now();
    proc.child.kill("SIGTERM");
    assert.equal(await proc.exited, 0);
    assert.ok(Date.now() - signalled < 6000);
    const logs = proc.stderr().trim().split("\n").map((line) => JSON.parse(line) as Record<string, unknown>);
    assert.deepEqual(logs.map((l) => l["msg"]), ["model-diabetes-node started", "draining", "stopped"]);
    assert.ok(logs.every((l) => l["service"] === "model" && typeof l["ts"] === "number" && l["level"] === "INFO"));
  } finally {
    proc.child.kill("SIGKILL");
  }
});

test("bad configuration: exit 2, the reason on stderr, nothing listens, no ready file", async () => {
  const readyPath = join(tempDir(), "ready.json");
  for (const [env, reason] of [
    [{ RDV_MODEL_ARGS: '{"algorithm": "ridge", "depth": 3}' }, /unknown key\(s\) "depth"/],
    [{ RDV_MODEL_ARGS: '{"algorithm": "lasso"}' }, /algorithm must be one of ridge, linear/],
    [{ RDV_MODEL_LISTEN: "nowhere" }, /RDV_MODEL_LISTEN="nowhere": expected host:port/],
    [{ RDV_MODEL_ARGS: '{"artifact": "/nonexistent/diabetes.json"}' }, /cannot read the diabetes artifact/],
    [{ RDV_MODEL_TLS__CERT_FILE: "/tmp/server.pem" }, /RDV_MODEL_TLS__CERT_FILE and RDV_MODEL_TLS__KEY_FILE go together/],
    [
      { RDV_MODEL_TLS__CERT_FILE: "/nonexistent/server.pem", RDV_MODEL_TLS__KEY_FILE: "/nonexistent/key.pem" },
      /RDV_MODEL_TLS__CERT_FILE="\/nonexistent\/server.pem": ENOENT/,
    ],
  ] as [Record<string, string>, RegExp][]) {
    const proc = start({ ...env, RDV_MODEL_READY_FILE: readyPath });
    assert.equal(await proc.exited, 2, JSON.stringify(env));
    assert.match(proc.stderr(), reason);
    assert.match(proc.stderr(), /^rendezvous model \(node\): bad configuration: /);
    assert.equal(existsSync(readyPath), false);
  }
});

test("a port already taken: exit 1 with the reason logged", async () => {
  const firstReady = join(tempDir(), "a.json");
  const first = start({ RDV_MODEL_READY_FILE: firstReady });
  try {
    const ready = await readyFile(firstReady);
    const second = start({ RDV_MODEL_LISTEN: ready.endpoint });
    assert.equal(await second.exited, 1);
    assert.match(second.stderr(), /cannot serve/);
  } finally {
    first.child.kill("SIGTERM");
    assert.equal(await first.exited, 0);
  }
});

/** A loopback TCP port free a moment ago. */
/**
 * A loopback port free now, below the kernel's ephemeral range (as the supervisor picks
 * them, services/supervisor/plan.py): a port from `listen(0)` is ephemeral and can be handed
 * again, a moment later, to the child's own gRPC listener on port 0.
 */
async function freePort(): Promise<number> {
  for (let attempt = 0; attempt < 100; attempt++) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    const server = createServer();
    const bound = await new Promise<boolean>((resolve) => {
      server.once("error", () => resolve(false));
      server.listen(port, "127.0.0.1", () => resolve(true));
    });
    if (bound) {
      await new Promise((resolve) => server.close(resolve));
      return port;
    }
  }
  throw new Error("no free port in 20000-32000");
}

/**
 * A container serving /metrics on a port picked free just before. The pick can be taken again
 * before the child binds it (by the child's own gRPC listener, an ephemeral port too, or by
 * any other process): the container then says so and exits 1, as it should, and the test
 * tries another port rather than fail on the machine's luck.
 */
async function startWithMetrics(): Promise<{ proc: ReturnType<typeof start>; port: number; endpoint: string }> {
  const failures: string[] = [];
  for (let attempt = 0; attempt < 3; attempt++) {
    const readyPath = join(tempDir(), "ready.json");
    const port = await freePort();
    const proc = start({ RDV_MODEL_READY_FILE: readyPath, RDV_MODEL_METRICS_PORT: String(port) });
    let code: number | null | undefined;
    void proc.exited.then((c) => (code = c));
    const deadline = Date.now() + 10_000;
    while (!existsSync(readyPath) && code === undefined && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
    }
    if (existsSync(readyPath)) {
      const ready = JSON.parse(readFileSync(readyPath, "utf-8")) as { endpoint: string };
      return { proc, port, endpoint: ready.endpoint };
    }
    proc.child.kill("SIGKILL");
    await proc.exited;
    // Only a taken metrics port is the machine's luck; anything else fails the test.
    assert.match(proc.stderr(), /cannot serve the metrics/, `exit ${String(code)}: ${proc.stderr()}`);
    failures.push(`port ${port}: ${proc.stderr().trim()}`);
  }
  throw new Error(`no metrics port could be bound in 3 attempts: ${failures.join("; ")}`);
}

test("RDV_MODEL_METRICS_PORT: /metrics counts calls by code and times them, as the Python servers do", async () => {
  const { proc, port, endpoint } = await startWithMetrics();
  let text: string;
  try {
    const client = new ModelServiceClient(endpoint, credentials.createInsecure());
    try {
      const features = FIXTURE.rows[0] as Record<string, number>;
      for (let i = 0; i < 3; i++) await call(client.predict.bind(client), predictRequest(features), 5000);
      const err = await failure(call(client.predict.bind(client), predictRequest({}), 5000));
      assert.equal(err.code, status.INVALID_ARGUMENT);
    } finally {
      client.close();
    }
    const response = await fetch(`http://127.0.0.1:${port}/metrics`);
    assert.equal(response.status, 200);
    text = await response.text();
  } catch (err) {
    proc.child.kill("SIGKILL");
    throw err;
  }
  // The metrics server closes with the container: SIGTERM still drains and exits 0.
  proc.child.kill("SIGTERM");
  assert.equal(await proc.exited, 0, proc.stderr());
  const labels = 'grpc_service="rendezvous.v1.ModelService",grpc_method="Predict",grpc_type="unary"';
  for (const line of [
    `rdv_grpc_server_handled_total{${labels},grpc_code="OK"} 3`,
    `rdv_grpc_server_handled_total{${labels},grpc_code="INVALID_ARGUMENT"} 1`,
    `rdv_grpc_server_handling_seconds_count{${labels}} 4`,
    `rdv_grpc_server_handling_seconds_bucket{le="0.05",${labels}} `,
    `rdv_grpc_server_in_flight{${labels}} 0`,
    "process_cpu_seconds_total ",
    "process_resident_memory_bytes ",
    "nodejs_eventloop_lag_seconds ",
  ]) {
    assert.ok(text.includes(line), `/metrics lacks ${line}`);
  }
});

test("started with the TLS settings: serves mTLS only, and says so in its start line", async () => {
  const dir = tempDir();
  const certs = makeCerts(join(dir, "certs"));
  const readyPath = join(dir, "ready.json");
  const proc = start({
    RDV_MODEL_READY_FILE: readyPath,
    RDV_MODEL_TLS__CERT_FILE: certs.serverCert,
    RDV_MODEL_TLS__KEY_FILE: certs.serverKey,
    RDV_MODEL_TLS__CLIENT_CA_FILE: certs.ca,
    // The client side a supervisor passes to every process: nothing for a container to do.
    RDV_MODEL_TLS__CA_FILE: certs.ca,
  });
  try {
    const ready = await readyFile(readyPath);
    const mtls = tlsChannel(certs, { cert: certs.clientCert, key: certs.clientKey });
    assert.equal(await healthStatus(ready.endpoint, "", mtls), "SERVING");
    assert.equal((await failure(healthStatus(ready.endpoint))).code, status.UNAVAILABLE);
    assert.equal((await failure(healthStatus(ready.endpoint, "", tlsChannel(certs)))).code, status.UNAVAILABLE);
    proc.child.kill("SIGTERM");
    assert.equal(await proc.exited, 0);
    const started = JSON.parse(proc.stderr().split("\n")[0] as string) as Record<string, unknown>;
    assert.equal(started["tls"], "mtls");
  } finally {
    proc.child.kill("SIGKILL");
  }
});
test("traces: the caller's traceparent is continued, the span printed by the console exporter", async () => {
  const readyPath = join(tempDir(), "ready.json");
  const child = spawn(process.execPath, [MAIN], {
    env: {
      PATH: process.env["PATH"] ?? "",
      RDV_MODEL_READY_FILE: readyPath,
      OTEL_TRACES_EXPORTER: "console",
      OTEL_SERVICE_NAME: "model-diabetes-node",
    },
    stdio: ["ignore", "pipe", "ignore"],
  });
  let stdout = "";
  child.stdout?.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
  try {
    const ready = await readyFile(readyPath);
    assert.equal(await healthStatus(ready.endpoint), "SERVING");
    const client = new ModelServiceClient(ready.endpoint, credentials.createInsecure());
    const metadata = new Metadata();
    metadata.set("traceparent", `00-${traceId}-00f067aa0ba902b7-01`);
    try {
      await new Promise<void>((resolve, reject) =>
        client.predict(predictRequest(FIXTURE.rows[0] as Record<string, number>), metadata, (err) => (err ? reject(err) : resolve())),
      );
    } finally {
      client.close();
    }
    child.kill("SIGTERM");
    // The batch still queued is exported before the process exits.
    assert.equal(await exited, 0);
    assert.match(stdout, new RegExp(`traceId: '${traceId}'`));
    assert.match(stdout, /name: 'grpc\.rendezvous\.v1\.ModelService\/Predict'/);
    assert.match(stdout, /'service\.name': 'model-diabetes-node'/);
    assert.doesNotMatch(stdout, /Health/, "health checks make no span");
  } finally {
    child.kill("SIGKILL");
  }
});

test("traces: an unknown exporter is bad configuration (exit 2)", async () => {
  const proc = start({ OTEL_TRACES_EXPORTER: "zipkin" });
  assert.equal(await proc.exited, 2);
  assert.match(proc.stderr(), /OTEL_TRACES_EXPORTER="zipkin": expected otlp, console or none/);
});
