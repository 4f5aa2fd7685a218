"""Example comparisons for the report and plot tests, built from seeded random scores (no models, no evals)."""

from __future__ import annotations

import numpy as np
import pytest

from gift_merge.compare.results import ArmRecord, Comparison, Score

GIB = 2**30

# arm -> (gift_gsm8k acc, gift_mmlu_stem acc, gift_sni rougeL): plausible numbers for a 1–8B instruct model
REALISTIC_MEANS = {
    "instruct": (0.42, 0.48, 0.43),
    "instruct-sft": (0.55, 0.44, 0.31),
    "shadow-ft": (0.56, 0.46, 0.34),
    "gift": (0.58, 0.48, 0.39),
    "task_arithmetic λ=0.5": (0.49, 0.48, 0.415),
    "task_arithmetic λ=1.0": (0.54, 0.46, 0.35),
    "task_arithmetic λ=1.5": (0.51, 0.42, 0.29),
    "ties": (0.53, 0.47, 0.37),
    "self-merge": (0.42, 0.48, 0.43),  # instruct merged with itself: must match instruct
}
REALISTIC_TASKS = ["gift_gsm8k", "gift_mmlu_stem", "gift_sni"]
# non-headline metrics, as offsets from the headline mean
EXTRA_METRICS = {"gift_gsm8k": {"pass_at_k": 0.12, "maj_at_k": 0.03}, "gift_sni": {"rouge1": 0.05}}


def _scores(
    means: dict[str, tuple[float, ...]],
    tasks: list[str],
    headline: dict[str, str],
    seeds: list[int],
    rng: np.random.Generator,
    extra: dict[str, dict[str, float]] | None = None,
) -> list[Score]:
    scores = []
    for arm, row in means.items():
        for task, mean in zip(tasks, row, strict=True):
            metrics = {headline[task]: 0.0, **(extra or {}).get(task, {})}
            for metric, shift in metrics.items():
                for seed in seeds:
                    value = float(np.clip(mean + shift + rng.normal(0, 0.012), 0, 1))
                    scores.append(Score(arm, task, metric, seed, value))
    return scores


def realistic_comparison() -> Comparison:
    """8 competing arms and one sanity gate on 3 tasks, 3 seeds, K=4; task arithmetic swept over λ."""
    rng = np.random.default_rng(20240601)
    headline = {"gift_gsm8k": "acc", "gift_mmlu_stem": "acc", "gift_sni": "rougeL"}
    arms = [
        ArmRecord("instruct", "model ../demo/models/instruct", eval_seconds=412.0),
        ArmRecord(
            "instruct-sft", "stage sft", build_seconds=1834.25, peak_rss_bytes=int(9.8 * GIB), eval_seconds=405.5
        ),
        ArmRecord(
            "shadow-ft", "stage shadow-ft", build_seconds=1911.0, peak_rss_bytes=int(10.4 * GIB), eval_seconds=409.1
        ),
        ArmRecord("gift", "stage gift-merge", build_seconds=622.4, peak_rss_bytes=int(3.1 * GIB), eval_seconds=410.0),
    ]
    for lam in (0.5, 1.0, 1.5):
        arms.append(
            ArmRecord(
                f"task_arithmetic λ={lam}",
                "task_arithmetic (inline)",
                build_seconds=41.3,
                peak_rss_bytes=int(2.05 * GIB),
                eval_seconds=408.0,
                sweep={"lambda": lam},
                family="task_arithmetic",
            )
        )
    arms.append(
        ArmRecord("ties", "ties (inline)", build_seconds=95.7, peak_rss_bytes=int(2.4 * GIB), eval_seconds=407.2)
    )
    arms.append(
        ArmRecord(
            "self-merge",
            "linear instruct+instruct (inline)",
            build_seconds=38.0,
            peak_rss_bytes=int(1.9 * GIB),
            eval_seconds=411.0,
            gate=True,
        )
    )
    return Comparison(
        arms=arms,
        scores=_scores(REALISTIC_MEANS, REALISTIC_TASKS, headline, [0, 1, 2], rng, EXTRA_METRICS),
        tasks=list(REALISTIC_TASKS),
        headline=headline,
        reference="instruct",
        retention_task="gift_sni",
        target_task="gift_gsm8k",
        samples=4,
        meta={
            "recipe": "recipes/compare-demo.yaml",
            "seeds": [0, 1, 2],
            "limit": 500,
            "samples": 4,
            "stages": {
                "sft@seed-0": {"seconds": 1834.25, "peak_rss_bytes": 10522669875},
                "gift-merge@seed-0": {"seconds": 622.4, "peak_rss_bytes": 3328599654},
                "shadow-ft@seed-0": {"seconds": 1911.0},
            },
        },
    )


def two_parameter_sweep() -> Comparison:
    """DARE-TIES swept over density × weight, next to instruct; no Pareto tasks set, one sample."""
    rng = np.random.default_rng(7)
    tasks = ["gift_gsm8k", "gift_sni"]
    headline = {"gift_gsm8k": "acc", "gift_sni": "rougeL"}
    means: dict[str, tuple[float, ...]] = {"instruct": (0.42, 0.40)}
    arms = [ArmRecord("instruct", "model instruct")]
    for weight in (0.5, 1.0):
        for density in (0.1, 0.3, 0.5, 0.9):
            name = f"dare_ties d={density} w={weight}"
            means[name] = (0.42 + 0.15 * weight * density**0.5, 0.40 - 0.08 * weight * density)
            arms.append(
                ArmRecord(
                    name,
                    "dare_ties (inline)",
                    build_seconds=60.0,
                    peak_rss_bytes=2 * GIB,
                    sweep={"density": density, "weight": weight},
                    family="dare_ties",
                )
            )
    return Comparison(
        arms=arms,
        scores=_scores(means, tasks, headline, [0, 1], rng),
        tasks=tasks,
        headline=headline,
        reference="instruct",
    )


@pytest.fixture
def realistic() -> Comparison:
    return realistic_comparison()


@pytest.fixture
def two_param() -> Comparison:
    return two_parameter_sweep()
