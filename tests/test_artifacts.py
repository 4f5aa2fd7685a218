"""What an output folder holds besides weights: tokenizer, chat template, generation config, card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from gift_merge.cli import main
from gift_merge.io.chat_templates import BUILTIN_TEMPLATES

RECIPE = "merge_method: linear\nmodels:\n  - {{model: {math}, parameters: {{weight: 1}}}}\n  - {{model: {code}, parameters: {{weight: 1}}}}\n"


def run(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), str(out), "-q"])
    assert result.exit_code == 0, result.output
    return out


def render(folder: Path) -> str:
    tok = AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)


def test_tokenizer_and_generation_config_come_from_the_base(tmp_path: Path, llama: dict[str, Path]) -> None:
    out = run(tmp_path, RECIPE.format(**llama))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (llama["math"] / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert "linear" in card and str(llama["code"]) in card and "```yaml" in card


def test_tokenizer_source_names_another_model(tmp_path: Path, llama: dict[str, Path]) -> None:
    other = shutil.copytree(llama["code"], tmp_path / "other")
    (other / "chat_template.jinja").write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    out = run(tmp_path, RECIPE.format(**llama) + f"tokenizer_source: {other}\n")
    assert render(out) == "<<hi>>"


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca"])
def test_builtin_chat_templates(tmp_path: Path, llama: dict[str, Path], name: str) -> None:
    out = run(tmp_path, RECIPE.format(**llama) + f"chat_template: {name}\n")
    assert (out / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES[name]
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert "hi" in render(out)


def test_literal_and_auto_chat_templates(tmp_path: Path, llama: dict[str, Path]) -> None:
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    out = run(tmp_path / "a", RECIPE.format(**llama) + f'chat_template: "{literal}"\n')
    assert render(out) == "[user] hi"
    out = run(tmp_path / "b", RECIPE.format(**llama) + "chat_template: auto\n")
    assert (out / "chat_template.jinja").read_text() == (llama["math"] / "chat_template.jinja").read_text()
