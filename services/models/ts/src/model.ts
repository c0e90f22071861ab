// What a servable model is, whatever it computes: metadata and an (a)synchronous predict
// that gets the time left and a signal that fires when the call is cancelled or its
// deadline passes. The servicer (service.ts) adapts it to rendezvous.v1.ModelService.
import type { GetModelMetadataResponse, PredictRequest, PredictResponse } from "../gen/rendezvous/v1/model";

export interface PredictContext {
  /** Milliseconds left before the tighter of the call's and the request's deadline; undefined: none. */
  budgetMs: number | undefined;
  /** Aborted when the call is cancelled or its gRPC deadline passes: stop working. */
  signal: AbortSignal;
}

export interface Model {
  metadata(): GetModelMetadataResponse;
  predict(request: PredictRequest, context: PredictContext): PredictResponse | Promise<PredictResponse>;
}
