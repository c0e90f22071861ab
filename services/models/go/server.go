package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	pb "github.com/rendezvous-ml/rendezvous/gen/go/rendezvous/v1"
)

// maxMessageBytes bounds requests and responses as the Python containers and the runner's
// channel do (max_message_bytes in services/core/settings.py); beyond it gRPC answers
// RESOURCE_EXHAUSTED.
const maxMessageBytes = 4 * 1024 * 1024

// container is a gRPC server with the model service, health, reflection and per-RPC metrics.
type container struct {
	server   *grpc.Server
	health   *health.Server
	listener net.Listener
	// registry holds the per-RPC and process metrics /metrics serves.
	registry *prometheus.Registry
	// endpoint is host:port as configured, with the port actually bound.
	endpoint string
	log      *slog.Logger
}

// listen binds the configured address and registers the services; nothing is served yet.
// creds makes the server TLS (nil: plaintext); extra are more server options (the tracing
// stats handler).
func listen(config Config, creds credentials.TransportCredentials, service *modelService, log *slog.Logger, extra ...grpc.ServerOption) (*container, error) {
	listener, err := net.Listen("tcp", config.Listen)
	if err != nil {
		return nil, err
	}
	host, _, _ := net.SplitHostPort(config.Listen)
	port := listener.Addr().(*net.TCPAddr).Port
	registry, metrics := newRegistry()
	options := append([]grpc.ServerOption{
		grpc.MaxRecvMsgSize(maxMessageBytes),
		grpc.MaxSendMsgSize(maxMessageBytes),
		grpc.ChainUnaryInterceptor(metrics.unary()),
		grpc.ChainStreamInterceptor(metrics.stream()),
	}, extra...)
	if creds != nil {
		options = append(options, grpc.Creds(creds))
	}
	server := grpc.NewServer(options...)
	pb.RegisterModelServiceServer(server, service)
	healthServer := health.NewServer()
	healthpb.RegisterHealthServer(server, healthServer)
	reflection.Register(server)
	return &container{
		server:   server,
		health:   healthServer,
		listener: listener,
		registry: registry,
		endpoint: net.JoinHostPort(host, strconv.Itoa(port)),
		log:      log,
	}, nil
}

// serve answers calls until stop; health says SERVING from the start. It returns the
// channel serve's result arrives on.
func (c *container) serve() <-chan error {
	c.setServing(healthpb.HealthCheckResponse_SERVING)
	done := make(chan error, 1)
	go func() { done <- c.server.Serve(c.listener) }()
	return done
}

func (c *container) setServing(status healthpb.HealthCheckResponse_ServingStatus) {
	c.health.SetServingStatus("", status)
	c.health.SetServingStatus(pb.ModelService_ServiceDesc.ServiceName, status)
}

// stop drains: health says NOT_SERVING at once (and stays so), calls in flight may finish
// for up to grace, then every connection is closed.
func (c *container) stop(grace time.Duration) {
	c.health.Shutdown()
	stopped := make(chan struct{})
	go func() {
		c.server.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(grace):
		c.log.Warn("calls still in flight after the grace period; closing them", "grace_s", grace.Seconds())
		c.server.Stop()
		<-stopped
	}
}

// readyFacts is the ready file's content, the fields the Python containers write
// (services/core/server.py write_ready_file with services/models/app.py facts).
type readyFacts struct {
	PID      int    `json:"pid"`
	Endpoint string `json:"endpoint"`
	Model    string `json:"model"`
	Kind     string `json:"kind"`
	Version  string `json:"version"`
}

// writeReadyFile writes facts to path atomically: a temporary file beside it, renamed.
func writeReadyFile(path string, facts readyFacts) error {
	if path == "" {
		return nil
	}
	data, err := json.Marshal(facts)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// serveUntilDone serves model as config says (over TLS with creds) until ctx ends (a
// signal), then drains within grace. A nil error means a clean stop.
func serveUntilDone(ctx context.Context, config Config, creds credentials.TransportCredentials, model *Diabetes, grace time.Duration, log *slog.Logger, extra ...grpc.ServerOption) error {
	c, err := listen(config, creds, newModelService(model, config.Version, log), log, extra...)
	if err != nil {
		return fmt.Errorf("%s=%q: %w", envListen, config.Listen, err)
	}
	metrics, err := serveMetrics(config.MetricsHost, config.MetricsPort, c.registry, log)
	if err != nil {
		return fmt.Errorf("%s=%q, %s=%d: %w", envMetricsHost, config.MetricsHost, envMetricsPort, config.MetricsPort, err)
	}
	defer metrics.close()
	done := c.serve()
	facts := readyFacts{os.Getpid(), c.endpoint, config.Name, kind, config.Version}
	if err := writeReadyFile(config.ReadyFile, facts); err != nil {
		c.stop(0)
		return fmt.Errorf("%s=%q: %w", envReadyFile, config.ReadyFile, err)
	}
	log.Info("model-"+config.Name+" started", "endpoint", c.endpoint, "model", config.Name,
		"kind", kind, "version", config.Version, "algorithm", config.Args.Algorithm, "tls", config.TLS.Mode())
	select {
	case err := <-done:
		return fmt.Errorf("the server stopped by itself: %w", err)
	case <-ctx.Done():
	}
	log.Info("draining", "reason", "signal", "grace_s", grace.Seconds())
	c.stop(grace)
	if err := <-done; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	log.Info("stopped")
	return nil
}
