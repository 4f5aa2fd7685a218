"""The GIFT authors' prompts, byte for byte, as presets: ``--prompt-preset qwen25 | llama3 | deepseek_math``.

The authors do not use the instruct models' chat templates: their annotation script
(``sustech-nlp/gift``, ``src/python_scripts/confidence_anno.py`` lines 19–44), their trainers
(``*_gift_2k.py`` lines 26–32) and their evaluation hard-code one prompt per model family, a system
prompt (Llama, Qwen) and the suffix "Please reason step by step, and put your final answer within
\\boxed{}." after the question. Reproducing their runs needs these exact bytes: the chat templates
tokenise differently on the same rows. The same strings serve annotation, training on the base model
and evaluating the merged model, so :func:`format_prompt` is the one way to build them.

A preset is an ordinary ``{instruction}`` prompt template (the authors call the placeholder
``{query}``) and is tokenised like one: ``prompt + response`` jointly, without special tokens. The
template carries its own special tokens as text, so the Llama preset's ``<|begin_of_text|>`` is the
sequence's only BOS.
"""

from __future__ import annotations

from gift_merge.errors import GiftMergeError
from gift_merge.suggest import did_you_mean

PLACEHOLDER = "{instruction}"

_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

PROMPT_PRESETS: dict[str, str] = {
    # Qwen2.5 (and the Qwen family): ChatML with the default system prompt.
    "qwen25": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{PLACEHOLDER}{_SUFFIX}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    # Llama-3.1-8B and 3.2-3B: note the "\n" after each <|eot_id|>, which Meta's own template lacks.
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>\n"
        f"<|start_header_id|>user<|end_header_id|>\n\n{PLACEHOLDER}{_SUFFIX}<|eot_id|>\n"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # DeepSeek-Math-7B: plain text, no special tokens, no trailing space after "Assistant:".
    "deepseek_math": f"User: {PLACEHOLDER}{_SUFFIX}\n\nAssistant:",
}
"""Preset name → prompt template with ``{instruction}``; the authors' ``confidence_anno.py`` lines 19–44."""


def preset_template(preset: str, key: str = "--prompt-preset") -> str:
    """The template of ``preset``; an unknown name fails naming ``key`` and the presets."""
    try:
        return PROMPT_PRESETS[preset]
    except KeyError:
        names = ", ".join(PROMPT_PRESETS)
        raise GiftMergeError(
            f"{key}: unknown preset {preset!r}{did_you_mean(preset, PROMPT_PRESETS)}; presets are {names}"
        ) from None


def format_prompt(preset: str, instruction: str) -> str:
    """The authors' prompt for ``instruction``: the preset with the instruction in place of ``{instruction}``.

    Exactly the string annotation and training use for an ``{"instruction", "response"}`` row, so an
    evaluation that builds its prompts here sees what training saw.

    >>> format_prompt("deepseek_math", "What is 2 + 3?")
    'User: What is 2 + 3?\\nPlease reason step by step, and put your final answer within \\\\boxed{}.\\n\\nAssistant:'
    """
    return fill_template(preset_template(preset), instruction)


def fill_template(template: str, instruction: str) -> str:
    """``template`` with ``{instruction}`` replaced, once per occurrence, by the text as is.

    Plain replacement, not ``str.format``: templates hold literal braces (``\\boxed{}``) and
    instructions hold LaTeX, neither of which may be interpreted.
    """
    return template.replace(PLACEHOLDER, instruction)
