"""A preference task with a known ground truth, for the quickstart and tests: sorting digits.

Prompt `sort 4 1 3 ->`; chosen: the digits sorted (` 1 3 4`); rejected: the same with two
neighbours swapped (` 1 4 3`). A policy that learns the task prefers chosen, so preference
accuracy rising is visible in a few CPU minutes. Ships its own word-level tokenizer (no downloads).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = SPECIALS + [str(d) for d in range(10)] + ["sort", "->"]


def build_toy_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def toy_record(rng: random.Random, min_digits: int = 3, max_digits: int = 8) -> dict:
    digits = [rng.randrange(10) for _ in range(rng.randint(min_digits, max_digits))]
    chosen = sorted(digits)
    rejected = list(chosen)
    swappable = [i for i in range(len(chosen) - 1) if chosen[i] != chosen[i + 1]]
    if not swappable:  # all digits equal: no wrong order exists, make one
        chosen[-1] = (chosen[-1] + 1) % 10
        chosen.sort()
        rejected, swappable = list(chosen), [i for i in range(len(chosen) - 1) if chosen[i] != chosen[i + 1]]
        digits = list(chosen)
        rng.shuffle(digits)
    i = rng.choice(swappable)
    rejected[i], rejected[i + 1] = rejected[i + 1], rejected[i]
    words = lambda xs: " " + " ".join(map(str, xs))
    return {"prompt": "sort" + words(digits) + " ->", "chosen": words(chosen), "rejected": words(rejected)}


TINY_LLAMA = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def write_toy_task(out_dir: str | Path, num_records: int = 4000, seed: int = 0) -> tuple[Path, Path]:
    """Write `pairs.jsonl` and `model/`: a randomly initialised tiny Llama (the policy's starting point
    and the reference) with the task's tokenizer, as a Hugging Face folder. Returns both paths."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out_dir / "model"
    tokenizer = build_toy_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tokenizer_dir))
    tokenizer.save_pretrained(str(tokenizer_dir))
    rng = random.Random(seed)
    pairs = out_dir / "pairs.jsonl"
    with open(pairs, "w") as handle:
        for _ in range(num_records):
            handle.write(json.dumps(toy_record(rng)) + "\n")
    return pairs, tokenizer_dir
