"""The paper-scale recipes in recipes/paper/ parse offline and carry the GIFT paper's settings.

They need a GPU, the Hub and the 2k training file, so they never run here; what is checked is what a
typo or a changed default could silently break: the arms, tasks and seeds, every train stage's
hyperparameters against the paper's numbers (written out below, from gift-method.md §5), and the
authors' prompt, EOS and step count (§1.3 and "Checked against the authors' code").
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from gift_merge.recipe import load_recipe
from gift_merge.recipe.schema import MergeStage, Recipe, TrainStage

PAPER = Path(__file__).parent.parent / "recipes" / "paper"

# recipe → (base, instruct, prompt preset, EOS appended to each training response: None = the base's)
RECIPES: dict[str, tuple[str, str, str, str | None]] = {
    "qwen2.5-7b-gift.yaml": ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", "qwen25", None),
    "llama-3.1-8b-gift.yaml": ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "llama3", "<|eot_id|>"),
    "llama-3.2-3b-gift.yaml": ("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct", "llama3", "<|eot_id|>"),
}

# gift-method.md §5, "Training configuration (identical across GIFT, Shadow-FT/SFT+Merge and Instruct-SFT)"
PAPER_TRAINING: dict[str, Any] = {
    "r": 64,
    "alpha": 128.0,
    "dropout": 0.05,
    "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "lr": 2e-4,
    "warmup_ratio": 0.1,
    "epochs": 1,
    "batch_size": 4,
    "grad_accum": 64,  # 4 × 64 = global batch 256 on one device
    "max_length": 2048,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "floor": 1e-4,
    "gamma": 1.0,
    "drop_last_accumulation": True,  # transformers 4.51's ⌊batches / accumulation⌋ steps: 7 for 2,000 rows
}

ARMS = [
    "instruct", "instruct-sft", "shadow-ft", "gift",
    "task-arithmetic-weight=0.5", "task-arithmetic-weight=1", "task-arithmetic-weight=1.5", "ties", "dare-ties",
]  # fmt: skip
ADAPTERS = {  # stage → (trained on, mode, annotated by the instruct model)
    "adapter-sft-instruct": ("instruct", "sft", False),
    "adapter-sft-base": ("base", "sft", False),
    "adapter-gift-base": ("base", "gift", True),
}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: parsing must not reach the Hub."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("parsing a recipe opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _load(name: str) -> Recipe:
    recipe = load_recipe(PAPER / name)
    assert recipe.compare is not None
    return recipe


def test_every_paper_recipe_is_tested() -> None:
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(RECIPES)
    assert (PAPER / "README.md").is_file()


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_arms_tasks_seeds_and_evaluation(name: str) -> None:
    _, instruct, preset, _ = RECIPES[name]
    spec = _load(name).compare
    assert [arm.name for arm in spec.arms] == ARMS
    assert spec.arm("instruct").model is not None and spec.arm("instruct").model.path == instruct
    assert spec.tasks == ("gift_gsm8k", "gift_svamp", "gift_mmlu_stem", "gift_sni")
    assert spec.seeds == (0, 1, 2)
    assert spec.reference == "instruct"
    assert (spec.device, spec.dtype) == ("cuda", "bfloat16")
    evaluation = spec.evaluation
    # Average@16 at T = 1.0 (gift-method.md §4.1), under the prompt training saw, with no chat template on top
    assert (evaluation.samples, evaluation.temperature, evaluation.sampling_temperature) == (16, 1.0, 1.0)
    assert evaluation.prompt_preset == preset and evaluation.chat_template is False
    assert evaluation.system_prompt is None and evaluation.limit is None


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_train_stages_carry_the_papers_settings(name: str) -> None:
    base, instruct, preset, eos = RECIPES[name]
    recipe = _load(name)
    stages = {stage.name: stage for stage in recipe.stages}
    models = {"base": base, "instruct": instruct}
    for stage_name, (trained_on, mode, annotated) in ADAPTERS.items():
        stage = stages[stage_name]
        assert isinstance(stage, TrainStage)
        config = stage.config
        assert {key: getattr(config, key) for key in PAPER_TRAINING} == PAPER_TRAINING, stage_name
        assert (config.base, config.mode) == (models[trained_on], mode)
        assert config.instruct == (instruct if annotated else None)
        assert (config.prompt_preset, config.prompt_template, config.eos_token) == (preset, None, eos)
        assert (config.device, config.dtype) == ("cuda", "bfloat16")
        # the 2k file the user fetches (recipes/paper/README.md); parsing does not need it
        assert Path(config.data) == PAPER / "data" / "numina_cot_2k.jsonl"
    for arm in ("instruct-sft", "shadow-ft", "gift"):  # θ' = θ_instruct + ΔW
        stage = stages[arm]
        assert isinstance(stage, MergeStage) and stage.merge_method == "gift"
        assert stage.base_model is not None and stage.base_model.path == instruct
        assert stage.dtype == "bfloat16"
