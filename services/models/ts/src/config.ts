// The configuration contract every polyglot model container shares: environment variables
// set by the supervisor. Anything wrong is a ConfigError naming the variable, raised before
// anything listens.

export type Algorithm = "ridge" | "linear";
const ALGORITHMS: readonly Algorithm[] = ["ridge", "linear"];

export interface DiabetesArgs {
  algorithm: Algorithm;
  /** A path overriding the committed artifact (relative to the working directory). */
  artifact?: string;
}

export interface Listen {
  host: string;
  port: number;
}

/**
 * The server side of the TLS settings every container reads (TlsSettings in
 * services/core/settings.py, RDV_MODEL_TLS__*): a certificate and key to serve TLS with, and
 * with clientCaFile mTLS (a client must present a certificate that CA signed). The client
 * side (CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE) is for channels a container never opens.
 */
export interface TlsConfig {
  certFile: string;
  keyFile: string;
  clientCaFile?: string;
}

export const ENV_TLS_CERT = "RDV_MODEL_TLS__CERT_FILE";
export const ENV_TLS_KEY = "RDV_MODEL_TLS__KEY_FILE";
export const ENV_TLS_CLIENT_CA = "RDV_MODEL_TLS__CLIENT_CA_FILE";

export interface Config {
  listen: Listen;
  name: string;
  version: string;
  args: DiabetesArgs;
  readyFile?: string;
  /** Prometheus /metrics (port 0: none); loopback unless a deployment says 0.0.0.0. */
  metrics: Listen;
  /** Plaintext when absent. */
  tls?: TlsConfig;
}

export const KIND = "diabetes";

export class ConfigError extends Error {
  override name = "ConfigError";
}

export function readConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const config: Config = {
    listen: parseListen(env["RDV_MODEL_LISTEN"] || "127.0.0.1:0"),
    // An empty name means the kind's, as in the Python container.
    name: env["RDV_MODEL_NAME"] || KIND,
    version: env["RDV_MODEL_VERSION"] || "1",
    args: parseArgs(env["RDV_MODEL_ARGS"] || "{}"),
    metrics: {
      host: env["RDV_MODEL_METRICS_HOST"] || "127.0.0.1",
      port: parsePort("RDV_MODEL_METRICS_PORT", env["RDV_MODEL_METRICS_PORT"] || "0"),
    },
  };
  const readyFile = env["RDV_MODEL_READY_FILE"];
  if (readyFile) {
    config.readyFile = readyFile;
  }
  const tls = parseTls(env);
  if (tls) {
    config.tls = tls;
  }
  return config;
}

/** The TLS variables, checked as TlsSettings checks them; undefined when TLS is off. */
export function parseTls(env: NodeJS.ProcessEnv): TlsConfig | undefined {
  const certFile = env[ENV_TLS_CERT] || "";
  const keyFile = env[ENV_TLS_KEY] || "";
  const clientCaFile = env[ENV_TLS_CLIENT_CA] || "";
  if (!certFile !== !keyFile) {
    throw new ConfigError(`${ENV_TLS_CERT} and ${ENV_TLS_KEY} go together`);
  }
  if (clientCaFile && !certFile) {
    throw new ConfigError(`${ENV_TLS_CLIENT_CA} (mTLS) needs ${ENV_TLS_CERT} and ${ENV_TLS_KEY}`);
  }
  if (!certFile) {
    return undefined;
  }
  return clientCaFile ? { certFile, keyFile, clientCaFile } : { certFile, keyFile };
}

/** host:port; IPv6 hosts in brackets ([::1]:0). */
export function parseListen(value: string): Listen {
  const match = /^(.+):(\d{1,5})$/.exec(value);
  const port = match ? Number(match[2]) : NaN;
  const host = match?.[1] ?? "";
  if (!match || port > 65535 || host.includes(":") !== /^\[.*\]$/.test(host)) {
    throw new ConfigError(`RDV_MODEL_LISTEN=${JSON.stringify(value)}: expected host:port, e.g. 127.0.0.1:0`);
  }
  return { host, port };
}

export function parsePort(variable: string, value: string): number {
  const port = /^\d{1,5}$/.test(value) ? Number(value) : NaN;
  if (!(port <= 65535)) {
    throw new ConfigError(`${variable}=${JSON.stringify(value)}: expected a port number from 0 to 65535`);
  }
  return port;
}

export function parseArgs(value: string): DiabetesArgs {
  let parsed: unknown;
  try {
    parsed = JSON.parse(value);
  } catch (err) {
    throw new ConfigError(`RDV_MODEL_ARGS is not valid JSON: ${(err as Error).message}`);
  }
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
    throw new ConfigError("RDV_MODEL_ARGS must be a JSON object");
  }
  const { algorithm = "ridge", artifact, ...unknown } = parsed as Record<string, unknown>;
  const extra = Object.keys(unknown);
  if (extra.length > 0) {
    throw new ConfigError(
      `RDV_MODEL_ARGS: unknown key(s) ${extra.map((k) => JSON.stringify(k)).join(", ")}; ` +
        `the ${KIND} model takes "algorithm" and "artifact"`,
    );
  }
  if (!ALGORITHMS.includes(algorithm as Algorithm)) {
    throw new ConfigError(
      `RDV_MODEL_ARGS: algorithm must be one of ${ALGORITHMS.join(", ")}, not ${JSON.stringify(algorithm)}`,
    );
  }
  const args: DiabetesArgs = { algorithm: algorithm as Algorithm };
  if (artifact !== undefined && artifact !== null) {
    if (typeof artifact !== "string" || artifact === "") {
      throw new ConfigError("RDV_MODEL_ARGS: artifact must be a non-empty path");
    }
    args.artifact = artifact;
  }
  return args;
}
