// Command rendezvous-model-go serves the diabetes model as rendezvous.v1.ModelService, in
// Go: the polyglot counterpart of `python -m services.models` with RDV_MODEL_KIND=diabetes.
//
// It reads the configuration every polyglot container shares from the environment:
//
//	RDV_MODEL_LISTEN      host:port to serve on (default 127.0.0.1:0)
//	RDV_MODEL_NAME        the model's name (default "diabetes")
//	RDV_MODEL_VERSION     its version (default "1")
//	RDV_MODEL_ARGS        a JSON object: {"algorithm": "ridge"|"linear", "artifact": path}
//	RDV_MODEL_READY_FILE  where to write {"pid", "endpoint", ...} once serving (optional)
//	RDV_MODEL_TLS__CERT_FILE, RDV_MODEL_TLS__KEY_FILE  serve TLS with this certificate
//	                      and key (PEM; plaintext when unset)
//	RDV_MODEL_TLS__CLIENT_CA_FILE  mTLS: a client must present a certificate this CA signed
//	RDV_MODEL_METRICS_PORT  Prometheus /metrics port (default 0: none)
//	RDV_MODEL_METRICS_HOST  the address it binds (default 127.0.0.1)
//
// and the standard OTEL_* variables for traces (tracing.go: a span per call, exported over
// OTLP when OTEL_TRACES_EXPORTER=otlp), and serves the model with the gRPC health service,
// server reflection and per-RPC metrics. A bad
// configuration (the artifact and the TLS files included) exits with status 2, a failure to serve with 1; SIGTERM or SIGINT drains
// (health NOT_SERVING, calls in flight finish within 5 s) and exits 0. Logs are JSON lines
// on stderr; -verbose adds debug ones.
package main

import (
	"context"
	"flag"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// shutdownGrace bounds the drain, as shutdown_grace_s (5 s) does for the Python containers.
// A variable only so that the drain's test need not wait 5 s.
var shutdownGrace = 5 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Getenv, os.Stderr))
}

// run is the whole program: its exit status for the arguments and environment, serving
// until ctx ends.
func run(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) int {
	flags := flag.NewFlagSet("rendezvous-model-go", flag.ContinueOnError)
	flags.SetOutput(stderr)
	verbose := flags.Bool("verbose", false, "log debug messages too")
	if err := flags.Parse(args); err != nil {
		return 2
	}
	log := newLogger(stderr, *verbose)
	config, err := loadConfig(getenv)
	if err != nil {
		log.Error("invalid configuration: " + err.Error())
		return 2
	}
	// Built before anything listens, so a bad artifact fails the start, not the first call.
	artifactPath := ""
	if config.Args.Artifact != nil {
		artifactPath = *config.Args.Artifact
	}
	artifact, source, err := loadArtifact(config.Args.Algorithm, artifactPath)
	if err != nil {
		log.Error("invalid configuration: " + envArgs + ": cannot load the artifact: " + err.Error())
		return 2
	}
	log.Debug("artifact loaded", "artifact", source)
	creds, err := config.TLS.serverCredentials()
	if err != nil {
		log.Error("invalid configuration: " + err.Error())
		return 2
	}
	traces, err := setupTracing(ctx, getenv, os.Stdout)
	if err != nil {
		log.Error("invalid configuration: " + err.Error())
		return 2
	}
	// Spans still queued go out before the process exits (at most shutdownGrace).
	defer func() {
		flush, cancel := context.WithTimeout(context.Background(), shutdownGrace)
		defer cancel()
		if err := traces.shutdown(flush); err != nil {
			log.Warn("spans not exported at exit: " + err.Error())
		}
	}()
	model := NewDiabetes(artifact, config.Name, config.Version)
	if err := serveUntilDone(ctx, config, creds, model, shutdownGrace, log, traces.serverOption); err != nil {
		log.Error("cannot serve: " + err.Error())
		return 1
	}
	return 0
}

// newLogger writes JSON lines shaped like the Python services' (services/core/telemetry.py):
// ts (epoch seconds), level, service, logger, msg and the attributes.
func newLogger(w io.Writer, verbose bool) *slog.Logger {
	level := slog.LevelInfo
	if verbose {
		level = slog.LevelDebug
	}
	handler := slog.NewJSONHandler(w, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(groups []string, attr slog.Attr) slog.Attr {
			if len(groups) > 0 {
				return attr
			}
			switch attr.Key {
			case slog.TimeKey:
				return slog.Float64("ts", float64(attr.Value.Time().UnixMicro())/1e6)
			case slog.LevelKey:
				if attr.Value.Any().(slog.Level) == slog.LevelWarn {
					return slog.String(slog.LevelKey, "WARNING")
				}
			}
			return attr
		},
	})
	return slog.New(handler).With("service", "model", "logger", "rendezvous-model-go")
}
