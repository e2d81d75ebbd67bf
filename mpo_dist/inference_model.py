"""A model for the inference tools (scoring, sampling, evaluation), built and sharded as the trainer's.

`load_inference_model` builds the module tree on the meta device, shards it with FSDP2 over
`model_shards` processes (`parallelize.shard_for_inference`; 0: the processes of a node, 1: a whole
copy per process), then allocates only this rank's slices and reads them from the safetensors files
(`model.materialize_weights`). Parameters are kept in the compute dtype (no float32 master, no
gradients), so a rank holds 1/model_shards of the weights, plus, during a forward, the decoder layer
being run and the root (final norm and head).

Every forward of a sharded model is a collective over its shard group: each rank computes its own
batch with parameters the group gathers layer by layer. The tools give ranks uneven work (shards of
different sizes, responses that end at different steps), so forwards go through a `Lockstep`: before
each one, the ranks of a group agree on which model runs next (policy or reference); a rank with no
forward of that model to do runs an idle one (a single token), and a rank whose work is done keeps
doing so (`finish`) until all are done. A rank's own numbers never depend on its peers: each batch is
computed alone with the full parameters, so outputs are the same at any world size and shard count.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mpo_dist.distributed import RankInfo
from mpo_dist.logprobs import LOGPROB_METHOD
from mpo_dist.model import DTYPES, build_model_from_config, materialize_weights
from mpo_dist.parallelize import inference_mesh, shard_for_inference

MODEL_SHARDS_HELP = ("processes that share one copy of each model, FSDP-sharded: a rank holds 1/N of the weights "
                     "(0: the processes of a node; 1: a whole copy per process, no collectives; N must divide the "
                     "number of processes)")
_DONE = 2**62  # what a rank with no forward left asks for: larger than any model's index


class Lockstep:
    """Agreement, over one shard group, on which sharded model runs each forward (module docstring)."""

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device
        self.models: list[InferenceModel] = []

    def _agree(self, wanted: int) -> int:
        choice = torch.tensor([wanted], dtype=torch.int64, device=self.device)
        dist.all_reduce(choice, op=dist.ReduceOp.MIN, group=self.group)  # the lowest index waiting runs first
        return int(choice.item())

    def run(self, index: int, forward):
        """Run `forward` of model `index` once every rank of the group runs a forward of that model."""
        while (chosen := self._agree(index)) != index:
            self.models[chosen].idle_forward()
        return forward()

    def finish(self) -> None:
        """Idle forwards for as long as another rank of the group still runs real ones."""
        while (chosen := self._agree(_DONE)) != _DONE:
            self.models[chosen].idle_forward()


class InferenceModel:
    """A causal LM for no-grad forwards; when sharded, each forward (`__call__`, the log-prob method)
    runs in lockstep with the other ranks of its shard group. Anything else is the module's."""

    def __init__(self, module: nn.Module, lockstep: Lockstep | None, device: torch.device):
        self.module, self.lockstep, self.device = module, lockstep, device
        self.index = -1
        if lockstep is not None:
            self.index = len(lockstep.models)
            lockstep.models.append(self)

    @property
    def sharded(self) -> bool:
        return self.lockstep is not None

    @property
    def shards(self) -> int:
        """Processes sharing this copy of the model."""
        return 1 if self.lockstep is None else self.lockstep.group.size()

    def describe(self) -> str:
        """How the weights are held, for the tools' log."""
        total = sum(p.numel() for p in self.module.parameters())
        if self.lockstep is None:
            return f"{total / 1e6:,.1f}M parameters, a whole copy per process"
        shards = self.shards
        return f"{total / 1e6:,.1f}M parameters sharded over {shards} processes (1/{shards} of the weights each)"

    def _forward(self, forward):
        return forward() if self.lockstep is None else self.lockstep.run(self.index, forward)

    def __call__(self, *args, **kwargs):
        return self._forward(lambda: self.module(*args, **kwargs))

    def finish(self) -> None:
        """Call when this rank has no forward left: it keeps serving its group's until every rank is done."""
        if self.lockstep is not None:
            self.lockstep.finish()

    @torch.no_grad()
    def idle_forward(self) -> None:
        self.module(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device), use_cache=False)

    def __getattr__(self, name: str):  # only for names the proxy itself lacks
        if name == "module":  # not set yet (e.g. a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)


def _logprobs_in_lockstep(self: InferenceModel, *args, **kwargs):
    return self._forward(lambda: getattr(self.module, LOGPROB_METHOD)(*args, **kwargs))


setattr(InferenceModel, LOGPROB_METHOD, _logprobs_in_lockstep)


MMAP_THRESHOLD_BYTES = 1 << 20


def give_large_blocks_back_on_free() -> bool:
    """On a CPU with glibc: serve blocks over MMAP_THRESHOLD_BYTES by mmap, so freeing them returns them.

    glibc raises its mmap threshold to the size of each large block freed; after that, blocks of that
    size come from the heap and stay in it when freed. A sharded model gathers and frees a layer per
    forward step, so a rank's memory would grow towards a whole copy of the model (measured: more
    than a replica's, at 2 processes). A fixed threshold turns that off. Returns whether it was set."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # not glibc
        return False
    return bool(libc.mallopt(-3, MMAP_THRESHOLD_BYTES))  # -3: M_MMAP_THRESHOLD


def finish_forwards(model) -> None:
    """`InferenceModel.finish` for whatever model the caller was given (a plain module needs nothing)."""
    if isinstance(model, InferenceModel):
        model.finish()


def load_inference_model(folder: str | Path, config, dtype: str, device: torch.device, info: RankInfo, *,
                         model_shards: int, option: str, lockstep: Lockstep | None = None) -> InferenceModel:
    """The model of `folder` (its transformers `config` already read and checked), in `dtype`, on
    `device`, sharded over `model_shards` processes. Models that run beside each other (the policy
    and its reference) share one `lockstep`: pass the first one's."""
    from transformers import GenerationConfig

    folder = Path(folder)
    mesh = inference_mesh(info.world_size, model_shards, info.local_world_size, device.type)  # checks model_shards
    module = build_model_from_config(config, DTYPES[dtype])
    if (folder / "generation_config.json").is_file():  # every stop token (e.g. end of turn as well as end of text)
        module.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    if mesh is not None:
        shard_for_inference(module, mesh)
        if device.type == "cpu":
            give_large_blocks_back_on_free()
    materialize_weights(module, folder, device, option=option)
    module.eval()
    if mesh is not None and lockstep is None:
        lockstep = Lockstep(mesh["dp_shard"].get_group(), device)
    return InferenceModel(module, lockstep if mesh is not None else None, device)
