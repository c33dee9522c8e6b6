"""CLIP image-image similarity: the paper's metric for contextual image generation (VIST, VisDial)."""

import datasets
import evaluate
import torch

from gill_hf.metrics.functional import paired_cosine

_DESCRIPTION = """Cosine similarity between paired image embeddings (row i of `predictions` is the CLIP embedding of a
generated image, row i of `references` that of the real one); GILL reports the mean with CLIP ViT-L/14 (VIST, 5 captions
+ 4 images: GILL 0.641, Stable Diffusion 0.598)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of embedding vectors of the generated images.
    references: list of embedding vectors of the real images, paired with `predictions`.
Returns:
    clip_similarity: the mean cosine; per_example: each pair's cosine.
Example:
    >>> import evaluate
    >>> from gill_hf.metrics import metric_path
    >>> metric = evaluate.load(metric_path("clip_similarity"))
    >>> round(metric.compute(predictions=[[1.0, 0.0], [0.0, 2.0]], references=[[1.0, 0.0], [1.0, 0.0]])["clip_similarity"], 3)
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClipSimilarity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Koh, Fried, Salakhutdinov. Generating Images with Multimodal Language Models. NeurIPS 2023.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Sequence(datasets.Value("float32"))}),
        )

    def _compute(self, predictions, references):
        cosine = paired_cosine(torch.tensor(predictions), torch.tensor(references))
        return {"clip_similarity": cosine.mean().item(), "per_example": cosine.tolist()}
