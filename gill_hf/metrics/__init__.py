"""Metrics for GILL: plain functions (`functional`) and local `evaluate` modules built on them.

```python
>>> import evaluate
>>> from gill_hf.metrics import metric_path
>>> recall = evaluate.load(metric_path("retrieval_recall"))
```
"""

from __future__ import annotations

import os

from .functional import (frechet_distance, generation_l2, macro_f1, paired_cosine, recall_at_k, recall_from_ranks,
                         retrieval_metrics, retrieval_ranks)

METRICS_DIR = os.path.dirname(os.path.abspath(__file__))


def metric_path(name: str) -> str:
    """Folder of a local `evaluate` metric module shipped with the package (for `evaluate.load`)."""
    path = os.path.join(METRICS_DIR, name)
    if not os.path.isfile(os.path.join(path, f"{name}.py")):
        raise ValueError(f"No local metric {name!r}; available: {sorted(available_metrics())}.")
    return path


def available_metrics() -> list[str]:
    return [d for d in os.listdir(METRICS_DIR) if os.path.isfile(os.path.join(METRICS_DIR, d, f"{d}.py"))]


__all__ = ["available_metrics", "frechet_distance", "generation_l2", "macro_f1", "metric_path", "paired_cosine", "recall_at_k",
           "recall_from_ranks", "retrieval_metrics", "retrieval_ranks"]
