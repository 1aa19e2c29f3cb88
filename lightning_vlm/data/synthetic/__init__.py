"""The embedded benchmark: procedurally generated scenes (scenes), their images (render), captions, questions and
hard negatives (language), the shards, manifest and tokenizer written from them (generator, tokenizer)."""

from lightning_vlm.data.synthetic.generator import DEFAULT_ROOT, generate_benchmark

__all__ = ["DEFAULT_ROOT", "generate_benchmark"]
