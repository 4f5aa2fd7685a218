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


def run(tmp_path: Path, text: str, *options: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), str(out), "-q", *options])
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


# ---------------------------------------------------------------- provenance: Hub revisions, fingerprints, licence

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_model(cache: Path, repo_id: str, source: Path, licence: str | None, commit: str = COMMIT) -> Path:
    """``source`` as huggingface_hub keeps a download: ``models--ORG--NAME/snapshots/COMMIT``, ``refs/main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    if licence is not None:
        (snapshot / "README.md").write_text(f"---\nlicense: {licence}\nlibrary_name: transformers\n---\n# {repo_id}\n")
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hub cache that huggingface_hub resolves ids from (HF_HUB_OFFLINE is set for every test)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def front_matter(out: Path) -> dict:
    from gift_merge.io.origin import front_matter as parse

    return parse(out / "README.md")


def test_hub_inputs_carry_their_revision_and_local_ones_their_fingerprints(
    tmp_path: Path, llama: dict[str, Path], hub_cache: Path
) -> None:
    import hashlib

    hub_model(hub_cache, "acme/base", llama["base"], "apache-2.0")
    hub_model(hub_cache, "acme/math", llama["math"], "apache-2.0", commit="f" * 40)
    text = f"merge_method: ties\nbase_model: acme/base\nmodels:\n  - {{model: acme/math, parameters: {{weight: 1, density: 0.5}}}}\n  - {{model: {llama['code']}, parameters: {{weight: 1, density: 0.5}}}}\n"
    out = run(tmp_path, text, "--hash-inputs")
    record = json.loads((out / "gift_merge.json").read_text())
    assert record["inputs"]["acme/base"]["hub_id"] == "acme/base"
    assert record["inputs"]["acme/base"]["revision"] == COMMIT
    assert record["inputs"]["acme/math"]["revision"] == "f" * 40
    assert "files" not in record["inputs"]["acme/base"]  # the commit pins a Hub input
    local = record["inputs"][str(llama["code"])]
    assert local["path"] == str(llama["code"].resolve())
    shards = sorted(p.name for p in llama["code"].glob("*.safetensors"))
    assert sorted(local["files"]) == shards and len(shards) > 1
    for name in shards:  # the hash the Hub shows for an LFS file, over the whole file
        assert local["files"][name] == "sha256:" + hashlib.sha256((llama["code"] / name).read_bytes()).hexdigest()
    assert record["hub_inputs"] == [{"id": "acme/base", "revision": COMMIT}, {"id": "acme/math", "revision": "f" * 40}]
    assert record["license"] is None  # the local model declares none
    card = (out / "README.md").read_text()
    matter = front_matter(out)
    assert matter["base_model"] == ["acme/base", "acme/math"] and "license" not in matter
    assert matter["base_model_relation"] == "merge"
    assert f"`acme/base` on the Hub at revision `{COMMIT}`" in card
    assert f"`{llama['code'].resolve()}`" in card and local["files"][shards[0]] in card
    unhashed = json.loads((run(tmp_path / "plain", text) / "gift_merge.json").read_text())
    sizes = unhashed["inputs"][str(llama["code"])]["files"]  # without --hash-inputs: sizes, no extra read
    assert sizes == {name: f"bytes:{(llama['code'] / name).stat().st_size}" for name in shards}


@pytest.mark.parametrize(
    ("licences", "expected"),
    [(("apache-2.0", "apache-2.0"), "apache-2.0"), (("apache-2.0", "mit"), None), (("apache-2.0", None), None)],
)
def test_license_only_when_every_input_declares_the_same(
    tmp_path: Path, llama: dict[str, Path], hub_cache: Path, licences: tuple, expected: str | None
) -> None:
    hub_model(hub_cache, "acme/math", llama["math"], licences[0])
    hub_model(hub_cache, "acme/code", llama["code"], licences[1])
    out = run(tmp_path, RECIPE.format(math="acme/math", code="acme/code"))
    matter = front_matter(out)
    assert matter.get("license") == expected
    record = json.loads((out / "gift_merge.json").read_text())
    assert record["license"] == ({"license": expected} if expected else None)
    assert matter["base_model"] == ["acme/math", "acme/code"]


def test_a_local_path_that_looks_like_a_hub_id_is_not_a_base_model(tmp_path: Path, llama: dict[str, Path]) -> None:
    shutil.copytree(llama["math"], tmp_path / "tiny" / "math")
    shutil.copytree(llama["code"], tmp_path / "tiny" / "code")
    out = run(tmp_path, RECIPE.format(math="tiny/math", code="tiny/code"))
    assert "base_model" not in front_matter(out)
    record = json.loads((out / "gift_merge.json").read_text())
    assert record["hub_inputs"] == [] and record["inputs"]["tiny/math"]["path"] == str(
        (tmp_path / "tiny" / "math").resolve()
    )


def test_a_multi_stage_output_names_the_hub_models_behind_its_stages(
    tmp_path: Path, llama: dict[str, Path], hub_cache: Path
) -> None:
    hub_model(hub_cache, "acme/math", llama["math"], "apache-2.0")
    hub_model(hub_cache, "acme/code", llama["code"], "apache-2.0")
    first = "name: soup\n" + RECIPE.format(math="acme/math", code="acme/code")
    last = f"merge_method: linear\nmodels:\n  - {{model: soup, parameters: {{weight: 1}}}}\n  - {{model: {llama['instruct']}, parameters: {{weight: 1}}}}\n"
    out = run(tmp_path, first + "---\n" + last)
    record = json.loads((out / "gift_merge.json").read_text())
    assert [e["id"] for e in record["hub_inputs"]] == ["acme/math", "acme/code"]
    assert record["inputs"]["soup"]["files"]  # the earlier stage is a local folder, fingerprinted
    assert front_matter(out)["base_model"] == ["acme/math", "acme/code"]
    assert "Hub models behind the inputs" in (out / "README.md").read_text()
    soup = json.loads((tmp_path / "out-stages" / "soup" / "gift_merge.json").read_text())
    assert soup["license"] == {"license": "apache-2.0"}  # both Hub inputs agree; the final merge adds a local one


def test_origin_reads_snapshot_folders_and_declared_licences(tmp_path: Path) -> None:
    from gift_merge.io.origin import agreed_license, declared_license, hub_origin

    assert hub_origin(tmp_path / "models--acme--m" / "snapshots" / COMMIT) == ("acme/m", COMMIT)
    assert hub_origin(tmp_path / "models--gpt2" / "snapshots" / COMMIT) == ("gpt2", COMMIT)
    assert hub_origin(tmp_path / "models--acme--m" / "snapshots" / "main") is None  # not a commit
    assert hub_origin(tmp_path / "acme" / "m") is None
    folder = tmp_path / "m"
    folder.mkdir()
    assert declared_license(folder) == {}
    (folder / "config.json").write_text('{"license": "mit"}')
    assert declared_license(folder) == {"license": "mit"}  # no card: the config's
    (folder / "README.md").write_text("---\nlicense: other\nlicense_name: acme-1\nlicense_link: LICENSE\n---\n")
    other = {"license": "other", "license_name": "acme-1", "license_link": "LICENSE"}
    assert declared_license(folder) == other
    assert agreed_license([other, dict(other)]) == other
    assert agreed_license([other, {**other, "license_name": "acme-2"}]) == {}
    (folder / "README.md").write_text("---\nlicense: [mit, apache-2.0]\n---\n")
    assert declared_license(folder) == {"license": "mit"}  # a list declares nothing; the config still does
