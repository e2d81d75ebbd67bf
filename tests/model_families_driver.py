"""The family test's one torchrun (tests/test_model_families.py): for each family of model_families.py,
in these processes, the tools and the trainer as their entry points run them, minus the launch:

1. rank 0 saves the tiny random-init model with transformers' save_pretrained (its own file layout:
   a mixture-of-experts model's experts one by one) beside the shared tokenizer; prepare the pairs;
2. score the pairs and sample D_ref with it, sharded over the processes (the weights read slice by slice,
   checked equal to transformers' own loading);
3. train MPO from it with FSDP2 on packed rows (4 steps, checkpoints at 2 and 4) and on padded rows,
   then resume a copy of the packed run's step-2 checkpoint to step 4 (padded: 2 steps);
4. rank 0 converts the packed run's step-4 checkpoint and loads the folder in transformers.

Rank 0 checks each stage and writes every family's outcome (pass, or the first line of what failed)
to --results, which the test reads: equal step-1 losses packed and padded (the reference was scored
the other way: any mask that differs from the model's own would show), the resumed run's weights and
optimizer state bitwise equal to the uninterrupted run's, and the converted folder's logits equal to
the checkpoint's model's.

    torchrun --nproc-per-node 2 tests/model_families_driver.py --work DIR --records JSONL --tokenizer DIR --results FILE
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from model_families import FAMILIES, family_config  # noqa: E402

STAGES = ("prepare", "score", "sample", "train packed", "train padded", "resume", "convert", "load in transformers")
STEPS = 4


def quiet(message: str) -> None:
    pass


def run_family(family: str, work: Path, records: Path, tokenizer_dir: Path, info, outcome: dict[str, str]) -> dict:
    """Run every stage for `family`, recording each that passed in `outcome` (so a failure shows which stage)."""
    from transformers import AutoModelForCausalLM

    from mpo_dist.config import load_config
    from mpo_dist.distributed import barrier
    from mpo_dist.metric_names import LOSS
    from mpo_dist.producers.prepare import PrepareOptions, prepare_pairs
    from mpo_dist.producers.sample import SamplingParams, sample_dref
    from mpo_dist.producers.score import open_reference, score_pairs
    from mpo_dist.tokenizer import load_tokenizer
    from mpo_dist.trainer import Trainer
    from support import TRAIN_CONFIG

    root = work / family.replace(" ", "_")
    model_dir, pairs = root / "model", root / "pairs"
    if info.rank == 0:
        # The tokenizer as the family's folder gives it (transformers picks the tokenizer class by the
        # config's model_type), and the model's embeddings exactly its vocabulary.
        family_config(family, 1).save_pretrained(str(model_dir))
        load_tokenizer(tokenizer_dir).save_pretrained(str(model_dir))
        torch.manual_seed(0)
        vocab = len(load_tokenizer(model_dir))
        AutoModelForCausalLM.from_config(family_config(family, vocab)).save_pretrained(str(model_dir))
    barrier()
    tokenizer = load_tokenizer(model_dir)
    prepare_pairs(records, model_dir, pairs, PrepareOptions(samples_per_shard=8, max_length=64, max_prompt_length=40),
                  rank=info.rank, world_size=info.world_size, log=quiet)
    barrier()  # rank 0 writes the manifest after the others' shards
    outcome["prepare"] = "pass"

    reference = open_reference(model_dir, pairs, "float32", info, tool="score_reference", model_shards=0)
    check_sharded_load(reference.model.module, model_dir)
    score_pairs(reference.model, pairs, root / "reference", rank=info.rank, world_size=info.world_size, batch_size=4,
                packing="never", device=reference.device, model_info=reference.model_info, log=quiet)
    outcome["score"] = "pass"
    sample_dref(reference.model, pairs, root / "dref", SamplingParams(max_new_tokens=6, seed=1),
                eos_token_ids=reference.eos_token_ids, pad_token_id=reference.pad_token_id, rank=info.rank,
                world_size=info.world_size, batch_size=8, device=reference.device, model_info=reference.model_info,
                log=quiet)
    outcome["sample"] = "pass"
    del reference

    def train(run: str, packing: str, steps: int = STEPS) -> Path:
        overrides = {"job.output_dir": root / run, "model.path": model_dir, "model.dtype": "float32",
                     "data.pairs": pairs, "data.reference": root / "reference", "data.dref": root / "dref",
                     "data.packing": packing, "data.batch_size": 4, "data.dref_batch_size": 4,
                     "training.steps": steps, "training.global_batch_size": 8, "optim.warmup_steps": 1,
                     "checkpoint.interval": 2, "checkpoint.keep": 2, "metrics.log_interval": 1,
                     "metrics.tensorboard": "false", "eval.pairs": "", "eval.reference": "", "eval.dref": "",
                     "eval.interval": 0}
        trainer = Trainer(load_config(str(TRAIN_CONFIG), [f"{key}={value}" for key, value in overrides.items()]))
        try:
            trainer.train()
        finally:
            trainer.close()
        return root / run

    packed = train("packed", "always")
    outcome["train packed"] = "pass"
    padded = train("padded", "never", steps=2)  # its first step is what is compared
    if info.rank == 0:  # the one that writes metrics.jsonl
        loss = [json.loads((run / "metrics.jsonl").read_text().splitlines()[0])[LOSS] for run in (packed, padded)]
        assert abs(loss[0] - loss[1]) <= 1e-4 * max(1.0, abs(loss[1])), f"step-1 loss packed {loss[0]} vs padded {loss[1]}"
    outcome["train padded"] = "pass"

    step2, step4 = "checkpoints/step-00000002", f"checkpoints/step-{STEPS:08d}"
    if info.rank == 0:
        shutil.copytree(packed / step2, root / "resumed" / step2)
    barrier()
    resumed = train("resumed", "always")
    if info.rank == 0:
        full, cut = (read_tensors(run / step4) for run in (packed, resumed))
        assert sorted(full) == sorted(cut) and any(".exp_avg_sq" in key for key in full)
        unequal = [key for key in full if not torch.equal(full[key], cut[key])]
        assert not unequal, f"resumed != uninterrupted at step {STEPS}: {unequal[:3]}"
    outcome["resume"] = "pass"

    if info.rank == 0:
        check_conversion(packed / step4, root / "hf", len(tokenizer))
    outcome["convert"] = outcome["load in transformers"] = "pass"
    barrier()
    return outcome


def check_sharded_load(module: torch.nn.Module, model_dir: Path) -> None:
    """The weights each rank read into its shard (a mixture-of-experts layer's experts piece by piece,
    only those of its shard) are, gathered, the tensors transformers loads from the folder: the runs
    that follow start from the same model, so their comparisons alone would not show a misplaced piece."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).state_dict()
    loaded = {name: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # the same order on every rank
              for name, tensor in module.state_dict().items()}
    assert any(isinstance(tensor, DTensor) for tensor in module.state_dict().values())  # sharded over the processes
    assert loaded.keys() == saved.keys(), sorted(set(loaded) ^ set(saved))[:3]
    unequal = [name for name in saved if not torch.equal(loaded[name], saved[name])]
    assert not unequal, f"sharded load differs from transformers' for {unequal[:3]}"


def read_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model, optimizer state, RNG), read in this process."""
    import torch.distributed.checkpoint as dcp

    from mpo_dist.dcp_reader import SafeFileSystemReader

    reader = SafeFileSystemReader(str(checkpoint))
    entries = reader.read_metadata().state_dict_metadata
    tensors = {key: torch.empty(entry.size, dtype=entry.properties.dtype) for key, entry in entries.items()
               if hasattr(entry, "size")}
    dcp.load(tensors, storage_reader=SafeFileSystemReader(str(checkpoint)), no_dist=True)
    return tensors


def check_conversion(checkpoint: Path, out: Path, vocab: int) -> None:
    """convert_checkpoint's folder, loaded by transformers, gives the logits of the checkpoint's model
    (its tensors read straight from the DCP files into the architecture transformers builds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mpo_dist.checkpoint_problems import HF_FILES_DIR, MODEL_PREFIX
    from mpo_dist.convert import convert_checkpoint
    from mpo_dist.model import tied_parameter_names

    convert_checkpoint(checkpoint, out, log=quiet)
    converted = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    config = AutoConfig.from_pretrained(str(checkpoint / HF_FILES_DIR), local_files_only=True)
    original = AutoModelForCausalLM.from_config(config, attn_implementation=converted.config._attn_implementation).eval()
    tensors = read_tensors(checkpoint)
    tied = tied_parameter_names(original)
    state = {name: tensors[MODEL_PREFIX + name] for name in original.state_dict() if name not in tied}
    assert not original.load_state_dict(state, strict=False).unexpected_keys
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = converted(tokens).logits, original(tokens).logits
    assert torch.equal(got, want), f"converted logits differ by {(got - want).abs().max().item()}"


def main() -> int:
    parser = argparse.ArgumentParser()
    for flag in ("--work", "--records", "--tokenizer", "--results"):
        parser.add_argument(flag, required=True, type=Path)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()

    from mpo_dist.cli import quiet_known_warnings
    from mpo_dist.distributed import destroy_distributed, init_distributed

    quiet_known_warnings()
    info = init_distributed(single_process_group=True)
    results = {}
    for family in args.families:
        outcome = {}
        try:
            run_family(family, args.work, args.records, args.tokenizer, info, outcome)
        except Exception as error:  # recorded, then raised: the later families would not run in step
            text = str(error).strip().splitlines()
            outcome["error"] = f"{type(error).__name__}: {text[0] if text else ''}"[:300]
            traceback.print_exc()
            results[family] = {stage: outcome.get(stage, "fail") for stage in STAGES} | {"error": outcome["error"]}
            if info.rank == 0:
                args.results.write_text(json.dumps(results, indent=2))
            raise
        results[family] = outcome
        if info.rank == 0:
            args.results.write_text(json.dumps(results, indent=2))
            print(f"model_families_driver: {family}: every stage passed", flush=True)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
