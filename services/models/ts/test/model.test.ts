// The diabetes model over a real loopback gRPC server and client: scores equal the Python
// model's (fixture), validation statuses with their details, PredictBatch, metadata,
// health and reflection.
import { status } from "@grpc/grpc-js";
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { FeatureType } from "../gen/rendezvous/v1/model";
import type { Algorithm } from "../src/config";
import { DiabetesModel } from "../src/diabetes";
import { MODEL_SERVICE } from "../src/server";
import { call, details, failure, FIXTURE, healthStatus, predictRequest, reflect, serve, TOLERANCE, type Running } from "./helpers";

const request = (features: Record<string, unknown>, requestId = "r") => predictRequest(features, { requestId });

const ROW = FIXTURE.rows[0] as Record<string, number>;

for (const algorithm of ["ridge", "linear"] as Algorithm[]) {
  describe(`diabetes ${algorithm} over gRPC`, () => {
    let running: Running;
    before(async () => {
      running = await serve(new DiabetesModel("diabetes-ts", "7", { algorithm }), "7");
    });
    after(() => running.close());

    test("Predict gives the Python model's scores (1e-9)", async () => {
      const expected = FIXTURE.scores[algorithm];
      let worst = 0;
      for (const [i, row] of FIXTURE.rows.entries()) {
        const response = await call(running.client.predict.bind(running.client), request(row));
        const difference = Math.abs(response.score - (expected[i] as number));
        worst = Math.max(worst, difference);
        assert.ok(difference <= TOLERANCE, `row ${i}: ${response.score} vs ${expected[i]}`);
        assert.deepEqual(response.outputs, { model: algorithm });
        assert.equal(response.modelVersion, "7");
      }
      assert.equal(worst, 0, "the same sum in the same order is bit-identical");
    });

    test("PredictBatch scores every row as Predict does", async () => {
      const batch = await call(running.client.predictBatch.bind(running.client), {
        requests: FIXTURE.rows.map((row, i) => request(row, `r${i}`)),
      });
      assert.equal(batch.results.length, FIXTURE.rows.length);
      batch.results.forEach((result, i) => {
        assert.equal(result.result?.$case, "response");
        const score = result.result?.$case === "response" ? result.result.value.score : NaN;
        assert.ok(Math.abs(score - (FIXTURE.scores[algorithm][i] as number)) <= TOLERANCE);
      });
    });
  });
}

describe("validation, batches, metadata, health, reflection", () => {
  let running: Running;
  before(async () => {
    running = await serve(new DiabetesModel("diabetes-ts", "3", { algorithm: "ridge" }), "3");
  });
  after(() => running.close());
  const predict = (features: Record<string, unknown>) =>
    call(running.client.predict.bind(running.client), request(features));

  test("a missing feature and bad values: INVALID_ARGUMENT with a field violation each, sorted", async () => {
    const { age: _age, ...withoutAge } = ROW;
    const err = await failure(predict({ ...withoutAge, s6: "high", bmi: NaN, bp: Infinity, s1: null, s2: true, s3: [1] }));
    assert.equal(err.code, status.INVALID_ARGUMENT);
    assert.equal(err.details, "invalid request: features.age, features.bmi, features.bp, features.s1, features.s2, features.s3, features.s6");
    const decoded = details(err);
    assert.equal(decoded.code, status.INVALID_ARGUMENT);
    assert.deepEqual(
      decoded.badRequest?.fieldViolations.map((v) => [v.field, v.description]),
      [
        ["features.age", "is required"],
        ["features.bmi", "must be a finite number"],
        ["features.bp", "must be a finite number"],
        ["features.s1", "must be a finite number"],
        ["features.s2", "must be a finite number"],
        ["features.s3", "must be a finite number"],
        ["features.s6", "must be a finite number"],
      ],
    );
    assert.equal(decoded.errorInfo?.reason, "INVALID_ARGUMENT");
    assert.equal(decoded.errorInfo?.domain, "rendezvous.v1");
  });

  test("no features at all: every input is required", async () => {
    const decoded = details(await failure(predict({})));
    assert.equal(decoded.badRequest?.fieldViolations.length, 10);
    assert.ok(decoded.badRequest?.fieldViolations.every((v) => v.description === "is required"));
  });

  test("extra features are ignored, as in the Python model", async () => {
    const response = await predict({ ...ROW, colour: "blue" });
    assert.ok(Math.abs(response.score - (FIXTURE.scores.ridge[0] as number)) <= TOLERANCE);
  });

  test("PredictBatch with good and bad requests: each succeeds or fails on its own", async () => {
    const { s1: _s1, ...withoutS1 } = ROW;
    const batch = await call(running.client.predictBatch.bind(running.client), {
      requests: [request(ROW, "a"), request(withoutS1, "b"), request(FIXTURE.rows[1] as Record<string, number>, "c"), request({ ...ROW, bmi: "x" }, "d")],
    });
    const cases = batch.results.map((r) => r.result?.$case);
    assert.deepEqual(cases, ["response", "error", "response", "error"]);
    const [a, b, c, d] = batch.results.map((r) => r.result?.value);
    assert.ok(a && "score" in a && Math.abs(a.score - (FIXTURE.scores.ridge[0] as number)) <= TOLERANCE);
    assert.ok(c && "score" in c && Math.abs(c.score - (FIXTURE.scores.ridge[1] as number)) <= TOLERANCE);
    assert.deepEqual(b, { grpcCode: status.INVALID_ARGUMENT, reason: "INVALID_ARGUMENT", message: "invalid request: features.s1" });
    assert.deepEqual(d, { grpcCode: status.INVALID_ARGUMENT, reason: "INVALID_ARGUMENT", message: "invalid request: features.bmi" });
  });

  test("an empty batch answers no results", async () => {
    const batch = await call(running.client.predictBatch.bind(running.client), { requests: [] });
    assert.deepEqual(batch.results, []);
  });

  test("GetModelMetadata: name, version, platform node, the artifact's inputs", async () => {
    const metadata = await call(running.client.getModelMetadata.bind(running.client), {});
    assert.equal(metadata.name, "diabetes-ts");
    assert.equal(metadata.version, "3");
    assert.equal(metadata.platform, "node");
    assert.deepEqual(metadata.outputs, ["model"]);
    assert.deepEqual(
      metadata.inputs.map((i) => i.name),
      ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"],
    );
    assert.ok(metadata.inputs.every((i) => i.type === FeatureType.FEATURE_TYPE_NUMBER && i.required && i.description));
  });

  test("health: SERVING for the server and for ModelService", async () => {
    assert.equal(await healthStatus(running.server.endpoint), "SERVING");
    assert.equal(await healthStatus(running.server.endpoint, MODEL_SERVICE), "SERVING");
  });

  test("reflection lists ModelService, health and reflection, and serves ModelService's file", async () => {
    const listed = await reflect(running.server.endpoint, { listServices: "" });
    assert.deepEqual(listed.listServicesResponse?.service.map((s) => s.name).sort(), [
      "grpc.health.v1.Health",
      "grpc.reflection.v1alpha.ServerReflection",
      MODEL_SERVICE,
    ]);
    const file = await reflect(running.server.endpoint, { fileContainingSymbol: `${MODEL_SERVICE}.Predict` });
    assert.ok((file.fileDescriptorResponse?.fileDescriptorProto.length ?? 0) >= 1);
  });
});
