"""Train the `diabetes` example models and write their JSON artifacts.

    python tools/train_diabetes.py            # (re)write services/models/artifacts/
    python tools/train_diabetes.py --check    # fail if the committed artifacts are stale

Data: scikit-learn's bundled diabetes dataset (`sklearn.datasets.load_diabetes`,
442 patients, ten scaled features, target = disease progression after one year;
no network needed). One seeded train/test split; both models learn on the
training rows only and are scored on the held-out rows:

- `linear`: ordinary least squares (`LinearRegression`);
- `ridge`: `Ridge`, its alpha chosen by leave-one-out cross-validation
  (`RidgeCV`) over a log grid, on the training rows only, then refitted.

Each artifact holds the coefficients, intercept, split, hyperparameters and
held-out metrics (R², MAE, RMSE) plus the training target mean (the least-wrong
constant, a sensible static default answer). It is JSON, so serving needs no
scikit-learn and predicting is a dot product. No timestamps: the same inputs give
byte-identical files, which is what `--check` relies on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression, Ridge, RidgeCV
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from sklearn.model_selection import train_test_split

from services.models.diabetes import (
    ARTIFACT_DIR,
    Algorithm,
    ArtifactFeature,
    ArtifactMetrics,
    ArtifactSplit,
    DiabetesArtifact,
    artifact_path,
)

DATASET = "sklearn.datasets.load_diabetes (scaled: mean-centred, unit L2 norm per feature)"
DESCRIPTIONS = {
    "age": "age in years (scaled)",
    "sex": "sex (scaled)",
    "bmi": "body mass index (scaled)",
    "bp": "average blood pressure (scaled)",
    "s1": "tc, total serum cholesterol (scaled)",
    "s2": "ldl, low-density lipoproteins (scaled)",
    "s3": "hdl, high-density lipoproteins (scaled)",
    "s4": "tch, total cholesterol / HDL (scaled)",
    "s5": "ltg, log of serum triglycerides level (scaled)",
    "s6": "glu, blood sugar level (scaled)",
}
ALGORITHMS: tuple[Algorithm, ...] = ("ridge", "linear")


def load_split(test_size: float, random_state: int) -> tuple[Any, Any, Any, Any, list[str]]:
    """X_train, X_test, y_train, y_test and the feature names."""
    data = load_diabetes()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=test_size, random_state=random_state
    )
    return x_train, x_test, y_train, y_test, list(data.feature_names)


def fit(
    algorithm: Algorithm, x_train: Any, y_train: Any, alpha_grid: list[float]
) -> tuple[Any, dict[str, Any]]:
    """The fitted estimator and the hyperparameters that made it."""
    if algorithm == "linear":
        return LinearRegression().fit(x_train, y_train), {}
    search = RidgeCV(alphas=alpha_grid).fit(x_train, y_train)
    alpha = float(search.alpha_)
    # Refit a plain Ridge so the artifact is exactly `Ridge(alpha).fit(train)`.
    return Ridge(alpha=alpha).fit(x_train, y_train), {
        "alpha": alpha,
        "alpha_selection": "RidgeCV leave-one-out on the training split",
        "alpha_grid": alpha_grid,
    }


def train(test_size: float, random_state: int, alpha_grid: list[float]) -> list[DiabetesArtifact]:
    x_train, x_test, y_train, y_test, names = load_split(test_size, random_state)
    artifacts = []
    for algorithm in ALGORITHMS:
        estimator, hyperparameters = fit(algorithm, x_train, y_train, alpha_grid)
        predicted = estimator.predict(x_test)
        artifacts.append(
            DiabetesArtifact(
                algorithm=algorithm,
                dataset=DATASET,
                sklearn_version=sklearn.__version__,
                features=[ArtifactFeature(name=n, description=DESCRIPTIONS[n]) for n in names],
                coefficients=[float(c) for c in estimator.coef_],
                intercept=float(estimator.intercept_),
                hyperparameters=hyperparameters,
                split=ArtifactSplit(
                    test_size=test_size,
                    random_state=random_state,
                    n_train=len(y_train),
                    n_test=len(y_test),
                ),
                metrics=ArtifactMetrics(
                    r2=float(r2_score(y_test, predicted)),
                    mae=float(mean_absolute_error(y_test, predicted)),
                    rmse=float(np.sqrt(mean_squared_error(y_test, predicted))),
                    train_target_mean=float(np.mean(y_train)),
                ),
            )
        )
    return artifacts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ARTIFACT_DIR)
    parser.add_argument("--test-size", type=float, default=0.2)
    parser.add_argument("--random-state", type=int, default=42)
    parser.add_argument(
        "--alpha-grid",
        type=float,
        nargs="+",
        default=[float(a) for a in np.logspace(-4, 2, 25)],
        help="ridge alphas to choose from",
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the files instead of writing them"
    )
    args = parser.parse_args(argv)
    stale = []
    for artifact in train(args.test_size, args.random_state, args.alpha_grid):
        path = artifact_path(artifact.algorithm, args.out_dir)
        text = artifact.dump()
        metrics = artifact.metrics
        print(
            f"{artifact.algorithm:6s} R2={metrics.r2:.4f} MAE={metrics.mae:.2f} "
            f"RMSE={metrics.rmse:.2f} train_mean={metrics.train_target_mean:.2f} "
            f"{artifact.hyperparameters.get('alpha', '')} -> {path}"
        )
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale artifacts (run tools/train_diabetes.py): {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
