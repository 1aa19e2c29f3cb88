"""DDP stays correct: two CPU processes (gloo) fit a tiny BLIP-2 through both stages and a tiny LLaVA through a LoRA
phase, and every parameter ends bit-identical on both ranks (DDP averages only the gradients of parameters that
required grad when it wrapped the model; without re-wrapping at the phase change, each rank would train its own
copy of what the new phase unfroze). Two ranks of batch B train as one process of batch 2B; a two-rank run resumed
mid-epoch ends as the uninterrupted one; every family's recipe fits on uneven shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from multiprocess.exactness import clip, one_process
from multiprocess.staged_fit import llava_lora
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_golden_losses import golden_config

from lightning_vlm.callbacks import StagedFreezing
from lightning_vlm.cli import load_model

SCRIPT = Path(__file__).parent / "multiprocess" / "staged_fit.py"
EXACTNESS = Path(__file__).parent / "multiprocess" / "exactness.py"
RECIPES = Path(__file__).parents[1] / "recipes"


def fit_two_ranks(case: str, root: str, out: Path, script: Path = SCRIPT) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               case, root, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("case, trained_late", [("blip2", "model.language_model."), ("llava_lora", "lora_")])
def test_replicas_stay_identical_across_a_phase_change(case, trained_late, tiny_benchmark, tmp_path):
    ranks = fit_two_ranks(case, tiny_benchmark, tmp_path)
    assert [r["steps"] for r in ranks] == [6, 6]
    late = [name for name in ranks[0]["trained"] if trained_late in name]
    assert late, f"the second phase trains nothing matching {trained_late!r}"
    differ = [name for name, value in ranks[0]["state"].items() if not torch.equal(value, ranks[1]["state"][name])]
    assert differ == []


def test_two_ranks_of_batch_b_train_as_one_process_of_batch_2b(tiny_benchmark, tmp_path):
    """The same global batches, split over two ranks or whole in one process: the same weights after three SGD
    steps (CLIP's loss gathers every rank's embeddings, so both see one 2B x 2B similarity matrix; DDP averages)."""
    ranks = fit_two_ranks("batch_split", tiny_benchmark, tmp_path, EXACTNESS)
    reference, initial = one_process(tiny_benchmark), dict(clip(tiny_benchmark).named_parameters())
    assert all(not torch.equal(value, initial[name]) for name, value in reference.items())  # every weight moved
    for name, value in reference.items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-6,
                                   msg=lambda message, name=name: f"{name}: {message}")


def test_a_two_rank_run_resumed_mid_epoch_sees_the_same_samples_and_ends_with_the_same_weights(tiny_benchmark,
                                                                                               tmp_path):
    ranks = fit_two_ranks("resume", tiny_benchmark, tmp_path, EXACTNESS)
    for rank in ranks:
        assert len(rank["whole"]) == 9 and rank["resumed"] == rank["whole"]
        straight = rank["straight_state"]
        assert [name for name, value in rank["resumed_state"].items() if not torch.equal(value, straight[name])] == []
    assert ranks[0]["whole"] != ranks[1]["whole"]  # each rank reads its own samples


def test_fsdp_shards_the_model_and_trains_it_as_ddp_does_through_a_staged_plan(tiny_benchmark, tmp_path):
    """FSDP2 (FSDP2Strategy, two gloo CPU processes) through a plan that keeps the vision encoder frozen and trains the
    LM through LoRA from step 3: each rank holds half the weights; the weights equal DDP's on the same data; the
    frozen encoder is untouched, the adapters trained; the full checkpoint loads strictly into a one-process model."""
    ranks = fit_two_ranks("fsdp", tiny_benchmark, tmp_path, EXACTNESS)
    for rank in ranks:
        held, total = rank["held"]["fsdp"]
        assert held < 0.55 * total
    fsdp, ddp = (torch.load(tmp_path / f"{name}.ckpt", weights_only=False)["state_dict"] for name in ("fsdp", "ddp"))
    for name, value in ddp.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    torch.manual_seed(0)
    single, phases, _ = llava_lora(tiny_benchmark)
    StagedFreezing(phases).apply(single)  # the layout the fit had: LoRA injected
    initial = {name: value.clone() for name, value in single.state_dict().items()}
    single.load_state_dict(fsdp)  # strict: every key, no FSDP prefix
    assert all(torch.equal(fsdp[name], initial[name]) for name in fsdp if name.startswith("model.vision."))
    assert all(not torch.equal(fsdp[name], initial[name]) for name in fsdp if "lora_B" in name)


FAMILIES = ["clip", "flava", "blip2", "llava"]  # contrastive, masked, Q-Former, generative


@pytest.mark.parametrize("recipe, fragment", [(family, None) for family in FAMILIES] + [("blip2", "fsdp")])
def test_each_family_fits_on_two_ranks_with_uneven_shards(recipe, fragment, tiny_benchmark, tmp_path):
    """The recipe itself under torchrun: three training shards over two ranks (two and one), a validation whose
    metrics are gathered over ranks and written once, and not one warning about unsynchronised logging. BLIP-2 also
    under the FSDP fragment (bf16 compute), whose checkpoint `load_model` reads back into one process."""
    config = golden_config(RECIPES / f"{recipe}.yaml", tiny_benchmark)
    config["trainer"].update(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_steps=3,
                             val_check_interval=3, limit_val_batches=1)
    config["trainer"].pop("logger")  # the CLI's default: TensorBoard under runs/
    config["data"]["init_args"].update(train=f"{tiny_benchmark}/train/shard-00000{{0..2}}.tar", samples_per_epoch=16,
                                       val_splits=["val"], eval_batch_size=16)
    config["model"]["init_args"]["eval_max_samples"] = 32
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config))
    strategy = ["--config", str(RECIPES / "strategies" / f"{fragment}.yaml")] if fragment else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lightning_vlm", "fit", "--config", "recipe.yaml", *strategy]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "sync_dist" not in output
    (run,) = (tmp_path / "runs" / "lightning_logs").iterdir()  # rank 0 alone writes the logs
    events = EventAccumulator(str(run))
    events.Reload()
    assert len(events.Scalars("val/loss")) == 1
    if fragment:
        (checkpoint,) = (tmp_path / "checkpoints").rglob("*.ckpt")
        state = load_model(str(tmp_path / "recipe.yaml"), str(checkpoint)).state_dict()
        assert state.keys() == torch.load(checkpoint, weights_only=False)["state_dict"].keys()
