"""The small word-level tokenizer of the synthetic benchmark (loaded back by `lightning_vlm.tokens.load_tokenizer`).

Words seen in training stay whole; any other ASCII word is spelt out from WordPiece characters, never lost.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from lightning_vlm.tokens import SPECIAL_TOKENS

ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def train_tokenizer(texts: Iterable[str], path: str | Path, vocab_size: int = 1000) -> None:
    """Save a lowercase WordPiece tokenizer holding the most frequent words of `texts` to a `tokenizers` JSON file.

    The vocabulary is counted here rather than by `tokenizers`' trainer, whose ids vary from run to run; frequency
    ties are broken alphabetically, so the same texts always give the same file.
    """
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace, then punctuation split off
    counts: Counter[str] = Counter()
    for text, n in Counter(texts).items():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] += n
    base = list(SPECIAL_TOKENS.values()) + list(ALPHABET) + [f"##{c}" for c in ALPHABET]
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if w not in base]
    vocab = base + words[: max(vocab_size - len(base), 0)]
    model = models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token=SPECIAL_TOKENS["unk_token"])
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()  # joins "##" pieces and removes the space before punctuation
    tokenizer.save(str(path))
