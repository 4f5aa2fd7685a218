"""``gift-merge eval``: score a model, an adapter on its model, or a recipe's stage with lm-eval."""

from __future__ import annotations

import time
from pathlib import Path

import click

from gift_merge.cli.support import check_device, handle_errors
from gift_merge.errors import GiftMergeError


def _task_list(value: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (value or "").split(",") if t.strip())


@click.command("eval")
@click.argument("model", required=False)
@click.option("--tasks", default=None, help="Comma-separated lm-eval task names (gift-merge eval --list-tasks).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write scores, settings, versions and lm-eval's output as JSON.")  # fmt: skip
@click.option(
    "--limit", type=float, default=None, help="Evaluate the first N documents of each task (N < 1: a fraction)."
)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1 …")
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on a GPU, fp32 on the CPU), float32 …")
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples per prompt [default: the task's].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling and few-shot selection.")
@click.option("--samples", type=int, default=1, show_default=True,
              help="Answers per prompt: with K > 1, Average@K (acc), pass@K and maj@K.")  # fmt: skip
@click.option("--temperature", type=float, default=None,
              help="Sampling temperature [default: greedy; 1.0 with --samples > 1].")  # fmt: skip
@click.option("--max-new-tokens", type=int, default=None, help="Cap on generated tokens [default: the task's].")
@click.option("--no-chat-template", is_flag=True, help="Prompt with the raw task text, not the model's chat template.")
@click.option("--system-prompt", default=None, help="A system message before every prompt.")
@click.option("--prompt-preset", default=None, metavar="NAME",
              help="The GIFT authors' prompt, byte for byte, as in training: qwen25, llama3, deepseek_math "
                   "(replaces the chat template; shipped gift_* tasks only).")  # fmt: skip
@click.option("--log-samples", is_flag=True, help="Keep every prompt, answer and per-document score in --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--list-tasks", is_flag=True, help="List the offline tasks shipped with gift-merge and exit.")
@handle_errors
def eval_command(model: str | None, tasks: str | None, out: Path | None, limit: float | None, batch_size: int,
                 device: str, dtype: str, num_fewshot: int | None, seed: int, samples: int,
                 temperature: float | None, max_new_tokens: int | None, no_chat_template: bool,
                 system_prompt: str | None, prompt_preset: str | None, log_samples: bool, overwrite: bool,
                 list_tasks: bool) -> None:  # fmt: skip
    """Evaluate MODEL with lm-evaluation-harness.

    MODEL is a model folder, a Hub id (org/name[@revision]), MODEL+ADAPTER (the adapter merged with
    peft), or RECIPE.yaml[:STAGE] (the built output of a recipe or of its named stage; a train stage is
    evaluated as its adapter on the model it was trained on). Any task lm-eval knows works when its data
    can be reached; the shipped gift_* tasks run offline.
    """
    if list_tasks:
        from gift_merge.evaluate.tasks import SHIPPED_TASKS

        width = max(len(name) for name in SHIPPED_TASKS)
        for name, description in SHIPPED_TASKS.items():
            click.echo(f"{name.ljust(width)}  {description}")
        return
    if model is None:
        raise GiftMergeError("MODEL: missing (a folder, a Hub id, MODEL+ADAPTER or RECIPE.yaml[:STAGE])")
    from gift_merge.evaluate.harness import EvalOptions

    options = EvalOptions(
        tasks=_task_list(tasks),
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        seed=seed,
        samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        chat_template=not no_chat_template,
        system_prompt=system_prompt,
        prompt_preset=prompt_preset,
    )
    if out is not None and out.exists() and not overwrite:
        raise GiftMergeError(f"{out}: already exists (use --overwrite to replace it)")
    device = check_device(device)
    from gift_merge.evaluate.harness import run_harness, task_manager
    from gift_merge.evaluate.loading import load_for_eval, resolve_target
    from gift_merge.evaluate.record import eval_record, score_table, write_json

    target = resolve_target(model)
    task_manager(options.tasks, options.prompt_preset)  # unknown task names fail before the model loads
    started = time.perf_counter()
    click.echo(f"evaluating {target.label} on {', '.join(options.tasks)} …", err=True)
    loaded = load_for_eval(target, device=device, dtype=dtype)
    run = run_harness(loaded.model, loaded.tokenizer, options, device=device)
    seconds = time.perf_counter() - started
    click.echo(score_table(run))
    if out is not None:
        write_json(out, eval_record(target.label, options, run, seconds, keep_samples=log_samples))
        click.echo(f"results written to {out} ({seconds:.1f} s)", err=True)
