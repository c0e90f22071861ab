"""Write the Python diabetes model's predictions for a few dataset rows to a JSON fixture.

The Node container's tests (services/models/ts/test/) compare their own predictions with
these, to 1e-9: both containers must give the same answer from the same artifact.

    .venv/bin/python -m tools.ts_model_fixture  # rewrites the committed fixture
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, get_args

from rendezvous.v1 import model_pb2
from sklearn.datasets import load_diabetes

from services.core.protos import set_values
from services.models.diabetes import Algorithm, DiabetesModel

FIXTURE = (
    Path(__file__).resolve().parent.parent
    / "services/models/ts/test/testdata/diabetes-python-predictions.json"
)
ROWS = (0, 1, 2, 3, 4, 57, 123, 250, 399, 441)


async def predictions() -> dict[str, Any]:
    data = load_diabetes()
    names = [str(name) for name in data.feature_names]
    rows = [dict(zip(names, (float(v) for v in data.data[i]), strict=True)) for i in ROWS]
    expected: dict[str, list[float]] = {}
    for algorithm in get_args(Algorithm):
        model = DiabetesModel("fixture", "1", {"algorithm": algorithm})
        scores = []
        for row in rows:
            request = model_pb2.PredictRequest()
            set_values(request.features, row)
            scores.append((await model.predict(request, None)).score)
        expected[algorithm] = scores
    return {
        "generated_by": "tools/ts_model_fixture.py (services.models.diabetes.DiabetesModel)",
        "dataset_rows": list(ROWS),
        "rows": rows,
        "scores": expected,
    }


def main() -> int:
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(asyncio.run(predictions()), indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(f"wrote {FIXTURE}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
