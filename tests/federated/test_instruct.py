"""Instruction data: column mapping, prompt masking, truncation, loaders, the task partition, the bundled mix."""

import json
import logging

import numpy as np
import pytest
from datasets import Dataset

from fedkernels.errors import ConfigError
from fedkernels.federated import instruct
from fedkernels.federated.data import load_dataset, partition, partition_task, rng_for
from fedkernels.federated.instruct import IGNORE, format_prompt, normalise_instructions, tokenize_instructions


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from fedkernels.assets import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def _rows(n=6, long_input_every=0):
    ins, inp, out, task = [], [], [], []
    for i in range(n):
        ins.append(f"Say the colour number {i}.")
        inp.append(("word " * 200) if long_input_every and i % long_input_every == 0 else f"item {i}")
        out.append(f"red blue green {i}")
        task.append("colours" if i % 2 else "numbers")
    return Dataset.from_dict({"instruction": ins, "input": inp, "output": out, "task": task})


def test_prompt_and_padding_labels_are_exactly_ignore(tok):
    ds = _rows(6)
    seq_len = 48
    data = tokenize_instructions(ds, tok, seq_len)
    assert len(data) == 6 and data.dropped == 0
    for k in range(len(data)):
        row = ds[k]
        p = tok(format_prompt(tok, row["instruction"], row["input"]), add_special_tokens=False)["input_ids"]
        r = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        n = len(p) + len(r)
        assert n < seq_len  # the row is padded, so padding positions exist
        labels = data.labels[k]
        assert (labels[: len(p)] == IGNORE).all()  # prompt
        assert labels[len(p): n].tolist() == r  # response tokens + EOS (SEP here)
        assert (labels[n:] == IGNORE).all()  # padding
        assert data.attention_mask[k].tolist() == [1] * n + [0] * (seq_len - n)
        assert data.input_ids[k, :n].tolist() == p + r
        assert data.prompt_ids[k] == p and data.references[k] == row["output"]


def test_chat_template_is_used_and_closes_the_turn(tok):
    chat_tok = tok.__class__.from_pretrained(tok.name_or_path)
    chat_tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </turn>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    ds = _rows(2)
    data = tokenize_instructions(ds, chat_tok, 64)
    prompt = format_prompt(chat_tok, ds[0]["instruction"], ds[0]["input"])
    assert prompt.startswith("<user>") and prompt.endswith("<assistant>")
    resp = data.labels[0][data.labels[0] != IGNORE].tolist()
    text = chat_tok.decode(resp)
    # The template's own end of turn is the last response token run, not an appended SEP.
    assert text.replace(" ", "").endswith("</turn>") and chat_tok.sep_token_id not in resp
    assert "red blue green 0" in text


def test_truncated_away_rows_are_dropped_and_counted(tok, caplog):
    ds = _rows(6, long_input_every=3)  # rows 0 and 3 have a 200-word input: the prompt fills seq_len
    with caplog.at_level(logging.WARNING, logger="fedkernels"):
        data = tokenize_instructions(ds, tok, 40)
    assert data.dropped == 2 and len(data) == 4
    assert "dropped 2 of 6" in caplog.text
    assert data.references == [ds[i]["output"] for i in (1, 2, 4, 5)]
    assert ((data.labels != IGNORE).sum(1) > 0).all()  # every kept row has a response token
    # A response cut short (not away) is kept: its labels stop at seq_len.
    row = _rows(1)
    prompt = format_prompt(tok, row[0]["instruction"], row[0]["input"])
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    short = tokenize_instructions(row, tok, n_prompt + 2)
    assert len(short) == 1 and short.attention_mask.all() and (short.labels != IGNORE).sum() == 2


def test_every_row_dropped_is_an_error(tok):
    with pytest.raises(ConfigError, match="seq_len is 8"):
        tokenize_instructions(_rows(3), tok, 8)


def test_dolly_and_explicit_column_names():
    dolly = Dataset.from_dict({"instruction": ["a", "b"], "context": ["", "ctx"], "response": ["x", "y"],
                               "category": ["qa", "summarization"]})
    out = normalise_instructions(dolly)
    assert out["input"] == ["", "ctx"] and out["output"] == ["x", "y"] and out["task"] == ["qa", "summarization"]
    custom = Dataset.from_dict({"q": ["a"], "ans": ["x"]})
    out = normalise_instructions(custom, {"instruction": "q", "output": "ans"})
    assert out["instruction"] == ["a"] and out["output"] == ["x"] and out["task"] == ["default"]
    with pytest.raises(ConfigError, match=r"column 'nope' given for 'output' does not exist; columns found: \['q'"):
        normalise_instructions(custom, {"instruction": "q", "output": "nope"})


def test_missing_columns_name_the_columns_found():
    ds = Dataset.from_dict({"foo": ["a"], "bar": ["b"]})
    with pytest.raises(ConfigError, match=r"columns found: \['foo', 'bar'\]"):
        normalise_instructions(ds)


def test_empty_output_is_an_error_naming_the_row():
    ds = Dataset.from_dict({"instruction": ["a", "b", "c"], "output": ["x", "  ", "z"]})
    with pytest.raises(ConfigError, match=r"row 1 has an empty output \(column 'output'\)"):
        normalise_instructions(ds)
    ds = Dataset.from_dict({"instruction": ["a"], "output": [None]})
    with pytest.raises(ConfigError, match="row 0 has an empty output"):
        normalise_instructions(ds)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_load_dataset_reads_instruction_files(tmp_path, suffix):
    rows = [{"instruction": f"do {i}", "input": "" if i % 2 else f"with {i}", "output": f"done {i}"} for i in range(4)]
    path = tmp_path / f"alpaca{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        path.write_text("instruction,input,output\n" + "\n".join(f"{r['instruction']},{r['input']},{r['output']}"
                                                                 for r in rows))
    ds = load_dataset(str(path))  # task inferred from the columns
    assert ds.column_names == ["instruction", "input", "output", "task"]
    assert ds["output"] == [r["output"] for r in rows] and ds["input"][0] == "with 0"


def test_load_dataset_without_usable_columns_names_them(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"question_text": "a", "score": 1}))
    with pytest.raises(ConfigError, match=r"columns found: \['question_text', 'score'\]"):
        load_dataset(str(path))
    with pytest.raises(ConfigError, match=r"columns found: \['question_text', 'score'\]"):
        load_dataset(str(path), task="causal-lm")


def test_task_partition_gives_each_client_exactly_one_task():
    labels = np.repeat(np.arange(3), [10, 7, 5])
    parts = partition(labels, 7, ("task", None), seed=3)
    assert len(parts) == 7
    for p in parts:
        assert len(p) > 0 and len(np.unique(labels[p])) == 1
    used = np.sort(np.concatenate(parts))
    assert used.tolist() == list(range(len(labels)))  # 7 clients >= 3 tasks: every example is held once
    held = [int(labels[p[0]]) for p in parts]
    assert sorted(set(held)) == [0, 1, 2] and max(held.count(t) for t in range(3)) == 3  # round-robin deal
    again = partition(labels, 7, ("task", None), seed=3)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))


def test_task_partition_needs_enough_examples():
    labels = np.asarray([0, 0, 1])
    with pytest.raises(ConfigError, match="task 1 has 1 examples for 2 clients"):
        partition_task(labels, 4, rng_for(0))


def test_config_accepts_task_partition():
    from fedkernels.federated import FederatedConfig

    assert FederatedConfig(partition="task").partition_spec() == ("task", None)


def test_bundled_instruct_mix():
    from fedkernels.assets import TWEET_SENTIMENTS, bbc_articles

    ds = load_dataset(instruct.INSTRUCT_MIX)
    tasks = np.asarray(ds["task"])
    assert sorted(set(tasks)) == ["headline", "sentiment", "topic"]
    assert all((tasks == t).sum() == 400 for t in ("headline", "sentiment", "topic"))
    articles = bbc_articles()
    titles = {a[1] for a in articles}
    sections = {a[0] for a in articles}
    head = [ds[int(i)] for i in np.flatnonzero(tasks == "headline")]
    topic = [ds[int(i)] for i in np.flatnonzero(tasks == "topic")]
    assert all(r["output"] in titles for r in head)
    assert {r["output"] for r in topic} == sections  # every section is asked for
    assert {r["output"] for r in ds if r["task"] == "sentiment"} == set(TWEET_SENTIMENTS)
    assert not {r["input"] for r in head} & {r["input"] for r in topic}  # disjoint article halves
    first = articles[0]
    assert first[1] == "Ad sales boost Time Warner profit"  # the first line of business/001.txt
