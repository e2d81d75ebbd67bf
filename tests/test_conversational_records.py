"""Conversational preference records (issue 26): `chosen` / `rejected` as whole conversations."""

from __future__ import annotations

import json

import pytest

from mpo_dist.data.raw_records import RawPair, column_names, parse_record

pytestmark = pytest.mark.unit

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Sort 3 1 2"}


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def parse(record: dict) -> RawPair | str:
    return parse_record(json.dumps(record), "jsonl")


def test_ultrafeedback_style_record_splits_at_the_shared_prompt():
    pair = parse({"prompt": USER["content"], "chosen": [USER, turn("assistant", "1 2 3")],
                  "rejected": [USER, turn("assistant", "1 3 2")], "score_chosen": 9.0})
    assert pair == RawPair([USER], "1 2 3", "1 3 2", None, conversational=True)


def test_multi_turn_with_a_system_prompt_keeps_every_earlier_turn_in_the_prompt():
    history = [SYSTEM, USER, turn("assistant", "1 2 3"), turn("user", "now descending")]
    pair = parse({"chosen": [*history, turn("assistant", "3 2 1")], "rejected": [*history, turn("assistant", "3 1 2")]})
    assert pair.prompt == history and (pair.chosen, pair.rejected) == ("3 2 1", "3 1 2")


@pytest.mark.parametrize("fmt", ["jsonl", "hh", "parquet-hh", "parquet-prompt"])
def test_conversations_are_read_whatever_format_the_file_was_taken_for(fmt):
    record = {"chosen": [USER, turn("assistant", "a")], "rejected": [USER, turn("assistant", "b")]}
    assert parse_record(json.dumps(record), fmt) == RawPair([USER], "a", "b", None, conversational=True)


def test_a_separate_prompt_is_put_before_conversations_that_lack_it():
    pair = parse({"prompt": [SYSTEM, USER], "chosen": [turn("assistant", "a")], "rejected": [turn("assistant", "b")]})
    assert pair.prompt == [SYSTEM, USER] and (pair.chosen, pair.rejected) == ("a", "b")


def test_a_prompt_that_the_conversations_already_hold_is_not_put_in_twice():
    """UltraFeedback's `prompt` repeats the first user turn; with a system prompt before it, putting it
    in front again would duplicate the turn (and move it above the system prompt)."""
    conversation = [SYSTEM, USER]
    pair = parse({"prompt": USER["content"], "chosen": [*conversation, turn("assistant", "a")],
                  "rejected": [*conversation, turn("assistant", "b")]})
    assert pair.prompt == [SYSTEM, USER]
    reason = parse({"prompt": "another question", "chosen": [*conversation, turn("assistant", "a")],
                    "rejected": [*conversation, turn("assistant", "b")]})
    assert reason == ("malformed: 'prompt' is not among the turns of the conversations, which hold their own user "
                      "turns")
    # Responses alone go after the conversation's system prompt and before nothing else.
    pair = parse({"prompt": USER["content"], "chosen": [SYSTEM, turn("assistant", "a")],
                  "rejected": [SYSTEM, turn("assistant", "b")]})
    assert pair.prompt == [SYSTEM, USER]


def test_messages_read_from_a_table_equal_those_read_from_json():
    """Arrow gives every message of a column the union of the keys (absent ones as None), in the
    struct's order: the messages are made canonical so all formats give the same pair and bytes."""
    from_json = parse({"chosen": [{"role": "system", "content": "Be brief.", "name": "rules"}, USER,
                                  turn("assistant", "a")],
                       "rejected": [{"role": "system", "content": "Be brief.", "name": "rules"}, USER,
                                    turn("assistant", "b")]})
    row = {"chosen": [{"content": "Be brief.", "name": "rules", "role": "system"},
                      {"content": USER["content"], "name": None, "role": "user"},
                      {"content": "a", "name": None, "role": "assistant"}],
           "rejected": [{"content": "Be brief.", "name": "rules", "role": "system"},
                        {"content": USER["content"], "name": None, "role": "user"},
                        {"content": "b", "name": None, "role": "assistant"}]}
    from_row = parse_record(row, "parquet-hh")
    assert from_row == from_json
    assert json.dumps(from_row.prompt) == json.dumps([{"role": "system", "content": "Be brief.", "name": "rules"}, USER])


def test_reasons_name_the_inputs_own_columns():
    names = column_names({"prompt": "question", "chosen": "pos", "rejected": "neg"})
    record = {"question": "q", "pos": [turn("assistant", "a")], "neg": "b"}
    assert parse_record(json.dumps(record), "jsonl", names) == (
        "malformed: 'neg' must be a list of {role, content} messages like the other side, got str")
    assert parse_record(json.dumps({"question": "q", "pos": " a"}), "jsonl", names) == "malformed: missing key 'neg'"
    assert parse_record(json.dumps({"question": "q", "pos": " a", "neg": " b"}), "jsonl", names) == RawPair("q", " a", " b")


@pytest.mark.parametrize("chosen, rejected, reason", [
    ([USER, turn("assistant", "a")], "b", "'rejected' must be a list of {role, content} messages like the other side, got str"),
    ([turn("user", "x"), turn("assistant", "a")], [turn("user", "y"), turn("assistant", "b")],
     "share no prompt"),
    ([USER, turn("assistant", "a"), turn("user", "more"), turn("assistant", "c")], [USER, turn("assistant", "b")],
     "after the 1 messages both conversations share, 'chosen' holds assistant, user, assistant; expected one assistant turn"),
    ([USER, turn("user", "a")], [USER, turn("assistant", "b")], "'chosen' holds user; expected one assistant turn"),
    ([USER, turn("assistant", "a")], [USER, turn("assistant", "a"), turn("assistant", "b")],
     "'chosen' holds nothing; expected one assistant turn"),
])
def test_conversations_that_cannot_be_split_are_reported_with_the_reason(chosen, rejected, reason):
    result = parse({"chosen": chosen, "rejected": rejected})
    assert isinstance(result, str) and result.startswith("malformed: ") and reason in result, result


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Like Qwen3's with thinking off: the generation prompt opens an empty think block that the rendering of
# a finished assistant turn does not hold, so the prompt is no prefix of the whole conversation.
REWRITING = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|><think></think>{% endif %}")


def chat_tokenizer(gpt2_dir, tmp_path, template: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_dir), local_files_only=True)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    return tmp_path / "tok"


def test_a_conversation_prepares_as_its_template_renders_it(tmp_path, gpt2_dir):
    from prepare_support import decode, prepare, read_samples, write_jsonl
    from mpo_dist.tokenizer import load_tokenizer

    directory = chat_tokenizer(gpt2_dir, tmp_path, CHATML)
    history = [SYSTEM, USER, turn("assistant", "1 2 3"), turn("user", "descending")]
    records = write_jsonl(tmp_path / "conv.jsonl", [
        {"chosen": [*history, turn("assistant", "3 2 1")], "rejected": [*history, turn("assistant", "3 1 2")]}])
    prepare(records, directory, tmp_path / "out", chat_template=True)
    [(_, _, meta, arrays)] = read_samples(tmp_path / "out")
    tokenizer = load_tokenizer(directory)
    whole = tokenizer.apply_chat_template([*history, turn("assistant", "3 2 1")], tokenize=False)
    prompt, chosen = decode(tokenizer, arrays["prompt_ids"]), decode(tokenizer, arrays["chosen_ids"])
    assert prompt + chosen == whole and chosen == "3 2 1<|im_end|>\n"
    assert prompt.count("<|im_start|>user") == 2 and prompt.endswith("<|im_start|>assistant\n")
    assert decode(tokenizer, arrays["rejected_ids"]) == "3 1 2<|im_end|>\n"


def test_a_template_that_rewrites_earlier_turns_is_reported_per_record(tmp_path, gpt2_dir):
    from prepare_support import dropped, prepare, write_jsonl

    directory = chat_tokenizer(gpt2_dir, tmp_path, REWRITING)
    records = write_jsonl(tmp_path / "conv.jsonl", [
        {"chosen": [USER, turn("assistant", "a")], "rejected": [USER, turn("assistant", "b")]},
        {"chosen": [SYSTEM, USER, turn("assistant", "c")], "rejected": [SYSTEM, USER, turn("assistant", "d")]},
        {"prompt": "A text prompt", "chosen": " kept", "rejected": " too"}])  # not split by the template: kept
    prepare(records, directory, tmp_path / "out", chat_template=True)
    reported = dropped(tmp_path / "out")
    assert [where for where, _ in reported] == ["line 1", "line 2"], reported
    assert all(reason.startswith("template_rewrites_turns: the chat template renders") for _, reason in reported)


def test_a_prepare_run_that_keeps_nothing_is_an_input_error_naming_the_commonest_reason(tmp_path, gpt2_dir):
    from prepare_support import prepare, write_jsonl
    from mpo_dist.errors import InputError

    directory = chat_tokenizer(gpt2_dir, tmp_path, CHATML)
    records = write_jsonl(tmp_path / "conv.jsonl", [
        {"chosen": [USER, turn("assistant", "a")], "rejected": [USER, turn("user", "b")]},
        *({"chosen": [USER, turn("assistant", blank)], "rejected": [USER, turn("assistant", "b")]} for blank in " \n")])
    with pytest.raises(InputError) as caught:
        prepare(records, directory, tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"--input {records}: none of its 3 records was kept; the commonest reason (2 records, "
                              "e.g. line 2): empty_response;"), message
    assert str(tmp_path / "out" / "prepare_report.json") in message


def test_conversations_without_a_chat_template_are_refused_naming_the_option(tmp_path, gpt2_dir):
    from prepare_support import leftovers, prepare, write_jsonl
    from mpo_dist.errors import InputError

    records = write_jsonl(tmp_path / "conv.jsonl", [
        {"prompt": "A text prompt", "chosen": " kept", "rejected": " too"},
        {"chosen": [USER, turn("assistant", "a")], "rejected": [USER, turn("assistant", "b")]}])
    with pytest.raises(InputError) as caught:
        prepare(records, gpt2_dir, tmp_path / "out")  # GPT-2 has no chat template
    assert str(caught.value) == (f"{records}: line 2: chosen/rejected are conversations (message lists), which need a "
                                 "chat template, and the tokenizer in --tokenizer has none; use a tokenizer folder with "
                                 "one (chat_template.jinja, or chat_template in tokenizer_config.json)")
    assert leftovers(tmp_path / "out") == [] and not (tmp_path / "out" / ".job.json").exists()


def test_conversations_use_the_template_without_the_flag_and_plain_prompts_stay_plain(tmp_path, gpt2_dir):
    import hashlib

    from prepare_support import decode, read_samples, write_jsonl
    from mpo_dist.data.shards import Manifest
    from mpo_dist.producers.prepare import PrepareOptions, prepare_pairs
    from mpo_dist.tokenizer import load_tokenizer

    directory = chat_tokenizer(gpt2_dir, tmp_path, CHATML)
    records = write_jsonl(tmp_path / "conv.jsonl", [
        {"prompt": "A text prompt", "chosen": " kept", "rejected": " too"},
        *({"chosen": [SYSTEM, USER, turn("assistant", x)], "rejected": [SYSTEM, USER, turn("assistant", x + "!")]}
          for x in "ab")])
    lines: list[str] = []
    prepare_pairs(records, directory, tmp_path / "out", PrepareOptions(samples_per_shard=2), log=lines.append)
    template_hash = "sha256:" + hashlib.sha256(CHATML.encode()).hexdigest()[:32]
    said = [line for line in lines if "chat template" in line]
    assert said == [f"prepare_pairs: conversations (chosen/rejected as message lists) are rendered with the tokenizer's "
                    f"chat template ({template_hash}); plain-text prompts are not (--chat-template renders those too)"]
    assert Manifest.read(tmp_path / "out").info["tokenizer"]["chat_template"] == template_hash
    # The claim holds only what earlier versions recorded of the tokenizer (its hash covers the template),
    # so a folder they prepared resumes; a rerun here does, from the claim alone.
    claim = json.loads((tmp_path / "out" / ".job.json").read_text())
    assert sorted(claim["tokenizer"]) == ["hash", "pad_token_id", "path", "vocab_size"]
    (tmp_path / "out" / "manifest.json").unlink()
    prepare_pairs(records, directory, tmp_path / "out", PrepareOptions(samples_per_shard=2), log=lines.append)
    assert Manifest.read(tmp_path / "out").info["tokenizer"]["chat_template"] == template_hash
    tokenizer = load_tokenizer(directory)
    (_, _, _, plain), (_, _, _, first), (_, _, _, second) = read_samples(tmp_path / "out")
    assert decode(tokenizer, plain["prompt_ids"]) == "A text prompt"  # no template, as without conversations
    assert decode(tokenizer, plain["chosen_ids"]) == " kept<|endoftext|>"
    for arrays, response in ((first, "a"), (second, "b")):
        assert decode(tokenizer, arrays["prompt_ids"]) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                                           "Sort 3 1 2<|im_end|>\n<|im_start|>assistant\n")
        assert decode(tokenizer, arrays["chosen_ids"]) == f"{response}<|im_end|>\n"  # no EOS after the end of turn
