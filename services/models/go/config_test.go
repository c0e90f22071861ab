package main

import (
	"strings"
	"testing"
)

func env(values map[string]string) func(string) string {
	return func(key string) string { return values[key] }
}

func TestConfigDefaults(t *testing.T) {
	config, err := loadConfig(env(map[string]string{"RDV_MODEL_KIND": "diabetes", "RDV_MODEL_VERSION": ""}))
	if err != nil {
		t.Fatal(err)
	}
	if config.Listen != "127.0.0.1:0" || config.Name != "diabetes" || config.Version != "1" ||
		config.Args.Algorithm != "ridge" || config.Args.Artifact != nil || config.ReadyFile != "" {
		t.Fatalf("defaults: %+v", config)
	}
}

func TestConfigReadsTheContract(t *testing.T) {
	config, err := loadConfig(env(map[string]string{
		"RDV_MODEL_LISTEN":     "[::1]:50123",
		"RDV_MODEL_NAME":       "diabetes-go",
		"RDV_MODEL_VERSION":    "2",
		"RDV_MODEL_ARGS":       `{"algorithm": "linear", "artifact": "x.json"}`,
		"RDV_MODEL_READY_FILE": "/tmp/ready.json",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if config.Listen != "[::1]:50123" || config.Name != "diabetes-go" || config.Version != "2" ||
		config.Args.Algorithm != "linear" || *config.Args.Artifact != "x.json" || config.ReadyFile != "/tmp/ready.json" {
		t.Fatalf("config: %+v", config)
	}
}

func TestConfigErrorsNameTheVariable(t *testing.T) {
	cases := map[string]struct{ key, value, message string }{
		"listen without port": {"RDV_MODEL_LISTEN", "127.0.0.1", "RDV_MODEL_LISTEN=\"127.0.0.1\": must be host:port"},
		"listen bad port":     {"RDV_MODEL_LISTEN", "127.0.0.1:http", "is not a number"},
		"listen port range":   {"RDV_MODEL_LISTEN", "127.0.0.1:70000", "is not a number from 0 to 65535"},
		"unknown key":         {"RDV_MODEL_ARGS", `{"algorithm": "ridge", "alpha": 1}`, `RDV_MODEL_ARGS: unknown key "alpha"`},
		"not an object":       {"RDV_MODEL_ARGS", `["ridge"]`, "RDV_MODEL_ARGS: must be a JSON object"},
		"null":                {"RDV_MODEL_ARGS", `null`, "RDV_MODEL_ARGS: must be a JSON object"},
		"bad json":            {"RDV_MODEL_ARGS", `{"algorithm": `, "RDV_MODEL_ARGS: unexpected EOF"},
		"trailing data":       {"RDV_MODEL_ARGS", `{} {}`, "RDV_MODEL_ARGS: unexpected data"},
		"bad algorithm":       {"RDV_MODEL_ARGS", `{"algorithm": "lasso"}`, `algorithm "lasso": must be ridge or linear`},
		"algorithm type":      {"RDV_MODEL_ARGS", `{"algorithm": 3}`, "RDV_MODEL_ARGS: json: cannot unmarshal number"},
		"empty artifact":      {"RDV_MODEL_ARGS", `{"artifact": ""}`, "artifact: must be a path"},
	}
	for name, c := range cases {
		_, err := loadConfig(env(map[string]string{c.key: c.value}))
		if err == nil || !strings.Contains(err.Error(), c.message) {
			t.Errorf("%s: got %v, want an error containing %q", name, err, c.message)
		}
	}
}
