"""Peak memory of a process that runs bf16 linear layers (forward + backward) on CPU over many
different input lengths: each new matrix shape leaves memory behind in the CPU kernels, so a
training step whose token count changes every step grows the process.

    python tools/bench_bf16_shape_memory.py [--steps 400] [--round-to 1] [--dtype bfloat16]

Prints the process's peak resident memory (VmHWM) every 100 steps. `--round-to N` rounds every
length up to a multiple of N (fewer distinct shapes); `--dtype float32` for comparison.
"""

import random
import sys

import torch

from mpo_dist.cli import run_main, tool_parser
from mpo_dist.metrics import peak_memory_bytes


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--steps", type=int, default=400, help="forward + backward passes, each of a random length")
    parser.add_argument("--round-to", type=int, default=1, help="round each length up to a multiple of this")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    args = parser.parse_args(argv)
    return run_main("bench_bf16_shape_memory", lambda info: bench(args), threads=1)


def bench(args) -> None:
    dtype = getattr(torch, args.dtype)
    weight = torch.randn(192, 64, dtype=dtype, requires_grad=True)
    rng = random.Random(0)
    for step in range(1, args.steps + 1):
        length = -(-rng.randint(200, 3000) // args.round_to) * args.round_to
        inputs = torch.randn(length, 64, dtype=dtype, requires_grad=True)
        torch.nn.functional.linear(inputs, weight).sum().backward()
        if step % 100 == 0:
            print(f"{args.dtype}, lengths rounded to {args.round_to}: after {step} steps, peak "
                  f"{peak_memory_bytes(torch.device('cpu')) / 2**20:,.0f} MiB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
