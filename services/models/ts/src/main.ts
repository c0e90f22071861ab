// The container: read the env contract (config.ts), load the model, serve it, say SERVING,
// write the ready file; on SIGTERM/SIGINT turn NOT_SERVING and shut down within the grace.
// Exit status: 0 after a signal, 2 for bad configuration, 1 when serving fails to start.
import { readConfig, ConfigError, KIND } from "./config";
import { DiabetesModel } from "./diabetes";
import { Logger } from "./log";
import { rpcMetrics, serveMetrics } from "./metrics";
import { writeReadyFile } from "./ready";
import { startModelServer } from "./server";
import { serverCredentials, tlsMode } from "./tls";

export const SHUTDOWN_GRACE_MS = 5000;
export const EXIT_BAD_CONFIG = 2;

export async function main(env: NodeJS.ProcessEnv = process.env): Promise<number> {
  const log = new Logger("model", "rendezvous.models.ts");
  let config;
  let model;
  let credentials;
  try {
    config = readConfig(env);
    // Built first, so a bad artifact or TLS file fails before anything listens.
    model = new DiabetesModel(config.name, config.version, config.args);
    credentials = serverCredentials(config.tls);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`rendezvous model (node): bad configuration: ${err.message}\n`);
      log.error("bad configuration", { error: err.message });
      return EXIT_BAD_CONFIG;
    }
    throw err;
  }
  const facts = { model: config.name, kind: KIND, version: config.version };
  const metrics = rpcMetrics();
  let server;
  let metricsServer;
  try {
    server = await startModelServer(model, {
      listen: config.listen,
      version: config.version,
      log,
      credentials,
      interceptors: [metrics.interceptor],
    });
  } catch (err) {
    log.error("cannot serve", { listen: `${config.listen.host}:${config.listen.port}` }, err);
    return 1;
  }
  try {
    metricsServer = await serveMetrics(metrics.registry, { ...config.metrics, log });
  } catch (err) {
    log.error("cannot serve the metrics", { metrics: `${config.metrics.host}:${config.metrics.port}` }, err);
    await server.shutdown(0);
    return 1;
  }
  const signalled = new Promise<NodeJS.Signals>((resolve) => {
    process.once("SIGTERM", resolve);
    process.once("SIGINT", resolve);
  });
  server.setServing(true);
  if (config.readyFile) {
    writeReadyFile(config.readyFile, { endpoint: server.endpoint, ...facts });
  }
  log.info(`model-${config.name} started`, {
    endpoint: server.endpoint,
    ...facts,
    algorithm: model.artifact.algorithm,
    tls: tlsMode(config.tls),
    platform: `node ${process.version}`,
  });
  const signal = await signalled;
  log.info("draining", { reason: "signal", signal, grace_ms: SHUTDOWN_GRACE_MS });
  await server.shutdown(SHUTDOWN_GRACE_MS);
  await metricsServer?.close();
  log.info("stopped", { endpoint: server.endpoint });
  return 0;
}
