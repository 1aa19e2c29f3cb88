"""LLaVA in the ImageToText paradigm through Lightning's Trainer: one fixed batch overfit by the projector and the LM
while the staged-freezing plan keeps the image encoder frozen."""

from __future__ import annotations

import lightning as L
import torch

from lightning_vlm.adapters import MLP
from lightning_vlm.callbacks import StagedFreezing
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.llava import LLaVA
from lightning_vlm.paradigms.generative import ImageToText

STEPS = 60
TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}


class StepRecorder(L.Callback):
    """Every training step's loss, and the samples and token ids of the batch it trained on."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.batches: list[tuple[list[str], torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())
        self.batches.append(([meta["key"] for meta in batch["meta"]], batch["input_ids"].clone()))


def test_llava_overfits_one_batch_with_its_image_encoder_frozen(tiny_benchmark, tmp_path):
    torch.manual_seed(0)
    model = LLaVA(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                  LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM), MLP())
    vision_before = {name: value.clone() for name, value in model.vision.state_dict().items()}
    projector_before = {name: value.clone() for name, value in model.projector.state_dict().items()}
    # captions only, read in shard order: each one-batch epoch is the same batch (a VQA batch redraws its questions).
    # Not Trainer(overfit_batches=1): it rebuilds the DataLoader to turn shuffling off, which EpochLoader refuses.
    data = ShardDataModule(root=tiny_benchmark, tasks={"caption": 1}, batch_size=8, shuffle_buffer=0)
    recorder = StepRecorder()
    trainer = L.Trainer(limit_train_batches=1, max_steps=STEPS, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path,
                        callbacks=[StagedFreezing([{"start_step": 0, "freeze": ["vision"]}]), recorder])
    trainer.fit(ImageToText(model, lr=1e-2, warmup_steps=1), data)

    assert len(recorder.losses) == STEPS
    keys, ids = recorder.batches[0]
    assert all(k == keys and torch.equal(i, ids) for k, i in recorder.batches)
    assert recorder.losses[-1] < 0.3 * recorder.losses[0], recorder.losses[::5]
    assert all(torch.equal(value, model.vision.state_dict()[name]) for name, value in vision_before.items())
    assert all(param.grad is None for param in model.vision.parameters())
    assert not all(torch.equal(value, model.projector.state_dict()[name]) for name, value in projector_before.items())
