// rendezvous.v1.ModelService for any Model: works out each request's budget (the tighter of
// the call's gRPC deadline and the request's own deadline), aborts the model's work when the
// call is cancelled or its deadline passes, stamps the model version, and maps errors as
// the Python servicer does (services/models/base.py): a ServiceError with its status and
// details, anything else INTERNAL with the text only in the log; in PredictBatch each
// request succeeds or fails on its own, as a ModelError result.
import type { Deadline, ServerUnaryCall } from "@grpc/grpc-js";
import type {
  ModelServiceServer,
  PredictBatchResponse,
  PredictRequest,
  PredictResponse,
  PredictResult,
} from "../gen/rendezvous/v1/model";
import { clientError, grpcError, modelError, ServiceError } from "./errors";
import type { Logger } from "./log";
import type { Model } from "./model";

export function modelService(model: Model, version: string, log: Logger): ModelServiceServer {
  /** The model's answer stamped with the version; rejects with what the client may see. */
  async function predict(request: PredictRequest, deadline: Deadline, signal: AbortSignal): Promise<PredictResponse> {
    try {
      signal.throwIfAborted();
      const response = await model.predict(request, { budgetMs: budgetMs(request, deadline), signal });
      return { ...response, modelVersion: response.modelVersion || version };
    } catch (err) {
      if (!(err instanceof ServiceError) && !signal.aborted) {
        log.error("predict failed", { request_id: request.requestId }, err);
      }
      throw clientError(err);
    }
  }

  async function result(request: PredictRequest, deadline: Deadline, signal: AbortSignal): Promise<PredictResult> {
    try {
      return { result: { $case: "response", value: await predict(request, deadline, signal) } };
    } catch (err) {
      return { result: { $case: "error", value: modelError(err as ServiceError) } };
    }
  }

  return {
    predict(call, callback) {
      const { signal, done } = watchCancel(call);
      predict(call.request, call.getDeadline(), signal).then(
        (response) => callback(null, response),
        (err: ServiceError) => callback(grpcError(err)),
      ).finally(done);
    },

    predictBatch(call, callback) {
      const { signal, done } = watchCancel(call);
      // Concurrently: a model that waits on something must not make the batch as slow as
      // the sum of its items.
      const deadline = call.getDeadline();
      Promise.all(call.request.requests.map((request) => result(request, deadline, signal))).then(
        (results) => callback(null, { results } satisfies PredictBatchResponse),
        (err: unknown) => callback(grpcError(clientError(err))),
      ).finally(done);
    },

    getModelMetadata(_call, callback) {
      callback(null, model.metadata());
    },
  };
}

/** A signal aborted when the call is cancelled: by the client, or by grpc-js once its deadline passed. */
function watchCancel(call: ServerUnaryCall<unknown, unknown>): { signal: AbortSignal; done: () => void } {
  const controller = new AbortController();
  const abort = (): void => controller.abort();
  if (call.cancelled) {
    abort();
  }
  call.on("cancelled", abort);
  return { signal: controller.signal, done: () => call.off("cancelled", abort) };
}

/** Milliseconds to the tighter of the call's deadline and the request's; undefined if neither is set. */
export function budgetMs(request: PredictRequest, deadline: Deadline, now: number = Date.now()): number | undefined {
  const callDeadline = deadline instanceof Date ? deadline.getTime() : deadline;
  const requestDeadline = request.deadline?.getTime() ?? Infinity;
  const earliest = Math.min(callDeadline, requestDeadline);
  return Number.isFinite(earliest) ? earliest - now : undefined;
}
