"""The shared token vocabulary: the image placeholder, location tokens, the ignore index of labels, and loading a
tokenizer by name, path or dataset root. The one module data, encoders and models all read these from."""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_vlm.pretrained import from_hub_or_prepared

IMAGE_TOKEN = "<image>"  # where an image stands in the text of a model that places images
IGNORE_INDEX = -100  # a label that carries no loss (prompts, padding, image tokens): PyTorch's cross-entropy default
SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "bos_token": "[BOS]",
    "eos_token": "[EOS]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
TOKENIZER_FILE = "tokenizer.json"  # the synthetic benchmark's own tokenizer, at its root
MODEL_MAX_LENGTH = 128  # the longest benchmark caption is ~40 tokens


@functools.cache
def location_tokens(bins: int) -> tuple[str, ...]:
    """The vocabulary of box coordinates, one token per bin: ``<loc_00>`` ... ."""
    width = len(str(bins - 1))
    return tuple(f"<loc_{i:0{width}d}>" for i in range(bins))


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A `tokenizer.json` file or a dataset root holding one as our fast tokenizer; else `AutoTokenizer`'s loading
    (a transformers model folder, which has a tokenizer_config.json, or a hub name: see `from_hub_or_prepared`)."""
    path = Path(name_or_path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    transformers_folder = path.is_dir() and (path / "tokenizer_config.json").is_file()
    if file.is_file() and file.suffix == ".json" and not transformers_folder:
        return PreTrainedTokenizerFast(tokenizer_file=str(file), model_max_length=MODEL_MAX_LENGTH, **SPECIAL_TOKENS)
    return from_hub_or_prepared(AutoTokenizer.from_pretrained, str(name_or_path))
