"""A merge split in parts by output shard (`run --part i/n`, `finalize`) writes a whole run's bytes."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from gift_merge.cli import main
from gift_merge.parts import RECORDS, parse_part, part_shards, plan_shards, staging_folder

RANDOM = """
merge_method: {method}
base_model: {base}
models:
  - model: {math}
    parameters: {{weight: 0.6, density: 0.5{extra}}}
  - model: {code}
    parameters: {{weight: 0.4, density: 0.5{extra}}}
dtype: float32
"""

TWO_STAGES = """
name: soup
merge_method: dare_ties
base_model: {base}
models:
  - model: {math}
    parameters: {{weight: 0.5, density: 0.6}}
  - model: {code}
    parameters: {{weight: 0.5, density: 0.6}}
---
merge_method: linear
models:
  - model: soup
    parameters: {{weight: 0.7}}
  - model: {base}
    parameters: {{weight: 0.3}}
"""

SHARDS = ["--out-shard-size", "150KB", "--seed", "11"]  # six shards of the tiny llama


def _recipe(tmp_path: Path, llama: dict[str, Path], method: str = "dare_ties") -> Path:
    extra = ", epsilon: 0.1" if method == "della" else ""
    path = tmp_path / f"{method}.yaml"
    path.write_text(RANDOM.format(method=method, extra=extra, **llama))
    return path


def _run(*args: str | Path) -> str:
    result = CliRunner().invoke(main, ["run", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def _same_folders(a: Path, b: Path, naming_paths: bool = True) -> None:
    """Every file of ``a`` in ``b`` with the same bytes; without ``naming_paths``, not those naming where the
    inputs are (card, gift_merge.json, the inputs' record: a multi-stage run's final stage reads its own
    OUT-stages)."""
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*"))
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*"))
    paths = {"README.md", "gift_merge.json", "gift_merge_inputs.json"}
    for name in names:
        if (a / name).is_file() and (naming_paths or name not in paths):
            assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_parts_write_the_bytes_of_a_whole_run(tmp_path: Path, llama: dict[str, Path], method: str) -> None:
    recipe = _recipe(tmp_path, llama, method)
    _run(recipe, tmp_path / "whole", *SHARDS)
    assert len(list((tmp_path / "whole").glob("model-*.safetensors"))) == 6
    for count in (2, 3):
        out = tmp_path / f"in{count}"
        for index in reversed(range(count)):  # any order; the last to finish finalizes
            assert not out.exists()
            said = _run(recipe, out, *SHARDS, "--part", f"{index}/{count}")
        assert "merged model written to" in said
        assert not staging_folder(out).exists()
        _same_folders(tmp_path / "whole", out)  # weights, index, config, tokenizer, card, gift_merge.json


def test_shards_do_not_depend_on_the_number_of_parts(tmp_path: Path, llama: dict[str, Path]) -> None:
    from gift_merge.merge import plan_recipe
    from gift_merge.recipe import load_recipe

    plan = plan_recipe(load_recipe(_recipe(tmp_path, llama)))[-1]
    shards = plan_shards(plan, 150_000)  # type: ignore[arg-type]
    for count in (1, 2, 4, 7):
        split = [s for i in range(count) for s in part_shards(shards, i, count)]
        assert sorted(s.file for s in split) == [s.file for s in shards]
    assert parse_part("3/4") == (3, 4)


@pytest.mark.parametrize("bad", ["4/4", "1", "a/2", "-1/2", "0/0"])
def test_a_bad_part_is_one_line(tmp_path: Path, llama: dict[str, Path], bad: str) -> None:
    result = CliRunner().invoke(main, ["run", str(_recipe(tmp_path, llama)), str(tmp_path / "o"), "--part", bad])
    assert result.exit_code == 2
    assert "--part" in result.output and "Traceback" not in result.output


def test_finalize_refuses_missing_or_damaged_shards(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe, out = _recipe(tmp_path, llama), tmp_path / "out"
    _run(recipe, out, *SHARDS, "--part", "0/2")
    staging = staging_folder(out)
    refused = CliRunner().invoke(main, ["finalize", str(out)])
    assert refused.exit_code == 2 and "3 of 6 shards are not written yet" in refused.output
    assert not out.exists()
    # a part killed after renaming its shard but before recording it: the shard is not done
    _run(recipe, out, *SHARDS, "--part", "1/2")  # finalizes
    _run(recipe, tmp_path / "again", *SHARDS, "--part", "0/2")
    (staging_folder(tmp_path / "again") / RECORDS / "model-00001-of-00006.safetensors.json").unlink()
    said = _run(recipe, tmp_path / "again", *SHARDS, "--part", "1/2")
    assert "5 of 6 shards present" in said and not (tmp_path / "again").exists()
    said = _run(recipe, tmp_path / "again", *SHARDS, "--part", "0/2")  # rewrites the unrecorded one only
    assert "1 shard(s) written, 2 written before" in said
    _same_folders(out, tmp_path / "again")
    assert not staging.exists()


def test_parts_of_another_plan_are_refused(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe, out = _recipe(tmp_path, llama), tmp_path / "out"
    _run(recipe, out, "--out-shard-size", "150KB", "--seed", "1", "--part", "0/2")
    other = CliRunner().invoke(main, ["run", str(recipe), str(out), "--out-shard-size", "150KB", "--seed", "2",
                                      "--part", "1/2"])  # fmt: skip
    assert other.exit_code == 2 and "holds parts of another plan" in other.output
    assert not out.exists()


def test_parts_of_changed_inputs_are_refused(tmp_path: Path, llama: dict[str, Path]) -> None:
    import shutil

    copies = {name: shutil.copytree(llama[name], tmp_path / name) for name in ("base", "math", "code")}
    recipe, out = _recipe(tmp_path, copies), tmp_path / "out"
    _run(recipe, out, *SHARDS, "--part", "0/2")
    weights = next(copies["math"].glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten meanwhile
    changed = CliRunner().invoke(main, ["run", str(recipe), str(out), *SHARDS, "--part", "1/2"])
    assert changed.exit_code == 2 and "holds parts of another plan" in changed.output


def test_a_part_refuses_a_shard_another_live_part_writes(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe, out = _recipe(tmp_path, llama), tmp_path / "out"
    _run(recipe, out, *SHARDS, "--part", "1/2")
    lock = staging_folder(out) / RECORDS / "model-00001-of-00006.safetensors.lock"
    import socket

    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process of this host
    busy = CliRunner().invoke(main, ["run", str(recipe), str(out), *SHARDS, "--part", "0/2"])
    assert busy.exit_code == 2 and "is writing it" in busy.output
    lock.write_text(f"{socket.gethostname()} 999999999")  # died: taken over
    _run(recipe, out, *SHARDS, "--part", "0/2")
    assert (out / "model.safetensors.index.json").is_file()


def test_a_multi_stage_recipe_runs_stage_by_stage(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = tmp_path / "two.yaml"
    recipe.write_text(TWO_STAGES.format(**llama))
    _run(recipe, tmp_path / "whole", *SHARDS)
    out = tmp_path / "out"
    said = [_run(recipe, out, *SHARDS, "--part", f"{i}/2") for i in (0, 1)]
    assert "stage soup, part 0/2" in said[0] and "run the parts again for the next stage" in said[1]
    assert (tmp_path / "out-stages" / "soup" / "config.json").is_file() and not out.exists()
    said = [_run(recipe, out, *SHARDS, "--part", f"{i}/2") for i in (1, 0)]
    assert "merged model written to" in said[1]
    _same_folders(tmp_path / "whole-stages" / "soup", tmp_path / "out-stages" / "soup")
    _same_folders(tmp_path / "whole", out, naming_paths=False)
    late = CliRunner().invoke(main, ["run", str(recipe), str(out), *SHARDS, "--part", "0/2"])
    assert late.exit_code == 2 and "not empty" in late.output
    assert json.loads((out / "gift_merge.json").read_text())["seed"] == 11
