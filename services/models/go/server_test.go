package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/rendezvous-ml/rendezvous/gen/go/rendezvous/v1"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// dial is a client connection to address, closed with the test: plaintext unless options
// give other transport credentials (the last one given wins).
func dial(t *testing.T, address string, options ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	options = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, options...)
	conn, err := grpc.NewClient(address, options...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// inMemory serves the ridge model on a bufconn listener: every call but the TCP tests'.
func inMemory(t *testing.T) pb.ModelServiceClient {
	t.Helper()
	service := newModelService(mustModel(t, "ridge"), "7", quiet)
	c, err := listen(Config{Listen: "127.0.0.1:0"}, nil, service, quiet)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.listener.Close()
	buffer := bufconn.Listen(1 << 20)
	c.listener = buffer
	done := c.serve()
	t.Cleanup(func() { c.stop(time.Second); <-done })
	conn := dial(t, "passthrough:///bufnet", grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
		return buffer.DialContext(ctx)
	}))
	return pb.NewModelServiceClient(conn)
}

func request(t *testing.T, row int) *pb.PredictRequest {
	t.Helper()
	return &pb.PredictRequest{RequestId: "r", Objective: "demo", Features: features(loadFixture(t).Rows[row])}
}

func callContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// details are the BadRequest violations ("field: description") and the ErrorInfo of err.
func details(t *testing.T, err error) ([]string, *errdetails.ErrorInfo) {
	t.Helper()
	var violations []string
	var info *errdetails.ErrorInfo
	for _, detail := range status.Convert(err).Details() {
		switch d := detail.(type) {
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				violations = append(violations, v.GetField()+": "+v.GetDescription())
			}
		case *errdetails.ErrorInfo:
			info = d
		default:
			t.Fatalf("unexpected detail %T", detail)
		}
	}
	return violations, info
}

func TestPredict(t *testing.T) {
	client := inMemory(t)
	response, err := client.Predict(callContext(t), request(t, 0))
	if err != nil {
		t.Fatal(err)
	}
	if want := loadFixture(t).Predictions["ridge"][0]; !closeEnough(response.GetScore(), want) {
		t.Errorf("score %v, Python %v", response.GetScore(), want)
	}
	if response.GetModelVersion() != "7" || response.GetOutputs()["model"].GetStringValue() != "ridge" {
		t.Errorf("response %v", response)
	}
}

func TestPredictInvalidFeatures(t *testing.T) {
	client := inMemory(t)
	bad := request(t, 0)
	delete(bad.Features, "bmi")
	bad.Features["age"] = structpb.NewStringValue("forty")
	bad.Features["s5"] = structpb.NewNumberValue(math.Inf(1))
	_, err := client.Predict(callContext(t), bad)
	st := status.Convert(err)
	if st.Code() != codes.InvalidArgument || st.Message() != "invalid request: features.age, features.bmi, features.s5" {
		t.Fatalf("status %v", st)
	}
	violations, info := details(t, err)
	want := "features.age: must be a finite number|features.bmi: is required|features.s5: must be a finite number"
	if strings.Join(violations, "|") != want {
		t.Errorf("violations %v", violations)
	}
	if info.GetReason() != "INVALID_ARGUMENT" || info.GetDomain() != "rendezvous.v1" {
		t.Errorf("error info %v", info)
	}
}

func TestPredictPastDeadlines(t *testing.T) {
	client := inMemory(t)
	late := request(t, 0)
	late.Deadline = timestamppb.New(time.Now().Add(-time.Millisecond))
	_, err := client.Predict(callContext(t), late)
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("request deadline passed: %v", err)
	}
	if _, info := details(t, err); info.GetReason() != "DEADLINE_EXCEEDED" {
		t.Errorf("error info %v", info)
	}
	// A deadline still ahead is fine.
	ahead := request(t, 0)
	ahead.Deadline = timestamppb.New(time.Now().Add(time.Minute))
	if _, err := client.Predict(callContext(t), ahead); err != nil {
		t.Fatalf("request deadline ahead: %v", err)
	}
	// The call's own deadline (gRPC's) ends it too.
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	if _, err := client.Predict(ctx, request(t, 0)); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("call deadline passed: %v", err)
	}
}

func TestPredictBatchMixesResults(t *testing.T) {
	client := inMemory(t)
	f := loadFixture(t)
	missing := request(t, 1)
	delete(missing.Features, "s6")
	late := request(t, 2)
	late.Deadline = timestamppb.New(time.Now().Add(-time.Second))
	batch := &pb.PredictBatchRequest{Requests: []*pb.PredictRequest{request(t, 0), missing, late, request(t, 3)}}
	response, err := client.PredictBatch(callContext(t), batch)
	if err != nil {
		t.Fatal(err)
	}
	results := response.GetResults()
	if len(results) != 4 {
		t.Fatalf("%d results", len(results))
	}
	for i, row := range map[int]int{0: 0, 3: 3} {
		if got := results[i].GetResponse().GetScore(); !closeEnough(got, f.Predictions["ridge"][row]) {
			t.Errorf("result %d: %v", i, results[i])
		}
	}
	invalid := results[1].GetError()
	if codes.Code(invalid.GetGrpcCode()) != codes.InvalidArgument || invalid.GetReason() != "INVALID_ARGUMENT" ||
		invalid.GetMessage() != "invalid request: features.s6" {
		t.Errorf("result 1: %v", results[1])
	}
	if expired := results[2].GetError(); codes.Code(expired.GetGrpcCode()) != codes.DeadlineExceeded || expired.GetReason() != "DEADLINE_EXCEEDED" {
		t.Errorf("result 2: %v", results[2])
	}
	empty, err := client.PredictBatch(callContext(t), &pb.PredictBatchRequest{})
	if err != nil || len(empty.GetResults()) != 0 {
		t.Errorf("empty batch: %v %v", empty, err)
	}
}

func TestPanicIsInternal(t *testing.T) {
	service := newModelService(mustModel(t, "ridge"), "1", quiet)
	service.model = nil // Score on a nil model panics
	_, err := service.Predict(context.Background(), request(t, 0))
	if st := status.Convert(err); st.Code() != codes.Internal || st.Message() != "internal error" || len(st.Details()) != 0 {
		t.Fatalf("status %v", st)
	}
	batch, err := service.PredictBatch(context.Background(), &pb.PredictBatchRequest{Requests: []*pb.PredictRequest{request(t, 0)}})
	if err != nil || codes.Code(batch.GetResults()[0].GetError().GetGrpcCode()) != codes.Internal {
		t.Fatalf("batch %v %v", batch, err)
	}
}

func TestGetModelMetadata(t *testing.T) {
	metadata, err := inMemory(t).GetModelMetadata(callContext(t), &pb.GetModelMetadataRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if metadata.GetName() != "diabetes-ridge" || metadata.GetPlatform() != "go" || len(metadata.GetInputs()) != 10 {
		t.Fatalf("metadata %v", metadata)
	}
}

// startProcess runs the whole program (run) on a real TCP port with env and returns the
// ready file's facts, a connection to the endpoint (dialled with options), and a stop
// function giving the exit status.
func startProcess(t *testing.T, env map[string]string, options ...grpc.DialOption) (readyFacts, *grpc.ClientConn, func() int) {
	t.Helper()
	readyFile := filepath.Join(t.TempDir(), "ready", "model.json")
	env["RDV_MODEL_READY_FILE"] = readyFile
	ctx, cancel := context.WithCancel(context.Background())
	exit := make(chan int, 1)
	go func() { exit <- run(ctx, nil, func(key string) string { return env[key] }, io.Discard) }()
	stop := func() int { cancel(); return <-exit }
	t.Cleanup(func() { cancel() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		data, err := os.ReadFile(readyFile)
		if err == nil {
			var facts readyFacts
			if err := json.Unmarshal(data, &facts); err != nil {
				t.Fatalf("ready file %q: %v", data, err)
			}
			return facts, dial(t, facts.Endpoint, options...), stop
		}
		select {
		case code := <-exit:
			t.Fatalf("exited with %d before it was ready", code)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("no ready file after 10 s")
		}
	}
}

func TestServesOverTCPWithHealthReflectionAndReadyFile(t *testing.T) {
	facts, conn, stop := startProcess(t, map[string]string{
		"RDV_MODEL_NAME":    "diabetes-go",
		"RDV_MODEL_VERSION": "3",
		"RDV_MODEL_ARGS":    `{"algorithm": "linear"}`,
	})
	if !strings.HasPrefix(facts.Endpoint, "127.0.0.1:") || strings.HasSuffix(facts.Endpoint, ":0") ||
		facts.PID != os.Getpid() || facts.Model != "diabetes-go" || facts.Kind != "diabetes" || facts.Version != "3" {
		t.Fatalf("ready file %+v", facts)
	}
	ctx := callContext(t)
	for _, service := range []string{"", "rendezvous.v1.ModelService"} {
		reply, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		if err != nil || reply.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health %q: %v %v", service, reply, err)
		}
	}
	response, err := pb.NewModelServiceClient(conn).Predict(ctx, request(t, 4))
	if err != nil {
		t.Fatal(err)
	}
	if want := loadFixture(t).Predictions["linear"][4]; !closeEnough(response.GetScore(), want) || response.GetModelVersion() != "3" {
		t.Errorf("over TCP: %v, Python %v", response, want)
	}
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	reply, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var services []string
	for _, service := range reply.GetListServicesResponse().GetService() {
		services = append(services, service.GetName())
	}
	if listed := strings.Join(services, ","); !strings.Contains(listed, "rendezvous.v1.ModelService") || !strings.Contains(listed, "grpc.health.v1.Health") {
		t.Errorf("reflection lists %s", listed)
	}
	_ = stream.CloseSend()
	if code := stop(); code != 0 {
		t.Errorf("exit status %d", code)
	}
}

func TestDrainSaysNotServingAndIsBounded(t *testing.T) {
	defer func(grace time.Duration) { shutdownGrace = grace }(shutdownGrace)
	shutdownGrace = time.Second
	_, conn, stop := startProcess(t, map[string]string{})
	// A Watch stream never ends by itself: the drain must say NOT_SERVING on it, then end it
	// once the grace period is over.
	watch, err := healthpb.NewHealthClient(conn).Watch(callContext(t), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if first, err := watch.Recv(); err != nil || first.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("first %v %v", first, err)
	}
	exit := make(chan int, 1)
	started := time.Now()
	go func() { exit <- stop() }()
	if next, err := watch.Recv(); err != nil || next.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("while draining: %v %v", next, err)
	}
	select {
	case code := <-exit:
		if code != 0 {
			t.Errorf("exit status %d", code)
		}
		if elapsed := time.Since(started); elapsed < shutdownGrace-100*time.Millisecond || elapsed > shutdownGrace+3*time.Second {
			t.Errorf("stopped after %v, the grace is %v", elapsed, shutdownGrace)
		}
	case <-time.After(shutdownGrace + 5*time.Second):
		t.Fatal("the drain is not bounded")
	}
}

func TestBadConfigurationExitsTwo(t *testing.T) {
	var stderr strings.Builder
	code := run(context.Background(), nil, env(map[string]string{"RDV_MODEL_ARGS": `{"algo": "ridge"}`}), &stderr)
	if code != 2 || !strings.Contains(stderr.String(), `invalid configuration: RDV_MODEL_ARGS: unknown key \"algo\"`) {
		t.Fatalf("exit %d, stderr %s", code, stderr.String())
	}
	stderr.Reset()
	code = run(context.Background(), nil, env(map[string]string{"RDV_MODEL_ARGS": `{"artifact": "/nonexistent.json"}`}), &stderr)
	if code != 2 || !strings.Contains(stderr.String(), "RDV_MODEL_ARGS: cannot load the artifact") {
		t.Fatalf("exit %d, stderr %s", code, stderr.String())
	}
	stderr.Reset()
	if code := run(context.Background(), []string{"--no-such-flag"}, env(nil), &stderr); code != 2 {
		t.Fatalf("bad flag: exit %d", code)
	}
	// A port that is taken cannot be served on: exit 1.
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	stderr.Reset()
	code = run(context.Background(), nil, env(map[string]string{"RDV_MODEL_LISTEN": taken.Addr().String()}), &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "cannot serve: RDV_MODEL_LISTEN=") {
		t.Fatalf("exit %d, stderr %s", code, stderr.String())
	}
}
