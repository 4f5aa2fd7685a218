"""Everything in an output folder besides the weights: config, tokenizer, recipe, model card."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from gift_merge.errors import GiftMergeError
from gift_merge.io.chat_templates import BUILTIN_TEMPLATES
from gift_merge.io.origin import LICENSE_KEYS

RECIPE_NAME = "gift_merge_recipe.yaml"
PROVENANCE_NAME = "gift_merge.json"
"""How an output was made, for machines: gift-merge's version, method, seed, engine, each input (a Hub id at its
commit, or a folder with its weight files' fingerprints), the Hub models behind them, their licence, the recipe."""


def package_versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of ``packages`` (None where one is missing), for the records outputs carry."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _copy(source: Path, target: Path) -> None:
    """One input file into the output; an unreadable input is the user's to fix, named in one line."""
    try:
        shutil.copyfile(source, target)
    except OSError as exc:
        raise GiftMergeError(f"{source}: cannot read ({exc.strerror or exc})") from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise GiftMergeError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise GiftMergeError(f"{path}: not UTF-8 (byte {exc.start})") from None


def copy_generation_config(source: Path, out: Path) -> None:
    if (source / "generation_config.json").is_file():
        _copy(source / "generation_config.json", out / "generation_config.json")


def copy_tokenizer(source: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            _copy(source / name, out / name)
            copied.append(name)
    for path in sorted(source.glob("*.tiktoken")):
        _copy(path, out / path.name)
        copied.append(path.name)
    return copied


def read_chat_template(folder: Path) -> str | None:
    """A model's chat template, wherever transformers may have saved it."""
    if (folder / "chat_template.jinja").is_file():
        return _read_text(folder / "chat_template.jinja")
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")):
        path = folder / name
        if path.is_file():
            try:
                document = json.loads(_read_text(path))
            except ValueError:
                continue
            value = document.get(key) if isinstance(document, dict) else None
            if isinstance(value, str):
                return value
    return None


def set_chat_template(out: Path, setting: str, input_folders: Iterable[Path]) -> None:
    """Write the recipe's chat template as ``chat_template.jinja``, the one place transformers reads first."""
    if setting == "auto":
        templates = [t for t in (read_chat_template(f) for f in input_folders) if t]
        if not templates:
            raise GiftMergeError("chat_template: auto found no chat template in any input model")
        template = Counter(templates).most_common(1)[0][0]
    else:
        template = BUILTIN_TEMPLATES.get(setting, setting)
    (out / "chat_template.json").unlink(missing_ok=True)
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(_read_text(config_path))
        except ValueError as exc:
            raise GiftMergeError(f"{config_path}: invalid JSON ({exc})") from None
        if isinstance(config, dict) and config.pop("chat_template", None) is not None:
            write_json(config_path, config)
    (out / "chat_template.jinja").write_text(template)


def write_model_card(
    out: Path,
    *,
    method: str,
    base: str | None,
    inputs: list[str],
    recipe_text: str,
    trained: Mapping[str, Mapping[str, Any]] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """A README naming the inputs and the method, with the recipe verbatim, as the Hub expects.

    The front matter comes from ``provenance`` (what ``gift_merge.json`` holds): ``base_model`` lists every
    Hub model behind the output (the Hub links the card to them; revisions go in the text, since the field
    takes ids only), and ``license`` appears only when every input declares the same one. ``trained`` maps
    an adapter input to the ``gift.json`` its trainer wrote, so the card says how the transferred adapter
    was made (GIFT or SFT, on which base, from which data).
    """
    record = dict(provenance or {})
    hub = [entry["id"] for entry in record.get("hub_inputs") or []]
    lines = ["---"]
    if hub:
        lines.append("base_model:")
        lines += [f"- {m}" for m in dict.fromkeys(hub)]
    lines += ["base_model_relation: merge", "library_name: transformers"]
    licence = record.get("license") or {}
    lines += [yaml.safe_dump({key: licence[key]}, allow_unicode=True).strip() for key in LICENSE_KEYS if key in licence]
    lines += ["tags:", "- gift-merge", "- merge", "---", "", "# Merged model", ""]
    lines.append(f"This model was merged with gift-merge using the `{method}` method"
                 + (f" with `{base}` as the base." if base else "."))  # fmt: skip
    described = dict(record.get("inputs") or {})
    lines += ["", "## Inputs", ""]
    for label in dict.fromkeys(inputs):
        lines += _input_lines(label, described.get(label))
    behind = [e for e in record.get("hub_inputs") or [] if not any(
        isinstance(d, dict) and d.get("hub_id") == e["id"] for d in described.values())]  # fmt: skip
    if behind:
        lines += ["", "Hub models behind the inputs (earlier stages, trained adapters):", ""]
        lines += [f"- `{e['id']}`" + (f" at revision `{e['revision']}`" if e.get("revision") else "") for e in behind]
    if provenance:
        lines += [
            "",
            f"Made with gift-merge {record.get('gift_merge_version')}, seed {record.get('seed')}, "
            f"engine {record.get('engine')} on {record.get('device')}; `{PROVENANCE_NAME}` records the same.",
        ]
    for label, trained_record in (trained or {}).items():
        lines += ["", f"## How `{label}` was trained", "", *_training_lines(trained_record)]
    lines += ["", "## Recipe", "", "```yaml", recipe_text.strip(), "```", ""]
    (out / "README.md").write_text("\n".join(lines))


def _input_lines(label: str, record: Mapping[str, Any] | None) -> list[str]:
    """One input of the card: a Hub id at its revision, or a folder and the fingerprint of each weight file."""
    if not record or not record.get("path"):
        return [f"- `{label}`"]
    lines = [f"- `{label}`: " + _where(record)]
    if isinstance(record.get("adapter"), Mapping):
        lines.append(f"  - adapter: {_where(record['adapter'])}")
    return lines


def _where(record: Mapping[str, Any]) -> str:
    if record.get("hub_id"):
        text = f"`{record['hub_id']}` on the Hub at revision `{record.get('revision')}`"
    else:
        files = record.get("files") or {}
        hashes = "; ".join(f"`{name}` {digest}" for name, digest in files.items())
        text = f"`{record['path']}`" + (f" ({hashes})" if hashes else "")
    return text + (f", licence {record['license']}" if record.get("license") else "")


def write_adapter_card(out: Path, record: Mapping[str, Any], log: Sequence[Mapping[str, Any]]) -> None:
    """The adapter's README (in place of peft's empty template): what it is, how it was trained, its loss."""
    base = str(record.get("base_model") or "")
    is_hub = "/" in base and not base.startswith((".", "/", "~")) and not Path(base).exists()
    mode = str(record.get("mode", "gift"))
    lines = ["---", *([f"base_model: {base}"] if is_hub else []), "base_model_relation: adapter", "library_name: peft",
             "tags:", "- gift-merge", "- lora", f"- {mode}", "---", "",
             f"# {'GIFT' if mode == 'gift' else 'SFT'} LoRA adapter", ""]  # fmt: skip
    lines.append(
        "A LoRA adapter trained on the base model with gift-merge; `merge_method: gift` adds it to the "
        "instruct model, and `PeftModel.from_pretrained(base, folder)` loads it."
    )
    lines += ["", "## How it was trained", "", *_training_lines(record)]
    losses = [float(r["loss"]) for r in log if "loss" in r]
    if losses:
        tokens = sum(int(r.get("tokens", 0)) for r in log)
        summary = (
            f"{len(losses)} optimizer steps, {tokens:,} tokens: loss {losses[0]:.4f} at the first step, "
            f"{min(losses):.4f} at its lowest, {losses[-1]:.4f} at the last (every step: `training_log.jsonl`)."
        )
        lines += ["", "## Loss", "", summary]
    lines += ["", "`gift.json` records every setting and the package versions.", ""]
    (out / "README.md").write_text("\n".join(lines))


def _training_lines(record: Mapping[str, Any]) -> list[str]:
    lora = record.get("lora") or {}
    lines = [
        f"- method: {record.get('method', 'unknown')}"
        + (f" (γ {record['gamma']:g}, floor {record['floor']:g})" if record.get("mode") == "gift" else ""),
        f"- trained on: `{record.get('base_model')}`",
    ]
    if record.get("instruct_model"):
        lines.append(f"- token scores from: `{record['instruct_model']}`")
    lines.append(f"- data: `{record.get('data')}` (sha256 {str(record.get('data_sha256'))[:12]}…, "
                 f"{record.get('examples')} examples, {record.get('steps')} optimizer steps)")  # fmt: skip
    if lora:
        lines.append(f"- LoRA: r {lora.get('r')}, alpha {lora.get('alpha')}, on {', '.join(lora.get('targets', []))}")
    return lines


def made_by_stage_text(folder: Path, text: str, marker: str) -> bool:
    """Whether ``folder`` holds a finished output (``marker`` is there) saved with recipe text ``text``.

    Every stage writes its own YAML text beside its output; the same text means the same inputs and
    options, so a merge or train stage can reuse the folder instead of redoing the work.
    """
    recipe_file = folder / RECIPE_NAME
    return (folder / marker).is_file() and recipe_file.is_file() and recipe_file.read_text() == text
