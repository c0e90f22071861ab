package main

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	pb "github.com/rendezvous-ml/rendezvous/gen/go/rendezvous/v1"
)

// replicaServiceConfig is what the mesh records as client_service_config
// (services/core/channels.py REPLICA_SERVICE_CONFIG), as a Go client receives it.
const replicaServiceConfig = `{
  "loadBalancingConfig": [{"round_robin": {}}],
  "healthCheckConfig": {"serviceName": ""},
  "methodConfig": [{
    "name": [{}],
    "waitForReady": false,
    "retryPolicy": {
      "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
      "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
}`

// settle bounds how long a health change takes to reach the balancer.
const settle = 5 * time.Second

// named answers Score with its name as the request id.
type named struct {
	pb.UnimplementedScoringServiceServer
	name string
}

func (n named) Score(context.Context, *pb.ScoreRequest) (*pb.ScoreResponse, error) {
	return &pb.ScoreResponse{RequestId: n.name}, nil
}

type replica struct {
	address string
	health  *health.Server
	server  *grpc.Server
}

func serve(t *testing.T, name string) *replica {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	pb.RegisterScoringServiceServer(server, named{name: name})
	status := health.NewServer()
	healthpb.RegisterHealthServer(server, status)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	return &replica{address: listener.Addr().String(), health: status, server: server}
}

// answers makes n calls and counts who answered.
func answers(t *testing.T, client pb.ScoringServiceClient, n int) map[string]int {
	t.Helper()
	seen := map[string]int{}
	for i := 0; i < n; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		response, err := client.Score(ctx, &pb.ScoreRequest{})
		cancel()
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		seen[response.GetRequestId()]++
	}
	return seen
}

// until calls until ten calls in a row were answered by exactly the replicas in want.
func until(t *testing.T, client pb.ScoringServiceClient, want ...string) {
	t.Helper()
	deadline := time.Now().Add(settle)
	for {
		seen := answers(t, client, 10)
		ok := len(seen) == len(want)
		for _, name := range want {
			ok = ok && seen[name] > 0
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("answered by %v, want %v", seen, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestReplicaAddressesOfATarget(t *testing.T) {
	got := replicaAddresses("ipv4:127.0.0.1:50051,127.0.0.1:50061")
	if len(got) != 2 || got[0] != "127.0.0.1:50051" || got[1] != "127.0.0.1:50061" {
		t.Fatalf("got %v", got)
	}
	if replicaAddresses("127.0.0.1:50051") != nil {
		t.Fatal("one address is not a replica list")
	}
}

func TestRoundRobinOverTheHealthyReplicas(t *testing.T) {
	a, b := serve(t, "a"), serve(t, "b")
	conn, err := Dial("ipv4:"+a.address+","+b.address, replicaServiceConfig,
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := pb.NewScoringServiceClient(conn)
	until(t, client, "a", "b")
	if seen := answers(t, client, 20); seen["a"] != 10 || seen["b"] != 10 {
		t.Fatalf("not round robin: %v", seen)
	}

	// A replica warming up says NOT_SERVING: no calls go there.
	b.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	until(t, client, "a")
	b.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	until(t, client, "a", "b")

	// One gone: the other answers every call.
	a.server.Stop()
	until(t, client, "b")
}
