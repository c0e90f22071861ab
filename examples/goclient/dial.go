package main

import (
	"fmt"
	"strings"

	"google.golang.org/grpc"
	// Registers client-side health checking: with the service config's healthCheckConfig, a
	// replica gets calls only while its grpc.health.v1 status is SERVING.
	_ "google.golang.org/grpc/health"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

// replicaSchemes are the schemes of a target listing several replicas, as the Python (C-core)
// clients take it: "ipv4:127.0.0.1:50051,127.0.0.1:50061". grpc-go has no resolver for them.
var replicaSchemes = []string{"ipv4:", "ipv6:"}

// replicaAddresses returns the addresses of a replica list target, or nil for any other.
func replicaAddresses(target string) []string {
	for _, scheme := range replicaSchemes {
		if rest, ok := strings.CutPrefix(target, scheme); ok {
			var addresses []string
			for _, address := range strings.Split(rest, ",") {
				if address != "" {
					addresses = append(addresses, address)
				}
			}
			return addresses
		}
	}
	return nil
}

// Dial opens a client to target: one address (or any target grpc-go resolves), or the list
// of rendezvous replicas `rendezvous up --rendezvous-replicas N` records, which is handed to
// a manual resolver. serviceConfig is the JSON the mesh records as client_service_config
// (round robin, health checks, the retry policy); "" leaves grpc-go's defaults.
func Dial(target, serviceConfig string, options ...grpc.DialOption) (*grpc.ClientConn, error) {
	if serviceConfig != "" {
		options = append(options, grpc.WithDefaultServiceConfig(serviceConfig))
	}
	addresses := replicaAddresses(target)
	if addresses == nil {
		return grpc.NewClient(target, options...)
	}
	if len(addresses) == 0 {
		return nil, fmt.Errorf("target %q lists no address", target)
	}
	builder := manual.NewBuilderWithScheme("rendezvous-replicas")
	state := resolver.State{}
	for _, address := range addresses {
		state.Addresses = append(state.Addresses, resolver.Address{Addr: address})
	}
	builder.InitialState(state)
	options = append(options, grpc.WithResolvers(builder))
	return grpc.NewClient(builder.Scheme()+":///replicas", options...)
}
