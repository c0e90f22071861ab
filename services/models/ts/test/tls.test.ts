// TLS and mTLS on the container's server, with the certificates a TLS mesh uses
// (tools/certs.py): who is served, who is refused at the handshake, and bad settings
// refused before anything listens.
import { credentials, status, type ChannelCredentials } from "@grpc/grpc-js";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { ModelServiceClient } from "../gen/rendezvous/v1/model";
import { ConfigError, parseTls, type TlsConfig } from "../src/config";
import { DiabetesModel } from "../src/diabetes";
import { startModelServer, type ModelServer } from "../src/server";
import { serverCredentials, tlsMode } from "../src/tls";
import { call, failure, FIXTURE, healthStatus, makeCerts, memoryLogger, predictRequest, TOLERANCE, tlsChannel, type Certs } from "./helpers";

let dir: string;
let mesh: Certs;
// Another CA and its client certificate: an intruder's.
let other: Certs;

before(() => {
  dir = mkdtempSync(join(tmpdir(), "rdv-model-ts-tls-"));
  mesh = makeCerts(join(dir, "mesh"));
  other = makeCerts(join(dir, "other"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

async function serveTls(tls: TlsConfig): Promise<ModelServer> {
  const model = new DiabetesModel("diabetes-node", "1", { algorithm: "ridge" });
  const server = await startModelServer(model, {
    listen: { host: "127.0.0.1", port: 0 },
    version: "1",
    log: memoryLogger().log,
    credentials: serverCredentials(tls),
  });
  server.setServing(true);
  return server;
}

/** A health check with `channel` fails with UNAVAILABLE: refused at the handshake. */
async function refused(endpoint: string, channel: ChannelCredentials, who: string): Promise<void> {
  const err = await failure(healthStatus(endpoint, "", channel));
  assert.equal(err.code, status.UNAVAILABLE, `${who}: ${err.message}`);
}

test("the TLS variables go together as TlsSettings says; the client side is ignored", () => {
  const cert = "RDV_MODEL_TLS__CERT_FILE";
  const key = "RDV_MODEL_TLS__KEY_FILE";
  const clientCa = "RDV_MODEL_TLS__CLIENT_CA_FILE";
  assert.equal(parseTls({ RDV_MODEL_TLS__CA_FILE: "ca.pem" }), undefined);
  assert.deepEqual(parseTls({ [cert]: "s.pem", [key]: "k.pem" }), { certFile: "s.pem", keyFile: "k.pem" });
  assert.deepEqual(parseTls({ [cert]: "s.pem", [key]: "k.pem", [clientCa]: "ca.pem" }), {
    certFile: "s.pem",
    keyFile: "k.pem",
    clientCaFile: "ca.pem",
  });
  assert.throws(() => parseTls({ [cert]: "s.pem" }), /RDV_MODEL_TLS__CERT_FILE and RDV_MODEL_TLS__KEY_FILE go together/);
  assert.throws(() => parseTls({ [key]: "k.pem" }), ConfigError);
  assert.throws(() => parseTls({ [clientCa]: "ca.pem" }), /RDV_MODEL_TLS__CLIENT_CA_FILE \(mTLS\) needs RDV_MODEL_TLS__CERT_FILE/);
  assert.deepEqual([tlsMode(undefined), tlsMode({ certFile: "s", keyFile: "k" })], ["off", "tls"]);
});

test("mTLS: a client with a certificate of the CA is served; plaintext, no certificate or another CA's are refused", async () => {
  const server = await serveTls({ certFile: mesh.serverCert, keyFile: mesh.serverKey, clientCaFile: mesh.ca });
  try {
    const client = new ModelServiceClient(server.endpoint, tlsChannel(mesh, { cert: mesh.clientCert, key: mesh.clientKey }));
    try {
      const response = await call(client.predict.bind(client), predictRequest(FIXTURE.rows[0] as Record<string, number>), 5000);
      assert.ok(Math.abs(response.score - (FIXTURE.scores.ridge[0] as number)) <= TOLERANCE);
    } finally {
      client.close();
    }
    await refused(server.endpoint, credentials.createInsecure(), "a plaintext client");
    await refused(server.endpoint, tlsChannel(mesh), "a TLS client without a certificate");
    await refused(server.endpoint, tlsChannel(mesh, { cert: other.clientCert, key: other.clientKey }), "another CA's client certificate");
    await refused(server.endpoint, tlsChannel(other, { cert: mesh.clientCert, key: mesh.clientKey }), "a client not trusting the server's CA");
  } finally {
    await server.shutdown(1000);
  }
});

test("TLS without a client CA: any TLS client trusting the CA is served, plaintext is refused", async () => {
  const server = await serveTls({ certFile: mesh.serverCert, keyFile: mesh.serverKey });
  try {
    assert.equal(await healthStatus(server.endpoint, "", tlsChannel(mesh)), "SERVING");
    await refused(server.endpoint, credentials.createInsecure(), "a plaintext client");
  } finally {
    await server.shutdown(1000);
  }
});

test("missing or bad TLS files are a ConfigError naming the variable", () => {
  const notPem = join(dir, "not.pem");
  writeFileSync(notPem, "not a certificate");
  const cases: [TlsConfig, RegExp][] = [
    [{ certFile: "/nonexistent/server.pem", keyFile: mesh.serverKey }, /RDV_MODEL_TLS__CERT_FILE="\/nonexistent\/server.pem": ENOENT/],
    [{ certFile: mesh.serverCert, keyFile: other.serverKey }, /RDV_MODEL_TLS__CERT_FILE=.*RDV_MODEL_TLS__KEY_FILE=.*: .*key values mismatch/],
    [{ certFile: mesh.serverCert, keyFile: notPem }, /RDV_MODEL_TLS__KEY_FILE=/],
    [{ certFile: mesh.serverCert, keyFile: mesh.serverKey, clientCaFile: notPem }, /RDV_MODEL_TLS__CLIENT_CA_FILE=".*not.pem": no PEM certificate in it/],
  ];
  for (const [tls, message] of cases) {
    assert.throws(() => serverCredentials(tls), (err: unknown) => err instanceof ConfigError && message.test(err.message), JSON.stringify(tls));
  }
});
