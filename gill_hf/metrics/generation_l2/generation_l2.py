"""GILL generation L2: mean per-token L2 distance between predicted and target decoder conditioning."""

import datasets
import evaluate
import torch

from gill_hf.metrics.functional import generation_l2

_DESCRIPTION = """The mean, over examples and token positions, of the L2 distance between the GILLMapper's output and
the image decoder's text-encoder embedding of the caption (GILL's generation loss; lower is better)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per example, a (tokens, dim) nested list (the mapper's output).
    references: per example, a (tokens, dim) nested list (the target).
Returns:
    gen_l2: float.
Example:
    >>> import evaluate
    >>> from gill_hf.metrics import metric_path
    >>> metric = evaluate.load(metric_path("generation_l2"))
    >>> metric.compute(predictions=[[[3.0, 4.0]]], references=[[[0.0, 0.0]]])["gen_l2"]
    5.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GenerationL2(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Koh, Fried, Salakhutdinov. Generating Images with Multimodal Language Models. NeurIPS 2023.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                }
            ),
        )

    def _compute(self, predictions, references):
        return {"gen_l2": generation_l2(torch.tensor(predictions), torch.tensor(references))}
