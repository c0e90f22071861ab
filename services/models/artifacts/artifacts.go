// Package artifacts holds the trained model artifacts that tools/train_diabetes.py writes,
// embedded at build time so a Go model container serves exactly the committed files from
// any working directory (the Python containers read the same files from this directory).
package artifacts

import "embed"

// FS holds every committed diabetes artifact, by file name (diabetes-<algorithm>.json).
//
//go:embed diabetes-*.json
var FS embed.FS
