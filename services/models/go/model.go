package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"

	"google.golang.org/protobuf/types/known/structpb"

	pb "github.com/rendezvous-ml/rendezvous/gen/go/rendezvous/v1"
	"github.com/rendezvous-ml/rendezvous/services/models/artifacts"
)

// The violation descriptions, as services/models/base.py words them.
const (
	descRequired   = "is required"
	descNotANumber = "must be a finite number"
	artifactFormat = 1
	// platform is what GetModelMetadata reports as the toolkit.
	platform = "go"
)

// algorithms the diabetes artifacts exist for (tools/train_diabetes.py).
var algorithms = map[string]bool{"ridge": true, "linear": true}

// Artifact is the JSON a trained diabetes model is served from (the fields of
// DiabetesArtifact in services/models/diabetes.py; unknown keys are an error there and here).
type Artifact struct {
	Format          int               `json:"format"`
	Algorithm       string            `json:"algorithm"`
	Dataset         string            `json:"dataset"`
	SklearnVersion  string            `json:"sklearn_version"`
	Features        []ArtifactFeature `json:"features"`
	Coefficients    []float64         `json:"coefficients"`
	Intercept       *float64          `json:"intercept"`
	Hyperparameters map[string]any    `json:"hyperparameters"`
	Split           struct {
		TestSize    float64 `json:"test_size"`
		RandomState int     `json:"random_state"`
		NTrain      int     `json:"n_train"`
		NTest       int     `json:"n_test"`
	} `json:"split"`
	Metrics struct {
		R2              float64 `json:"r2"`
		MAE             float64 `json:"mae"`
		RMSE            float64 `json:"rmse"`
		TrainTargetMean float64 `json:"train_target_mean"`
	} `json:"metrics"`
}

// ArtifactFeature is one input of the trained model, in coefficient order.
type ArtifactFeature struct {
	Name        string `json:"name"`
	Description string `json:"description"`
}

// decodeStrict decodes exactly one JSON value into out, refusing unknown keys.
func decodeStrict(data []byte, out any) error {
	decoder := json.NewDecoder(bytes.NewReader(data))
	decoder.DisallowUnknownFields()
	if err := decoder.Decode(out); err != nil {
		return err
	}
	if _, err := decoder.Token(); !errors.Is(err, io.EOF) {
		return errors.New("unexpected data after the JSON value")
	}
	return nil
}

// parseArtifact reads and checks an artifact's JSON.
func parseArtifact(data []byte) (*Artifact, error) {
	var artifact Artifact
	if err := decodeStrict(data, &artifact); err != nil {
		return nil, err
	}
	switch {
	case artifact.Format != artifactFormat:
		return nil, fmt.Errorf("format %d, not %d", artifact.Format, artifactFormat)
	case !algorithms[artifact.Algorithm]:
		return nil, fmt.Errorf("unknown algorithm %q", artifact.Algorithm)
	case len(artifact.Features) == 0:
		return nil, errors.New("no features")
	case len(artifact.Coefficients) != len(artifact.Features):
		return nil, errors.New("coefficients and features differ in length")
	case artifact.Intercept == nil:
		return nil, errors.New("no intercept")
	}
	for _, feature := range artifact.Features {
		if feature.Name == "" {
			return nil, errors.New("a feature without a name")
		}
	}
	return &artifact, nil
}

// loadArtifact reads the artifact at path, or the committed one for algorithm when path
// is empty; it must hold a model of that algorithm.
func loadArtifact(algorithm, path string) (*Artifact, string, error) {
	var data []byte
	var err error
	source := path
	if path == "" {
		source = fmt.Sprintf("diabetes-%s.json", algorithm)
		data, err = artifacts.FS.ReadFile(source)
		source = "services/models/artifacts/" + source + " (embedded)"
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, source, err
	}
	artifact, err := parseArtifact(data)
	if err != nil {
		return nil, source, fmt.Errorf("%s: %w", source, err)
	}
	if artifact.Algorithm != algorithm {
		return nil, source, fmt.Errorf("%s holds a %s model, not %s", source, artifact.Algorithm, algorithm)
	}
	return artifact, source, nil
}

// violation names one offending field of a request.
type violation struct {
	field, description string
}

// term is one feature's part of the dot product, computed once at start.
type term struct {
	name, path  string
	coefficient float64
}

// Diabetes scores intercept + coefficients · features, as services/models/diabetes.py.
type Diabetes struct {
	algorithm string
	intercept float64
	terms     []term
	metadata  *pb.GetModelMetadataResponse
}

// NewDiabetes builds the model served under name and version from a loaded artifact.
func NewDiabetes(artifact *Artifact, name, version string) *Diabetes {
	model := &Diabetes{algorithm: artifact.Algorithm, intercept: *artifact.Intercept}
	inputs := make([]*pb.FeatureSpec, 0, len(artifact.Features))
	for i, feature := range artifact.Features {
		model.terms = append(model.terms, term{feature.Name, featurePath(feature.Name), artifact.Coefficients[i]})
		inputs = append(inputs, &pb.FeatureSpec{
			Name:        feature.Name,
			Type:        pb.FeatureType_FEATURE_TYPE_NUMBER,
			Required:    true,
			Description: feature.Description,
		})
	}
	model.metadata = &pb.GetModelMetadataResponse{
		Name:     name,
		Version:  version,
		Platform: platform,
		Inputs:   inputs,
		Outputs:  []string{"model"},
	}
	return model
}

// featurePath is the field a violation names for one feature.
func featurePath(name string) string {
	return "features." + name
}

// Score is the prediction for the features, or the violations (sorted) that prevent it.
// The sum runs in the Python model's order (intercept first, then feature by feature) and
// each product is rounded before it is added (no fused multiply-add), so both give the
// same float64.
func (m *Diabetes) Score(features map[string]*structpb.Value) (float64, []violation) {
	score := m.intercept
	var violations []violation
	for _, t := range m.terms {
		value, present := features[t.name]
		if !present {
			violations = append(violations, violation{t.path, descRequired})
			continue
		}
		number, ok := finiteNumber(value)
		if !ok {
			violations = append(violations, violation{t.path, descNotANumber})
			continue
		}
		score += float64(t.coefficient * number)
	}
	if violations != nil {
		sort.Slice(violations, func(i, j int) bool {
			a, b := violations[i], violations[j]
			return a.field < b.field || (a.field == b.field && a.description < b.description)
		})
		return 0, violations
	}
	return score, nil
}

// finiteNumber is the value as a finite float64: a JSON number that is neither NaN nor an
// infinity (a bool, a string, null or a list is not a number).
func finiteNumber(value *structpb.Value) (float64, bool) {
	kind, ok := value.GetKind().(*structpb.Value_NumberValue)
	if !ok || math.IsNaN(kind.NumberValue) || math.IsInf(kind.NumberValue, 0) {
		return 0, false
	}
	return kind.NumberValue, true
}
