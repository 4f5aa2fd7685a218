"""One lm-evaluation-harness run on an already loaded model, and its scores in a flat form.

lm-eval does the evaluation itself (prompting, chat templates, batching, generation, metrics), so any
task it knows works and the numbers are the ones the community reports. What this module adds: the
task index (gift-merge's shipped offline tasks first, lm-eval's own only when a task needs them, since
indexing lm-eval's thousands of task files takes seconds), the sampled-metric settings (``--samples K``
becomes the task's ``repeats`` and sampling at temperature T), one seed for every random source, the
GIFT authors' prompts (``--prompt-preset``: the shipped tasks' loaders build them, lm-eval sends them as
they are), and scores keyed ``task → metric`` without lm-eval's filter suffixes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from gift_merge.errors import GiftMergeError
from gift_merge.suggest import did_you_mean

log = logging.getLogger(__name__)

DEFAULT_SAMPLING_TEMPERATURE = 1.0
"""The GIFT paper's Average@16 samples at T = 1.0, top-p 1."""

PRESET_TURN_ENDS: dict[str, str | None] = {"qwen25": "<|im_end|>", "llama3": "<|eot_id|>", "deepseek_math": None}
"""Where the answer's turn ends in each prompt preset, so generation stops there (None: at the EOS only,
which lm-eval always stops at); the preset templates close the user turn with the same marker."""


@dataclass(frozen=True)
class EvalOptions:
    """What ``gift-merge eval`` and a ``compare:`` document pass to lm-eval."""

    tasks: tuple[str, ...]
    limit: float | None = None
    batch_size: int = 8
    num_fewshot: int | None = None
    seed: int = 0
    samples: int = 1
    temperature: float | None = None
    max_new_tokens: int | None = None
    chat_template: bool = True
    system_prompt: str | None = None
    prompt_preset: str | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise GiftMergeError("--tasks: name at least one task (gift-merge eval --list-tasks)")
        if self.prompt_preset is not None:
            self._check_preset(self.prompt_preset)
            # The preset is the whole prompt, its chat wrapping included as text: a chat template on top
            # would wrap it twice. Recorded as off, so results.json says what lm-eval was asked to do.
            object.__setattr__(self, "chat_template", False)
        if self.samples < 1:
            raise GiftMergeError(f"--samples: must be at least 1, got {self.samples}")
        if self.temperature is not None and self.temperature < 0:
            raise GiftMergeError(f"--temperature: must be >= 0, got {self.temperature}")
        if self.samples > 1 and self.temperature == 0:
            raise GiftMergeError("--samples > 1 needs a temperature above 0: greedy samples are all the same")
        if self.limit is not None and self.limit <= 0:
            raise GiftMergeError(f"--limit: must be positive, got {self.limit}")
        if self.batch_size < 1:
            raise GiftMergeError(f"--batch-size: must be at least 1, got {self.batch_size}")

    def _check_preset(self, preset: str) -> None:
        """A preset names a known prompt, replaces any system prompt, and reaches only the shipped tasks,
        whose loaders build their prompts from it (lm-eval's own tasks would get their plain text)."""
        from gift_merge.evaluate.tasks import SHIPPED_TASKS
        from gift_merge.train.prompts import preset_template

        if not isinstance(preset, str):
            raise GiftMergeError(f"--prompt-preset: expected a preset name, got {preset!r}")
        preset_template(preset, "--prompt-preset")
        if self.system_prompt is not None:
            raise GiftMergeError("--system-prompt: cannot be combined with --prompt-preset, whose prompt has its own")
        others = [name for name in self.tasks if name not in SHIPPED_TASKS]
        if others:
            hint = did_you_mean(others[0], sorted(SHIPPED_TASKS))
            raise GiftMergeError(
                f"--prompt-preset: builds the prompts of the shipped gift_* tasks only, not of {others[0]!r}{hint} "
                "(gift-merge eval --list-tasks)"
            )

    @property
    def sampling_temperature(self) -> float | None:
        """The temperature generation samples at, or None for greedy decoding."""
        if self.temperature is not None:
            return self.temperature or None
        return DEFAULT_SAMPLING_TEMPERATURE if self.samples > 1 else None

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "tasks": list(self.tasks), "sampling_temperature": self.sampling_temperature}


@dataclass
class HarnessRun:
    """Scores of one model on its tasks, plus lm-eval's own output (kept for results.json)."""

    scores: dict[str, dict[str, float]]  # task → metric → value
    stderr: dict[str, dict[str, float]]
    counts: dict[str, int]  # task → documents evaluated
    raw: dict[str, Any]  # lm-eval's results, configs, versions, n-shot, n-samples
    samples: dict[str, list[dict[str, Any]]]  # task → per-document records


@functools.lru_cache(maxsize=8)
def task_manager(tasks: tuple[str, ...], prompt_preset: str | None = None) -> Any:
    """lm-eval's index over the shipped tasks, and over lm-eval's own only if a task is not shipped.

    lm-eval hands a TaskManager's ``metadata`` to every task's dataset loader, which is how the shipped
    tasks learn the prompt preset; a manager therefore serves one preset, and the cache keys on it.
    """
    from lm_eval.tasks import TaskManager

    from gift_merge.evaluate.tasks import SHIPPED_TASKS, TASKS_DIR

    needs_defaults = any(name not in SHIPPED_TASKS for name in tasks)
    metadata = {"prompt_preset": prompt_preset} if prompt_preset is not None else None
    with _quiet_lm_eval():
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_defaults, metadata=metadata)
    known = set(manager.all_tasks) if hasattr(manager, "all_tasks") else None
    for name in tasks:
        if known is not None and name not in known:
            hint = did_you_mean(name, sorted(SHIPPED_TASKS)) or did_you_mean(name, sorted(known))
            raise GiftMergeError(f"--tasks: unknown task {name!r}{hint} (gift-merge eval --list-tasks)")
    return manager


def task_specs(options: EvalOptions, manager: Any) -> list[Any]:
    """Task names; with ``--samples K`` or a prompt preset, the loaded tasks with their settings changed.

    lm-eval builds a task from an inline ``{"task": name, "repeats": K}`` as a new task rather than as an
    override of the registered one, so the registered tasks are loaded and changed instead: ``repeats``
    set to K, and with a preset a multiple-choice task's answer placed right after the prompt (no
    ``target_delimiter`` space), as lm-eval does under a chat template, since the preset's prompt ends
    where the assistant's turn begins.
    """
    if options.samples == 1 and options.prompt_preset is None:
        return list(options.tasks)
    with _quiet_lm_eval():
        loaded = manager.load(list(options.tasks))["tasks"]
    for task in loaded.values():
        if options.samples > 1:
            task.set_config(key="repeats", value=options.samples)
        if options.prompt_preset is not None and task.get_config("output_type") == "multiple_choice":
            task.set_config(key="target_delimiter", value="")
    return list(loaded.values())


def generation_overrides(options: EvalOptions, stop: str | None = None) -> dict[str, Any] | None:
    """Generation settings that replace the tasks' own: sampling, a cap on new tokens, and the text
    generation stops at (lm-eval always stops at the tokenizer's EOS as well)."""
    overrides: dict[str, Any] = {}
    if stop is not None:
        overrides["until"] = [stop]
    temperature = options.sampling_temperature
    if temperature is not None:
        overrides.update(do_sample=True, temperature=temperature, top_p=1.0)
    if options.max_new_tokens is not None:
        overrides["max_gen_toks"] = options.max_new_tokens
    return overrides or None


def run_harness(model: Any, tokenizer: Any, options: EvalOptions, *, device: str = "cpu") -> HarnessRun:
    """Evaluate a loaded transformers model on ``options.tasks`` with lm-eval, in this process."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(options.tasks, options.prompt_preset)
    if options.prompt_preset is not None:
        stop = PRESET_TURN_ENDS.get(options.prompt_preset)
        # The preset's text is the whole sequence, tokenised as training tokenised it: without special
        # tokens, so the Llama preset's "<|begin_of_text|>" is the only BOS and the others get none.
        special: dict[str, Any] = {"add_bos_token": False}
    else:
        stop = end_of_turn(tokenizer) if options.chat_template else None
        special = {}
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, device=device, **special)
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_specs(options, manager),
            task_manager=manager,
            num_fewshot=options.num_fewshot,
            limit=options.limit,
            apply_chat_template=options.chat_template,
            system_instruction=options.system_prompt,
            gen_kwargs=generation_overrides(options, stop),
            random_seed=options.seed,
            numpy_random_seed=options.seed,
            torch_random_seed=options.seed,
            fewshot_random_seed=options.seed,
            log_samples=True,
        )
    if raw is None:  # only non-zero ranks of a distributed lm-eval run return nothing
        raise GiftMergeError("lm-eval returned no results")
    return harness_run(raw)


def end_of_turn(tokenizer: Any) -> str | None:
    """The token that ends a turn of the chat template, when it is not the EOS (ChatML's ``<|im_end|>``
    in a tokenizer whose EOS is ``</s>``): an answer ends there, so generation stops there."""
    from gift_merge.train.model import chat_end_token

    try:
        token = chat_end_token(tokenizer, "the model")
    except GiftMergeError:
        return None
    return None if token == tokenizer.eos_token else token


def harness_run(raw: dict[str, Any]) -> HarnessRun:
    """lm-eval's ``simple_evaluate`` output → :class:`HarnessRun`."""
    scores: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    for task, entries in raw["results"].items():
        scores[task], stderr[task] = flat_metrics(entries)
    counts = {task: int(n.get("effective", n.get("original", 0))) for task, n in raw.get("n-samples", {}).items()}
    kept: dict[str, Any] = {
        key: raw[key] for key in ("results", "configs", "versions", "n-shot", "n-samples") if key in raw
    }
    kept["lm_eval_version"] = raw.get("lm_eval_version")
    return HarnessRun(scores, stderr, counts, kept, dict(raw.get("samples", {})))


def flat_metrics(entries: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """``{"acc,all": v, "acc_stderr,all": s, …}`` → ``({"acc": v}, {"acc": s})``.

    The filter suffix is dropped when a task has one filter; with several (lm-eval's gsm8k has
    ``strict-match`` and ``flexible-extract``) each metric keeps it as ``metric[filter]``.
    """
    filters = {key.split(",", 1)[1] for key in entries if "," in key}
    values: dict[str, float] = {}
    errors: dict[str, float] = {}
    for key, value in entries.items():
        if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        metric, filter_name = key.split(",", 1)
        is_stderr = metric.endswith("_stderr")
        metric = metric.removesuffix("_stderr")
        name = metric if len(filters) == 1 else f"{metric}[{filter_name}]"
        (errors if is_stderr else values)[name] = float(value)
    return values, errors


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every step at INFO and warns that it was handed a model object, which is on purpose
    here, and rouge-score logs its tokenizer choice through absl; all of it shows with ``--debug`` only.

    lm-eval also records the git commit of the working directory, which for gift-merge's users is
    whatever folder they ran from, and outside a repository git prints "fatal: not a git repository" on
    the terminal; the record is left empty instead.
    """
    import lm_eval.evaluator

    loggers = [logging.getLogger(name) for name in ("lm_eval", "absl")]
    levels = [logger.level for logger in loggers]
    verbose = logging.getLogger().level <= logging.DEBUG
    recorder = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    for logger in loggers:
        logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = recorder
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
