"""The held-out evaluation pass: preference metrics on eval pairs and the KL monitor on a held-out D_ref.

One pass reads the whole held-out set once (or `eval.max_batches` batches per rank), sharded over
the data-parallel ranks in manifest order (no shuffle): fixed batches of `eval.batch_size`, the tail
padded with flagged duplicates so every rank runs the same number of batches, and the duplicates
given weight 0, so every sample counts exactly once whatever the number of ranks. The training
objective (objective.py) weighs each real pair by 1 / (real pairs over all ranks), so its metrics,
summed over batches and ranks, are global means; everything is summed over ranks in ONE all-reduce
at the end.

The KL monitor `eval/kl_ref_policy` estimates KL(pi_ref || pi_theta) as mean(logp_ref - logp_theta)
over held-out D_ref samples y ~ pi_ref (their logp_ref comes from the shards), with its standard
error. It needs only eval.dref, so it works for every loss. Unlike the training-set `loss/dref_kl`,
these samples are never trained on, so the estimate is not biased downwards.

The pass does not touch training state: no gradients (torch.no_grad), the training data loaders are
not used (the eval streams are separate and read in this process, no DataLoader), the model's
train/eval mode and torch's RNG states are restored afterwards; so a run with eval on follows the
same trajectory, bit for bit, as the same run with eval off.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace
from typing import Callable, Iterator

import torch

from mpo_dist.attention import packing_for
from mpo_dist.config import DataConfig, EvalConfig
from mpo_dist.batch import MicroBatch
from mpo_dist.data.collate import collate_dref, collate_pairs
from mpo_dist.data.layout import layout_for
from mpo_dist.data.dataset import ShardStream
from mpo_dist.data.sampler import BatchSpec
from mpo_dist.data.samples import DrefSource, PairSource
from mpo_dist.data.shards import ShardError
from mpo_dist.distributed import all_reduce_sum
from mpo_dist.objective import Objective, policy_logprobs
from mpo_dist.metric_names import (EVAL_CONSOLE, EVAL_DREF_SAMPLES, EVAL_PAIRS, EVAL_SECONDS, KL_MONITOR, console_line,
                                   eval_name, stderr_name)


def _stream(source, collate, batch_size: int, sequences_per_sample: int, dp_rank: int, dp_world_size: int) -> ShardStream:
    """One unshuffled epoch in manifest order, tail padded (flagged) to whole rounds of batch_size x ranks."""
    spec = BatchSpec(batch_size=batch_size, sequences_per_sample=sequences_per_sample, shuffle=False,
                     shuffle_window=4096, drop_tail=False)
    return ShardStream(source, collate, spec, seed=0, dp_rank=dp_rank, dp_world_size=dp_world_size, num_epochs=1)


def mean_and_stderr(count: float, total: float, squares: float) -> tuple[float, float]:
    """The mean of `count` values from their sum and sum of squares, and its standard error (NaN for one value)."""
    mean = total / count
    variance = max(squares / count - mean * mean, 0.0) * count / (count - 1) if count > 1 else math.nan
    return mean, math.sqrt(variance / count)


def clustered_mean_and_stderr(values: torch.Tensor, clusters: torch.Tensor) -> tuple[float, float]:
    """The mean of `values` and its standard error when values of one cluster (the samples of one
    prompt) are not independent: the cluster-robust variance G/(G-1) * sum_g (sum_{i in g} (x_i - mean))^2 / N^2
    over G clusters. With one value per cluster it is the usual s^2 / N; NaN for one cluster."""
    values = values.double()
    count = values.numel()
    mean = values.mean()
    per_cluster = torch.zeros(int(clusters.max()) + 1, dtype=torch.float64).index_add_(0, clusters, values - mean)
    groups = int(torch.unique(clusters).numel())
    if groups < 2:
        return float(mean), math.nan
    variance = groups / (groups - 1) * float((per_cluster * per_cluster).sum()) / count**2
    return float(mean), math.sqrt(variance)


def real_samples(total: int, batch_size: int, dp_world_size: int, max_batches: int) -> int:
    """Real samples one pass reads over all ranks: rank r's batch i holds global positions
    i*B*W + r*B ... + B - 1, so the first k batches of every rank are positions [0, k*B*W)."""
    if not max_batches:
        return total
    return min(total, max_batches * batch_size * dp_world_size)


class Evaluator:
    """Held-out evaluation of the trainer's (FSDP) model; `evaluate()` is a collective: every rank calls it."""

    def __init__(self, config: EvalConfig, data: DataConfig, *, model: torch.nn.Module, objective: Objective,
                 device: torch.device, dp_rank: int, dp_world_size: int, pad_token_id: int,
                 tokenizer_hash: str | None = None, vocab_size: int | None = None,
                 layout_cost: Callable[[int, int, bool], float], varlen: bool = False,
                 record: Callable[[MicroBatch, torch.Tensor], None] | None = None):
        """`record(batch, logps)`, when given, sees every batch's per-sequence policy log-probs (on the host)."""
        self.config, self.model, self.objective, self.device, self.record = config, model, objective, device, record
        # The training forward's layout: data's options, the model's cost (flops.CostModel.layout_cost) and
        # whether packed rows carry varlen pieces (attention.resolve_attention gave "varlen").
        data = replace(data, packing=packing_for(data.packing, getattr(model, "config", None)))  # windowed: padded
        self.layout = layout_for(data, pad_token_id, cost=layout_cost, varlen=varlen)
        ranks = dict(dp_rank=dp_rank, dp_world_size=dp_world_size)
        self.pairs = self.dref = None
        self.expected = {"pairs": 0, "dref": 0}  # real samples of one pass, over all ranks
        def open_stream(option: str, folder: str, what: str, make_source, collate, sequences_per_sample: int):
            try:
                source = make_source()
            except (ShardError, FileNotFoundError) as error:
                raise ShardError(f"{what}: {error}") from error
            _same_tokenizer(option, folder, source.shards.manifest.tokenizer_hash, tokenizer_hash)
            expected = real_samples(source.shards.manifest.num_samples, config.batch_size, dp_world_size, config.max_batches)
            return _stream(source, collate, config.batch_size, sequences_per_sample, **ranks), expected

        if config.pairs:
            self.pairs, self.expected["pairs"] = open_stream(
                "eval.pairs", config.pairs, f"eval.pairs={config.pairs} / eval.reference={config.reference}",
                lambda: PairSource(config.pairs, config.reference, vocab_size=vocab_size), collate_pairs, 2)
        if config.dref:
            self.dref, self.expected["dref"] = open_stream(
                "eval.dref", config.dref, f"eval.dref={config.dref}", lambda: DrefSource(config.dref, vocab_size=vocab_size),
                collate_dref, 1)

    def _batches(self, stream: ShardStream, what: str) -> Iterator[MicroBatch]:
        """The pass's micro-batches of one stream (pairs or D_ref alone: one forward each), on the device."""
        stream.start_at(0, 0)
        batches = iter(stream)
        if self.config.max_batches:
            batches = itertools.islice(batches, self.config.max_batches)
        for batch in batches:
            pairs, dref = (batch, None) if what == "pairs" else (None, batch)
            yield MicroBatch.build(pairs, dref, self.layout).to(self.device)

    def _recorded(self, batch: MicroBatch, logps: torch.Tensor) -> torch.Tensor:
        if self.record is not None:
            self.record(batch, logps.detach().cpu())
        return logps

    def _local_sums(self) -> tuple[list[str], torch.Tensor]:
        """This rank's shares: the loss metrics (weighted to global means), then pair count, D_ref count,
        and the sums of d = logp_ref - logp_theta and d**2 over D_ref samples (all float64)."""
        device = self.device
        metric_sums: dict[str, torch.Tensor] = {}
        pairs = torch.zeros((), dtype=torch.float64, device=device)
        if self.pairs is not None:
            for batch in self._batches(self.pairs, "pairs"):
                out = self.objective(self.model, batch, pair_total=self.expected["pairs"])
                self._recorded(batch, out.logps)
                for name, value in out.loss.metrics.items():
                    metric_sums[name] = metric_sums.get(name, 0) + value.detach().double()
                pairs += batch.pairs.real.sum()
        dref = torch.zeros(3, dtype=torch.float64, device=device)  # count, sum d, sum d**2
        if self.dref is not None:
            for batch in self._batches(self.dref, "dref"):
                logps = self._recorded(batch, batch.dref_part(policy_logprobs(self.model, batch).logps))
                real = batch.dref.real.to(torch.float64)
                d = batch.dref.ref_logps.to(torch.float64) - logps.double()
                dref += torch.stack([real.sum(), (real * d).sum(), (real * d * d).sum()])
        names = sorted(metric_sums)  # the same on every rank: every rank has at least one batch
        local = torch.cat([torch.stack([metric_sums[n] for n in names]) if names else dref.new_zeros(0),
                           pairs.reshape(1), dref])
        return names, local

    def evaluate(self) -> dict[str, float]:
        """One pass; returns the eval metrics (equal on every rank). Training state is left as it was."""
        start = time.monotonic()
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                names, local = self._local_sums()
                values = all_reduce_sum(local).tolist()  # the one collective of the pass (and its host sync)
        finally:
            self.model.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)
        out = {eval_name(name): value for name, value in zip(names, values)}
        pairs, count, total, squares = values[len(names):]
        for what, seen in (("pairs", pairs), ("dref", count)):
            if round(seen) != self.expected[what]:  # an error in the sharding, never in the data
                raise RuntimeError(f"eval pass read {seen:.0f} real {what} samples, expected {self.expected[what]}")
        if self.pairs is not None:
            out[EVAL_PAIRS] = pairs
        if self.dref is not None:
            out[KL_MONITOR], out[stderr_name(KL_MONITOR)] = mean_and_stderr(count, total, squares)
            out[EVAL_DREF_SAMPLES] = count
        out[EVAL_SECONDS] = time.monotonic() - start
        return out


def _same_tokenizer(option: str, folder: str, found: str | None, expected: str | None) -> None:
    if expected is not None and found != expected:
        raise ShardError(f"{option} {folder}: tokenizer {found} differs from the training pairs' {expected}; "
                         "prepare (and score or sample) the held-out data with the policy's tokenizer")


def describe(values: dict[str, float]) -> str:
    """One console line of the main eval metrics present in `values`."""
    return console_line(values, EVAL_CONSOLE, after=[f"{values[EVAL_SECONDS]:.1f}s"])
