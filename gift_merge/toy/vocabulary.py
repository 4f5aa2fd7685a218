"""The toy family's word-level tokenizer and chat template.

Every word the toy generators can write is one token and every number 0–99 is one token, so a tiny model
copies a number by copying one position (character or BPE pieces would make copying a multi-token skill
that a briefly trained model does not learn). Text is written with single spaces between tokens, and the
tokenizer splits on whitespace and joins with single spaces, so ``decode(encode(text)) == text`` for every
generated text. The vocabulary is a fixed list, not trained, which makes it identical for every seed.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD, UNK, SYSTEM, USER, ASSISTANT, END = "<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, SYSTEM, USER, ASSISTANT, END)
"""Special tokens, ids 0–5. ``<|end|>`` closes every turn and is also the EOS, so generation stops there."""

MAX_NUMBER = 99
"""Numbers 0 … MAX_NUMBER are single tokens; the generators keep every value in this range."""

NAMES: dict[str, str] = {
    "Tom": "He", "Ben": "He", "Sam": "He", "Max": "He", "Leo": "He",
    "Ann": "She", "Mia": "She", "Lily": "She", "Eva": "She", "Zoe": "She",
}  # fmt: skip
"""Names of the word problems' people and the pronoun of each."""

OBJECTS: tuple[str, ...] = ("apples", "pens", "cards", "books", "coins", "shells", "stamps", "marbles", "cookies")
"""What the people of the word problems count."""

PLUS_VERBS: tuple[str, ...] = ("gets", "finds", "buys")
MINUS_VERBS: tuple[str, ...] = ("gives away", "loses", "sells")
"""Word-problem steps: a plus verb adds (``gets 7 more``), a minus verb takes away (``loses 5``)."""

LIST_WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "red", "blue", "tree", "fish", "bird", "moon", "star", "car", "hat",
    "box", "cup", "key", "map", "rain", "milk", "door", "ship", "lamp", "frog", "bell", "rose",
)  # fmt: skip
"""Words the instructions operate on (repeat, first, last, count)."""

GLUE_WORDS: tuple[str, ...] = (
    # word problems
    "has", "more", "How", "many", "does", "have", "now", "?", ".", ",", "+", "-", "=", ":", "!",
    # task style and instruct style solutions
    "First", "Then", "So", "the", "answer", "is", "\\boxed{", "}", "Sure", "and", "The",
    # instructions
    "Repeat", "words", "What", "plus", "minus", "last", "first", "word", "number", "comes", "after",
    # pretraining text
    "Copy", "Count", "from",
)  # fmt: skip
"""Every other word the generators write."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
"""``<|user|> question <|end|>`` then ``<|assistant|> `` to answer; roles system, user and assistant."""


def vocabulary() -> list[str]:
    """Every token in id order: specials, numbers, then words (duplicates dropped, first kept)."""
    words = [*SPECIAL_TOKENS, *(str(n) for n in range(MAX_NUMBER + 1))]
    for name, pronoun in NAMES.items():
        words += [name, pronoun]
    words += list(OBJECTS) + list(PLUS_VERBS) + [w for verb in MINUS_VERBS for w in verb.split()]
    words += list(LIST_WORDS) + list(GLUE_WORDS)
    return list(dict.fromkeys(words))


def build_tokenizer(max_length: int = 256) -> PreTrainedTokenizerFast:
    """A word-level ``PreTrainedTokenizerFast`` with the chat template; ``save_pretrained`` writes files that
    ``AutoTokenizer`` loads. Unknown words become ``<unk>`` rather than pieces, which makes a generator
    that writes a word outside :func:`vocabulary` visible in tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {word: index for index, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=END,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,  # its rules would glue " ." and " ," onto the word before
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
