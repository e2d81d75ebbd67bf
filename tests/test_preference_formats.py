"""Conversational preference data as users bring it (issue 26): real chat templates (Llama-3, ChatML /
Qwen, Gemma, and one that drops earlier reasoning) written into test tokenizers' folders, and one
UltraFeedback-binarized-style set read as Parquet, JSON lines and a `datasets` folder, with a column
mapping. Expected values come from the templates' renderings and the tokenizers, never from prepare.
Unit tests in this process, and one e2e test of the tool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mpo_dist.data.raw_records import RecordSource, parse_columns
from mpo_dist.data.shards import Manifest, shard_name
from mpo_dist.errors import InputError
from mpo_dist.producers.prepare import STATS_DIR
from mpo_dist.tokenizer import load_tokenizer
from prepare_support import dropped, prepare, read_samples, write_jsonl
from support import REPO, SUBPROCESS_ENV

# Meta-Llama-3-Instruct's template, as published.
LLAMA3 = (r"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          r"message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          r"{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          r"{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2-Instruct's ChatML template, which adds a default system prompt when a conversation has none.
CHATML = (r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Gemma 3's (text content): no system role, the system prompt is folded into the first user turn; the
# assistant is 'model'; roles must alternate.
GEMMA = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim -}}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
# ChatML that, like reasoning models' templates (Qwen3's), keeps the <think> block of the last assistant
# turn only: adding the final turn strips the block of the turn that was last in the prompt.
DROPS_EARLIER_THINKING = r"""
{%- set ns = namespace(last=-1) -%}
{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
    {%- set content = m['content'] -%}
    {%- if m['role'] == 'assistant' and loop.index0 < ns.last and '</think>' in content -%}
        {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
    {%- endif -%}
    {{- '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""
# Meta Llama 3's pre-tokenizer pattern: '\n\n' before a word is one piece, as at the end of a prompt.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")

SYSTEM = {"role": "system", "content": "Answer in digits."}


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def save_tokenizer(base: Path, folder: Path, specials: dict, template: str, *, in_config: bool = False,
                   llama3_pretokenizer: bool = False) -> Path:
    """`base` with `specials` added and `template` written as chat_template.jinja (or, `in_config`, as
    tokenizer_config.json's chat_template), the two places transformers reads it from."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    tokenizer.add_special_tokens(specials)
    if llama3_pretokenizer:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if llama3_pretokenizer:  # GPT2Tokenizer would rebuild GPT-2's pre-tokenizer; Llama 3's config names this class
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if in_config:
        config["chat_template"] = template
    else:
        (folder / "chat_template.jinja").write_text(template)
    config_path.write_text(json.dumps(config))
    assert load_tokenizer(folder).chat_template == template  # read from where it was written
    return folder


# name -> (base tokenizer, special tokens, template, the end of a turn, how a turn starts, in_config, Llama 3 pre-tokenizer)
TEMPLATES = {
    "llama3": ("gpt2-tokenizer", {"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}, LLAMA3, "<|eot_id|>", "<|start_header_id|>", True, True),
    "chatml": ("gpt2-tokenizer", {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, CHATML, "<|im_end|>\n",
               "<|im_start|>", False, False),
    # stories260K's SentencePiece-style tokenizer puts '▁' before each text piece: a response tokenized
    # on its own would differ from the same text in the whole conversation.
    "gemma": ("stories260K", {"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
              GEMMA, "<end_of_turn>\n", "<start_of_turn>", False, False),
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, shared_data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-tokenizers")
    return {name: save_tokenizer(shared_data(base), root / name, specials, template, in_config=in_config,
                                 llama3_pretokenizer=llama3)
            for name, (base, specials, template, _, _, in_config, llama3) in TEMPLATES.items()}


HISTORY = [turn("user", "Sort 3 1 2"), turn("assistant", "1 2 3"), turn("user", "Now descending")]
CASES = {  # conversation before the final turn -> (chosen, rejected)
    "multi-turn": (HISTORY, ("3 2 1", "3 1 2")),
    "system prompt": ([SYSTEM, turn("user", "Sort 9 7 8")], ("7 8 9", "9 8 7")),
}
# What each template makes of the system-prompt case with the chosen response, written out.
SYSTEM_CASE_RENDERED = {
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer in digits.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nSort 9 7 8<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n7 8 9<|eot_id|>"),
    "chatml": ("<|im_start|>system\nAnswer in digits.<|im_end|>\n<|im_start|>user\nSort 9 7 8<|im_end|>\n"
               "<|im_start|>assistant\n7 8 9<|im_end|>\n"),
    "gemma": ("<bos><start_of_turn>user\nAnswer in digits.\n\nSort 9 7 8<end_of_turn>\n"
              "<start_of_turn>model\n7 8 9<end_of_turn>\n"),
}


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_conversations_split_where_the_template_renders_the_final_turn(name, tokenizers, tmp_path):
    _, _, _, end_of_turn, turn_start, _, _ = TEMPLATES[name]
    records = write_jsonl(tmp_path / "conv.jsonl", [
        {"chosen": [*history, turn("assistant", chosen)], "rejected": [*history, turn("assistant", rejected)]}
        for history, (chosen, rejected) in CASES.values()])
    prepare(records, tokenizers[name], tmp_path / "out")  # no --chat-template: conversations use it anyway
    tokenizer = load_tokenizer(tokenizers[name])
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    samples = read_samples(tmp_path / "out")
    assert len(samples) == 2
    for (_, _, meta, arrays), (case, (history, responses)) in zip(samples, CASES.items()):
        assert meta["prompt"] == history and (meta["chosen"], meta["rejected"]) == responses
        prompt = arrays["prompt_ids"].tolist()
        assert prompt == encode(tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True))
        rendered_prompt = tokenizer.decode(prompt)
        for side, response in zip(("chosen_ids", "rejected_ids"), responses):
            whole = tokenizer.apply_chat_template([*history, turn("assistant", response)], tokenize=False)
            if case == "system prompt" and side == "chosen_ids":
                assert whole == SYSTEM_CASE_RENDERED[name]
            ids = arrays[side].tolist()
            assert prompt + ids == encode(whole), (case, side)
            assert ids[-len(encode(end_of_turn)):] == encode(end_of_turn)  # the model learns to end its turn
            if name == "gemma":  # on its own, the response would start with '▁': its tokens come from the whole
                assert encode(response + end_of_turn) != ids
        # Every earlier turn is in the prompt, in order, and one turn more is opened: the generation prompt's.
        positions = [rendered_prompt.find(message["content"]) for message in history]
        assert -1 not in positions and positions == sorted(positions), (case, rendered_prompt)
        turns = len(history) - (name == "gemma" and history[0]["role"] == "system")  # Gemma folds the system prompt
        turns += name == "chatml" and history[0]["role"] != "system"  # ChatML adds a default one
        assert rendered_prompt.count(turn_start) == turns + 1


@pytest.mark.unit
def test_a_merge_across_the_prompt_end_is_reported(tmp_path, shared_data):
    """With GPT-2's own pre-tokenizer, the Llama-3 template's '\\n\\n' ending the prompt is one token,
    but two before the response's first word: no split of the whole conversation's tokens is right."""
    folder = save_tokenizer(shared_data("gpt2-tokenizer"), tmp_path / "gpt2-llama3", TEMPLATES["llama3"][1], LLAMA3)
    history, (chosen, rejected) = CASES["system prompt"]
    records = write_jsonl(tmp_path / "conv.jsonl", [
        {"chosen": [*history, turn("assistant", chosen)], "rejected": [*history, turn("assistant", rejected)]},
        {"prompt": "plain", "chosen": " a", "rejected": " b"}])
    prepare(records, folder, tmp_path / "out")
    assert dropped(tmp_path / "out") == [("line 1", "template_split: the rendered conversation's tokens do not start "
                                          "with the prompt's tokens (a token spans the prompt's end)")]


@pytest.mark.unit
def test_a_template_that_drops_earlier_reasoning_is_reported_per_record(tmp_path, shared_data):
    folder = save_tokenizer(shared_data("gpt2-tokenizer"), tmp_path / "thinking", TEMPLATES["chatml"][1],
                            DROPS_EARLIER_THINKING)
    thought = turn("assistant", "<think>sort them</think>1 2 3")
    records = write_jsonl(tmp_path / "conv.jsonl", [
        {"chosen": [turn("user", "Sort 3 1 2"), thought, turn("user", "Again"), turn("assistant", "1 2 3")],
         "rejected": [turn("user", "Sort 3 1 2"), thought, turn("user", "Again"), turn("assistant", "3 2 1")]},
        {"chosen": [*HISTORY, turn("assistant", "3 2 1")], "rejected": [*HISTORY, turn("assistant", "1 2 3")]},
        {"chosen": [turn("user", "Sort 2 1"), turn("assistant", "<think>swap</think>1 2")],
         "rejected": [turn("user", "Sort 2 1"), turn("assistant", "<think>keep</think>2 1")]}])
    prepare(records, folder, tmp_path / "out")
    assert dropped(tmp_path / "out") == [("line 1", "template_rewrites_turns: the chat template renders the earlier "
                                          "turns differently once the final assistant turn is added, so no "
                                          "prompt/response split matches it")]
    tokenizer = load_tokenizer(folder)
    kept = read_samples(tmp_path / "out")
    assert [meta["where"] for _, _, meta, _ in kept] == ["line 2", "line 3"]
    assert tokenizer.decode(kept[1][3]["chosen_ids"]) == "<think>swap</think>1 2<|im_end|>\n"  # the final turn keeps it


@pytest.mark.unit
def test_a_conversation_the_template_refuses_is_reported_with_its_message(tokenizers, tmp_path):
    records = write_jsonl(tmp_path / "conv.jsonl", [
        {"chosen": [turn("user", "a"), turn("user", "b"), turn("assistant", "c")],
         "rejected": [turn("user", "a"), turn("user", "b"), turn("assistant", "d")]},
        {"chosen": [turn("user", "a"), turn("assistant", "c")], "rejected": [turn("user", "a"), turn("assistant", "d")]}])
    prepare(records, tokenizers["gemma"], tmp_path / "out")
    assert dropped(tmp_path / "out") == [("line 1", "template_error: the chat template refused the conversation "
                                          "(Conversation roles must alternate user/assistant/user/assistant/...)")]


# ---------------------------------------------------------------------------- one set, three formats


def ultrafeedback_records() -> list[dict]:
    """UltraFeedback-binarized's fields: `prompt` repeats the first user turn, chosen / rejected / messages
    are whole conversations; some with a system prompt (one with a `name`, a key only some messages
    have), some multi-turn; the last record's rejected side answers another prompt."""
    records = []
    for i in range(12):
        question = f"Sort {i} {i + 2} {i + 1}"
        head = [turn("user", question)]
        if i % 3 == 0:
            head = [{"role": "system", "content": "Answer in digits.", **({"name": "rules"} if i == 3 else {})}, *head]
        if i % 3 == 1:
            head = [*head, turn("assistant", f"{i} {i + 1} {i + 2}"), turn("user", "Now descending")]
        chosen, rejected = [*head, turn("assistant", f"{i + 2} {i + 1} {i}")], [*head, turn("assistant", f"{i} {i + 2}")]
        records.append({"prompt": question, "prompt_id": f"{i:04x}", "chosen": chosen, "rejected": rejected,
                        "messages": chosen, "score_chosen": 8.0 + i % 2, "score_rejected": 3.5})
    records.append({**records[0], "prompt_id": "bad", "rejected": [turn("user", "Other"), turn("assistant", "x")]})
    return records


@pytest.fixture(scope="module")
def ultrafeedback(tmp_path_factory) -> dict[str, Path]:
    """The same records as JSON lines, Parquet, a datasets folder and a DatasetDict folder (train/test)."""
    import datasets

    datasets.disable_progress_bars()
    folder = tmp_path_factory.mktemp("ultrafeedback")
    records = ultrafeedback_records()
    dataset = datasets.Dataset.from_list(records)
    dataset.save_to_disk(str(folder / "uf-dataset"))
    datasets.DatasetDict({"train": dataset, "test": datasets.Dataset.from_list(records[:2])}).save_to_disk(
        str(folder / "uf-splits"))
    renamed = [{"question": r["prompt"], "pos": r["chosen"], "neg": r["rejected"]} for r in records]
    return {"jsonl": write_jsonl(folder / "uf.jsonl", records), "parquet": _parquet(records, folder / "uf.parquet"),
            "datasets": folder / "uf-dataset", "splits": folder / "uf-splits",
            "renamed.jsonl": write_jsonl(folder / "renamed.jsonl", renamed),
            "renamed.parquet": _parquet(renamed, folder / "renamed.parquet")}


def _parquet(records: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=5)  # read a row group at a time
    return path


def contents(out: Path) -> list:
    """Every sample's shard, key, meta (its position as a number) and token ids, and the reports' drops."""
    samples = [(shard, key, {**meta, "where": int(meta["where"].split()[1])}, {n: a.tolist() for n, a in arrays.items()})
               for shard, key, meta, arrays in read_samples(out)]
    return [samples, [(int(where.split()[1]), reason) for where, reason in dropped(out)]]


def tars(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.tar"))}


@pytest.mark.unit
def test_jsonl_parquet_and_a_datasets_folder_prepare_into_the_same_shards(ultrafeedback, tokenizers, tmp_path):
    outs = {}
    for kind in ("jsonl", "parquet", "datasets"):
        outs[kind] = tmp_path / kind
        prepare(ultrafeedback[kind], tokenizers["chatml"], outs[kind], samples_per_shard=5)
    outs["split"] = tmp_path / "split"
    prepare(ultrafeedback["splits"], tokenizers["chatml"], outs["split"], samples_per_shard=5, split="train")
    manifests = {kind: Manifest.read(out) for kind, out in outs.items()}
    assert [manifests[kind].info["input"]["format"] for kind in outs] == [
        "jsonl", "parquet-prompt", "datasets-prompt", "datasets-prompt"]
    assert all(m.shards == manifests["jsonl"].shards for m in manifests.values()) and manifests["jsonl"].num_samples == 12
    assert [shard.num_samples for shard in manifests["jsonl"].shards] == [5, 5, 2]
    expected = contents(outs["jsonl"])
    assert expected[1] == [(13, "malformed: 'prompt' is not among the turns of the conversations, which hold their "
                                "own user turns")]
    for kind in ("parquet", "datasets", "split"):
        assert contents(outs[kind]) == expected, kind
    assert tars(outs["parquet"]) == tars(outs["datasets"]) == tars(outs["split"])  # 'row N' in both: byte-identical

    tokenizer = load_tokenizer(tokenizers["chatml"])
    records = ultrafeedback_records()
    for _, _, meta, arrays in expected[0]:
        record = records[meta["where"] - 1]
        assert meta["prompt"] == record["chosen"][:-1]  # every earlier turn, the prompt field not put in twice
        whole = tokenizer.apply_chat_template(record["chosen"], tokenize=False)
        assert tokenizer.decode(arrays["prompt_ids"] + arrays["chosen_ids"]) == whole
    assert expected[0][3][2]["prompt"][0] == {"role": "system", "content": "Answer in digits.", "name": "rules"}


@pytest.mark.unit
def test_a_datasets_folder_is_described_resumed_and_its_splits_chosen(ultrafeedback, tokenizers, tmp_path):
    folder = ultrafeedback["splits"]
    out = tmp_path / "out"
    prepare(folder, tokenizers["chatml"], out, samples_per_shard=5, split="train")
    arrow = sorted((folder / "train").glob("*.arrow"))
    info = Manifest.read(out).info["input"]
    assert info == {"path": str(folder.resolve()), "format": "datasets-prompt", "split": "train", "rows": 13,
                    "size": sum(path.stat().st_size for path in arrow),
                    "fingerprint": json.loads((folder / "train" / "state.json").read_text())["_fingerprint"]}
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    (out / shard_name(1)).unlink()
    (out / STATS_DIR / f"{shard_name(1)}.json").unlink()
    prepare(folder, tokenizers["chatml"], out, samples_per_shard=5, split="train")  # resumes: the same input
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before
    with pytest.raises(InputError, match=r"holds output made with other settings \(input differ"):
        prepare(folder, tokenizers["chatml"], out, samples_per_shard=5, split="test")

    with pytest.raises(InputError) as error:
        prepare(folder, tokenizers["chatml"], tmp_path / "other")
    assert str(error.value) == f"--input {folder} holds the splits train, test; choose one with --split"
    with pytest.raises(InputError, match="^--split validation: --input .* holds the splits train, test$"):
        prepare(folder, tokenizers["chatml"], tmp_path / "other", split="validation")
    with pytest.raises(InputError, match="^--split train: --input .*uf-dataset holds one dataset, not splits"):
        prepare(ultrafeedback["datasets"], tokenizers["chatml"], tmp_path / "other", split="train")
    with pytest.raises(InputError, match="^--split train: --input .*uf.parquet is a file"):
        prepare(ultrafeedback["parquet"], tokenizers["chatml"], tmp_path / "other", split="train")
    assert not (tmp_path / "other").exists()


@pytest.mark.unit
def test_progress_counts_rows_of_tables_and_bytes_of_json_lines(ultrafeedback):
    for kind, total in (("parquet", 13), ("datasets", 13), ("jsonl", ultrafeedback["jsonl"].stat().st_size)):
        source = RecordSource(ultrafeedback[kind])
        records = source.records()
        for _ in range(5):
            next(records)
        assert source.total == total and 0 < source.done < total, kind
        assert source.done == 5 or kind == "jsonl"
        assert len(list(records)) == 8 and source.done == total, kind


@pytest.mark.unit
def test_without_the_datasets_package_a_datasets_folder_names_the_extra(ultrafeedback, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(InputError) as error:
        RecordSource(ultrafeedback["datasets"])
    assert str(error.value) == (f"--input {ultrafeedback['datasets']} is a Hugging Face datasets folder; reading it "
                                "needs the datasets package: pip install 'mpo_dist[datasets]'")


@pytest.mark.unit
def test_a_folder_that_is_no_readable_datasets_folder_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(InputError, match=r"^--input .*notes is a folder but not a datasets folder \(no state.json"):
        RecordSource(tmp_path / "notes")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{}")
    with pytest.raises(InputError, match=r"^--input .*broken: not a readable datasets folder \("):
        RecordSource(tmp_path / "broken")
    with pytest.raises(InputError, match=r"^--input .*broken is a folder; --format jsonl reads a file"):
        RecordSource(tmp_path / "broken", "jsonl")


# ---------------------------------------------------------------------------- --columns


@pytest.mark.unit
def test_a_column_mapping_reads_a_set_that_names_its_fields_otherwise(ultrafeedback, tokenizers, tmp_path):
    columns = parse_columns("prompt=question,chosen=pos,rejected=neg")
    assert columns == {"prompt": "question", "chosen": "pos", "rejected": "neg"}
    for kind in ("jsonl", "parquet"):
        plain, mapped = tmp_path / kind, tmp_path / f"mapped-{kind}"
        prepare(ultrafeedback[kind], tokenizers["chatml"], plain, samples_per_shard=5)
        prepare(ultrafeedback[f"renamed.{kind}"], tokenizers["chatml"], mapped, samples_per_shard=5, columns=columns)
        assert tars(mapped) == tars(plain), kind
        assert Manifest.read(mapped).info["input"]["columns"] == columns
        assert dropped(mapped) == [(f"{'line' if kind == 'jsonl' else 'row'} 13", "malformed: 'question' is not "
                                    "among the turns of the conversations, which hold their own user turns")]


@pytest.mark.unit
def test_a_mapped_column_the_input_lacks_is_an_error_naming_it_and_the_file(ultrafeedback, tokenizers, tmp_path):
    columns = {"prompt": "question", "chosen": "good", "rejected": "neg"}
    renamed = ultrafeedback["renamed.parquet"]
    with pytest.raises(InputError) as error:
        prepare(renamed, tokenizers["chatml"], tmp_path / "out", columns=columns)
    assert str(error.value) == (f"--input {renamed} has no column 'good' (for chosen; its columns: question, pos, neg); "
                                "correct --columns chosen=COLUMN")
    with pytest.raises(InputError) as error:
        prepare(ultrafeedback["renamed.jsonl"], tokenizers["chatml"], tmp_path / "out", columns=columns)
    assert str(error.value) == (f"--columns chosen=good: the first record of --input {ultrafeedback['renamed.jsonl']} "
                                "has no such key (its keys: neg, pos, question)")
    with pytest.raises(InputError) as error:  # no mapping: the table's own names must be there
        prepare(renamed, tokenizers["chatml"], tmp_path / "out")
    assert str(error.value) == (f"--input {renamed} has no column 'chosen' (for chosen; its columns: question, pos, "
                                "neg); name it with --columns chosen=COLUMN")
    assert not (tmp_path / "out").exists()
    for text, words in (("prompt=q,chosen", "each item must be FIELD=COLUMN"), ("answer=x", "got 'answer=x'"),
                        ("chosen=a,chosen=b", "chosen is mapped twice"), ("chosen=a,rejected=a", "'a' is mapped to two")):
        with pytest.raises(InputError, match=f"^--columns '{text}': .*{words}"):
            parse_columns(text)


@pytest.mark.e2e
def test_the_tool_reads_a_split_with_a_mapping_and_refuses_a_bad_mapping_in_one_line(ultrafeedback, tokenizers,
                                                                                       tmp_path):
    import datasets

    renamed = datasets.load_from_disk(str(ultrafeedback["splits"])).rename_columns(
        {"prompt": "question", "chosen": "pos", "rejected": "neg"})
    renamed.save_to_disk(str(tmp_path / "renamed-splits"))
    tool = [sys.executable, str(REPO / "tools" / "prepare_pairs.py"), "--tokenizer", str(tokenizers["chatml"])]
    runs = [subprocess.Popen([*tool, "--input", str(tmp_path / "renamed-splits"), "--split", "test", "--out",
                              str(tmp_path / "out"), "--columns", "prompt=question,chosen=pos,rejected=neg"],
                             env=SUBPROCESS_ENV, cwd=REPO, stderr=subprocess.PIPE, text=True),
            subprocess.Popen([*tool, "--input", str(ultrafeedback["jsonl"]), "--out", str(tmp_path / "bad"),
                              "--columns", "chosen"], env=SUBPROCESS_ENV, cwd=REPO, stderr=subprocess.PIPE, text=True)]
    (_, good), (_, bad) = (run.communicate(timeout=300) for run in runs)
    assert runs[0].returncode == 0, good[-3000:]
    assert "are rendered with the tokenizer's chat template (sha256:" in good
    assert "2 records -> 2 pairs in 1 shards" in good
    samples = read_samples(tmp_path / "out")
    assert [meta["prompt"] for _, _, meta, _ in samples] == [r["chosen"][:-1] for r in ultrafeedback_records()[:2]]
    assert runs[1].returncode == 2 and bad.strip().splitlines() == [
        "prepare_pairs: error: --columns 'chosen': each item must be FIELD=COLUMN with FIELD one of prompt, chosen, "
        "rejected, label; got 'chosen'"]
