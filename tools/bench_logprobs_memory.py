"""Peak memory (and time) of the chunked log-prob path against the naive full log-softmax.

    python tools/bench_logprobs_memory.py [--vocab 50257] [--batch 8] [--length 1024] [--chunk-tokens 1024]

Each variant runs forward + backward in a fresh process on a tiny Llama body with the given
vocabulary (the projection and log-softmax dominate); the figure is the rise of the process's peak
resident memory (Linux VmHWM) above what it held before the step, or on CUDA the allocator's peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mpo_dist.cli import run_main, tool_parser


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(variant: str, vocab: int, batch: int, length: int, chunk_tokens: int, device: str) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mpo_dist.logprobs import sequence_logprobs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length)
    model = AutoModelForCausalLM.from_config(config).to(device)
    input_ids = torch.randint(0, vocab, (batch, length), device=device)
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    response_mask = attention_mask.clone()
    response_mask[:, : length // 4] = False

    def step():
        if variant == "naive":
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            token = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
            logps = (token * response_mask[:, 1:]).sum(-1)
        else:
            logps = sequence_logprobs(model, input_ids, attention_mask, response_mask, chunk_tokens).logps
        logps.sum().backward()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
        before = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    return {"variant": variant, "peak_increase_bytes": peak - before, "seconds": time.perf_counter() - start}


def measure(vocab: int, batch: int, length: int, chunk_tokens: int, device: str = "cpu") -> dict[str, dict]:
    """Both variants, each in its own process so neither sees the other's freed-but-cached memory."""
    results = {}
    for variant in ("naive", "chunked"):
        command = [sys.executable, __file__, "--variant", variant, "--vocab", str(vocab), "--batch", str(batch),
                   "--length", str(length), "--chunk-tokens", str(chunk_tokens), "--device", device]
        output = subprocess.run(command, check=True, capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    return results


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary of the tiny Llama")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="tokens per log-softmax chunk of the chunked path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--variant", choices=["naive", "chunked"], help="internal: run one variant and print JSON")
    args = parser.parse_args(argv)
    return run_main("bench_logprobs_memory", lambda info: bench(args))


def bench(args) -> None:
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.vocab, args.batch, args.length, args.chunk_tokens, args.device)))
        return
    results = measure(args.vocab, args.batch, args.length, args.chunk_tokens, args.device)
    naive_logits = args.batch * args.length * args.vocab * 4
    print(f"vocab {args.vocab}, batch {args.batch}, length {args.length}, chunk {args.chunk_tokens} tokens, "
          f"{args.device}; float32 logits of the whole batch: {naive_logits / 2**30:.2f} GiB")
    for name, result in results.items():
        print(f"  {name:<8} peak +{result['peak_increase_bytes'] / 2**30:6.2f} GiB   {result['seconds']:6.2f} s (forward + backward)")
    ratio = results["naive"]["peak_increase_bytes"] / results["chunked"]["peak_increase_bytes"]
    print(f"  chunked peak is {ratio:.1f}x lower")


if __name__ == "__main__":
    sys.exit(main())
