"""A model's tokenizer as its files hold it: its vocabulary, read for planning, and a merged one, written.

Read with the ``tokenizers`` library, so planning and writing a merged tokenizer import neither
transformers nor torch. The vocabulary is what transformers' fast tokenizer holds once loaded, which is
what mergekit builds its merge from: ``tokenizer.json``'s tokens, then the special tokens that
``tokenizer_config.json`` names and the file lacks, which transformers adds on load. A model with only slow
tokenizer files (``tokenizer.model``, ``vocab.json``) is converted by transformers, as mergekit's
``use_fast=True`` does; that alone imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from gift_merge.errors import GiftMergeError
from gift_merge.io.artifacts import TOKENIZER_FILES, write_json

SLOW_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "spiece.model")
"""Files of slow tokenizers: a merged tokenizer is fast only (``tokenizer.json``), as mergekit's is."""
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_EXTRA_KEYS = ("extra_special_tokens", "additional_special_tokens")


@dataclass(frozen=True)
class TokenizerVocab:
    """token → id as transformers' ``get_vocab()`` returns it, the added tokens (content → their
    ``tokenizer.json`` properties, in id order) and the size of the model's own vocabulary (without added
    tokens), which decides the id the next added token gets."""

    ids: Mapping[str, int]
    added: Mapping[str, Mapping[str, Any]]
    model_size: int

    @property
    def size(self) -> int:
        """Rows the vocabulary needs: one past its largest id."""
        return max(self.ids.values(), default=-1) + 1


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GiftMergeError(f"{path}: cannot read as JSON ({exc})") from None


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", *SLOW_FILES))


def load_tokenizer(folder: Path) -> Tokenizer:
    """The folder's fast tokenizer as transformers loads it; :class:`GiftMergeError` when it has none."""
    if (folder / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the tokenizers library raises its own exception types
            raise GiftMergeError(f"{folder / 'tokenizer.json'}: cannot load ({exc})") from None
    elif has_tokenizer(folder):
        tok = _converted(folder)
    else:
        raise GiftMergeError(f"{folder}: no tokenizer files (tokenizer.json, or a slow tokenizer's)")
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    _add_config_tokens(tok, config if isinstance(config, dict) else {})
    return tok


def _converted(folder: Path) -> Tokenizer:
    """A slow-only tokenizer converted to a fast one by transformers (imports torch)."""
    from transformers import AutoTokenizer

    from gift_merge.hf_quiet import quiet_transformers

    try:
        with quiet_transformers(logs=True):
            slow = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise GiftMergeError(f"{folder}: cannot load its tokenizer ({exc})") from None
    if not getattr(slow, "is_fast", False):
        raise GiftMergeError(f"{folder}: its tokenizer has no fast (tokenizer.json) form to merge")
    return Tokenizer.from_str(slow.backend_tokenizer.to_str())


def _token(value: Any, *, special: bool) -> AddedToken | None:
    if isinstance(value, str):
        return AddedToken(value, special=special)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        props = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=bool(value.get("special", special)), **props)
    return None


def _add_config_tokens(tok: Tokenizer, config: Mapping[str, Any]) -> None:
    """What transformers adds on load: ``added_tokens_decoder`` entries and named special tokens the
    tokenizer lacks as added tokens (a token already in the vocabulary keeps its id)."""
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    wanted: list[AddedToken] = []
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        entries = sorted(((int(k), v) for k, v in decoder.items() if str(k).isdigit()), key=lambda kv: kv[0])
        wanted += [t for _, v in entries if (t := _token(v, special=False)) is not None]
    wanted += [t for key in _SPECIAL_KEYS if (t := _token(config.get(key), special=True)) is not None]
    for key in _EXTRA_KEYS:
        if isinstance(config.get(key), list):
            wanted += [t for v in config[key] if (t := _token(v, special=True)) is not None]
    missing, seen = [], set(added)
    for token in wanted:
        if token.content not in seen:
            missing.append(token)
            seen.add(token.content)
    if missing:
        tok.add_tokens(missing)


def vocabulary_of(tok: Tokenizer) -> TokenizerVocab:
    decoder = sorted(tok.get_added_tokens_decoder().items())
    return TokenizerVocab(
        ids=tok.get_vocab(with_added_tokens=True),
        added={t.content: _props(t) for _, t in decoder},
        model_size=tok.get_vocab_size(with_added_tokens=False),
    )


def _props(token: AddedToken) -> dict[str, Any]:
    return {k: getattr(token, k) for k in ("single_word", "lstrip", "rstrip", "normalized", "special")}


def read_vocabulary(folder: Path) -> TokenizerVocab | None:
    """The vocabulary of the folder's tokenizer, or ``None`` where the folder has no tokenizer files."""
    return vocabulary_of(load_tokenizer(folder)) if has_tokenizer(folder) else None


def strip(tok: Tokenizer, limit: int, where: Path) -> Tokenizer:
    """``tok`` without the tokens whose id is ``limit`` or more (rows the model's embedding lacks).

    BPE merges that use or make a removed token go with it (mergekit keeps merges that make one, which the
    tokenizers library then refuses to load)."""
    if all(i < limit for i in tok.get_vocab(with_added_tokens=True).values()):
        return tok
    document = json.loads(tok.to_str())
    model = document["model"]
    if not isinstance(model.get("vocab"), dict):
        raise GiftMergeError(
            f"{where}: its {model.get('type')} tokenizer has tokens past the model's vocab_size ({limit}); "
            "only BPE, WordLevel and WordPiece tokenizers can be cut to it"
        )
    removed = {t for t, i in model["vocab"].items() if i >= limit}
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < limit}
    if model.get("type") == "BPE":
        kept = []
        for merge in model.get("merges", []):
            pair = merge.split(" ") if isinstance(merge, str) else list(merge)
            if not (set(pair) & removed or "".join(pair) in removed):
                kept.append(merge)
        model["merges"] = kept
    document["added_tokens"] = [t for t in document.get("added_tokens", []) if t["id"] < limit]
    return Tokenizer.from_str(json.dumps(document))


def write_tokenizer(
    out: Path, home: Path, *, limit: int | None, additions: Sequence[tuple[str, Mapping[str, Any] | None]],
    expected: Mapping[str, int],
) -> None:  # fmt: skip
    """The merged tokenizer in ``out``: ``home``'s tokenizer cut at ``limit``, plus ``additions`` in order
    (a plain added token where the properties are ``None``, as transformers' ``add_tokens(str)`` makes
    one), saved as ``tokenizer.json`` with ``home``'s other tokenizer files (chat template, special tokens)
    beside it; slow tokenizer files are left out. ``expected`` is the planned vocabulary: a tokenizer that
    disagrees with the embedding rows is never written."""
    tok = load_tokenizer(home)
    if limit is not None:
        tok = strip(tok, limit, home)
    if additions:
        tok.add_tokens([content if props is None else AddedToken(content, **props) for content, props in additions])
    got = tok.get_vocab(with_added_tokens=True)
    if dict(got) != dict(expected):
        wrong = sorted(set(got.items()) ^ set(expected.items()), key=lambda kv: kv[1])[:3]
        raise GiftMergeError(f"{home}: the merged tokenizer's ids differ from the planned vocabulary at {wrong}")
    for name in TOKENIZER_FILES:
        if name not in SLOW_FILES and name != "tokenizer.json" and (home / name).is_file():
            (out / name).write_bytes((home / name).read_bytes())
    tok.save(str(out / "tokenizer.json"))
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        if isinstance(config, dict) and isinstance(config.get("added_tokens_decoder"), dict):
            decoder = sorted(tok.get_added_tokens_decoder().items())
            config["added_tokens_decoder"] = {str(i): {"content": t.content, **_props(t)} for i, t in decoder}
            write_json(config_path, config)
