package main

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// The configuration contract every polyglot model container shares: the supervisor starts
// it with these variables (services/supervisor/plan.py). Others it sets (RDV_MODEL_KIND,
// ...) are for the Python container and ignored here.
const (
	envListen      = "RDV_MODEL_LISTEN"
	envName        = "RDV_MODEL_NAME"
	envVersion     = "RDV_MODEL_VERSION"
	envArgs        = "RDV_MODEL_ARGS"
	envReadyFile   = "RDV_MODEL_READY_FILE"
	envMetricsPort = "RDV_MODEL_METRICS_PORT"
	envMetricsHost = "RDV_MODEL_METRICS_HOST"

	defaultListen  = "127.0.0.1:0"
	defaultVersion = "1"
	// Loopback, as the Python services' metrics_host; a container deployment sets 0.0.0.0.
	defaultMetricsHost = "127.0.0.1"
	// kind is the only model this container serves; it names it when RDV_MODEL_NAME is empty.
	kind = "diabetes"
)

// Config is what the container serves, and where.
type Config struct {
	// Listen is host:port; port 0 picks a free one (the ready file says which).
	Listen string
	// Name and Version are what GetModelMetadata reports and predictions carry.
	Name    string
	Version string
	// Args are the diabetes model's arguments.
	Args DiabetesArgs
	// ReadyFile, when set, receives {"endpoint", "pid", ...} once the container serves.
	ReadyFile string
	// MetricsPort, when not 0, serves Prometheus /metrics on MetricsHost:MetricsPort.
	MetricsPort int
	MetricsHost string
	// TLS is the server's TLS (RDV_MODEL_TLS__*): plaintext, TLS or mTLS.
	TLS TLSConfig
}

// DiabetesArgs are RDV_MODEL_ARGS for the diabetes model (services/models/diabetes.py).
type DiabetesArgs struct {
	// Algorithm is ridge (the default) or linear.
	Algorithm string `json:"algorithm"`
	// Artifact, when set, is a path to read the model from instead of the committed file.
	Artifact *string `json:"artifact"`
}

// loadConfig reads the RDV_MODEL_* variables through getenv; every problem is an error
// naming the variable.
func loadConfig(getenv func(string) string) (Config, error) {
	config := Config{
		Listen:      orDefault(getenv(envListen), defaultListen),
		Name:        orDefault(getenv(envName), kind),
		Version:     orDefault(getenv(envVersion), defaultVersion),
		ReadyFile:   getenv(envReadyFile),
		MetricsHost: orDefault(getenv(envMetricsHost), defaultMetricsHost),
	}
	if err := checkListen(config.Listen); err != nil {
		return Config{}, fmt.Errorf("%s=%q: %w", envListen, config.Listen, err)
	}
	if port := getenv(envMetricsPort); port != "" {
		number, err := strconv.ParseUint(port, 10, 16)
		if err != nil {
			return Config{}, fmt.Errorf("%s=%q: must be a port number from 0 to 65535", envMetricsPort, port)
		}
		config.MetricsPort = int(number)
	}
	args, err := parseArgs(getenv(envArgs))
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", envArgs, err)
	}
	config.Args = args
	if config.TLS, err = loadTLSConfig(getenv); err != nil {
		return Config{}, err
	}
	return config, nil
}

func orDefault(value, fallback string) string {
	if value == "" {
		return fallback
	}
	return value
}

func checkListen(listen string) error {
	_, port, err := net.SplitHostPort(listen)
	if err != nil {
		return errors.New("must be host:port")
	}
	if number, err := strconv.ParseUint(port, 10, 16); err != nil || port == "" {
		return fmt.Errorf("port %q is not a number from 0 to 65535", port)
	} else if number > 65535 {
		return fmt.Errorf("port %d is out of range", number)
	}
	return nil
}

// parseArgs reads a JSON object of diabetes arguments; empty means {}.
func parseArgs(text string) (DiabetesArgs, error) {
	args := DiabetesArgs{Algorithm: "ridge"}
	if strings.TrimSpace(text) == "" {
		return args, nil
	}
	if !strings.HasPrefix(strings.TrimSpace(text), "{") {
		return DiabetesArgs{}, errors.New("must be a JSON object")
	}
	if err := decodeStrict([]byte(text), &args); err != nil {
		if key, unknown := strings.CutPrefix(err.Error(), "json: unknown field "); unknown {
			return DiabetesArgs{}, fmt.Errorf("unknown key %s (the diabetes model takes algorithm and artifact)", key)
		}
		return DiabetesArgs{}, err
	}
	if !algorithms[args.Algorithm] {
		return DiabetesArgs{}, fmt.Errorf("algorithm %q: must be ridge or linear", args.Algorithm)
	}
	if args.Artifact != nil && *args.Artifact == "" {
		return DiabetesArgs{}, errors.New("artifact: must be a path when given")
	}
	return args, nil
}
