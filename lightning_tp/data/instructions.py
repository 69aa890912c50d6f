"""Instruction prompts: named prompt templates, token-level rendering of examples, and the built-in
data set.

* :data:`PROMPT_TEMPLATES` / :func:`get_template` / :func:`format_prompt`: the text put before an
  Alpaca record's response (exactly as used in training, so generation can reuse it).
* :func:`encode_instruction` / :func:`encode_chat`: ``(tokens, loss_mask)`` of a prompt and its
  response, or of a conversation; only responses (assistant turns) and their EOS carry a label.
* :func:`make_default_dataset`: a small instruction set generated deterministically in code, so
  examples run with no files and no network.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_tp.data.tokenizers import Tokenizer
from lightning_tp.errors import DataError

__all__ = [
    "PROMPT_TEMPLATES",
    "PromptTemplate",
    "encode_chat",
    "encode_instruction",
    "format_prompt",
    "get_template",
    "make_default_dataset",
]


# -------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt for Alpaca-style records: ``str.format`` patterns with ``{instruction}`` (and
    ``{input}``).

    The rendered prompt is followed directly by the response; it should therefore end with the
    response header. Literal braces in a pattern must be doubled (``{{``), as for
    :meth:`str.format`.
    """

    name: str
    no_input: str
    with_input: str

    def render(self, instruction: str, input: str = "") -> str:
        """The prompt for ``instruction`` (and ``input``, when not empty)."""
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction)


#: Named prompt templates; add an entry to make a new ``template=`` name available.
PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        name="alpaca",
        no_input=(
            "Below is an instruction that describes a task. Write a response that appropriately"
            " completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides"
            " further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
    ),
    "plain": PromptTemplate(
        name="plain",
        no_input="### Instruction:\n{instruction}\n\n### Response:\n",
        with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    ),
}

def get_template(name: str) -> PromptTemplate:
    """The registered :class:`PromptTemplate` called ``name``; :class:`DataError` naming the choices
    otherwise."""
    try:
        return PROMPT_TEMPLATES[name]
    except (KeyError, TypeError):
        raise DataError(
            f"Unknown prompt template: template={name!r}. Fix: use one of"
            f" {sorted(PROMPT_TEMPLATES)}, or add a PromptTemplate to"
            " lightning_tp.data.finetune.PROMPT_TEMPLATES."
        ) from None


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The prompt text for an instruction (and optional input), exactly as used in training.

    Generating after this text (with a BOS token first, if the tokenizer has one) continues with a
    response.
    """
    return get_template(template).render(instruction, input)


# -------------------------------------------------------------------------------- encoding


def encode_instruction(tokenizer: Tokenizer, prompt: str,
                       response: str) -> tuple[list[int], list[bool]]:
    """``(tokens, loss_mask)`` of a prompt followed by its response: ``[BOS] prompt response EOS``.

    The prompt and the response are tokenized separately, so the boundary between them is exact;
    ``loss_mask`` is ``True`` on the response tokens and the EOS only.
    """
    prompt_ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
    response_ids = tokenizer.encode(response, eos=True)
    return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """``(tokens, loss_mask)`` of a conversation given as ``(role, content)`` pairs.

    A BOS (if any), then one ``<|role|>\\ncontent\\n`` turn per message, except that an assistant
    turn ends with EOS in place of the newline. ``loss_mask`` is ``True`` on assistant contents and
    their EOS only. With ``add_generation_prompt`` an ``<|assistant|>\\n`` header is appended (for
    generation).
    """
    tokens: list[int] = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    mask: list[bool] = [False] * len(tokens)
    for role, content in messages:
        if role == "assistant":
            header = tokenizer.encode("<|assistant|>\n")
            body = tokenizer.encode(content, eos=True)
            tokens += header + body
            mask += [False] * len(header) + [True] * len(body)
        else:
            turn = tokenizer.encode(f"<|{role}|>\n{content}\n")
            tokens += turn
            mask += [False] * len(turn)
    if add_generation_prompt:
        header = tokenizer.encode("<|assistant|>\n")
        tokens += header
        mask += [False] * len(header)
    return tokens, mask


# -------------------------------------------------------------------------------- default set

_WORDS = (
    "apple banana cherry grape lemon mango melon peach pear plum "
    "river ocean lake hill stone cloud storm rain snow wind "
    "tiger zebra horse mouse eagle whale shark camel panda otter "
    "house table chair door window lamp clock bottle cup spoon "
    "green yellow purple orange silver black white brown pink blue "
    "happy quick quiet brave calm proud lucky sunny funny gentle "
    "run jump swim read write sing dance climb build paint "
    "music paper pencil garden forest castle bridge rocket planet star "
    "bread honey sugar butter cheese pizza pasta salad soup cake "
    "king queen pilot farmer doctor artist baker sailor teacher robot "
    "moon sun earth fire water light shadow dream magic story "
    "red big small tall short fast slow warm cold soft"
).split()


def make_default_dataset(num_examples: int = 3000, seed: int = 1234) -> list[dict[str, str]]:
    """A deterministic instruction set of simple string tasks with short answers (no files, no
    network).

    Tasks: reverse a word, write a sentence in uppercase, count the letters of a word, sort a few
    small numbers, add two numbers, repeat a word ``n`` times; built from a fixed word list with
    ``random.Random(seed)``. Records are unique and have no ``input`` (everything is in the
    instruction, which keeps examples under 256 byte tokens with the ``"alpaca"`` template). At most
    ``num_examples`` records are returned.
    """
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    for word in _WORDS:
        records.append({"instruction": f"Reverse the word: {word}", "output": word[::-1]})
        records.append({"instruction": f"How many letters are in the word '{word}'?",
                        "output": str(len(word))})
        for n in (2, 3, 4):
            records.append({"instruction": f"Repeat the word '{word}' {n} times.",
                            "output": " ".join([word] * n)})
    seen = {r["instruction"] for r in records}

    def add(instruction: str, output: str) -> bool:
        if instruction in seen:
            return False
        seen.add(instruction)
        records.append({"instruction": instruction, "output": output})
        return True

    remaining = max(0, num_examples - len(records))
    targets = {"upper": remaining // 3, "sort": remaining // 3,
               "add": remaining - 2 * (remaining // 3)}
    for task, count in targets.items():
        made = attempts = 0
        while made < count and attempts < 50 * count:
            attempts += 1
            if task == "upper":
                sentence = " ".join(rng.sample(_WORDS, rng.randint(2, 4)))
                made += add(f"Write in uppercase: {sentence}", sentence.upper())
            elif task == "sort":
                numbers = [rng.randint(0, 20) for _ in range(rng.randint(3, 5))]
                made += add(
                    f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}",
                    ", ".join(map(str, sorted(numbers))),
                )
            else:
                a, b = rng.randint(0, 50), rng.randint(0, 50)
                made += add(f"What is {a} plus {b}?", str(a + b))
    rng.shuffle(records)
    return records[:num_examples]
