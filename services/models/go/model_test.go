package main

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/rendezvous-ml/rendezvous/services/models/artifacts"
)

// Regenerate with: .venv/bin/python -m tools.diabetes_fixture services/models/go/testdata/python_predictions.json
const pythonFixture = "testdata/python_predictions.json"

// tolerance is how close the Go and Python answers must be: 1e-9, relative for the rows far
// from 1 in magnitude.
func closeEnough(got, want float64) bool {
	return math.Abs(got-want) <= 1e-9*math.Max(1, math.Abs(want))
}

type fixture struct {
	Rows        []map[string]float64 `json:"rows"`
	Predictions map[string][]float64 `json:"predictions"`
}

func loadFixture(t *testing.T) fixture {
	t.Helper()
	data, err := os.ReadFile(pythonFixture)
	if err != nil {
		t.Fatal(err)
	}
	var f fixture
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatal(err)
	}
	if len(f.Rows) == 0 || len(f.Predictions) != len(algorithms) {
		t.Fatalf("%s: %d rows, %d algorithms", pythonFixture, len(f.Rows), len(f.Predictions))
	}
	return f
}

func features(row map[string]float64) map[string]*structpb.Value {
	out := make(map[string]*structpb.Value, len(row))
	for name, value := range row {
		out[name] = structpb.NewNumberValue(value)
	}
	return out
}

func mustModel(t *testing.T, algorithm string) *Diabetes {
	t.Helper()
	artifact, _, err := loadArtifact(algorithm, "")
	if err != nil {
		t.Fatal(err)
	}
	return NewDiabetes(artifact, "diabetes-"+algorithm, "7")
}

// expectedFromArtifact is intercept + Σ coefficient × feature, read from the committed
// JSON independently of the model's own loading.
func expectedFromArtifact(t *testing.T, algorithm string, row map[string]float64) float64 {
	t.Helper()
	data, err := artifacts.FS.ReadFile("diabetes-" + algorithm + ".json")
	if err != nil {
		t.Fatal(err)
	}
	var raw struct {
		Features     []struct{ Name string } `json:"features"`
		Coefficients []float64               `json:"coefficients"`
		Intercept    float64                 `json:"intercept"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		t.Fatal(err)
	}
	sum := raw.Intercept
	for i, feature := range raw.Features {
		value, ok := row[feature.Name]
		if !ok {
			t.Fatalf("row lacks %s", feature.Name)
		}
		sum += float64(raw.Coefficients[i] * value)
	}
	return sum
}

func TestScoreMatchesTheArtifactAndPython(t *testing.T) {
	f := loadFixture(t)
	for algorithm, want := range f.Predictions {
		model := mustModel(t, algorithm)
		identical := 0
		for i, row := range f.Rows {
			got, violations := model.Score(features(row))
			if violations != nil {
				t.Fatalf("%s row %d: %v", algorithm, i, violations)
			}
			if formula := expectedFromArtifact(t, algorithm, row); !closeEnough(got, formula) {
				t.Errorf("%s row %d: %v, the artifact's formula gives %v", algorithm, i, got, formula)
			}
			if !closeEnough(got, want[i]) {
				t.Errorf("%s row %d: %v, Python answered %v (diff %g)", algorithm, i, got, want[i], got-want[i])
			}
			if got == want[i] {
				identical++
			}
		}
		t.Logf("%s: %d/%d rows agree with Python to 1e-9, %d bit for bit", algorithm, len(f.Rows), len(f.Rows), identical)
	}
}

func TestScoreIgnoresFeaturesTheModelDoesNotRead(t *testing.T) {
	f := loadFixture(t)
	model := mustModel(t, "ridge")
	with := features(f.Rows[0])
	with["colour"] = structpb.NewStringValue("blue")
	got, violations := model.Score(with)
	if violations != nil || got != f.Predictions["ridge"][0] {
		t.Fatalf("got %v %v", got, violations)
	}
}

func TestScoreNamesEveryOffendingFeatureSorted(t *testing.T) {
	f := loadFixture(t)
	model := mustModel(t, "linear")
	bad := features(f.Rows[0])
	delete(bad, "s6")
	delete(bad, "age")
	bad["bmi"] = structpb.NewStringValue("0.06")
	bad["bp"] = structpb.NewNumberValue(math.NaN())
	bad["s1"] = structpb.NewNumberValue(math.Inf(-1))
	bad["s2"] = structpb.NewBoolValue(true)
	bad["s3"] = structpb.NewNullValue()
	bad["s4"] = structpb.NewListValue(&structpb.ListValue{})
	_, got := model.Score(bad)
	want := []violation{
		{"features.age", descRequired},
		{"features.bmi", descNotANumber},
		{"features.bp", descNotANumber},
		{"features.s1", descNotANumber},
		{"features.s2", descNotANumber},
		{"features.s3", descNotANumber},
		{"features.s4", descNotANumber},
		{"features.s6", descRequired},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("violation %d: got %v, want %v", i, got[i], want[i])
		}
	}
}

func TestMetadata(t *testing.T) {
	metadata := mustModel(t, "ridge").metadata
	if metadata.GetName() != "diabetes-ridge" || metadata.GetVersion() != "7" || metadata.GetPlatform() != "go" {
		t.Fatalf("metadata %v", metadata)
	}
	names := []string{}
	for _, input := range metadata.GetInputs() {
		if !input.GetRequired() || input.GetType().String() != "FEATURE_TYPE_NUMBER" || input.GetDescription() == "" {
			t.Errorf("input %v", input)
		}
		names = append(names, input.GetName())
	}
	if got := strings.Join(names, ","); got != "age,sex,bmi,bp,s1,s2,s3,s4,s5,s6" {
		t.Errorf("inputs %s", got)
	}
	if len(metadata.GetOutputs()) != 1 || metadata.GetOutputs()[0] != "model" {
		t.Errorf("outputs %v", metadata.GetOutputs())
	}
}

func TestLoadArtifact(t *testing.T) {
	committed, err := artifacts.FS.ReadFile("diabetes-linear.json")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name, text string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	// A path overrides the committed file.
	if artifact, _, err := loadArtifact("linear", write("ok.json", string(committed))); err != nil || artifact.Algorithm != "linear" {
		t.Fatalf("override: %v", err)
	}
	cases := map[string]struct{ algorithm, path, message string }{
		"wrong algorithm": {"ridge", write("linear.json", string(committed)), "holds a linear model, not ridge"},
		"unknown key":     {"linear", write("extra.json", strings.Replace(string(committed), `"format": 1,`, `"format": 1, "extra": 2,`, 1)), `unknown field "extra"`},
		"format":          {"linear", write("format.json", strings.Replace(string(committed), `"format": 1,`, `"format": 2,`, 1)), "format 2, not 1"},
		"lengths":         {"linear", write("short.json", `{"format": 1, "algorithm": "linear", "features": [{"name": "a"}], "coefficients": [], "intercept": 1}`), "differ in length"},
		"no intercept":    {"linear", write("nointercept.json", `{"format": 1, "algorithm": "linear", "features": [{"name": "a"}], "coefficients": [1]}`), "no intercept"},
		"missing file":    {"linear", filepath.Join(dir, "absent.json"), "no such file"},
	}
	for name, c := range cases {
		if _, _, err := loadArtifact(c.algorithm, c.path); err == nil || !strings.Contains(err.Error(), c.message) {
			t.Errorf("%s: got %v, want an error containing %q", name, err, c.message)
		}
	}
}
