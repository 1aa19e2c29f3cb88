"""Image-text retrieval recall@K, where a hit is any of the top K items carrying the query's caption.

Hand-written rather than torchmetrics' ``RetrievalHitRate``: that metric computes the same hit rate, but from the
flattened N^2 score matrix with a query index per cell, looping over queries in Python once per K; one ``topk``
over the matrix gives every K at once. ``tests/test_eval.py`` checks that the two agree.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def retrieval_recall(
    scores: Tensor, image_texts: Sequence[str], texts: Sequence[str], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K both ways (``i2t_r{k}``, ``t2i_r{k}``) for a (N_img, N_txt) score matrix, higher = better match.

    A text is correct for an image when it equals the image's caption: synthetic captions repeat, so strings are
    compared, not indices. Queries without any correct item count as misses; K is clipped to the gallery size.
    """
    relevant = caption_match(image_texts, texts).to(scores.device)
    i2t = hit_rate_at_k(scores, relevant, ks)
    t2i = hit_rate_at_k(scores.T, relevant.T, ks)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def caption_match(image_texts: Sequence[str], texts: Sequence[str]) -> Tensor:
    """Boolean (N_img, N_txt) matrix, True where the text equals the image's caption."""
    ids = {text: i for i, text in enumerate(dict.fromkeys([*image_texts, *texts]))}
    image_ids = torch.tensor([ids[text] for text in image_texts])
    text_ids = torch.tensor([ids[text] for text in texts])
    return image_ids[:, None] == text_ids[None, :]


def hit_rate_at_k(scores: Tensor, relevant: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Per K, the fraction of rows whose K highest-scoring columns include a relevant one."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit_within = relevant.gather(1, top).cumsum(dim=1) > 0  # [:, j]: a relevant column among the top j + 1
    return {k: hit_within[:, min(k, top.shape[1]) - 1].float().mean().item() for k in ks}


def rerank_recall(
    scores: Tensor,
    rescore: Callable[[Tensor, Tensor], Tensor],
    image_texts: Sequence[str],
    texts: Sequence[str],
    k: int,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Image->text recall@K (``i2t_rerank_r{K}``) after re-scoring each image's top ``k`` texts by ``scores``
    with ``rescore(image_rows, text_cols)`` (e.g. BLIP-2's ITM): the top k are re-ordered, the rest keep their
    place after them."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # (N, k)
    rows = torch.arange(scores.shape[0], device=scores.device).repeat_interleave(k)
    new = rescore(rows, top.flatten()).view(-1, k)
    reranked = scores.clone()
    reranked.scatter_(1, top, scores.max() + 1 + new.to(scores.dtype))  # above every score outside the top k
    return {f"i2t_rerank_r{key}": value
            for key, value in hit_rate_at_k(reranked, caption_match(image_texts, texts).to(scores.device), ks).items()}
