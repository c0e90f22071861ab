// The server's transport: plaintext, TLS, or mTLS (a client certificate the configured CA
// signed is required), from the TLS settings in config.ts. The files are read and checked
// here, at start: a missing or bad file is a ConfigError naming its variable, not a
// failure at the first handshake.
import { ServerCredentials } from "@grpc/grpc-js";
import { readFileSync } from "node:fs";
import { createSecureContext } from "node:tls";
import { ConfigError, ENV_TLS_CERT, ENV_TLS_CLIENT_CA, ENV_TLS_KEY, type TlsConfig } from "./config";

export type TlsMode = "off" | "tls" | "mtls";

export function tlsMode(tls: TlsConfig | undefined): TlsMode {
  return tls === undefined ? "off" : tls.clientCaFile ? "mtls" : "tls";
}

export function serverCredentials(tls: TlsConfig | undefined): ServerCredentials {
  if (tls === undefined) {
    return ServerCredentials.createInsecure();
  }
  const cert = readPem(ENV_TLS_CERT, tls.certFile);
  const key = readPem(ENV_TLS_KEY, tls.keyFile);
  const ca = tls.clientCaFile ? readPem(ENV_TLS_CLIENT_CA, tls.clientCaFile) : null;
  if (ca && !ca.toString("utf-8").includes("-----BEGIN CERTIFICATE-----")) {
    throw new ConfigError(`${ENV_TLS_CLIENT_CA}=${JSON.stringify(tls.clientCaFile)}: no PEM certificate in it`);
  }
  try {
    // What the server will build for each connection: fails now on a bad PEM or a key
    // that is not the certificate's.
    createSecureContext({ cert, key, ...(ca ? { ca } : {}) });
  } catch (err) {
    throw new ConfigError(
      `${ENV_TLS_CERT}=${JSON.stringify(tls.certFile)}, ${ENV_TLS_KEY}=${JSON.stringify(tls.keyFile)}` +
        `${ca ? `, ${ENV_TLS_CLIENT_CA}=${JSON.stringify(tls.clientCaFile)}` : ""}: ${(err as Error).message}`,
    );
  }
  // checkClientCertificate: with a client CA, a client without a certificate it signed is
  // refused at the handshake.
  return ServerCredentials.createSsl(ca, [{ private_key: key, cert_chain: cert }], ca !== null);
}

function readPem(variable: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new ConfigError(`${variable}=${JSON.stringify(path)}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}
