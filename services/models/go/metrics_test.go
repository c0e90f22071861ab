package main

import (
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/rendezvous-ml/rendezvous/gen/go/rendezvous/v1"
)

// freePort is a loopback TCP port free a moment ago.
// freePort is a loopback port free now, below the kernel's ephemeral range (as the
// supervisor picks them, services/supervisor/plan.py): a port from Listen(":0") is ephemeral
// and can be handed again, a moment later, to the child's own gRPC listener on port 0.
func freePort(t *testing.T) int {
	t.Helper()
	for range 100 {
		port := 20000 + rand.IntN(12000)
		listener, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			continue
		}
		listener.Close()
		return port
	}
	t.Fatal("no free port in 20000-32000")
	return 0
}

func scrape(t *testing.T, port int) string {
	t.Helper()
	response, err := http.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer response.Body.Close()
	body, err := io.ReadAll(response.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

func TestMetricsCountCallsByCodeAndTimeThem(t *testing.T) {
	port := freePort(t)
	_, conn, stop := startProcess(t, map[string]string{"RDV_MODEL_METRICS_PORT": strconv.Itoa(port)})
	defer stop()
	client := pb.NewModelServiceClient(conn)
	for range 3 {
		if _, err := client.Predict(callContext(t), request(t, 0)); err != nil {
			t.Fatal(err)
		}
	}
	bad := request(t, 0)
	delete(bad.Features, "bmi")
	if _, err := client.Predict(callContext(t), bad); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("bad request: %v", err)
	}
	text := scrape(t, port)
	// The Python servers' names, labels and code spelling (services/core/rpc_metrics.py).
	labels := `grpc_method="Predict",grpc_service="rendezvous.v1.ModelService",grpc_type="unary"`
	for _, want := range []string{
		`rdv_grpc_server_handled_total{grpc_code="OK",` + labels + `} 3`,
		`rdv_grpc_server_handled_total{grpc_code="INVALID_ARGUMENT",` + labels + `} 1`,
		`rdv_grpc_server_handling_seconds_count{` + labels + `} 4`,
		`rdv_grpc_server_handling_seconds_bucket{` + labels + `,le="0.05"} `,
		`rdv_grpc_server_in_flight{` + labels + `} 0`,
		"process_cpu_seconds_total ",
		"process_resident_memory_bytes ",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

func TestMetricsBindTheConfiguredHostOnly(t *testing.T) {
	config, err := loadConfig(env(map[string]string{"RDV_MODEL_METRICS_PORT": "9464"}))
	if err != nil {
		t.Fatal(err)
	}
	if config.MetricsPort != 9464 || config.MetricsHost != "127.0.0.1" {
		t.Fatalf("config %+v", config)
	}
	if _, err := loadConfig(env(map[string]string{"RDV_MODEL_METRICS_PORT": "http"})); err == nil ||
		!strings.Contains(err.Error(), "RDV_MODEL_METRICS_PORT=\"http\"") {
		t.Fatalf("bad port: %v", err)
	}
	registry, _ := newRegistry()
	none, err := serveMetrics("127.0.0.1", 0, registry, quiet)
	if none != nil || err != nil {
		t.Fatalf("port 0 serves %v, %v", none, err)
	}
	served, err := serveMetrics("127.0.0.1", freePort(t), registry, quiet)
	if err != nil {
		t.Fatal(err)
	}
	defer served.close()
	if host, _, _ := net.SplitHostPort(served.address); host != "127.0.0.1" {
		t.Errorf("bound %s", served.address)
	}
}

func TestSplitMethodAndCodeNames(t *testing.T) {
	if service, method := splitMethod("/rendezvous.v1.ModelService/Predict"); service != "rendezvous.v1.ModelService" || method != "Predict" {
		t.Errorf("split %q %q", service, method)
	}
	for code, name := range map[codes.Code]string{codes.OK: "OK", codes.InvalidArgument: "INVALID_ARGUMENT", codes.Unauthenticated: "UNAUTHENTICATED", codes.Code(99): "UNKNOWN"} {
		var err error
		if code != codes.OK {
			err = status.Error(code, "x")
		}
		if got := codeName(err); got != name {
			t.Errorf("%v: %q, want %q", code, got, name)
		}
	}
}
