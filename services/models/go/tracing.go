package main

import (
	"context"
	"fmt"
	"io"
	"strings"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc/filters"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/stdout/stdouttrace"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"google.golang.org/grpc"
)

// Traces, as the Python services have them (services/core/tracing.py), from the standard
// variables only (the Go SDK reads the rest itself):
//
//	OTEL_TRACES_EXPORTER                otlp | console | none (default none)
//	OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT  where otlp sends (OTLP over gRPC; http:// is plaintext)
//	OTEL_TRACES_SAMPLER / _ARG          the sampler (default parent-based, always on)
//	OTEL_SERVICE_NAME                   the service (default "model")
//	OTEL_RESOURCE_ATTRIBUTES            more resource attributes
const envTracesExporter = "OTEL_TRACES_EXPORTER"

// defaultServiceName is the Python containers' (services/models/app.py runs "model").
const defaultServiceName = "model"

// tracing is what setupTracing installed: the server option that opens a span per call,
// and how to flush the spans still queued at exit.
type tracing struct {
	serverOption grpc.ServerOption
	shutdown     func(context.Context) error
}

// setupTracing installs the W3C trace-context propagator (so a call's traceparent is
// continued whatever the exporter) and, with an exporter, a tracer provider that batches
// spans off the request path. otelgrpc opens a SERVER span per call, health checks and
// reflection aside. stdout is where console spans are printed.
func setupTracing(ctx context.Context, getenv func(string) string, stdout io.Writer) (*tracing, error) {
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(
		propagation.TraceContext{}, propagation.Baggage{}))
	noop := func(context.Context) error { return nil }
	var exporter sdktrace.SpanExporter
	switch name := strings.ToLower(strings.TrimSpace(getenv(envTracesExporter))); name {
	case "", "none":
	case "otlp":
		otlp, err := otlptracegrpc.New(ctx)
		if err != nil {
			return nil, fmt.Errorf("%s=otlp: %w", envTracesExporter, err)
		}
		exporter = otlp
	case "console":
		console, err := stdouttrace.New(stdouttrace.WithWriter(stdout))
		if err != nil {
			return nil, fmt.Errorf("%s=console: %w", envTracesExporter, err)
		}
		exporter = console
	default:
		return nil, fmt.Errorf("%s=%q: expected otlp, console or none", envTracesExporter, name)
	}
	untraced := filters.None(filters.ServicePrefix("grpc."))
	if exporter == nil {
		// Nothing recorded: otelgrpc's spans are the no-op provider's, which still carry
		// the caller's trace context.
		return &tracing{grpc.StatsHandler(otelgrpc.NewServerHandler(otelgrpc.WithFilter(untraced))), noop}, nil
	}
	res := resource.NewSchemaless(resourceAttributes(getenv)...)
	// The sampler comes from OTEL_TRACES_SAMPLER (the SDK reads it); without it parent-based,
	// always on, as the Python services' default ratio of 1.
	provider := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(res))
	otel.SetTracerProvider(provider)
	handler := otelgrpc.NewServerHandler(otelgrpc.WithFilter(untraced), otelgrpc.WithTracerProvider(provider))
	return &tracing{grpc.StatsHandler(handler), provider.Shutdown}, nil
}

// resourceAttributes are the spans' resource: service.name "model" unless
// OTEL_RESOURCE_ATTRIBUTES (key=value,...) or OTEL_SERVICE_NAME, which wins, say otherwise.
func resourceAttributes(getenv func(string) string) []attribute.KeyValue {
	values := map[string]string{"service.name": defaultServiceName}
	keys := []string{"service.name"}
	for _, item := range strings.Split(getenv("OTEL_RESOURCE_ATTRIBUTES"), ",") {
		key, value, found := strings.Cut(item, "=")
		key = strings.TrimSpace(key)
		if !found || key == "" {
			continue
		}
		if _, seen := values[key]; !seen {
			keys = append(keys, key)
		}
		values[key] = strings.TrimSpace(value)
	}
	if name := getenv("OTEL_SERVICE_NAME"); name != "" {
		values["service.name"] = name
	}
	attributes := make([]attribute.KeyValue, 0, len(keys))
	for _, key := range keys {
		attributes = append(attributes, attribute.String(key, values[key]))
	}
	return attributes
}
