// Traces, as the Python services have them (services/core/tracing.py), from the standard
// variables:
//   OTEL_TRACES_EXPORTER                   otlp | console | none (default none)
//   OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT   where otlp sends (OTLP over gRPC; read by the exporter)
//   OTEL_TRACES_SAMPLER / _ARG             the sampler (default parent-based, always on)
//   OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES   the resource (default service.name "model")
//   OTEL_BSP_SCHEDULE_DELAY                how often queued spans are sent, ms (default 5000)
// The W3C trace-context propagator and @opentelemetry/instrumentation-grpc are installed
// whatever the exporter, so a call's traceparent is continued (a SERVER span per call,
// health checks and reflection aside). The instrumentation patches @grpc/grpc-js as it is
// loaded: setupTracing runs before anything requires it (main.ts).
import { context, propagation, trace } from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import { CompositePropagator, W3CBaggagePropagator, W3CTraceContextPropagator } from "@opentelemetry/core";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-grpc";
import { registerInstrumentations } from "@opentelemetry/instrumentation";
import { GrpcInstrumentation } from "@opentelemetry/instrumentation-grpc";
import { detectResources, envDetector, resourceFromAttributes } from "@opentelemetry/resources";
import {
  AlwaysOffSampler,
  AlwaysOnSampler,
  BatchSpanProcessor,
  ConsoleSpanExporter,
  ParentBasedSampler,
  TraceIdRatioBasedSampler,
  TracerProvider,
  type Sampler,
  type SpanExporter,
} from "@opentelemetry/sdk-trace";

export const DEFAULT_SERVICE_NAME = "model";
// Health checks (every few hundred ms from supervisors and probes) and reflection tell nothing.
const UNTRACED_METHODS = ["Check", "Watch", "ServerReflectionInfo"];

export class TracingConfigError extends Error {}

export interface Tracing {
  /** Export what is still queued (call before exiting). */
  shutdown(): Promise<void>;
}

const SAMPLERS: Record<string, (ratio: number) => Sampler> = {
  always_on: () => new AlwaysOnSampler(),
  always_off: () => new AlwaysOffSampler(),
  traceidratio: (ratio) => new TraceIdRatioBasedSampler(ratio),
  parentbased_always_on: () => new ParentBasedSampler({ root: new AlwaysOnSampler() }),
  parentbased_always_off: () => new ParentBasedSampler({ root: new AlwaysOffSampler() }),
  parentbased_traceidratio: (ratio) => new ParentBasedSampler({ root: new TraceIdRatioBasedSampler(ratio) }),
};

/** The sampler OTEL_TRACES_SAMPLER names (default parent-based, always on). */
export function samplerFrom(env: NodeJS.ProcessEnv): Sampler {
  const name = (env.OTEL_TRACES_SAMPLER ?? "parentbased_always_on").trim().toLowerCase();
  const make = SAMPLERS[name];
  if (make === undefined) {
    throw new TracingConfigError(`OTEL_TRACES_SAMPLER=${JSON.stringify(name)}: expected one of ${Object.keys(SAMPLERS).join(", ")}`);
  }
  const raw = env.OTEL_TRACES_SAMPLER_ARG;
  const ratio = raw === undefined || raw === "" ? 1 : Number(raw);
  if (!Number.isFinite(ratio) || ratio < 0 || ratio > 1) {
    throw new TracingConfigError(`OTEL_TRACES_SAMPLER_ARG=${JSON.stringify(raw)}: expected a ratio from 0 to 1`);
  }
  return make(ratio);
}

function exporterFrom(env: NodeJS.ProcessEnv): SpanExporter | undefined {
  const name = (env.OTEL_TRACES_EXPORTER ?? "none").trim().toLowerCase();
  switch (name) {
    case "":
    case "none":
      return undefined;
    case "otlp":
      return new OTLPTraceExporter();
    case "console":
      return new ConsoleSpanExporter();
    default:
      throw new TracingConfigError(`OTEL_TRACES_EXPORTER=${JSON.stringify(name)}: expected otlp, console or none`);
  }
}

export function setupTracing(env: NodeJS.ProcessEnv = process.env): Tracing {
  const exporter = exporterFrom(env);
  const sampler = samplerFrom(env);
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
  propagation.setGlobalPropagator(
    new CompositePropagator({ propagators: [new W3CTraceContextPropagator(), new W3CBaggagePropagator()] }),
  );
  let provider: TracerProvider | undefined;
  if (exporter !== undefined) {
    // The environment's service name and attributes win over the default.
    const resource = resourceFromAttributes({ "service.name": DEFAULT_SERVICE_NAME }).merge(
      detectResources({ detectors: [envDetector] }),
    );
    // This SDK release no longer reads OTEL_BSP_SCHEDULE_DELAY itself.
    const delay = Number(env.OTEL_BSP_SCHEDULE_DELAY);
    const processor = new BatchSpanProcessor({
      exporter,
      ...(Number.isFinite(delay) && delay > 0 ? { scheduledDelayMillis: delay } : {}),
    });
    provider = new TracerProvider({ resource, sampler, spanProcessors: [processor] });
    trace.setGlobalTracerProvider(provider);
  }
  registerInstrumentations({ instrumentations: [new GrpcInstrumentation({ ignoreGrpcMethods: UNTRACED_METHODS })] });
  return { shutdown: async () => provider?.shutdown() };
}
