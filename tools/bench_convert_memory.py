"""Peak memory of checkpoint conversion against the model's size.

    python tools/bench_convert_memory.py [--hidden 768] [--layers 8] [--vocab 32000] [--shard-sizes 50MB,5GB]

Writes a trainer-format checkpoint (model + AdamW state, via the Checkpointer) of a random Llama,
then converts it in a fresh process per shard size and reports the rise of that process's peak
resident memory (Linux VmHWM) during the conversion (libraries are imported before the baseline).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mpo_dist.cli import run_main, tool_parser

REPO = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def convert_and_measure(checkpoint: str, out: str, shard_size: str) -> dict:
    import transformers.models.llama.modeling_llama  # noqa: F401  code, not data: loaded before the baseline
    from transformers import AutoModelForCausalLM  # noqa: F401

    from mpo_dist.convert import convert_checkpoint, parse_size

    Path("/proc/self/clear_refs").write_text("5")  # peak mark := current RSS
    before = _rss_kib("VmRSS")
    convert_checkpoint(checkpoint, out, "float32", parse_size(shard_size), log=lambda message: None)
    return {"peak_increase_bytes": (_rss_kib("VmHWM") - before) * 1024,
            "files": len(list(Path(out).glob("*.safetensors")))}


def write_checkpoint(root: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, int]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mpo_dist.checkpoint import Checkpointer, ModelOptimizerState

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpointer = Checkpointer(root, keep=1, rank=0, dp_rank=0, dp_world_size=1, log=lambda m: None)
    folder = checkpointer.save(0, {"model_optimizer": ModelOptimizerState(model, optimizer)}, {},
                               write_extra=lambda f: config.save_pretrained(str(f / "hf")))
    return folder, sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--hidden", type=int, default=768, help="hidden size of the random Llama (64 per head)")
    parser.add_argument("--layers", type=int, default=8, help="its decoder layers")
    parser.add_argument("--vocab", type=int, default=32000, help="its vocabulary")
    parser.add_argument("--shard-sizes", default="50MB,5GB", help="--max-shard-size values to measure, comma-separated")
    parser.add_argument("--measure", nargs=3, metavar=("CHECKPOINT", "OUT", "SIZE"), help="internal: one conversion")
    args = parser.parse_args(argv)
    return run_main("bench_convert_memory", lambda info: bench(args))


def bench(args) -> None:
    if args.measure:
        print(json.dumps(convert_and_measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder, model_bytes = write_checkpoint(Path(tmp) / "checkpoints", args.hidden, args.layers, args.vocab)
        print(f"model: {model_bytes / 2**20:.0f} MiB of float32 weights (checkpoint with optimizer state: "
              f"{sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20:.0f} MiB)")
        for size in args.shard_sizes.split(","):
            out = subprocess.run([sys.executable, __file__, "--measure", str(folder), f"{tmp}/out-{size}", size],
                                 check=True, capture_output=True, text=True, cwd=REPO).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"  --max-shard-size {size:<6} {result['files']:>3} files, peak memory +{result['peak_increase_bytes'] / 2**20:6.0f} MiB "
                  f"({result['peak_increase_bytes'] / model_bytes:.2f} x the model)")


if __name__ == "__main__":
    sys.exit(main())
