"""Write an MLServer model directory serving the diabetes ridge model (scikit-learn runtime).

    .venv-mlserver/bin/python tools/oip_diabetes_model.py OUT_DIR [--model-name diabetes-ridge]

Runs in MLServer's own virtualenv (`make mlserver`), so the model is pickled and later
loaded by the same scikit-learn: it imports nothing of Rendezvous. It fits `Ridge` with the
alpha of the committed artifact (services/models/artifacts/diabetes-ridge.json) on the
training rows of the split tools/train_diabetes.py uses (test_size 0.2, random_state 42),
and writes into OUT_DIR:

- `<model-name>/model.joblib` and `<model-name>/model-settings.json` (implementation
  mlserver_sklearn.SKLearnModel; input tensor `input-0`, FP64 [-1, 10]; output `predict`);
- `expected.json`: the feature names (column order), the held-out rows and the model's own
  predictions for them, which what comes back through a mesh must equal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import joblib
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.model_selection import train_test_split

REPO = Path(__file__).resolve().parents[1]
ARTIFACT = REPO / "services" / "models" / "artifacts" / "diabetes-ridge.json"
INPUT = "input-0"
OUTPUT = "predict"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model-name", default="diabetes-ridge")
    args = parser.parse_args(argv)
    artifact = json.loads(ARTIFACT.read_text(encoding="utf-8"))
    split = artifact["split"]
    data = load_diabetes()
    x_train, x_test, y_train, _ = train_test_split(
        data.data,
        data.target,
        test_size=split["test_size"],
        random_state=split["random_state"],
    )
    model = Ridge(alpha=artifact["hyperparameters"]["alpha"]).fit(x_train, y_train)
    features = list(data.feature_names)
    model_dir = args.out_dir / args.model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, model_dir / "model.joblib")
    settings = {
        "name": args.model_name,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "1"},
        "inputs": [{"name": INPUT, "datatype": "FP64", "shape": [-1, len(features)]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP64", "shape": [-1, 1]}],
    }
    (model_dir / "model-settings.json").write_text(json.dumps(settings, indent=2))
    expected = {
        "model_name": args.model_name,
        "features": features,
        "rows": [[float(v) for v in row] for row in x_test],
        "predictions": [float(p) for p in model.predict(x_test)],
    }
    (args.out_dir / "expected.json").write_text(json.dumps(expected))
    print(f"{args.model_name}: Ridge(alpha={model.alpha:g}) -> {model_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
