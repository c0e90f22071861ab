// Command goclient scores through a running mesh from Go, over every rendezvous replica.
//
// It reads what any client needs from the mesh's state file (`rendezvous up` writes it):
// the endpoint (one address, or the replicas as "ipv4:a,b") and, with replicas, the gRPC
// service config to pass with it (client_service_config: round robin over the replicas that
// answer health with SERVING, and UNAVAILABLE retried on another). grpc-go resolves no
// "ipv4:" list, so Dial hands the addresses to a manual resolver.
//
//	go run ./examples/goclient [-state .run/mesh/state.json] [-target T] [-service-config JSON] [-n 10]
//
// It prints each answer's source and score; plaintext only (a TLS mesh needs credentials).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"

	pb "github.com/rendezvous-ml/rendezvous/gen/go/rendezvous/v1"
)

// meshState is the part of the supervisor's state.json a client reads.
type meshState struct {
	Endpoint      string          `json:"endpoint"`
	ServiceConfig json.RawMessage `json:"client_service_config"`
}

// sample is the diabetes dataset's first row (scaled), as the demo objective expects.
var sample = map[string]float64{
	"age": 0.0380759, "sex": 0.0506801, "bmi": 0.0616962, "bp": 0.0218724,
	"s1": -0.0442235, "s2": -0.0348208, "s3": -0.0434008, "s4": -0.0025923,
	"s5": 0.0199075, "s6": -0.0176461,
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, out, errs io.Writer) int {
	flags := flag.NewFlagSet("goclient", flag.ContinueOnError)
	statePath := flags.String("state", ".run/mesh/state.json", "the mesh's state file")
	target := flags.String("target", "", "the target instead of the state file's endpoint")
	serviceConfig := flags.String("service-config", "",
		"the service config (JSON) instead of the state file's client_service_config")
	calls := flags.Int("n", 10, "calls to make")
	objective := flags.String("objective", "demo", "the objective to score")
	if err := flags.Parse(args); err != nil {
		return 2
	}
	var state meshState
	if raw, err := os.ReadFile(*statePath); err == nil {
		if err := json.Unmarshal(raw, &state); err != nil {
			fmt.Fprintf(errs, "goclient: %s: %v\n", *statePath, err)
			return 2
		}
	}
	if *target != "" {
		state.Endpoint = *target
	}
	if *serviceConfig != "" {
		state.ServiceConfig = json.RawMessage(*serviceConfig)
	}
	if state.Endpoint == "" {
		fmt.Fprintln(errs, "goclient: no mesh state and no -target")
		return 2
	}
	conn, err := Dial(state.Endpoint, string(state.ServiceConfig),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintf(errs, "goclient: %v\n", err)
		return 1
	}
	defer conn.Close()
	features := map[string]*structpb.Value{}
	for name, value := range sample {
		features[name] = structpb.NewNumberValue(value)
	}
	client := pb.NewScoringServiceClient(conn)
	for i := 0; i < *calls; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		response, err := client.Score(ctx, &pb.ScoreRequest{Objective: *objective, Features: features})
		cancel()
		if err != nil {
			fmt.Fprintf(errs, "goclient: call %d: %v\n", i, err)
			return 1
		}
		decision := response.GetDecision()
		fmt.Fprintf(out, "%s %s %.3f\n", decision.GetSource(), decision.GetModel(), response.GetScore())
	}
	return 0
}
