package main

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The per-RPC metrics every server of the mesh exports, with the Python servers' names,
// labels and buckets (services/core/rpc_metrics.py), so one dashboard reads them all.

// slaBuckets are services/core/telemetry.py's SLA_BUCKETS_S: milliseconds around a 50 ms SLA.
var slaBuckets = []float64{
	0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03,
	0.04, 0.045, 0.05, 0.055, 0.06, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
}

// codeNames are the status codes as Python's grpc.StatusCode names them (grpc-go's
// String() says "InvalidArgument", Python "INVALID_ARGUMENT"): one label value per code.
var codeNames = [...]string{
	"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
	"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
	"ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
	"UNAUTHENTICATED",
}

func codeName(err error) string {
	code := status.Code(err)
	if int(code) < len(codeNames) {
		return codeNames[code]
	}
	return codeNames[codes.Unknown]
}

// rpcMetrics counts, times and gauges the calls of one server.
type rpcMetrics struct {
	handled  *prometheus.CounterVec
	handling *prometheus.HistogramVec
	inFlight *prometheus.GaugeVec
}

// newRegistry is the container's registry: the RPC metrics and the process' own (CPU, RSS,
// the Go runtime), what the Python containers' prometheus_client exports by default.
func newRegistry() (*prometheus.Registry, *rpcMetrics) {
	registry := prometheus.NewRegistry()
	labels := []string{"grpc_service", "grpc_method", "grpc_type"}
	metrics := &rpcMetrics{
		handled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rdv_grpc_server_handled_total",
			Help: "gRPC calls completed by the server, by status code",
		}, append(labels, "grpc_code")),
		handling: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rdv_grpc_server_handling_seconds",
			Help:    "Time a gRPC call spent in the server (a stream: its whole life)",
			Buckets: slaBuckets,
		}, labels),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "rdv_grpc_server_in_flight",
			Help: "gRPC calls (and open streams) in progress",
		}, labels),
	}
	registry.MustRegister(
		metrics.handled, metrics.handling, metrics.inFlight,
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewGoCollector(),
	)
	return registry, metrics
}

// splitMethod turns "/pkg.Service/Method" into ("pkg.Service", "Method").
func splitMethod(fullMethod string) (string, string) {
	for i := len(fullMethod) - 1; i >= 0; i-- {
		if fullMethod[i] == '/' {
			service := fullMethod[:i]
			if len(service) > 0 && service[0] == '/' {
				service = service[1:]
			}
			return service, fullMethod[i+1:]
		}
	}
	return "", fullMethod
}

// observe runs call, counting it in flight meanwhile, then by its code and duration.
// grpc-go calls interceptors only for registered methods: labels stay bounded.
func (m *rpcMetrics) observe(fullMethod, kind string, call func() error) error {
	service, method := splitMethod(fullMethod)
	inFlight := m.inFlight.WithLabelValues(service, method, kind)
	inFlight.Inc()
	started := time.Now()
	err := call()
	m.handling.WithLabelValues(service, method, kind).Observe(time.Since(started).Seconds())
	inFlight.Dec()
	m.handled.WithLabelValues(service, method, kind, codeName(err)).Inc()
	return err
}

func (m *rpcMetrics) unary() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, request any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		var response any
		err := m.observe(info.FullMethod, "unary", func() error {
			var err error
			response, err = handler(ctx, request)
			return err
		})
		return response, err
	}
}

func (m *rpcMetrics) stream() grpc.StreamServerInterceptor {
	return func(server any, stream grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		kind := "bidi_stream"
		switch {
		case info.IsClientStream && !info.IsServerStream:
			kind = "client_stream"
		case info.IsServerStream && !info.IsClientStream:
			kind = "server_stream"
		}
		return m.observe(info.FullMethod, kind, func() error { return handler(server, stream) })
	}
}

// metricsServer serves /metrics over HTTP on host:port until closed.
type metricsServer struct {
	server  *http.Server
	address string
}

// serveMetrics starts the /metrics endpoint (none when port is 0: a nil server).
func serveMetrics(host string, port int, registry *prometheus.Registry, log *slog.Logger) (*metricsServer, error) {
	if port == 0 {
		return nil, nil
	}
	listener, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(registry, promhttp.HandlerOpts{Registry: registry}))
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := server.Serve(listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("the metrics endpoint stopped: " + err.Error())
		}
	}()
	return &metricsServer{server: server, address: listener.Addr().String()}, nil
}

func (m *metricsServer) close() {
	if m != nil {
		_ = m.server.Close()
	}
}
