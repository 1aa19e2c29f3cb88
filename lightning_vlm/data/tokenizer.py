"""The small word-level tokenizer of the synthetic benchmark, and loading of any tokenizer by name or path.

Words seen in training stay whole; any other ASCII word is spelt out from WordPiece characters, never lost.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_vlm.pretrained import load_pretrained

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "bos_token": "[BOS]",
    "eos_token": "[EOS]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
FILE_NAME = "tokenizer.json"
ALPHABET = string.ascii_lowercase + string.digits + string.punctuation
MODEL_MAX_LENGTH = 128  # the longest benchmark caption is ~40 tokens


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


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A `tokenizer.json` file or a dataset root holding one as our fast tokenizer; else `AutoTokenizer`'s loading
    (a transformers model folder, which has a tokenizer_config.json, or a hub name: see `load_pretrained`)."""
    path = Path(name_or_path)
    file = path / FILE_NAME if path.is_dir() else path
    transformers_folder = path.is_dir() and (path / "tokenizer_config.json").is_file()
    if file.is_file() and file.suffix == ".json" and not transformers_folder:
        return PreTrainedTokenizerFast(tokenizer_file=str(file), model_max_length=MODEL_MAX_LENGTH, **SPECIAL_TOKENS)
    return load_pretrained(AutoTokenizer.from_pretrained, str(name_or_path))
