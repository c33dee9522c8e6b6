"""GILL retrieval recall: text->image and image->text R@1 / R@5 over paired embeddings."""

import datasets
import evaluate
import torch

from gill_hf.metrics.functional import retrieval_metrics

_DESCRIPTION = """Recall@k both ways between paired text and image retrieval embeddings (row i of each is one
example): the share of texts whose own image ranks in the top k by cosine similarity (t2i), and the converse
(i2t). Ties count against the example."""

_KWARGS_DESCRIPTION = """
Args:
    text_embeds: list of embedding vectors (one per example).
    image_embeds: list of embedding vectors, paired with `text_embeds`.
Returns:
    t2i_r1, t2i_r5, i2t_r1, i2t_r5: floats in [0, 1].
Example:
    >>> import evaluate
    >>> from gill_hf.metrics import metric_path
    >>> metric = evaluate.load(metric_path("retrieval_recall"))
    >>> metric.compute(text_embeds=[[1.0, 0.0], [0.0, 1.0]], image_embeds=[[1.0, 0.1], [0.1, 1.0]])["t2i_r1"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Koh, Fried, Salakhutdinov. Generating Images with Multimodal Language Models. NeurIPS 2023.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "text_embeds": datasets.Sequence(datasets.Value("float32")),
                    "image_embeds": datasets.Sequence(datasets.Value("float32")),
                }
            ),
        )

    def _compute(self, text_embeds, image_embeds):
        return retrieval_metrics(torch.tensor(text_embeds), torch.tensor(image_embeds))
