"""The Trainer: builds the parts from a Config, runs train steps, logs, and checkpoints.

One optimizer step takes `grad_accum` micro-batches (batch.MicroBatch, made ready by
stream.TrainingStream: pairs plus, for MPO with tau > 0, D_ref samples, laid out by data/layout.py
as padded rows or packed with each pair's prompt shared), runs the objective on each (objective.py:
one forward, then the loss), which weighs every real pair by 1 / (real pairs in the global batch);
gradients are summed over ranks (parallelize.py), so the gradient is that of the exact global mean
whatever the world size, accumulation or padding. No reference model is loaded: reference log-probs come from the shards.
Host syncs: one per step for the finite-value guard (a step whose global loss or gradient norm is
NaN or inf is skipped, and too many in a row stop the run), the rest at logging steps only.
With `eval` configured, a held-out pass (evaluation.py) runs every eval.interval steps and after the
last step, without changing the training trajectory; its metrics go out with the step's log.
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from mpo_dist import metric_names as names
from mpo_dist.checkpoint import Checkpointer, DamagedCheckpointError, ModelOptimizerState, RNGState, refuse_to_overwrite_a_run
from mpo_dist.compute_dtype import choose_dtype
from mpo_dist.config import Config, grad_accum_for, save_config
from mpo_dist.convert import export_hf, write_hf_files
from mpo_dist.batch import MicroBatch
from mpo_dist.attention import attention_switchable, packing_for, resolve_attention, use_packed_attention
from mpo_dist.data.layout import layout_for
from mpo_dist.data.loader import build_dref_loader, build_pair_loader
from mpo_dist.data.input_paths import check_input_paths
from mpo_dist.data.preflight import check_eval_inputs, check_training_inputs, read_manifest
from mpo_dist.distributed import all_reduce_sum, device_for, log_main, raise_on_every_rank, rank_info_of_group
from mpo_dist.errors import InputError, Terminated
from mpo_dist.evaluation import Evaluator, describe as describe_eval
from mpo_dist.finite_guard import FiniteGuard, refuse_non_finite_state
from mpo_dist.preemption import Preemption
from mpo_dist.flops import CostModel, mfu, peak_tflops
from mpo_dist.losses import build_loss
from mpo_dist.objective import Objective
from mpo_dist.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricLogger, StepWindow, peak_memory_bytes
from mpo_dist.trackers import Tracking, active_backends, check_installed
from mpo_dist.model import build_model, count_parameters, load_model_config, materialize_model
from mpo_dist.optim import build_lr_scheduler, build_optimizer
from mpo_dist.parallelize import apply_fsdp, build_mesh
from mpo_dist.run_lock import folders_to_create, remove_if_empty, take_run_lock
from mpo_dist.stream import TrainingStream
from mpo_dist.tokenizer import check_tokenizer_matches, tokenizer_beside_model

HF_EXPORT_DIR = "hf"  # checkpoint.export_hf's folder in job.output_dir


def _real_samples(batches: list[MicroBatch], device: torch.device) -> torch.Tensor:
    """[2] float32 on `device`: the real pairs and real D_ref samples of `batches` (moved there),
    summed from their flags on the device, so no host number enters the step as a blocking copy."""
    zero = torch.zeros((), dtype=torch.int64, device=device)
    per_batch = [torch.stack([zero if part is None else part.real.sum() for part in (batch.pairs, batch.dref)])
                 for batch in batches]
    return torch.stack(per_batch).sum(0).float()


class Trainer(Stateful):
    def __init__(self, config: Config):
        """Build everything, or leave nothing behind: a run refused before its first step releases its
        run lock and removes the output folders it created (an earlier run's files were not touched)."""
        new_folders = folders_to_create(Path(config.job.output_dir))
        try:
            self._build(config)
        except BaseException:
            self.close()
            if getattr(self, "info", None) is not None and self.info.is_main:
                remove_if_empty(new_folders)
            raise

    def _build(self, config: Config) -> None:
        self.config = config
        # A tracker's missing package (metrics.backends) is refused before anything is opened or written.
        check_installed(active_backends(config.metrics.backends, config.metrics.tensorboard))
        self.info = rank_info_of_group()  # FSDP2 and DCP need a group at any size: the entry point set it up
        self.device = device_for(self.info)
        # model.dtype=auto resolved once, here: the model, the FSDP policy and the provenance check use this name.
        self.dtype = choose_dtype(config.model.dtype, self.device, "model.dtype", "mpo_dist", log=log_main)
        self.output_dir = Path(config.job.output_dir)
        torch.manual_seed(config.job.seed)
        self.step = 0
        # Progress: global totals as of the last checkpoint, plus what this rank has done since.
        self.pairs_seen, self.tokens_seen, self._local_pairs, self._local_tokens = 0, 0, 0, 0
        self.epochs = {"pairs": 0, "dref": 0}  # epoch of the last batch taken from each stream
        self.epoch_progress = 0.0  # epochs of pairs done, as a fraction
        self.guard = FiniteGuard(config.training.max_nonfinite_steps, log=log_main)
        self.preemption = Preemption([name for name in config.job.preempt_signals.split(",") if name])
        self._saved_step: int | None = None  # the step of the newest checkpoint this process saved
        self.rng_state = RNGState()  # rank-local: restored once the data iterators exist (train)
        # Before any input is opened (a refused run builds nothing) or anything is written.
        self.run_lock = take_run_lock(self.output_dir, self.info.is_main, log=log_main)
        refuse_to_overwrite_a_run(self.checkpoints_dir, config.checkpoint.resume, config.job.overwrite_output_dir)

        # Everything that can be wrong with the inputs is checked here, on every rank, before the model is built:
        # first that every configured path exists, then the pairs' tokenizer (manifests only) before the pre-flight
        # reads every shard (another tokenizer's pairs would be an out-of-vocabulary problem in every sample).
        uses_dref = config.loss.name == "mpo" and config.loss.tau > 0
        check_input_paths(config, uses_dref=uses_dref)
        self.dp_rank, self.dp_world_size = self.info.rank, self.info.world_size  # all ranks are data-parallel
        self.grad_accum = grad_accum_for(config, self.dp_world_size)
        model_config = load_model_config(config.model)
        self.tokenizer = tokenizer_beside_model(config.model.path)  # also saved into every checkpoint
        model_name = f"model.path {config.model.path}" if config.model.path else "the model of model.config"
        check_tokenizer_matches(read_manifest("data.pairs", config.data.pairs, "pairs"), model_config.vocab_size,
                                self.tokenizer, data=f"data.pairs {config.data.pairs}", model=model_name,
                                fix="re-run tools/prepare_pairs.py with the model's tokenizer "
                                    f"(--tokenizer {config.model.path or 'DIR'})")
        check_training_inputs(config.data.pairs, config.data.reference or None, config.data.dref if uses_dref else None,
                              vocab_size=model_config.vocab_size, model_dtype=self.dtype, rank=self.info.rank,
                              world_size=self.info.world_size, preflight=config.data.preflight,
                              on_dtype_mismatch=config.data.reference_dtype_mismatch, log=log_main)
        if config.eval.enabled:
            check_eval_inputs(config.eval.pairs or None, config.eval.reference or None, config.eval.dref or None,
                              train_pairs_dir=config.data.pairs, train_reference_dir=config.data.reference or None,
                              require_held_out=config.eval.require_held_out)
        pair_loader = build_pair_loader(config.data, seed=config.job.seed, dp_rank=self.dp_rank,
                                        dp_world_size=self.dp_world_size, num_epochs=None)
        pairs = pair_loader.manifest
        self.pad_token_id = int(pairs.info.get("tokenizer", {}).get("pad_token_id") or 0)
        dref_loader = None
        if uses_dref:
            dref_loader = build_dref_loader(config.data, seed=config.job.seed, dp_rank=self.dp_rank,
                                            dp_world_size=self.dp_world_size, tokenizer_hash=pairs.tokenizer_hash)
        self.objective = Objective(build_loss(config.loss))

        self.mesh = build_mesh(config.parallel, self.info.world_size, self.device.type)
        self.model = build_model(config.model)
        # Packed rows' attention (model.attention, attention.py): "dense" (a 4-D mask), "varlen" (pieces
        # built with each batch by the layout) or "flex" (a block mask built per micro-batch on the device).
        self.attention = resolve_attention(config.model.attention, self.device, self.model.config, training=True,
                                           dtype=self.dtype, switchable=attention_switchable(self.model))
        self.varlen = self.attention == "varlen"
        use_packed_attention(self.model, self.attention)  # the dense path too: masks come prepared, no host sync
        apply_fsdp(self.model, self.mesh, config.parallel, self.dtype)
        materialize_model(self.model, config.model, self.device, seed=config.job.seed,
                          cpu_offload=config.parallel.cpu_offload)
        self.model.train()
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = build_lr_scheduler(self.optimizer, config.optim, config.training.steps)
        # Padded or packed rows (data/layout.py), by the model's FLOPs when data.packing=auto; the same
        # cost model counts the FLOPs logged (flops.py).
        self.cost_model = CostModel.of(self.model)
        layout_cost = self.cost_model.layout_cost
        # Micro-batches are laid out where they are made: the stream hands the trainer ready ones.
        # A sliding-window model's rows are padded: no packed mask applies its window (attention.packing_for).
        data_config = replace(config.data, packing=packing_for(config.data.packing, self.model.config))
        self.data = TrainingStream(pair_loader, dref_loader, layout_for(data_config, self.pad_token_id, cost=layout_cost,
                                                                                 varlen=self.varlen))
        # Held-out evaluation (evaluation.py): its own streams, never the training loaders; the same layout.
        self.evaluator = None
        if config.eval.enabled:
            self.evaluator = Evaluator(config.eval, config.data, model=self.model, objective=self.objective,
                                       device=self.device, dp_rank=self.dp_rank, dp_world_size=self.dp_world_size,
                                       pad_token_id=self.pad_token_id, tokenizer_hash=pairs.tokenizer_hash,
                                       vocab_size=model_config.vocab_size, layout_cost=layout_cost,
                                       varlen=self.varlen)

        self.checkpointer = Checkpointer(self.checkpoints_dir, config.checkpoint.keep, self.info.rank, self.dp_rank,
                                         self.dp_world_size, log=log_main, model_config=model_config.to_dict())
        self._peak_tflops = peak_tflops(config.metrics.peak_tflops, self.device)
        self._tracker_runs: dict[str, str] = {}  # W&B / MLflow run ids of the checkpoint resumed from
        self._completed = False  # train() reached the last step: the trackers' runs end as finished
        self._resume()
        self._claim_output_dir()
        self.metrics = self._open_metrics()
        log_main(f"mpo_dist: {type(self.model).__name__.removeprefix('FSDP')} with {count_parameters(self.model):,} "
                 f"parameters on {self.info.world_size} x {self.device.type}, {config.loss.name} loss, {self.grad_accum} "
                 f"micro-batches of {config.data.batch_size} pairs per rank per step, {config.training.steps} steps")

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _open_metrics(self) -> MetricLogger:
        """Rank 0's trackers (metrics.backends), resuming the tracker runs the checkpoint names; one that
        cannot start stops every rank before step 1."""
        error, metrics = None, None
        try:
            metrics = MetricLogger(self.output_dir, self.info.is_main, self.config.training.steps, start_step=self.step,
                                   log=log_main, tracking=Tracking.of(self.config, self._tracker_runs))
        except InputError as caught:
            error = caught
        raise_on_every_rank(error, lambda: InputError("metrics.backends: rank 0 could not start its trackers (see its error)"))
        return metrics

    def _claim_output_dir(self) -> None:
        """Once the inputs and any resume are accepted: an earlier run's files go when
        job.overwrite_output_dir asks for it (never otherwise), then this run's config is written.
        Rank 0 does it; every rank learns the outcome, so none writes into the folder before it is done."""
        error = None
        if self.info.is_main:
            try:
                if self.config.job.overwrite_output_dir:
                    self._delete_earlier_run()
                save_config(self.config, self.output_dir / "config.yaml")
            except OSError as caught:
                error = InputError(f"job.output_dir {self.output_dir}: cannot prepare it for this run ({caught})")
        raise_on_every_rank(error, lambda: InputError(f"job.output_dir {self.output_dir}: rank 0 could not "
                                                      "prepare it for this run (see its error)"))

    def _delete_earlier_run(self) -> None:
        """job.overwrite_output_dir: the earlier run's checkpoints, metrics and export. A symbolic link
        (checkpoints kept on other storage) is removed, never followed."""
        deleted = [path for path in (self.checkpoints_dir, self.output_dir / TENSORBOARD_DIR,
                                     self.output_dir / HF_EXPORT_DIR, self.output_dir / METRICS_FILE)
                   if path.is_symlink() or path.exists()]
        for path in deleted:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if deleted:
            log_main(f"mpo_dist: job.overwrite_output_dir=true: deleted the earlier run's "
                     f"{', '.join(path.name for path in deleted)} in {self.output_dir}")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        pairs, tokens = self._progress()
        return {"step": self.step, "tokens_seen": tokens, "pairs_seen": pairs,
                "pairs_epoch": self.epochs["pairs"], "dref_epoch": self.epochs["dref"], **self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen, self.pairs_seen = int(state["step"]), int(state["tokens_seen"]), int(state["pairs_seen"])
        self.epochs = {"pairs": int(state["pairs_epoch"]), "dref": int(state["dref_epoch"])}
        self.guard.load_state_dict(state)
        self._local_pairs = self._local_tokens = 0

    def _progress(self) -> tuple[int, int]:
        """Real pairs and tokens trained on, over all ranks (a collective: every rank calls it)."""
        local = all_reduce_sum(torch.tensor([self._local_pairs, self._local_tokens], dtype=torch.float64, device=self.device))
        return self.pairs_seen + int(local[0]), self.tokens_seen + int(local[1])

    def _checkpoint_states(self) -> tuple[dict[str, Stateful], dict[str, Stateful]]:
        # The data position is global (equal on every rank: int64 tensors), so it is shared state and
        # follows to any world size; only the RNG is per rank.
        shared = {"model_optimizer": ModelOptimizerState(self.model, self.optimizer),
                  "scheduler": self.scheduler, "train_state": self, "data": self.data}
        return shared, {"rng": self.rng_state}

    def _resume(self) -> None:
        self.data.set_micro_batches_per_step(self.grad_accum)
        resume = self.config.checkpoint.resume
        if resume == "none":
            return
        folder, info = self.checkpointer.resume(resume, *self._checkpoint_states())  # "auto" skips damaged ones
        if folder is None:
            return
        log_main(f"mpo_dist: resumed from {folder} at step {self.step}")
        if info["dp_world_size"] != self.dp_world_size:
            log_main(f"mpo_dist: {folder} was written by {info['dp_world_size']} data-parallel ranks, now "
                     f"{self.dp_world_size}: model, optimizer and schedule were resharded; the RNG state is per rank "
                     f"and is not restored (every rank goes on from job.seed's; dropout is off, so training does not "
                     f"depend on it)")
        self._tracker_runs = dict(info.get("trackers", {}))
        if "data" in info["missing"]:
            raise DamagedCheckpointError(f"{folder} holds no data position (every checkpoint of this format has one); "
                                         "resume from another checkpoint (checkpoint.resume=PATH)")
        for what, note in self.data.resumed():
            log_main(f"mpo_dist: {what} data position {note}")

    def save_checkpoint(self) -> Path:
        started = time.perf_counter()
        folder = self.checkpointer.save(
            self.step, *self._checkpoint_states(),
            write_extra=lambda target: write_hf_files(target, self.model, self.config.model.path, self.tokenizer),
            info_extra={"trackers": self.metrics.run_ids()})  # rank 0's: the one that writes checkpoint.json
        # The time is what a preemption grace period must cover (docs/launching.md, "Preemption").
        log_main(f"mpo_dist: checkpoint saved to {folder} ({time.perf_counter() - started:.1f} s)")
        self._saved_step = self.step
        return folder

    # ------------------------------------------------------------------ training

    def train_step(self, batches: list[MicroBatch]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One optimizer step. Returns this rank's shares of the step's loss metrics (device tensors;
        summed over ranks they give the global values) and the metrics equal on every rank.

        Host syncs (counted in tests/test_host_syncs.py): every micro-batch goes over in one
        non-blocking copy, all issued before the first forward, and what the host must know (sizes,
        token counts, varlen pieces) came with the batch, so this code reads nothing back between the
        first forward and the last backward; the step's one sync is the finite check after it."""
        batches = [batch.to(self.device) for batch in batches]
        totals = all_reduce_sum(_real_samples(batches, self.device))
        pair_total, dref_total = totals.clamp(min=1.0).unbind()  # real samples in the global batch
        sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            out = self.objective(self.model, batch, pair_total=pair_total, dref_total=dref_total).loss
            out.loss.backward()  # gradients are summed over ranks: the weights make it the global mean
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0) + value.detach()
        max_norm = self.config.training.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # With parallel.cpu_offload the gradients, so the norm, are on the host: no need to wait for that copy.
        grad_norm = grad_norm.to(self.device, non_blocking=True)
        if self.guard.step_is_finite(self.step + 1, sums["loss"], grad_norm, stop=self.preemption.requested):
            self.optimizer.step()  # else: parameters and optimizer state (moments, step count) stay as they were
        self._step_schedule()
        self.optimizer.zero_grad(set_to_none=True)
        return sums, {"grad_norm": grad_norm.detach()}

    def _step_schedule(self) -> None:
        """The schedule steps on a skipped step too: it is a function of the step count, which counts
        the batches consumed, skipped or not; so the learning rate of step N is the same with or
        without earlier skips, the schedule still ends at training.steps, and scheduler.last_epoch
        stays equal to the saved step. (torch warns when it steps before any optimizer step.)"""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()

    def _count(self, batches: list[MicroBatch]) -> dict[str, float]:
        """A step's counts on this rank (tokens as data, positions computed, FLOPs, real pairs);
        advances the progress counters and the epoch bookkeeping."""
        counts = {"tokens": sum(batch.counts.tokens for batch in batches),
                  "positions": sum(batch.counts.positions for batch in batches),
                  "real_positions": sum(batch.counts.real_positions for batch in batches),
                  "flops": sum(self.cost_model.training_flops(batch.inputs) for batch in batches),
                  "pairs": sum(batch.counts.pairs for batch in batches)}
        self._local_pairs += counts["pairs"]
        self._local_tokens += counts["tokens"]
        last = batches[-1].position
        self.epochs["pairs"], self.epoch_progress = last.pairs_epoch, last.pairs_progress
        if last.dref_epoch is not None:
            self.epochs["dref"] = last.dref_epoch
        return counts

    def train(self) -> None:
        config = self.config
        total = config.training.steps
        if self.step >= total:
            log_main(f"mpo_dist: already at step {self.step} of {total} in {self.output_dir}; nothing to train "
                     "(raise training.steps to go on, or use a new job.output_dir)")
            return
        batches = iter(self.data)
        self.rng_state.restore()  # after the loaders' draws from the CPU generator, as in an uninterrupted run
        # From here a preemption signal ends the run after the step in progress; once the last step is
        # done it is only recorded, so that the export and the last lines are written whole.
        with self.preemption:
            folder = self._train_steps(batches, total)
            self._finish(folder)
        if self.preemption.requested:
            log_main(f"mpo_dist: {self.preemption.received} came after the last step; the run is complete")

    def _train_steps(self, batches, total: int) -> Path | None:
        config = self.config
        window = StepWindow()
        folder = None
        while self.step < total:
            micro_batches = [next(batches) for _ in range(self.grad_accum)]
            summed, replicated = self.train_step(micro_batches)
            self.step += 1
            window.add_step(summed, replicated, self._count(micro_batches), skipped=self.guard.last_skipped)
            stop = self.guard.should_stop
            evaluated = self._evaluate() if not stop and self._eval_due(self.step) else {}
            if self.step % config.metrics.log_interval == 0 or self.step in (1, total) or stop:
                self._log(window.reduce(self.device), evaluated)
                window.reset()
            elif evaluated:
                self.metrics.write(self.step, evaluated)
            if stop:
                raise self.guard.stop_error(self.step, self.checkpointer.latest())
            saved = False
            if (config.checkpoint.interval and self.step % config.checkpoint.interval == 0) or self.step == total:
                refuse_non_finite_state(self.model, self.optimizer, self.step, self.checkpointer.latest())
                folder = self.save_checkpoint()
                saved = True
                if config.checkpoint.keep_best and evaluated:
                    self._consider_best(folder, evaluated)
            # A signal that came during this step's evaluation or save stops the run here, on the checkpoint
            # just written, instead of after one more step and save: the ranks agree on it once more
            # (a collective at checkpoint steps only).
            if self.step < total and (self.guard.stop_agreed or (saved and self._signal_on_any_rank())):
                self._stop_preempted(folder, window)
        return folder

    def _signal_on_any_rank(self) -> bool:
        flag = torch.tensor([float(self.preemption.requested)], device=self.device)
        return all_reduce_sum(flag).item() > 0

    def _stop_preempted(self, folder: Path | None, window: StepWindow) -> None:
        """Every rank agreed that a preemption signal came: log the steps not yet logged, save this step
        unless it was just saved, then leave as SIGTERM does (cli: exit 143, cleanup)."""
        if window.window_steps:
            self._log(window.reduce(self.device), {})
        if self._saved_step != self.step:
            refuse_non_finite_state(self.model, self.optimizer, self.step, self.checkpointer.latest())
            folder = self.save_checkpoint()
        received = self.preemption.received or "a signal on another rank"
        log_main(f"mpo_dist: {received} at step {self.step}: checkpoint {folder} saved; stopping "
                 "(a restart with checkpoint.resume=auto goes on from it)")
        raise Terminated(f"{received}, after saving step {self.step}")

    def _finish(self, folder: Path | None) -> None:
        config = self.config
        if config.checkpoint.export_hf:
            export_hf(folder, self.output_dir / HF_EXPORT_DIR, config.checkpoint.export_dtype, log=log_main)
        self._completed = True
        log_main(f"mpo_dist: done; {', '.join(self.metrics.locations())}")

    def _consider_best(self, folder: Path, evaluated: dict[str, float]) -> None:
        """checkpoint.keep_best: keep `folder` as the best checkpoint when its eval metric beats the best so far."""
        metric, mode = self.config.checkpoint.keep_best, self.config.checkpoint.best_mode
        if metric not in evaluated:
            raise InputError(f"checkpoint.keep_best={metric} is not an eval metric of this run; it has: "
                             f"{', '.join(sorted(name for name in evaluated if name.startswith('eval/')))}")
        self.checkpointer.consider_best(folder, metric, evaluated[metric], mode)

    def _eval_due(self, step: int) -> bool:
        interval = self.config.eval.interval
        return self.evaluator is not None and ((interval and step % interval == 0) or step == self.config.training.steps)

    def _evaluate(self) -> dict[str, float]:
        """The held-out eval metrics (a collective); model, optimizer, data positions and RNG are left as they were."""
        values = self.evaluator.evaluate()
        log_main(f"mpo_dist: eval at step {self.step}: {describe_eval(values)}")
        return values

    def _log(self, window: dict[str, float], evaluated: dict[str, float] | None = None) -> None:
        pairs_seen, tokens_seen = self._progress()
        seconds, steps, tokens = window.pop("seconds"), window.pop("steps"), window.pop("tokens")
        positions, real_positions, flops = window.pop("positions"), window.pop("real_positions"), window.pop("flops")
        pairs = max(window.pop("pairs"), 1)
        out = {
            **window,
            names.LR: self.scheduler.get_last_lr()[0],
            names.TOKENS_PER_S: tokens / seconds,
            names.TOKENS_PER_S_PER_DEVICE: tokens / seconds / self.info.world_size,
            names.PAIRS_PER_S: pairs / seconds,
            names.SECONDS_PER_STEP: seconds / steps,
            names.PADDING: 1 - real_positions / max(positions, 1),
            names.POSITIONS_PER_PAIR: positions / pairs,
            names.FLOPS_PER_PAIR: flops / pairs,
            names.PEAK_GIB: peak_memory_bytes(self.device) / 2**30,
            **({names.PEAK_RESERVED_GIB: torch.cuda.max_memory_reserved(self.device) / 2**30}
               if self.device.type == "cuda" else {}),  # what the caching allocator holds: what runs out first
            names.EPOCH: self.epoch_progress, names.PAIRS_SEEN: pairs_seen, names.TOKENS_SEEN: tokens_seen,
            names.SKIPPED_STEPS: self.guard.skipped_steps,
        }
        if self._peak_tflops:
            out[names.MFU] = mfu(flops, seconds, self.info.world_size, self._peak_tflops)
        self.metrics.write(self.step, {**out, **(evaluated or {})})

    def close(self) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.close(completed=self._completed)
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()
