// The env contract: defaults, and a clear ConfigError for anything wrong.
import assert from "node:assert/strict";
import { test } from "node:test";
import { ConfigError, parseArgs, parseListen, readConfig } from "../src/config";
import { DiabetesModel } from "../src/diabetes";

test("defaults: 127.0.0.1:0, name diabetes, version 1, ridge, no ready file, no metrics", () => {
  assert.deepEqual(readConfig({}), {
    listen: { host: "127.0.0.1", port: 0 },
    name: "diabetes",
    version: "1",
    args: { algorithm: "ridge" },
    metrics: { host: "127.0.0.1", port: 0 },
  });
});

test("every variable is read", () => {
  const config = readConfig({
    RDV_MODEL_LISTEN: "0.0.0.0:50071",
    RDV_MODEL_NAME: "diabetes-node",
    RDV_MODEL_VERSION: "2",
    RDV_MODEL_ARGS: '{"algorithm": "linear", "artifact": "/tmp/a.json"}',
    RDV_MODEL_READY_FILE: "/tmp/ready.json",
    RDV_MODEL_METRICS_PORT: "9464",
    RDV_MODEL_METRICS_HOST: "0.0.0.0",
  });
  assert.deepEqual(config, {
    listen: { host: "0.0.0.0", port: 50071 },
    name: "diabetes-node",
    version: "2",
    args: { algorithm: "linear", artifact: "/tmp/a.json" },
    readyFile: "/tmp/ready.json",
    metrics: { host: "0.0.0.0", port: 9464 },
  });
  for (const bad of ["http", "70000", "-1"]) {
    assert.throws(() => readConfig({ RDV_MODEL_METRICS_PORT: bad }), /RDV_MODEL_METRICS_PORT=/, bad);
  }
});

test("listen addresses", () => {
  assert.deepEqual(parseListen("[::1]:0"), { host: "[::1]", port: 0 });
  assert.deepEqual(parseListen("localhost:8080"), { host: "localhost", port: 8080 });
  for (const bad of ["", "127.0.0.1", ":80", "127.0.0.1:x", "127.0.0.1:70000", "::1:0"]) {
    assert.throws(() => parseListen(bad), ConfigError, bad);
  }
});

test("args: unknown keys, bad algorithm, bad JSON and non-objects are errors naming the problem", () => {
  assert.throws(() => parseArgs('{"algorithm": "ridge", "alpha": 1}'), /unknown key\(s\) "alpha"/);
  assert.throws(() => parseArgs('{"algorithm": "lasso"}'), /algorithm must be one of ridge, linear/);
  assert.throws(() => parseArgs("{algorithm"), /not valid JSON/);
  assert.throws(() => parseArgs("[]"), /must be a JSON object/);
  assert.throws(() => parseArgs('{"artifact": 3}'), /artifact must be a non-empty path/);
  assert.deepEqual(parseArgs('{"artifact": null}'), { algorithm: "ridge" });
});

test("an artifact of another algorithm, or a missing one, fails at start", () => {
  assert.throws(
    () => new DiabetesModel("d", "1", { algorithm: "linear", artifact: `${__dirname}/../../../artifacts/diabetes-ridge.json` }),
    /holds a ridge model, not linear/,
  );
  assert.throws(() => new DiabetesModel("d", "1", { algorithm: "ridge", artifact: "/nonexistent.json" }), ConfigError);
});
