"""Where a model's tensors lie in its Hugging Face safetensors files, when not under their own names.

transformers 5 keeps some tensors fused in memory that the files store piece by piece: a
mixture-of-experts layer holds all its experts in one tensor (`mlp.experts.gate_up_proj`, [experts,
2 x intermediate, hidden], each expert's gate and up projections concatenated; `mlp.experts.down_proj`,
[experts, hidden, intermediate]) where Qwen3-MoE's files hold `mlp.experts.E.gate_proj.weight`,
`...up_proj.weight`, `...down_proj.weight` per expert E, and Mixtral's `block_sparse_moe.experts.E.w1`,
`w3`, `w2`. transformers describes each architecture's layout in its conversion mapping
(`conversion_mapping.get_model_conversion_mapping`: renamings, and converters whose operations stack
experts and concatenate projections); `FileLayout` reads that mapping and says, for each tensor of the
model, which file tensors fill which part of it. It understands renamings of one plain name part and
converters that stack experts (`MergeModulelist(dim=0)`) and then, optionally, concatenate their
projections (`Concatenate(dim=1)`), which is what the dense and MoE families use; any other
transform that would apply to a model's tensor is refused (`UnsupportedLayout`), never guessed.

The model loader (model.load_pretrained_weights) reads each piece into its place in this rank's shard,
so no rank reads experts it does not hold; conversion (convert.py) writes the pieces, as
transformers' own save_pretrained does, so that the folder loads in transformers and in vLLM alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLAIN = re.compile(r"^[\w.*]+$")  # a pattern that is a literal name part ("*": an expert's index)


class UnsupportedLayout(ValueError):
    """A transform of the architecture's conversion mapping that FileLayout cannot invert."""


@dataclass(frozen=True)
class FilePiece:
    key: str  # the tensor's name in the safetensors files
    index: tuple  # where it lies in the model's tensor: () all of it, (expert,) or (expert, slice along dim 1)


@dataclass(frozen=True)
class _Stack:
    target: str  # the fused tensor's name suffix, e.g. "mlp.experts.gate_up_proj"
    sources: tuple[str, ...]  # the per-expert file names' suffixes, "*" for the expert, concatenated along dim 1


class FileLayout:
    """The file layout of a transformers model (see the module docstring), from its conversion mapping."""

    def __init__(self, lm):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming

        self.renamings: list[tuple[str, str]] = []  # (in memory, in the files)
        self.stacks: list[_Stack] = []
        self.unsupported: list[str] = []
        for transform in get_model_conversion_mapping(lm, add_legacy=False):
            sources, targets = list(transform.source_patterns), list(transform.target_patterns)
            plain = all(_PLAIN.match(pattern) for pattern in sources + targets) and len(targets) == 1
            plain = plain and getattr(transform, "scope_prefix", None) in (None, "")
            if isinstance(transform, WeightRenaming) and plain and len(sources) == 1 and "*" not in sources[0]:
                self.renamings.append((targets[0], sources[0]))
                continue
            operations = getattr(transform, "operations", None) or []
            kinds = [(type(op), getattr(op, "dim", None)) for op in operations]
            stacked = kinds == [(MergeModulelist, 0)] and len(sources) == 1
            stacked = stacked or (kinds == [(MergeModulelist, 0), (Concatenate, 1)] and len(sources) > 1)
            if isinstance(transform, WeightConverter) and plain and stacked and all("*" in s for s in sources):
                self.stacks.append(_Stack(targets[0], tuple(sources)))
                continue
            self.unsupported.append(repr(transform))

    def _file_name(self, name: str) -> str:
        """`name` with the renamings reversed (Mixtral: ".mlp." -> ".block_sparse_moe.")."""
        for in_memory, in_files in self.renamings:
            name = name.replace(in_memory, in_files)
        return name

    def pieces(self, name: str, shape) -> list[FilePiece]:
        """The file tensors that make up the model's tensor `name` of `shape`, and where each goes."""
        for stack in self.stacks:
            target = stack.target
            if not (name.endswith(target) and (target.startswith(".") or name[: -len(target)].endswith(".")
                                               or name == target)):
                continue
            experts, width = shape[0], shape[1] // len(stack.sources) if len(shape) > 1 else 0
            prefix = name[: -len(target)]
            pieces = []
            for expert in range(experts):
                for number, source in enumerate(stack.sources):
                    key = self._file_name(prefix + source.replace("*", str(expert), 1))
                    where = (expert,) if len(stack.sources) == 1 else (expert, slice(number * width, (number + 1) * width))
                    pieces.append(FilePiece(key, where))
            return pieces
        return [FilePiece(self._file_name(name), ())]

    def describe_unsupported(self) -> str:
        return "; ".join(self.unsupported)
