// The servicer and server with stand-in models: deadlines reach the model as a budget and
// an abort signal, unexpected errors stay private, shutdown drains within its grace.
import { status } from "@grpc/grpc-js";
import assert from "node:assert/strict";
import { test } from "node:test";
import type { GetModelMetadataResponse, PredictRequest, PredictResponse } from "../gen/rendezvous/v1/model";
import type { Model, PredictContext } from "../src/model";
import { MODEL_SERVICE } from "../src/server";
import { budgetMs } from "../src/service";
import { call, failure, healthStatus, predictRequest, serve } from "./helpers";

const METADATA: GetModelMetadataResponse = { name: "stand-in", version: "1", platform: "node", inputs: [], outputs: [] };

const request = (deadline?: Date): PredictRequest => predictRequest({}, deadline ? { deadline } : {});

/** Answers after `delayMs` unless its signal fires first; records what it was given. */
class SlowModel implements Model {
  seen: PredictContext[] = [];
  aborted = 0;
  constructor(private readonly delayMs: number) {}
  metadata(): GetModelMetadataResponse {
    return METADATA;
  }
  predict(_request: PredictRequest, context: PredictContext): Promise<PredictResponse> {
    this.seen.push(context);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => resolve({ score: 1, outputs: {}, modelVersion: "" }), this.delayMs);
      context.signal.addEventListener("abort", () => {
        clearTimeout(timer);
        this.aborted += 1;
        reject(new Error("aborted"));
      });
    });
  }
}

test("budgetMs: the tighter of the call's and the request's deadline, undefined without either", () => {
  const now = 1_000_000;
  assert.equal(budgetMs(request(), Infinity, now), undefined);
  assert.equal(budgetMs(request(), new Date(now + 250), now), 250);
  assert.equal(budgetMs(request(new Date(now + 100)), new Date(now + 250), now), 100);
  assert.equal(budgetMs(request(new Date(now + 900)), now + 250, now), 250);
  assert.equal(budgetMs(request(new Date(now - 5)), Infinity, now), -5);
});

test("the call's deadline: the model gets its budget, is aborted when it passes, the client gets DEADLINE_EXCEEDED", async () => {
  const model = new SlowModel(5000);
  const running = await serve(model);
  try {
    const started = Date.now();
    const err = await failure(call(running.client.predict.bind(running.client), request(), 150));
    assert.equal(err.code, status.DEADLINE_EXCEEDED);
    assert.ok(Date.now() - started < 1000);
    const budget = model.seen[0]?.budgetMs;
    assert.ok(budget !== undefined && budget > 0 && budget <= 150, `budget ${budget}`);
    // The server sees the cancellation right after the client does.
    for (let i = 0; i < 50 && model.aborted === 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal(model.aborted, 1);
    assert.ok(model.seen[0]?.signal.aborted);
    // An aborted call is not an error worth logging.
    assert.deepEqual(running.lines.filter((l) => l["level"] === "ERROR"), []);
  } finally {
    await running.close();
  }
});

test("PredictBatch items get their own request deadline within the call's", async () => {
  const model = new SlowModel(0);
  const running = await serve(model);
  try {
    const soon = new Date(Date.now() + 2000);
    await call(running.client.predictBatch.bind(running.client), { requests: [request(soon), request()] }, 10_000);
    const budgets = model.seen.map((c) => c.budgetMs ?? NaN);
    assert.ok((budgets[0] as number) <= 2000 && (budgets[0] as number) > 1000, `${budgets}`);
    assert.ok((budgets[1] as number) > 9000, `${budgets}`);
  } finally {
    await running.close();
  }
});

test("an unexpected error: INTERNAL with a generic message, its text only in the log", async () => {
  const model: Model = {
    metadata: () => METADATA,
    predict: () => {
      throw new TypeError("secret detail");
    },
  };
  const running = await serve(model);
  try {
    const err = await failure(call(running.client.predict.bind(running.client), request()));
    assert.equal(err.code, status.INTERNAL);
    assert.equal(err.details, "internal error");
    const batch = await call(running.client.predictBatch.bind(running.client), { requests: [request()] });
    assert.deepEqual(batch.results[0]?.result, {
      $case: "error",
      value: { grpcCode: status.INTERNAL, reason: "INTERNAL", message: "internal error" },
    });
    const logged = running.lines.filter((l) => l["level"] === "ERROR");
    assert.equal(logged.length, 2);
    assert.match(String(logged[0]?.["exc"]), /secret detail/);
  } finally {
    await running.close();
  }
});

test("shutdown: a call in flight finishes within the grace", async () => {
  const running = await serve(new SlowModel(300));
  const inFlight = call(running.client.predict.bind(running.client), request(), 5000);
  await new Promise((r) => setTimeout(r, 50));
  const stopped = running.server.shutdown(3000);
  const response = await inFlight;
  assert.equal(response.score, 1);
  assert.equal(response.modelVersion, "1", "the servicer stamps the version the model left empty");
  await stopped;
  running.client.close();
});

test("shutdown is bounded: calls still running after the grace are cut", async () => {
  const running = await serve(new SlowModel(60_000));
  assert.equal(await healthStatus(running.server.endpoint, MODEL_SERVICE), "SERVING");
  const inFlight = failure(call(running.client.predict.bind(running.client), request(), 60_000));
  await new Promise((r) => setTimeout(r, 50));
  running.server.setServing(false);
  assert.equal(await healthStatus(running.server.endpoint, MODEL_SERVICE), "NOT_SERVING");
  const started = Date.now();
  await running.server.shutdown(200);
  assert.ok(Date.now() - started < 1000, "shutdown took longer than its grace");
  assert.notEqual((await inFlight).code, status.OK);
  assert.ok(running.lines.some((l) => l["level"] === "WARNING"));
  running.client.close();
});
