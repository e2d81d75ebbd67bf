"""The held-out evaluation pass: preference metrics on eval pairs and the KL monitor on a held-out D_ref.

One pass reads the whole held-out set once (or `eval.max_batches` batches per rank), sharded over
the data-parallel ranks in manifest order (no shuffle): fixed batches of `eval.batch_size`, the tail
padded with flagged duplicates so every rank runs the same number of batches, and the duplicates
given weight 0, so every sample counts exactly once whatever the number of ranks. The loss function
is called with weight = real / (real samples over all ranks), so its metrics, summed over batches
and ranks, are global means; everything is summed over ranks in ONE all-reduce at the end.

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
from typing import Callable, Iterator

import torch

from mpo_dist.config import DataConfig, EvalConfig
from mpo_dist.data.collate import batch_documents, collate_dref, collate_pairs
from mpo_dist.data.layout import layout_for
from mpo_dist.data.dataset import ShardStream
from mpo_dist.data.sampler import BatchSpec
from mpo_dist.data.samples import DrefSource, PairSource
from mpo_dist.data.shards import ShardError
from mpo_dist.distributed import all_reduce_sum
from mpo_dist.logprobs import batch_logprobs
from mpo_dist.metrics import logged_name

PREFIX = "eval/"
KL_MONITOR = "eval/kl_ref_policy"


def _stream(source, collate, batch_size: int, sequences_per_sample: int, dp_rank: int, dp_world_size: int) -> ShardStream:
    """One unshuffled epoch in manifest order, tail padded (flagged) to whole rounds of batch_size x ranks."""
    spec = BatchSpec(batch_size=batch_size, sequences_per_sample=sequences_per_sample, shuffle=False,
                     shuffle_window=4096, drop_tail=False)
    return ShardStream(source, collate, spec, seed=0, dp_rank=dp_rank, dp_world_size=dp_world_size, num_epochs=1)


def real_samples(total: int, batch_size: int, dp_world_size: int, max_batches: int) -> int:
    """Real samples one pass reads over all ranks: rank r's batch i holds global positions
    i*B*W + r*B ... + B - 1, so the first k batches of every rank are positions [0, k*B*W)."""
    if not max_batches:
        return total
    return min(total, max_batches * batch_size * dp_world_size)


class Evaluator:
    """Held-out evaluation of the trainer's (FSDP) model; `evaluate()` is a collective: every rank calls it."""

    def __init__(self, config: EvalConfig, data: DataConfig, *, model: torch.nn.Module, loss_fn: Callable,
                 device: torch.device, dp_rank: int, dp_world_size: int, pad_token_id: int,
                 tokenizer_hash: str | None = None, vocab_size: int | None = None,
                 layout_cost: Callable[[int, int, bool], float] | None = None):
        self.config, self.model, self.loss_fn, self.device = config, model, loss_fn, device
        # The training forward's layout: data's options, and the model's cost (metrics.model_layout_cost).
        self.layout = layout_for(data, pad_token_id, cost=layout_cost)
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

    def _batches(self, stream: ShardStream) -> Iterator[dict]:
        stream.start_at(0, 0)
        batches = iter(stream)
        return itertools.islice(batches, self.config.max_batches) if self.config.max_batches else batches

    def _logps(self, batch: dict) -> torch.Tensor:
        """Policy log-probs of a pairs batch (chosen, then rejected) or of a D_ref batch."""
        documents = batch_documents(batch) if "chosen_ids" in batch else batch_documents(None, batch)
        return batch_logprobs(self.model, self.layout(documents).to(self.device)).logps

    def _local_sums(self) -> tuple[list[str], torch.Tensor]:
        """This rank's shares: the loss metrics (weighted to global means), then pair count, D_ref count,
        and the sums of d = logp_ref - logp_theta and d**2 over D_ref samples (all float64)."""
        device = self.device
        metric_sums: dict[str, torch.Tensor] = {}
        pairs = torch.zeros((), dtype=torch.float64, device=device)
        if self.pairs is not None:
            for batch in self._batches(self.pairs):
                logps = self._logps(batch)
                size = len(batch["keys"])
                real = (~batch["is_pad"]).to(device)
                weight = real.to(torch.float32) / self.expected["pairs"]
                out = self.loss_fn(logps[:size], logps[size:], batch["ref_chosen_logps"].to(device),
                                   batch["ref_rejected_logps"].to(device), label=batch["label"].to(device),
                                   weight=weight, chosen_lengths=batch["chosen_lengths"].to(device),
                                   rejected_lengths=batch["rejected_lengths"].to(device))
                for name, value in out.metrics.items():
                    metric_sums[name] = metric_sums.get(name, 0) + value.detach().double()
                pairs += real.sum()
        dref = torch.zeros(3, dtype=torch.float64, device=device)  # count, sum d, sum d**2
        if self.dref is not None:
            for batch in self._batches(self.dref):
                real = (~batch["is_pad"]).to(device, torch.float64)
                d = batch["ref_logps"].to(device, torch.float64) - self._logps(batch).double()
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
        out = {PREFIX + logged_name(name): value for name, value in zip(names, values)}
        pairs, count, total, squares = values[len(names):]
        for what, seen in (("pairs", pairs), ("dref", count)):
            if round(seen) != self.expected[what]:  # an error in the sharding, never in the data
                raise RuntimeError(f"eval pass read {seen:.0f} real {what} samples, expected {self.expected[what]}")
        if self.pairs is not None:
            out[PREFIX + "pairs"] = pairs
        if self.dref is not None:
            mean = total / count
            variance = max(squares / count - mean * mean, 0.0) * count / (count - 1) if count > 1 else math.nan
            out[KL_MONITOR] = mean
            out[KL_MONITOR + "_stderr"] = math.sqrt(variance / count)
            out[PREFIX + "dref_samples"] = count
        out[PREFIX + "seconds"] = time.monotonic() - start
        return out


def _same_tokenizer(option: str, folder: str, found: str | None, expected: str | None) -> None:
    if expected is not None and found != expected:
        raise ShardError(f"{option} {folder}: tokenizer {found} differs from the training pairs' {expected}; "
                         "prepare (and score or sample) the held-out data with the policy's tokenizer")


def describe(values: dict[str, float]) -> str:
    """One console line of the main eval metrics present in `values`."""
    parts = []
    for name, label, fmt in ((PREFIX + logged_name("loss"), "loss", "{:.4f}"),
                             (PREFIX + logged_name("reward_accuracy"), "reward acc", "{:.3f}"),
                             (PREFIX + logged_name("preference_accuracy"), "pref acc", "{:.3f}"),
                             (PREFIX + logged_name("accuracy"), "acc", "{:.3f}"),
                             (PREFIX + logged_name("reward_margin"), "margin", "{:+.3f}")):
        if name in values:
            parts.append(f"{label} {fmt.format(values[name])}")
    if KL_MONITOR in values:
        parts.append(f"kl(ref|pol) {values[KL_MONITOR]:.3f} +- {values[KL_MONITOR + '_stderr']:.3f}")
    parts.append(f"{values[PREFIX + 'seconds']:.1f}s")
    return " | ".join(parts)
