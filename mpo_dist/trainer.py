"""The Trainer: builds the parts from a Config, runs train steps, logs, and checkpoints.

One optimizer step takes `grad_accum` micro-batches of pairs (plus, for MPO with tau > 0, one D_ref
micro-batch each), runs one forward per micro-batch over chosen + rejected + D_ref rows, and
weights every real pair by 1 / (real pairs in the global batch), so the gradient is that of the
exact global mean whatever the world size, accumulation or padding. No reference model is loaded:
reference log-probs come from the shards. Host syncs happen only at logging steps.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from mpo_dist.checkpoint import HF_FILES_DIR, Checkpointer, ModelOptimizerState, RNGState
from mpo_dist.config import Config, save_config
from mpo_dist.convert import convert_checkpoint
from mpo_dist.data.collate import stack_rows
from mpo_dist.data.loader import build_dref_loader, build_pair_loader
from mpo_dist.data.shards import Manifest
from mpo_dist.distributed import init_distributed
from mpo_dist.logprobs import sequence_logprobs
from mpo_dist.losses import build_loss
from mpo_dist.metrics import MetricLogger, flops_per_token, peak_memory_bytes, peak_tflops
from mpo_dist.model import build_model, count_parameters, load_model_config, materialize_model
from mpo_dist.optim import build_lr_scheduler, build_optimizer
from mpo_dist.parallelize import apply_fsdp, build_mesh
from mpo_dist.tokenizer import tokenizer_beside_model, tokenizer_fingerprint


def log0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def resolve_grad_accum(config: Config, dp_world_size: int) -> int:
    """Micro-batches per step, so that a step holds training.global_batch_size pairs at any world size."""
    if not config.training.global_batch_size:
        return config.training.grad_accum
    per_micro = config.data.batch_size * dp_world_size
    accum, remainder = divmod(config.training.global_batch_size, per_micro)
    if remainder or accum == 0:
        raise ValueError(
            f"training.global_batch_size={config.training.global_batch_size} is not a multiple of "
            f"data.batch_size ({config.data.batch_size}) x data-parallel ranks ({dp_world_size}) = {per_micro}; "
            "change training.global_batch_size or data.batch_size"
        )
    return accum


def check_data_matches_model(config: Config, pairs: Manifest, model_config, tokenizer) -> None:
    """Refuse pairs tokenized with another tokenizer than the model's (`tokenizer`, None when the
    model folder has none), naming the options."""
    vocab = pairs.info.get("tokenizer", {}).get("vocab_size")
    if vocab is not None and vocab > model_config.vocab_size:
        raise ValueError(f"data.pairs {config.data.pairs} uses a {vocab}-token vocabulary but the model has "
                         f"{model_config.vocab_size} embeddings; prepare the pairs with the model's tokenizer")
    if tokenizer is not None:
        model_hash = tokenizer_fingerprint(tokenizer)
        if model_hash != pairs.tokenizer_hash:
            path = config.model.path
            raise ValueError(
                f"data.pairs {config.data.pairs} was tokenized with tokenizer {pairs.tokenizer_hash}, but model.path "
                f"{path} has tokenizer {model_hash}; re-run tools/prepare_pairs.py with --tokenizer {path}"
            )


class Trainer(Stateful):
    def __init__(self, config: Config):
        self.config = config
        self.info = init_distributed()
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.info.local_rank) if cuda else torch.device("cpu")
        self.output_dir = Path(config.job.output_dir)
        torch.manual_seed(config.job.seed)
        self.step = 0
        # Progress: global totals as of the last checkpoint, plus what this rank has done since.
        self.pairs_seen, self.tokens_seen, self._local_pairs, self._local_tokens = 0, 0, 0, 0
        self.epochs = {"pairs": 0, "dref": 0}  # epoch of the last batch taken from each stream

        # Everything that can be wrong with the inputs is checked here, on every rank, before the model is built.
        self.dp_rank, self.dp_world_size = self.info.rank, self.info.world_size  # all ranks are data-parallel
        self.grad_accum = resolve_grad_accum(config, self.dp_world_size)
        model_config = load_model_config(config.model)
        self.pair_loader = build_pair_loader(config.data, seed=config.job.seed, dp_rank=self.dp_rank,
                                             dp_world_size=self.dp_world_size, pad_token_id=0, num_epochs=None)
        pairs_manifest = self.pair_loader.dataset.source.shards.manifest
        self.tokenizer = tokenizer_beside_model(config.model.path)  # also saved into every checkpoint
        check_data_matches_model(config, pairs_manifest, model_config, self.tokenizer)
        self.pad_token_id = int(pairs_manifest.info.get("tokenizer", {}).get("pad_token_id") or 0)
        self.use_dref = config.loss.name == "mpo" and config.loss.tau > 0
        self.dref_loader = None
        if self.use_dref:
            self.dref_loader = build_dref_loader(config.data, seed=config.job.seed, dp_rank=self.dp_rank,
                                                 dp_world_size=self.dp_world_size, pad_token_id=self.pad_token_id,
                                                 tokenizer_hash=pairs_manifest.tokenizer_hash)
        self.loss_fn = build_loss(config.loss)

        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")

        self.mesh = build_mesh(config.parallel, self.info.world_size, self.device.type)
        self.model = build_model(config.model)
        apply_fsdp(self.model, self.mesh, config.parallel, config.model.dtype)
        materialize_model(self.model, config.model, self.device, seed=config.job.seed)
        self.model.train()
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = build_lr_scheduler(self.optimizer, config.optim, config.training.steps)

        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", config.checkpoint.keep, self.info.rank,
                                         self.dp_rank, self.dp_world_size, log=log0)
        self.metrics = MetricLogger(self.output_dir, self.info.is_main, config.metrics.tensorboard,
                                    config.training.steps, log=log0)
        self._peak_tflops = peak_tflops(config.metrics.peak_tflops, self.device)
        self._flop_params = count_parameters(self.model, exclude_embeddings=True)
        self._resume()
        log0(f"mpo_dist: {type(self.model).__name__.removeprefix('FSDP')} with {count_parameters(self.model):,} parameters on "
             f"{self.info.world_size} x {self.device.type}, {config.loss.name} loss, {self.grad_accum} micro-batches "
             f"of {config.data.batch_size} pairs per rank per step, {config.training.steps} steps")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        pairs, tokens = self._progress()
        return {"step": self.step, "tokens_seen": tokens, "pairs_seen": pairs,
                "pairs_epoch": self.epochs["pairs"], "dref_epoch": self.epochs["dref"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen, self.pairs_seen = int(state["step"]), int(state["tokens_seen"]), int(state["pairs_seen"])
        self.epochs = {"pairs": int(state["pairs_epoch"]), "dref": int(state["dref_epoch"])}
        self._local_pairs = self._local_tokens = 0

    def _progress(self) -> tuple[int, int]:
        """Real pairs and tokens trained on, over all ranks (a collective: every rank calls it)."""
        local = torch.tensor([self._local_pairs, self._local_tokens], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(local)
        return self.pairs_seen + int(local[0]), self.tokens_seen + int(local[1])

    def _checkpoint_states(self) -> tuple[dict[str, Stateful], dict[str, Stateful]]:
        shared = {"model_optimizer": ModelOptimizerState(self.model, self.optimizer),
                  "scheduler": self.scheduler, "train_state": self}
        rank_local: dict[str, Stateful] = {"pair_loader": self.pair_loader, "rng": RNGState()}
        if self.dref_loader is not None:
            rank_local["dref_loader"] = self.dref_loader
        return shared, rank_local

    def _resume(self) -> None:
        resume = self.config.checkpoint.resume
        if resume == "none":
            return
        folder = self.checkpointer.latest() if resume == "auto" else Path(resume)
        if folder is None:
            return
        info = self.checkpointer.load(folder, *self._checkpoint_states())
        log0(f"mpo_dist: resumed from {folder} at step {self.step}")
        if not info["rank_local_restored"]:
            # The position within an epoch is per rank; the epoch is not: go on with the next one.
            self.pair_loader.dataset.restart_at_epoch(self.epochs["pairs"] + 1)
            if self.dref_loader is not None:
                self.dref_loader.dataset.restart_at_epoch(self.epochs["dref"] + 1)
            log0(f"mpo_dist: WARNING: {folder} was written by {info['dp_world_size']} data-parallel ranks, now "
                 f"{self.dp_world_size}: model, optimizer and schedule were resharded, but the data position is "
                 f"per rank and cannot follow; data restarts at the beginning of epoch {self.epochs['pairs'] + 1} "
                 f"(the rest of epoch {self.epochs['pairs']} is skipped)")

    def _write_hf_files(self, folder: Path) -> None:
        """The model's config, generation config and tokenizer, so a checkpoint converts on its own."""
        target = folder / HF_FILES_DIR
        config = self.model.config
        config.architectures = [type(self.model).__name__.removeprefix("FSDP")]
        config.save_pretrained(str(target))
        source = Path(self.config.model.path) if self.config.model.path else None
        if source is not None and (source / "generation_config.json").is_file():
            shutil.copy2(source / "generation_config.json", target / "generation_config.json")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(target))

    def save_checkpoint(self) -> Path:
        folder = self.checkpointer.save(self.step, *self._checkpoint_states(), write_extra=self._write_hf_files)
        log0(f"mpo_dist: checkpoint saved to {folder}")
        return folder

    # ------------------------------------------------------------------ training

    def _micro_batches(self, pair_iter, dref_iter) -> list[tuple[dict, dict | None]]:
        return [(next(pair_iter), next(dref_iter) if dref_iter is not None else None) for _ in range(self.grad_accum)]

    def train_step(self, micro_batches: list[tuple[dict, dict | None]]) -> dict[str, torch.Tensor]:
        """One optimizer step; returns this rank's share of the step's metrics (device tensors, summed
        over ranks they give the global values)."""
        device = self.device
        counts = torch.tensor([[float((~pairs["is_pad"]).sum()), float((~dref["is_pad"]).sum()) if dref else 0.0]
                               for pairs, dref in micro_batches], device=device).sum(0)
        if dist.is_initialized():
            dist.all_reduce(counts)  # real pairs and D_ref samples in the whole global batch
        pair_count, dref_count = counts.clamp(min=1.0).unbind()
        sums: dict[str, torch.Tensor] = {}
        for pairs, dref in micro_batches:
            rows = pairs if dref is None else stack_rows(pairs, dref, self.pad_token_id, self.config.data.padding_side)
            logps = sequence_logprobs(self.model, rows["input_ids"].to(device), rows["attention_mask"].to(device),
                                      rows["response_mask"].to(device)).logps
            size = len(pairs["keys"])
            weight = (~pairs["is_pad"]).to(device, torch.float32) / pair_count
            kwargs = {}
            if dref is not None:
                kwargs = {"dref_policy_logps": logps[2 * size :], "dref_ref_logps": dref["ref_logps"].to(device),
                          "dref_weight": (~dref["is_pad"]).to(device, torch.float32) / dref_count}
            out = self.loss_fn(logps[:size], logps[size : 2 * size], pairs["ref_chosen_logps"].to(device),
                               pairs["ref_rejected_logps"].to(device), label=pairs["label"].to(device),
                               weight=weight, **kwargs)
            (out.loss * self.dp_world_size).backward()  # FSDP averages gradients over ranks
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0) + value.detach()
        max_norm = self.config.training.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums["grad_norm"] = grad_norm.detach() / self.dp_world_size  # replicated: sums back to itself
        return sums

    def train(self) -> None:
        config = self.config
        total = config.training.steps
        if self.step >= total:
            log0(f"mpo_dist: already at step {self.step} of {total}; nothing to train")
            return
        pair_iter = iter(self.pair_loader)
        dref_iter = iter(self.dref_loader) if self.dref_loader is not None else None
        window: dict[str, torch.Tensor] = {}
        window_steps, window_tokens, window_padded, window_rows, window_start = 0, 0, 0, 0, time.monotonic()
        while self.step < total:
            micro_batches = self._micro_batches(pair_iter, dref_iter)
            step_metrics = self.train_step(micro_batches)
            self.step += 1
            for pairs, dref in micro_batches:
                tokens = pairs["num_tokens"] + (dref["num_tokens"] if dref else 0)
                window_tokens += tokens
                window_padded += pairs["num_padded_tokens"] + (dref["num_padded_tokens"] if dref else 0)
                window_rows += pairs["input_ids"].shape[0] + (dref["input_ids"].shape[0] if dref else 0)
                self._local_pairs += int((~pairs["is_pad"]).sum())
                self._local_tokens += tokens
            self.epochs["pairs"] = micro_batches[-1][0]["epoch"]
            if micro_batches[-1][1] is not None:
                self.epochs["dref"] = micro_batches[-1][1]["epoch"]
            for name, value in step_metrics.items():
                window[name] = window.get(name, 0) + value
            window_steps += 1
            if self.step % config.metrics.log_interval == 0 or self.step in (1, total):
                self._log(window, window_steps, (window_tokens, window_padded, window_rows), time.monotonic() - window_start)
                window, window_steps, window_tokens, window_padded, window_rows = {}, 0, 0, 0, 0
                window_start = time.monotonic()
            if (config.checkpoint.interval and self.step % config.checkpoint.interval == 0) or self.step == total:
                folder = self.save_checkpoint()
        if config.checkpoint.export_hf:
            self.export_hf(folder)
        if self.info.is_main and self.metrics.writer is not None:
            log0(f"mpo_dist: done; TensorBoard logs in {self.metrics.tensorboard_dir} "
                 f"(tensorboard --logdir {self.metrics.tensorboard_dir})")

    def export_hf(self, checkpoint: Path) -> None:
        """The final model as a Hugging Face folder, converted by rank 0 while the others wait."""
        target = self.output_dir / "hf"
        if self.info.is_main:
            if target.exists():
                shutil.rmtree(target)  # a previous export of this run; the new one replaces it
            convert_checkpoint(checkpoint, target, self.config.checkpoint.export_dtype, log=log0)
        if dist.is_initialized():
            dist.barrier()

    def _log(self, window: dict, steps: int, counts: tuple[int, int, int], seconds: float) -> None:
        """Reduce the window's sums over ranks once, then log. `counts`: real tokens, padded tokens, rows."""
        names = sorted(window)
        values = torch.stack([window[name].float() for name in names] + [torch.tensor(float(c), device=self.device) for c in counts])
        if dist.is_initialized():
            dist.all_reduce(values)
        values = values.tolist()  # the one host sync, at logging steps only
        global_tokens, global_padded, global_rows = values[-3:]
        pairs_seen, tokens_seen = self._progress()
        metrics = {name: value / steps for name, value in zip(names, values)}
        out = {
            "loss/total": metrics.pop("loss"),
            "reward/accuracy": metrics.pop("accuracy"), "reward/margin": metrics.pop("reward_margin"),
            "reward/p": metrics.pop("p"), "logps/chosen": metrics.pop("chosen_logps"),
            "logps/rejected": metrics.pop("rejected_logps"), "optim/grad_norm": metrics.pop("grad_norm"),
            "optim/lr": self.scheduler.get_last_lr()[0],
            "throughput/tokens_per_s": global_tokens / seconds,
            "throughput/tokens_per_s_per_device": global_tokens / seconds / self.info.world_size,
            "throughput/padding": 1 - global_tokens / max(global_padded, 1),
            "memory/peak_gib": peak_memory_bytes(self.device) / 2**30,
            "progress/epoch": self.epochs["pairs"], "progress/pairs_seen": pairs_seen, "progress/tokens_seen": tokens_seen,
        }
        out.update({f"loss/{name}": value for name, value in metrics.items()})
        if self._peak_tflops:
            model_config = self.model.config
            mean_length = global_padded / max(global_rows, 1)  # attention cost grows with the padded length
            per_token = flops_per_token(self._flop_params, model_config.num_hidden_layers, model_config.hidden_size, mean_length)
            out["throughput/mfu"] = per_token * global_padded / seconds / self.info.world_size / (self._peak_tflops * 1e12)
        self.metrics.write(self.step, out)

    def close(self) -> None:
        self.metrics.close()
