package main

import (
	"bytes"
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"

	pb "github.com/rendezvous-ml/rendezvous/gen/go/rendezvous/v1"
)

// A call with a traceparent is a SERVER span of the caller's trace, exported (console) before
// shutdown returns; a health check makes no span.
func TestTheCallersTraceIsContinued(t *testing.T) {
	env := map[string]string{"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "model-diabetes-go"}
	var out bytes.Buffer
	traces, err := setupTracing(context.Background(), func(k string) string { return env[k] }, &out)
	if err != nil {
		t.Fatal(err)
	}
	service := newModelService(mustModel(t, "ridge"), "7", quiet)
	c, err := listen(Config{Listen: "127.0.0.1:0"}, nil, service, quiet, traces.serverOption)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.listener.Close()
	buffer := bufconn.Listen(1 << 20)
	c.listener = buffer
	done := c.serve()
	conn := dial(t, "passthrough:///bufnet", grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
		return buffer.DialContext(ctx)
	}))
	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	ctx := metadata.AppendToOutgoingContext(callContext(t), "traceparent", "00-"+traceID+"-00f067aa0ba902b7-01")
	if _, err := pb.NewModelServiceClient(conn).Predict(ctx, request(t, 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := healthpb.NewHealthClient(conn).Check(callContext(t), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	c.stop(time.Second)
	<-done
	if err := traces.shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	printed := out.String()
	for _, want := range []string{`"TraceID":"` + traceID + `"`, `"Name":"rendezvous.v1.ModelService/Predict"`, `"SpanKind":2`, `"Value":"model-diabetes-go"`} {
		if !strings.Contains(printed, want) {
			t.Errorf("the printed spans lack %s:\n%s", want, printed)
		}
	}
	if strings.Contains(printed, "Health") {
		t.Errorf("a health check made a span:\n%s", printed)
	}
}

func TestAnUnknownExporterIsAnError(t *testing.T) {
	_, err := setupTracing(context.Background(), func(k string) string {
		return map[string]string{"OTEL_TRACES_EXPORTER": "zipkin"}[k]
	}, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), `OTEL_TRACES_EXPORTER="zipkin"`) {
		t.Fatalf("got %v", err)
	}
}
