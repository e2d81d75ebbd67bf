"""Loading a local tokenizer and fingerprinting it, so shards made with one are never read with another."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mpo_dist.errors import InputError, MissingInputError


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer from a local folder (never the hub), with a pad token set."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise MissingInputError(f"tokenizer folder {path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot load a tokenizer from this folder ({error})") from error
    if len(tokenizer) == 0:
        raise InputError(f"{path}: tokenizer has an empty vocabulary")
    set_pad_token(tokenizer, path)
    return tokenizer


def set_pad_token(tokenizer, path) -> None:
    """Give a tokenizer without a pad token one of its own tokens for padding: EOS, else UNK, else BOS,
    else id 0. Padding positions are masked everywhere, so any real id serves; a new token would not:
    it would grow the vocabulary past the model's embeddings (and change what prepare records as the
    vocabulary size), so the vocabulary is checked unchanged."""
    if tokenizer.pad_token_id is not None:
        return
    size = len(tokenizer)
    existing = next((token for token in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token)
                     if token is not None and tokenizer.convert_tokens_to_ids(token) is not None), None)
    tokenizer.pad_token = existing if existing is not None else tokenizer.convert_ids_to_tokens(0)
    if len(tokenizer) != size or tokenizer.pad_token_id is None or not 0 <= tokenizer.pad_token_id < size:
        raise InputError(f"{path}: the tokenizer has no pad token and none of its own tokens could serve as one "
                         f"(its vocabulary went from {size} to {len(tokenizer)}); add a pad_token to its tokenizer_config.json")


def tokenizer_beside_model(model_dir: str | os.PathLike | None):
    """The tokenizer saved in a model folder, or None when the folder has none (or there is no folder)."""
    if not model_dir:
        return None
    path = Path(model_dir)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return load_tokenizer(path)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: the vocabulary/merges/normaliser, special tokens, chat template.

    Folder layout and file names do not enter it, so the same tokenizer saved elsewhere hashes equal.
    """
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "unk": tokenizer.unk_token,
        "prefix": tokenizer("", add_special_tokens=True)["input_ids"],
        "chat_template": tokenizer.chat_template,
    }
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return "sha256:" + digest.hexdigest()[:32]


def check_tokenizer_matches(manifest, model_vocab_size: int, tokenizer, *, data: str, model: str, fix: str) -> None:
    """Refuse shards (`manifest`) tokenized by another tokenizer than the model's.

    `tokenizer` is the one saved beside the model (None when the folder has none: then only the
    vocabulary size can be compared). `data` and `model` name the inputs as the caller's user
    knows them (config options in the trainer, flags in a tool); `fix` says what to do instead.
    """
    # The fingerprint first: a different tokenizer also explains a different vocabulary size.
    if tokenizer is not None:
        model_hash = tokenizer_fingerprint(tokenizer)
        if model_hash != manifest.tokenizer_hash:
            raise InputError(f"{data} was tokenized with tokenizer {manifest.tokenizer_hash}, but {model} has "
                             f"tokenizer {model_hash}; {fix}")
    vocab = manifest.info.get("tokenizer", {}).get("vocab_size")
    if vocab is not None and vocab > model_vocab_size:
        raise InputError(f"{data} uses a {vocab}-token vocabulary but {model} has {model_vocab_size} embeddings; {fix}")
