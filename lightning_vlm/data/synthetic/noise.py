"""Caption noise: a known share of the training captions made wrong, every sample marked, so that data curation
(data/tools/curate.py) can be scored against the truth, as web alt-text is wrong for an unknown share of its pairs.

A wrong caption is one of the scene's own hard negatives (an attribute swapped or changed, a relation reversed) or
the caption of another training image, the two equally likely. Which samples are noisy depends on the seed and the
split's size only, and the noisy set of a smaller share is part of that of a larger one.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from typing import Any

from lightning_vlm.errors import InvalidSettingError

OTHER_IMAGE = "other_image"  # the noise kind of a caption taken from another image
_OTHER_IMAGE_TRIES = 20  # another image may share this one's caption; draw again that many times


def check_share(share: float) -> None:
    """An `InvalidSettingError` unless ``share`` is a fraction in [0, 1]."""
    if not 0.0 <= share <= 1.0:
        raise InvalidSettingError(f"--caption-noise must be a share in [0, 1], got {share}")


@functools.lru_cache(maxsize=8)
def noisy_indices(seed: int, size: int, share: float) -> frozenset[int]:
    """The round(share x size) indices of a split of ``size`` samples whose captions are corrupted: a prefix of a
    permutation drawn from the seed, so larger shares add samples to smaller ones' noisy set."""
    check_share(share)
    order = list(range(size))
    random.Random(f"{seed}/caption-noise").shuffle(order)
    return frozenset(order[: round(share * size)])


def add_caption_noise(
    sample: dict[str, Any], seed: int, index: int, size: int, share: float, caption_of: Callable[[int], str]
) -> dict[str, Any]:
    """The generator's sample with ``"noisy"`` in its json, and, when ``index`` is a noisy one, a wrong ``txt`` and
    json ``caption`` (the true one kept as ``clean_caption``, the kind of error as ``noise_kind``).

    ``caption_of(j)`` is the true caption of sample j of the same split.
    """
    record = json.loads(sample["json"])
    record["noisy"] = index in noisy_indices(seed, size, share)
    if not record["noisy"]:
        return {**sample, "json": json.dumps(record).encode()}
    kind, text = wrong_caption(record, random.Random(f"{seed}/caption-noise/{index}"), index, size, caption_of)
    record.update(noise_kind=kind, clean_caption=record["caption"], caption=text)
    return {**sample, "txt": text.encode(), "json": json.dumps(record).encode()}


def wrong_caption(
    record: dict[str, Any], rng: random.Random, index: int, size: int, caption_of: Callable[[int], str]
) -> tuple[str, str]:
    """(noise kind, caption): one of the record's hard negatives (kind: what was edited) or, with the same chance,
    another image's different caption; either kind stands in when the other has nothing to offer."""
    negatives = record["hard_negatives"]
    if not negatives or (size > 1 and rng.random() < 0.5):
        for _ in range(_OTHER_IMAGE_TRIES if size > 1 else 0):
            other = rng.randrange(size - 1)
            text = caption_of(other + (other >= index))
            if text != record["caption"]:
                return OTHER_IMAGE, text
    if not negatives:
        raise ValueError(f"sample {index} has neither a hard negative nor another image with a different caption")
    negative = rng.choice(negatives)
    return negative["kind"], negative["caption"]
