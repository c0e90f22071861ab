package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	pb "github.com/rendezvous-ml/rendezvous/gen/go/rendezvous/v1"
)

// runMainEnv makes the test binary run main() instead of the tests: the real process,
// signals and exit status, without building a second binary.
const runMainEnv = "RDV_GO_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

// process starts this test binary as the container, with env added to the environment.
func process(t *testing.T, env ...string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-verbose")
	cmd.Env = append(os.Environ(), append(env, runMainEnv+"=1")...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	return cmd, &stderr
}

func TestProcessStopsCleanlyOnSIGTERM(t *testing.T) {
	readyFile := filepath.Join(t.TempDir(), "ready.json")
	cmd, stderr := process(t, "RDV_MODEL_READY_FILE="+readyFile, "RDV_MODEL_ARGS={}")
	var facts readyFacts
	for deadline := time.Now().Add(10 * time.Second); ; {
		if data, err := os.ReadFile(readyFile); err == nil {
			if err := json.Unmarshal(data, &facts); err != nil {
				t.Fatal(err)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready; stderr:\n%s", stderr)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if facts.PID != cmd.Process.Pid {
		t.Errorf("ready file pid %d, process %d", facts.PID, cmd.Process.Pid)
	}
	if _, err := pb.NewModelServiceClient(dial(t, facts.Endpoint)).Predict(callContext(t), request(t, 0)); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit: %v; stderr:\n%s", err, stderr)
	}
	// Every stderr line is a JSON log record; -verbose logged the debug ones too.
	var messages []string
	for _, line := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		var record map[string]any
		if err := json.Unmarshal([]byte(line), &record); err != nil {
			t.Fatalf("not a JSON line: %q", line)
		}
		if record["service"] != "model" || record["ts"] == nil || record["level"] == nil {
			t.Errorf("record %v", record)
		}
		messages = append(messages, record["msg"].(string))
	}
	if got := strings.Join(messages, "|"); got != "artifact loaded|model-diabetes started|draining|stopped" {
		t.Errorf("log messages %s", got)
	}
}

func TestProcessRefusesBadConfiguration(t *testing.T) {
	cmd, stderr := process(t, `RDV_MODEL_ARGS={"algorithm": "ridge", "alpha": 0.1}`)
	err := cmd.Wait()
	if exit, ok := err.(*exec.ExitError); !ok || exit.ExitCode() != 2 {
		t.Fatalf("exit %v", err)
	}
	if !strings.Contains(stderr.String(), `"level":"ERROR","msg":"invalid configuration: RDV_MODEL_ARGS: unknown key \"alpha\"`) {
		t.Errorf("stderr %s", stderr)
	}
}
