"""The offline pass of tools/evaluate.py: the trainer's held-out evaluation of a given model.

It runs the trainer's own held-out pass (`evaluation.Evaluator`, given the plain model), so the
`eval/...` metrics are the trainer's, computed the same way: held-out pairs with their reference
log-probs (preference metrics of the chosen loss) and a held-out D_ref (the KL monitor
`eval/kl_ref_policy`, an estimate of KL(pi_ref || pi_theta), with its standard error). Every sample
is read once over all ranks; with `per_sample`, every sample's log-probs are gathered into the
report by key (one more sum over ranks: each rank fills the positions of its own samples).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from mpo_dist.batch import MicroBatch
from mpo_dist.config import DataConfig, EvalConfig, LossConfig
from mpo_dist.data.shards import Manifest, ShardCursor, ShardError
from mpo_dist.distributed import RankInfo, all_reduce_sum
from mpo_dist.errors import InputError
from mpo_dist.evaluation import Evaluator
from mpo_dist.flops import CostModel
from mpo_dist.losses import build_loss
from mpo_dist.objective import Objective
from mpo_dist.progress import Progress, stderr_log


class _Recorder:
    """Every real sample's log-probs by key, as the held-out pass computes them (for --per-sample)."""

    def __init__(self):
        self.records: dict[str, dict[str, tuple[float, ...]]] = {"pairs": {}, "dref": {}}

    def __call__(self, batch: MicroBatch, logps: torch.Tensor) -> None:
        values = logps.double()
        if batch.pairs is not None:
            pairs = batch.pairs
            rows = zip(pairs.keys, pairs.real.tolist(), batch.chosen(values).tolist(), batch.rejected(values).tolist(),
                       pairs.ref_chosen_logps.double().tolist(), pairs.ref_rejected_logps.double().tolist())
            self.records["pairs"].update((key, tuple(row)) for key, real, *row in rows if real)
        else:
            dref = batch.dref
            rows = zip(dref.keys, dref.real.tolist(), values.tolist(), dref.ref_logps.double().tolist())
            self.records["dref"].update((key, tuple(row)) for key, real, *row in rows if real)


PER_SAMPLE_FIELDS = {"pairs": ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"),
                     "dref": ("policy_logps", "ref_logps")}


def _manifest_keys(folder: str | Path, kind: str) -> list[str]:
    manifest = Manifest.read(folder, kind)
    return [key for shard in manifest.shards
            for key, _, _ in ShardCursor(Path(folder) / shard.name, kind, shard.num_samples)]


def _gather_per_sample(records: dict, folders: dict[str, str], device: torch.device) -> dict:
    """Every sample's values in manifest order, whichever rank computed them (one sum over ranks)."""
    layout, parts = [], []
    for what, folder in folders.items():
        keys = _manifest_keys(folder, "pairs" if what == "pairs" else "dref")
        width = len(PER_SAMPLE_FIELDS[what])
        values = torch.zeros(len(keys), width + 1, dtype=torch.float64)  # the last column counts who filled a row
        index = {key: i for i, key in enumerate(keys)}
        for key, row in records[what].items():
            values[index[key], :width] = torch.tensor(row, dtype=torch.float64)
            values[index[key], width] = 1
        layout.append((what, keys, values.shape))
        parts.append(values.flatten())
    if not parts:
        return {}
    total = all_reduce_sum(torch.cat(parts).to(device)).cpu()
    out, start = {}, 0
    for what, keys, shape in layout:
        values = total[start : start + shape.numel()].reshape(shape)
        start += shape.numel()
        if not bool((values[:, -1] == 1).all()):  # an error in the sharding, never in the data
            raise RuntimeError(f"per-sample {what}: some samples were evaluated {values[:, -1].tolist()} times")
        out[what] = {"keys": keys, **{name: values[:, i].tolist() for i, name in enumerate(PER_SAMPLE_FIELDS[what])}}
    return out


def _flag_names(error: ShardError) -> InputError:
    text = str(error).replace("eval.pairs=", "--pairs ").replace("eval.reference=", "--reference ").replace("eval.dref=", "--dref ")
    return InputError(text)


def offline_metrics(model, *, pairs: str, reference: str, dref: str, batch_size: int, loss: LossConfig, per_sample: bool,
                    device: torch.device, info: RankInfo, pad_token_id: int, vocab_size: int,
                    log: Callable[[str], None] = stderr_log) -> tuple[dict[str, float], dict]:
    """The trainer's eval metrics (`eval/...`) of `model` on `pairs` scored by `reference` and on `dref`
    (either may be ""), and every sample's log-probs when `per_sample`. Rank 0 shows its batches' progress."""
    pairs = pairs if reference else ""
    config = EvalConfig(pairs=pairs, reference=reference if pairs else "", dref=dref, batch_size=batch_size)
    if not config.enabled:
        return {}, {}
    recorder = _Recorder()
    progress = Progress("evaluate (held-out)", "batches", log, enabled=info.rank == 0, first_after_s=0.0,
                        detail=f"rank 0 of {info.world_size}, " if info.world_size > 1 else "")
    batches = 0

    def record(batch: MicroBatch, logps: torch.Tensor) -> None:
        nonlocal batches
        if per_sample:
            recorder(batch, logps)
        batches += 1
        progress.update(batches)

    try:
        evaluator = Evaluator(config, DataConfig(pairs=pairs or dref), model=model,
                              objective=Objective(build_loss(loss)), device=device, dp_rank=info.rank,
                              dp_world_size=info.world_size, pad_token_id=pad_token_id, vocab_size=vocab_size,
                              layout_cost=CostModel.of(model).layout_cost,
                              # Each batch's log-probs come to the host for it: only where something is shown.
                              record=record if per_sample or progress.shown else None)
    except ShardError as error:
        raise _flag_names(error) from error
    # Every rank runs as many batches: the held-out sets padded to whole rounds of batch_size x ranks.
    progress.total = sum(math.ceil(evaluator.expected[what] / (batch_size * info.world_size)) for what in ("pairs", "dref"))
    metrics = evaluator.evaluate()
    progress.close()
    if not per_sample:
        return metrics, {}
    folders = {what: folder for what, folder in (("pairs", pairs), ("dref", dref)) if folder}
    return metrics, _gather_per_sample(recorder.records, folders, device)
