"""Write the Python diabetes model's predictions for a few rows, for other languages' tests.

    python -m tools.diabetes_fixture services/models/go/testdata/python_predictions.json

The rows are the first ones of scikit-learn's bundled diabetes dataset plus a few edge rows
(all zeros, large and negative values). Each prediction is what the Python container
answers (`DiabetesModel.predict`, the serving path), for every committed artifact, so a
container in another language can check it agrees to 1e-9.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2
from rendezvous.v1 import model_pb2
from sklearn.datasets import load_diabetes

from services.models.diabetes import DiabetesModel

DATASET_ROWS = 6
ALGORITHMS = ("ridge", "linear")


def rows() -> list[dict[str, float]]:
    data = load_diabetes()
    names = list(data.feature_names)
    out = [
        {name: float(value) for name, value in zip(names, row, strict=True)}
        for row in data.data[:DATASET_ROWS]
    ]
    out.append(dict.fromkeys(names, 0.0))
    out.append({name: (-1.0) ** i * 1e6 * (i + 1) for i, name in enumerate(names)})
    out.append({name: -0.1 * (i + 1) / 3 for i, name in enumerate(names)})
    return out


async def predictions() -> dict[str, Any]:
    table = rows()
    out: dict[str, Any] = {"rows": table, "predictions": {}}
    for algorithm in ALGORITHMS:
        model = DiabetesModel("diabetes", "1", {"algorithm": algorithm})
        scores = []
        for row in table:
            request = model_pb2.PredictRequest(
                features={name: struct_pb2.Value(number_value=v) for name, v in row.items()}
            )
            scores.append((await model.predict(request, None)).score)
        out["predictions"][algorithm] = scores
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    # Python's float repr round-trips, so the other side parses the very same doubles.
    text = json.dumps(asyncio.run(predictions()), indent=2) + "\n"
    Path(argv[0]).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
