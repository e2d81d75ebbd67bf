"""Tokenizers of prepared pairs: a chat template renders HH dialogues and message lists, and the
tokenizer fingerprint that ties every shard set to the tokenizer that made it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpo_dist.data.shards import Manifest
from mpo_dist.tokenizer import load_tokenizer, tokenizer_fingerprint
from prepare_support import ASSISTANT, GPT2_EOS_TEXT, decode, leftovers, prepare, read_samples, write_jsonl

pytestmark = pytest.mark.unit

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def template_tokenizer_dir(tmp_path_factory, gpt2_dir) -> Path:
    """The GPT-2 tokenizer saved to another folder with a simple chat template."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("gpt2-chat")
    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_dir), local_files_only=True)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return directory


# ---------------------------------------------------------------------------- chat template


HH_DIALOGUE = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."


def test_chat_template_renders_hh_and_message_prompts(tmp_path, template_tokenizer_dir, gpt2):
    tokenizer = load_tokenizer(template_tokenizer_dir)
    assert tokenizer.chat_template == TEMPLATE
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": HH_DIALOGUE + ASSISTANT + " Why did the chicken cross the road?", "rejected": HH_DIALOGUE + ASSISTANT + " No."},
    ])
    out = tmp_path / "hh-out"
    prepare(hh, template_tokenizer_dir, out, chat_template=True)
    [(_, _, meta, arrays)] = read_samples(out)
    assert meta["prompt"] == HH_DIALOGUE + ASSISTANT
    prompt = decode(tokenizer, arrays["prompt_ids"])
    assert prompt == "<|user|>Hi there\n<|assistant|>Hello! How can I help?\n<|user|>Tell me a joke.\n<|assistant|>"
    assert prompt.count("<|user|>") == 2 and prompt.endswith("<|assistant|>")
    assert decode(tokenizer, arrays["chosen_ids"]) == " Why did the chicken cross the road?" + GPT2_EOS_TEXT
    assert decode(tokenizer, arrays["rejected_ids"]) == " No." + GPT2_EOS_TEXT
    manifest = Manifest.read(out, "pairs")
    assert manifest.tokenizer_hash == tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(gpt2)

    messages = write_jsonl(tmp_path / "messages.jsonl", [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "chosen": " Hello", "rejected": " Go"},
        {"prompt": "Plain question?", "chosen": " yes", "rejected": " no"},
    ])
    out = tmp_path / "messages-out"
    prepare(messages, template_tokenizer_dir, out, chat_template=True)
    prompts = [decode(tokenizer, arrays["prompt_ids"]) for _, _, _, arrays in read_samples(out)]
    assert prompts == ["<|system|>Be brief.\n<|user|>Hi\n<|assistant|>", "<|user|>Plain question?\n<|assistant|>"]


def test_chat_template_flag_without_a_template_is_an_error(tmp_path, gpt2_dir, gpt2):
    assert gpt2.chat_template is None
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_DIALOGUE + ASSISTANT + " A", "rejected": HH_DIALOGUE + ASSISTANT + " B"}])
    with pytest.raises(ValueError, match="--chat-template"):
        prepare(hh, gpt2_dir, tmp_path / "out", chat_template=True)
    assert leftovers(tmp_path / "out") == []
    assert prepare(hh, gpt2_dir, tmp_path / "out")["kept"] == 1  # the failed run did not claim --out


# ---------------------------------------------------------------------------- tokenizer fingerprint


def test_tokenizer_fingerprint(tmp_path, gpt2_dir, stories_dir, gpt2, template_tokenizer_dir):
    from transformers import AutoTokenizer

    assert tokenizer_fingerprint(gpt2) == tokenizer_fingerprint(load_tokenizer(gpt2_dir))
    copy = tmp_path / "copy"
    AutoTokenizer.from_pretrained(str(gpt2_dir), local_files_only=True).save_pretrained(str(copy))
    assert tokenizer_fingerprint(load_tokenizer(copy)) == tokenizer_fingerprint(gpt2)
    stories = load_tokenizer(stories_dir)
    assert tokenizer_fingerprint(stories) == tokenizer_fingerprint(load_tokenizer(stories_dir))
    assert tokenizer_fingerprint(stories) != tokenizer_fingerprint(gpt2)
    assert tokenizer_fingerprint(load_tokenizer(template_tokenizer_dir)) != tokenizer_fingerprint(gpt2)
    assert tokenizer_fingerprint(gpt2).startswith("sha256:")


# ---------------------------------------------------------------------------- pad token


def _word_tokenizer_dir(folder: Path, **specials) -> Path:
    """A 40-word tokenizer without a pad token, with the given special tokens (words of its vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(40)}, unk_token=specials.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(str(folder))
    return folder


def test_a_tokenizer_without_a_pad_token_pads_with_one_of_its_own(tmp_path, gpt2_dir, gpt2):
    """No pad token: EOS pads (else UNK, BOS, id 0), the vocabulary never grows, so prepared pairs fit a
    model whose embeddings are exactly the tokenizer's vocabulary, also after the tokenizer is saved
    beside a checkpoint and loaded again."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(gpt2_dir), local_files_only=True)
    assert plain.pad_token is None
    assert (gpt2.pad_token_id, len(gpt2)) == (plain.eos_token_id, len(plain)) == (50256, 50257)
    gpt2.save_pretrained(str(tmp_path / "saved"))
    assert len(load_tokenizer(tmp_path / "saved")) == 50257

    cases = {"eos": ({"eos_token": "w7", "unk_token": "w3"}, 7), "unk": ({"unk_token": "w3", "bos_token": "w5"}, 3),
             "bos": ({"bos_token": "w5"}, 5), "none": ({}, 0)}
    for name, (specials, pad_id) in cases.items():
        tokenizer = load_tokenizer(_word_tokenizer_dir(tmp_path / name, **specials))
        assert (name, tokenizer.pad_token_id, len(tokenizer)) == (name, pad_id, 40)

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "w1 w2", "chosen": " w3", "rejected": " w4"}])
    prepare(pairs, tmp_path / "eos", tmp_path / "out", append_eos=True)
    manifest = Manifest.read(tmp_path / "out", "pairs")
    assert manifest.info["tokenizer"]["vocab_size"] == 40 and manifest.info["tokenizer"]["pad_token_id"] == 7
    [(_, _, _, arrays)] = read_samples(tmp_path / "out")
    assert arrays["chosen_ids"].tolist() == [3, 7] and max(arrays["prompt_ids"].tolist()) < 40
