"""A training step without host syncs (issue 24): host_sync.py counts what would make the host wait
for a GPU, transfer.py moves a micro-batch in one copy, and a real trainer step on CPU makes exactly
exactly one sync: the finite-value guard's read after the last backward."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, fields
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from support import TRAIN_CONFIG, collated_samples, tiny_causal_lm, toy_overrides
from mpo_dist.batch import MicroBatch
from mpo_dist.config import load_config
from mpo_dist.data.layout import ModelInput, lay_out
from mpo_dist.host_sync import count_host_syncs, not_counted
from mpo_dist.logprobs import batch_logprobs, padded_rows_input, sequence_logprobs
from mpo_dist.transfer import ALIGNMENT, to_device
from mpo_dist.varlen import VarlenDescriptors

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def positions_cost(rows: int, width: int, dense_attention: bool, attended_pairs: int | None = None) -> float:
    return float(rows * width)


def micro_batch(packing: str, varlen: bool = False, bucket_shapes: bool = True) -> MicroBatch:
    """support.collated_samples' 5 pairs (one with an empty prompt) and 3 D_ref samples, laid out."""
    layout = partial(lay_out, packing=packing, pad_token_id=0, cost=positions_cost, pack_tokens=48,
                     bucket_shapes=bucket_shapes, varlen=varlen)
    return MicroBatch.build(*collated_samples(), layout)


class RecordOps(TorchDispatchMode):
    """Every aten op dispatched inside, by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def tensors_of(value, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for field in fields(value):
        item = getattr(value, field.name)
        if isinstance(item, torch.Tensor):
            out[prefix + field.name] = item
        elif hasattr(item, "__dataclass_fields__"):
            out.update(tensors_of(item, f"{prefix}{field.name}."))
    return out


# ------------------------------------------------------------------ the counter itself


def test_the_counter_sees_each_kind_of_host_sync_once_and_where_it_is():
    x = torch.arange(6.0)
    mask = x > 2
    syncing = {
        "item": lambda: x[0].item(), "bool": lambda: bool(x[0] > 1), "float": lambda: float(x.sum()),
        "tolist": lambda: x.tolist(), "numpy": lambda: x.numpy(), "cpu": lambda: x.cpu(),
        "nonzero": lambda: mask.nonzero(), "mask index": lambda: x[mask],
        "masked_select": lambda: x.masked_select(mask),
        "bincount": lambda: torch.bincount(x.long()), "unique": lambda: torch.unique(x),
        "repeat_interleave": lambda: torch.repeat_interleave(x.long()), "equal": lambda: torch.equal(x, x),
        "host data": lambda: torch.tensor([1.0, 2.0]),
    }
    for name, code in syncing.items():
        with count_host_syncs() as found:
            code()
        assert len(found) == 1, (name, found.report())
        assert f"test_host_syncs.py:{code.__code__.co_firstlineno}" in found.syncs[0].origin, found.report()
    index = torch.tensor([0, 2])
    with count_host_syncs() as found:  # what stays on the device: nothing to count
        y = (x * 2).index_select(0, index).cumsum(0) + x.masked_fill(mask, 0).sum()
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.long), output_size=6)
        x.new_zeros(3).index_add(0, index, y)
        torch.zeros(2).to(CPU, non_blocking=True)
    assert len(found) == 0, found.report()
    with count_host_syncs() as found, not_counted():
        x.tolist()
    assert len(found) == 0


# ------------------------------------------------------------------ one copy per micro-batch


@dataclass
class Inner:
    flags: torch.Tensor
    count: int


@dataclass
class Sample:
    floats: torch.Tensor
    ints: torch.Tensor
    longs: torch.Tensor
    empty: torch.Tensor
    scalar: torch.Tensor
    strided: torch.Tensor
    inner: Inner
    keys: list[str]


def every_dtype() -> Sample:
    return Sample(floats=torch.randn(3, 5), ints=torch.arange(7, dtype=torch.int32), longs=torch.arange(-3, 4) * 2**40,
                  empty=torch.zeros(0, 4, dtype=torch.int64), scalar=torch.tensor(2.5, dtype=torch.float64),
                  strided=torch.arange(12.0).reshape(3, 4).t(), inner=Inner(torch.tensor([True, False, True]), 3),
                  keys=["a", "b"])


def leaves_of(value, prefix: str = "") -> dict[str, object]:
    """The fields of `value` (and its nested dataclasses) that are not tensors."""
    out = {}
    for field in fields(value):
        item = getattr(value, field.name)
        if hasattr(item, "__dataclass_fields__"):
            out.update(leaves_of(item, f"{prefix}{field.name}."))
        elif not isinstance(item, torch.Tensor):
            out[prefix + field.name] = item
    return out


@pytest.mark.parametrize("value", [every_dtype, lambda: micro_batch("always", varlen=True),
                                   lambda: micro_batch("never")], ids=["dtypes", "packed_varlen", "padded"])
def test_one_copy_moves_every_tensor_and_the_views_do_not_alias(value):
    value = value()
    before = tensors_of(value)
    with RecordOps() as record:
        moved = to_device(value, CPU, always_pack=True)
    # One transfer (_to_copy of the buffer); the packing is one gather (cat) into the host buffer.
    assert record.ops["_to_copy"] == 1 and record.ops["copy_"] == 0 and record.ops["cat"] == 1, record.ops
    assert type(moved) is type(value) and leaves_of(moved) == leaves_of(value)  # ints, keys, counts stay
    after = tensors_of(moved)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape, name
        assert torch.equal(after[name], tensor), name
    # All in one buffer, at aligned, disjoint byte ranges, none in the caller's memory.
    storages = {t.untyped_storage().data_ptr() for t in after.values()}
    assert len(storages) == 1 and not storages & {t.untyped_storage().data_ptr() for t in before.values()}
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in after.values() if t.numel())
    assert all(start % ALIGNMENT == 0 for start, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    expected = {name: tensor.clone() for name, tensor in before.items()}
    for name, tensor in after.items():  # writing one view leaves every other as it was
        tensor.fill_(True if tensor.dtype == torch.bool else 7)
        expected[name] = torch.full_like(before[name], True if tensor.dtype == torch.bool else 7)
        assert all(torch.equal(t, expected[other]) for other, t in after.items()), name
    assert all(torch.equal(tensor, tensors_of(value)[name]) for name, tensor in before.items())  # originals untouched


def test_micro_batch_to_uses_the_one_copy_and_stays_put_on_the_cpu():
    batch = micro_batch("always", varlen=True)
    assert batch.to(CPU) is batch and batch.inputs.to(CPU) is batch.inputs  # nothing to copy
    assert isinstance(batch.inputs.varlen, VarlenDescriptors)
    with RecordOps() as record:
        moved = to_device(batch.inputs.varlen, CPU, always_pack=True)
    assert record.ops["_to_copy"] == 1 and moved.max_q == batch.inputs.varlen.max_q
    assert torch.equal(moved.cu_seq_k, batch.inputs.varlen.cu_seq_k)


# ------------------------------------------------------------------ per-sequence counts from the host


@pytest.mark.parametrize("packing,bucket_shapes", [("always", True), ("never", True), ("always", False)])
def test_token_counts_come_from_the_layout_and_equal_a_bincount(packing, bucket_shapes):
    batch = micro_batch(packing, bucket_shapes=bucket_shapes)
    inputs = batch.inputs
    count = inputs.num_sequences
    expected = torch.bincount(inputs.sequence_index, minlength=count + 1)[:count]
    assert inputs.tokens_per_sequence.dtype == torch.int64 and torch.equal(inputs.tokens_per_sequence, expected)
    # Every response token has a predictor but the first of pair 1's two (its prompt is empty).
    pairs, dref = collated_samples()
    lengths = [len(r) for r in pairs["chosen_ids"] + pairs["rejected_ids"] + dref["response_ids"]]
    lengths[1] -= 1
    lengths[len(pairs["chosen_ids"]) + 1] -= 1
    assert inputs.tokens_per_sequence.tolist() == lengths
    if bucket_shapes:
        assert len(inputs.sequence_index) > int(expected.sum())  # extra head positions, in the discarded slot
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        assert torch.equal(batch_logprobs(model, inputs).num_tokens, expected)


def test_padded_rows_input_counts_its_tokens_on_the_device_without_bincount():
    ids = torch.tensor([[5, 6, 7, 8, 0], [9, 3, 4, 0, 0]])
    attention = ids != 0
    response = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    inputs = padded_rows_input(ids, attention, response)
    assert isinstance(inputs, ModelInput) and inputs.tokens_per_sequence.tolist() == [2, 2]
    assert torch.equal(inputs.tokens_per_sequence, torch.bincount(inputs.sequence_index, minlength=2))
    with torch.no_grad():
        assert sequence_logprobs(tiny_causal_lm("gpt2"), ids, attention, response).num_tokens.tolist() == [2, 2]


# ------------------------------------------------------------------ a trainer step, counted

# The step's syncs on a GPU (the optimizer aside: torch's AdamW keeps its step counters on the CPU and
# reads them there, host work on a GPU too, so `optimizer.step` is left out of the count):
# - ONE after the last backward: finite_guard.step_is_finite reads the global loss and gradient norm
#   to decide the update (accepted: no NaN or inf reaches the weights);
# - none in the forwards: the log-prob path hands the model prepared 4-D masks (or the zero-size
#   no_mask), so transformers' mask preparation, which would read a 2-D mask or the position ids on
#   the host, returns early; varlen's CPU twin cuts its pieces by host ints carried with the batch.
# Nothing else: no bincount, no .item(), no host number turned into a tensor, no size read.
# (data.packing, model.attention): padded rows (with padding), packed rows under the dense mask, packed
# rows by varlen pieces (the CPU twin), padded rows of a varlen run.
LAYOUTS = [("never", "dense"), ("always", "dense"), ("always", "varlen"), ("never", "varlen")]
GRAD_ACCUM = 2


@contextlib.contextmanager
def optimizer_not_counted(optimizer):
    stack = contextlib.ExitStack()
    pre = optimizer.register_step_pre_hook(lambda *_: stack.enter_context(not_counted()))
    post = optimizer.register_step_post_hook(lambda *_: stack.close())
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def counted_step(trainer, steps: int = 1):
    """The syncs of trainer step `steps` (the earlier ones run uncounted)."""
    data = iter(trainer.data)
    with optimizer_not_counted(trainer.optimizer):
        for step in range(steps):
            batches = [next(data) for _ in range(trainer.grad_accum)]
            assert all(batch.pairs is not None and batch.dref is not None for batch in batches)  # MPO with D_ref rows
            with count_host_syncs() if step == steps - 1 else contextlib.nullcontext() as found:
                trainer.train_step(batches)
    return found, batches


def build_trainer(toy_inputs, tmp_path, packing: str, attention: str):
    from mpo_dist.trainer import Trainer

    return Trainer(load_config(str(TRAIN_CONFIG), toy_overrides(toy_inputs, tmp_path, **{
        "model.attention": attention, "data.packing": packing, "training.steps": 3,
        "training.grad_accum": GRAD_ACCUM, "metrics.tensorboard": "false"})))


@pytest.mark.parametrize("packing,attention", LAYOUTS)
def test_a_training_step_makes_only_the_stated_host_syncs(toy_inputs, one_process_group, tmp_path, packing, attention):
    """One sync per step, the finite check after the last backward: none in the forwards (the masks
    come prepared, so transformers reads none back; the varlen twin cuts pieces by host ints), none
    in the loss, none in the backward."""
    trainer = build_trainer(toy_inputs, tmp_path, packing, attention)
    try:
        found, batches = counted_step(trainer, steps=2)  # the second step: optimizer state and all warm
    finally:
        trainer.close()
    assert all(batch.inputs.packed == (packing == "always") for batch in batches)
    varlen = (packing, attention) == ("always", "varlen")
    assert all((batch.inputs.varlen is not None) == varlen for batch in batches)
    assert any(batch.inputs.num_real_positions < batch.inputs.num_positions for batch in batches)  # padding to mask
    finite = found.at("finite_guard.py")
    assert len(finite) == 1 and "step_is_finite" in finite[0].where, found.report()
    assert len(found) == 1, found.report()


def test_a_sync_added_to_the_loss_is_caught_and_named(toy_inputs, one_process_group, tmp_path, monkeypatch):
    import mpo_dist.losses as losses

    trainer = build_trainer(toy_inputs, tmp_path, "always", "dense")
    real_mean, calls = losses._mean, []

    def mean_read_on_the_host(values, weight):
        out = real_mean(values, weight)
        calls.append(1)
        if out.item() != out.item():  # the kind of NaN check that stalls a GPU step
            raise AssertionError("NaN")
        return out

    monkeypatch.setattr(losses, "_mean", mean_read_on_the_host)
    try:
        found, _ = counted_step(trainer)
    finally:
        trainer.close()
    injected = found.at("in mean_read_on_the_host")
    assert calls and len(injected) == 2 * len(calls) and len(found) == 1 + len(injected), found.report()
    assert all(sync.op == "aten._local_scalar_dense" and sync.where.startswith("mpo_dist/losses.py:")
               for sync in injected), found.report()
    assert {sync.where.split(" in ")[1] for sync in injected} == {"mpo_loss", "_pair_metrics"}  # _mean's callers
    assert "aten._local_scalar_dense at mpo_dist/losses.py:" in found.report()
