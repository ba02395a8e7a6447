"""alignkit.data: readers, validation/normalisation, tokenisation with exact prompt/response split, collators."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch
from torch.testing import assert_close

from alignkit.config import DataConfig
from alignkit.data.collate import collate_preference, collate_prompts, collate_sft, pad_sequences
from alignkit.data.formats import load_examples
from alignkit.data.io import DataError, read_records
from alignkit.data.tokenize import (
    render_prompt,
    tokenize_kto,
    tokenize_pair,
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
)
from alignkit.models.tiny import tiny_tokenizer

GOOD = {
    "sft": {"prompt": "hi", "completion": "hello"},
    "preference": {"prompt": "hi", "chosen": "hello", "rejected": "go away"},
    "kto": {"prompt": "hi", "completion": "hello", "label": True},
    "prompt": {"prompt": "hi", "answer": "4"},
    "stepwise": {"prompt": "1+1+1?", "steps": ["1+1=2", "2+1=3"], "labels": [True, True]},
}


def write_jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def where(path, line, field=None, unit="line"):
    """Regex for the start of a DataError message: '{file}, line {line}, field '{field}': '."""
    s = f"{path}, {unit} {line}"
    if field is not None:
        s += f", field '{field}'"
    return re.escape(s + ": ")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ================================================================ readers
def test_jsonl_line_numbers_skip_empty_lines(tmp_path):
    path = write_jsonl(tmp_path, [{"a": 1}, "", "   ", {"a": 2}])
    records = read_records(str(path))
    assert [(r.data, r.line, r.unit) for r in records] == [({"a": 1}, 1, "line"), ({"a": 2}, 4, "line")]
    assert records[0].source == str(path)


def test_json_array_rows(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    records = read_records(str(path))
    assert [(r.data["a"], r.line, r.unit) for r in records] == [(1, 1, "row"), (2, 2, "row")]


def test_json_not_array_and_element_not_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": []}))
    with pytest.raises(DataError, match=re.escape(f"{path}: expected a JSON array of objects") + ".*got dict"):
        read_records(str(path))
    path.write_text(json.dumps([{"a": 1}, 3]))
    with pytest.raises(DataError, match=where(path, 2, unit="row") + "expected a JSON object, got int"):
        read_records(str(path))


def test_json_invalid_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(DataError, match=where(path, 2) + r"invalid JSON \(Expecting value at column 8\)"):
        read_records(str(path))


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = [{"prompt": "p1", "label": True, "margin": 1.0}, {"prompt": "p2", "label": False}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = read_records(str(path))
    # row 2 has margin null in the shared schema: read as absent
    assert [(r.data, r.line, r.unit) for r in records] == [(rows[0], 1, "row"), (rows[1], 2, "row")]


def test_parquet_corrupt(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=re.escape(f"{path}: is not a readable Parquet file")):
        read_records(str(path))


def test_csv_cells_are_strings_and_label_string_is_an_error(tmp_path):
    """Cells stay strings when read; a KTO label cell must spell a bool (true/false, 1/0, yes/no)."""
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion,label\nhi,"hello, you",sure\n')
    records = read_records(str(path))
    assert [(r.data, r.line, r.unit) for r in records] == [
        ({"prompt": "hi", "completion": "hello, you", "label": "sure"}, 1, "row")
    ]
    with pytest.raises(DataError, match=where(path, 1, "label", "row") + r"expected a bool .* got str 'sure'"):
        load_examples(str(path), "kto")


def test_csv_row_with_too_many_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=where(path, 2, unit="row") + "has 3 cells but the header has 2 columns"):
        read_records(str(path))


def test_datasets_dir_and_dataset_dict_split(tmp_path):
    import datasets

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    records = read_records(str(tmp_path / "ds"))
    assert [(r.data, r.line) for r in records] == [(rows[0], 1), (rows[1], 2)]

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[1:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    test = read_records(str(tmp_path / "dd"), split="test")
    assert [(r.data, r.line, r.unit) for r in test] == [(rows[1], 1, "row")]
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'dd'}: has no split 'validation'; available splits: "
                                                  "['test', 'train']")):
        read_records(str(tmp_path / "dd"), split="validation")


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'empty'}: is not a directory saved with datasets")):
        read_records(str(tmp_path / "empty"))


@pytest.fixture
def fake_builtin(monkeypatch):
    calls = []

    def hhh(split):
        calls.append(split)
        return [{"prompt": "q", "chosen": "good", "rejected": "bad"}, {"prompt": "q2", "chosen": 3, "rejected": "x"}]

    module = types.ModuleType("alignkit.data.builtin")
    module.BUILTIN_DATASETS = {"hhh": hhh}
    monkeypatch.setitem(sys.modules, "alignkit.data.builtin", module)
    return calls


def test_builtin(fake_builtin):
    records = read_records("builtin:hhh", split="test")
    assert fake_builtin == ["test"]
    assert [(r.source, r.line, r.unit) for r in records] == [("builtin:hhh", 1, "row"), ("builtin:hhh", 2, "row")]
    with pytest.raises(DataError, match=where("builtin:hhh", 2, "chosen", "row") + "expected a non-empty string"):
        load_examples("builtin:hhh", "preference")
    with pytest.raises(DataError, match=re.escape("builtin:nope: unknown built-in dataset; available: ['hhh']")):
        read_records("builtin:nope")


def test_data_error_attributes_and_pickle():
    import pickle

    e = DataError("f.csv", 3, "label", "expected a bool, got str", unit="row")
    assert (e.file, e.line, e.field, str(e)) == ("f.csv", 3, "label", "f.csv, row 3, field 'label': expected a bool, got str")
    assert str(pickle.loads(pickle.dumps(e))) == str(e)
    assert str(DataError("f.jsonl", None, None, "is empty")) == "f.jsonl: is empty"


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file or directory")):
        read_records(str(tmp_path / "nope.jsonl"))
    path = tmp_path / "d.txt"
    path.write_text("x")
    with pytest.raises(DataError, match=re.escape(f"{path}: unsupported file type '.txt'; supported: .jsonl, .json, "
                                                  ".parquet, .csv")):
        read_records(str(path))
    with pytest.raises(DataError, match="no data path given"):
        read_records("")


def test_non_utf8_names_line_and_byte_offset(tmp_path):
    # line 1 is b'{"a": 1}' (8 bytes) + b"\n" -> line 2 starts at byte 9; b'{"b": "' is 7 bytes -> 0xff at 16.
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(DataError, match=where(path, 2) + r"is not valid UTF-8 \(byte offset 16"):
        read_records(str(path))
    # same bytes in a .json file: the offset is from the file start as well
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"a": 1},\n{"b": "\xff"}]')
    with pytest.raises(DataError, match=where(path, 2) + r"is not valid UTF-8 \(byte offset 18"):
        read_records(str(path))


def test_invalid_json_line_and_non_object_line(tmp_path):
    path = write_jsonl(tmp_path, [{"a": 1}, '{"a": 2,}'])
    with pytest.raises(DataError, match=where(path, 2) + r"invalid JSON \(Expecting property name"):
        read_records(str(path))
    path = write_jsonl(tmp_path, [{"a": 1}, "", "[1, 2]"])
    with pytest.raises(DataError, match=where(path, 3) + "expected a JSON object, got list"):
        read_records(str(path))


# ================================================================ formats: good records
def test_sft_formats_normalised(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    path = write_jsonl(tmp_path, [{"prompt": "hi", "completion": "hello", "id": 7}, {"messages": msgs}])
    examples, stats = load_examples(str(path), "sft")
    assert examples == [
        {"prompt": [{"role": "user", "content": "hi"}], "completion": "hello", "id": 7,
         "_source": str(path), "_line": 1},
        {"prompt": msgs[:2], "completion": "a", "_source": str(path), "_line": 2},
    ]
    assert (stats.n_read, stats.n_kept, stats.n_skipped) == (2, 2, 0)


def test_preference_message_lists_and_margin(tmp_path):
    path = write_jsonl(tmp_path, [
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}], "margin": 2},
    ])
    (ex,), _ = load_examples(str(path), "preference")
    assert ex == {"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad", "group": 0,
                  "margin": 2.0, "_source": str(path), "_line": 1}


def test_preference_implicit_prompt(tmp_path):
    """TRL implicit prompt: chosen/rejected are full conversations; their common prefix is the prompt."""
    prefix = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    path = write_jsonl(tmp_path, [
        {"chosen": prefix + [{"role": "assistant", "content": "good"}],
         "rejected": prefix + [{"role": "assistant", "content": "bad"}]},
    ])
    (ex,), _ = load_examples(str(path), "preference")
    assert (ex["prompt"], ex["chosen"], ex["rejected"]) == (prefix, "good", "bad")


def test_preference_implicit_prompt_errors(tmp_path):
    path = write_jsonl(tmp_path, [{"chosen": "good", "rejected": "bad"}])
    with pytest.raises(DataError, match=where(path, 1, "prompt") + "missing required field"):
        load_examples(str(path), "preference")
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = write_jsonl(tmp_path, [{"chosen": conv, "rejected": conv}])
    with pytest.raises(DataError, match=where(path, 1, "rejected") + "chosen and rejected conversations"):
        load_examples(str(path), "preference")


def test_ranking_expands_to_pairs(tmp_path):
    """responses [a, b, c] with ranking [2, 1, 3] (1 = best) -> order b > a > c.

    K-choose-2 in index order: (0,1) -> (b, a); (0,2) -> (a, c); (1,2) -> (b, c).
    Second record ranking [1, 1, 2]: the tie (0,1) gives no pair -> (x, z), (y, z).
    """
    path = write_jsonl(tmp_path, [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 1, 3], "src": "h"},
        {"prompt": "p2", "responses": ["x", "y", "z"], "ranking": [1, 1, 2]},
    ])
    examples, stats = load_examples(str(path), "preference")
    pairs = [(e["chosen"], e["rejected"], e["group"]) for e in examples]
    assert pairs == [("b", "a", 0), ("a", "c", 0), ("b", "c", 0), ("x", "z", 1), ("y", "z", 1)]
    assert all(e["src"] == "h" for e in examples[:3])
    assert "responses" not in examples[0] and "ranking" not in examples[0]
    assert (stats.n_read, stats.n_kept, stats.n_pairs_from_rankings) == (2, 2, 5)


def test_kto_prompt_stepwise(tmp_path):
    path = write_jsonl(tmp_path, [GOOD["kto"]])
    (ex,), _ = load_examples(str(path), "kto")
    assert (ex["prompt"], ex["completion"], ex["label"]) == ([{"role": "user", "content": "hi"}], "hello", True)
    path = write_jsonl(tmp_path, [GOOD["prompt"]])
    (ex,), _ = load_examples(str(path), "prompt")
    assert ex == {"prompt": [{"role": "user", "content": "hi"}], "answer": "4", "_source": str(path), "_line": 1}
    path = write_jsonl(tmp_path, [GOOD["stepwise"]])
    (ex,), _ = load_examples(str(path), "stepwise")
    assert (ex["steps"], ex["labels"]) == (["1+1=2", "2+1=3"], [True, True])


# ================================================================ formats: bad records
BAD = [
    ("sft", {"prompt": "a"}, "completion", "missing required field"),
    ("sft", {"prompt": "a", "completion": "   "}, "completion", "expected a non-empty string, got an empty"),
    ("sft", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages[1].role",
     "expected the last message to be 'assistant', got 'user'"),
    ("sft", {"text": "a"}, None, "matches no SFT format; expected {\"prompt\", \"completion\"} or {\"messages\""),
    ("preference", {"prompt": "a", "chosen": 3, "rejected": "b"}, "chosen",
     "expected a non-empty string or a list with one assistant message, got int"),
    ("preference", {"prompt": "a", "chosen": "b", "rejected": " \n"}, "rejected", "expected a non-empty string"),
    ("preference", {"prompt": "a", "chosen": "b", "rejected": "b"}, "rejected", "identical to chosen"),
    ("preference", {"prompt": [{"role": "bot", "content": "a"}], "chosen": "b", "rejected": "c"}, "prompt[0].role",
     "expected one of system, user, assistant, got 'bot'"),
    ("preference", {"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}, "prompt[0].content",
     "missing required field"),
    ("preference", {"prompt": "a", "chosen": "b", "rejected": "c", "margin": "1.5"}, "margin",
     "expected a number, got str '1.5'"),
    ("preference", {"prompt": "a", "responses": ["x", "y", "z"], "ranking": [1, 2]}, "ranking",
     "expected one rank per response (3), got 2 ranks"),
    ("preference", {"prompt": "a", "responses": ["x", "y"], "ranking": [1, "2"]}, "ranking[1]",
     "expected an integer rank (1 = best), got str '2'"),
    ("preference", {"prompt": "a", "responses": ["x"], "ranking": [1]}, "responses",
     "expected a list of at least 2 responses, got 1 responses"),
    ("preference", {"prompt": "a", "responses": ["x", "y"], "ranking": [1, 1]}, "ranking", "all responses are tied"),
    ("preference", {"text": "a"}, None, "matches no preference format; expected"),
    ("kto", {"prompt": "a", "completion": "b", "label": 1}, "label", "expected a bool"),
    ("kto", {"prompt": "a", "completion": "b"}, "label", "missing required field"),
    ("prompt", {"question": "a"}, "prompt", "missing required field"),
    ("prompt", {"prompt": 5}, "prompt", "expected a non-empty string or a list of messages, got int"),
    ("stepwise", {"prompt": "a", "steps": ["s1", "s2"], "labels": [True]}, "labels",
     "expected one label per step (2 steps), got 1 labels"),
]


@pytest.mark.parametrize("kind,record,field,what", BAD, ids=[f"{k}-{f}-{i}" for i, (k, _, f, _w) in enumerate(BAD)])
def test_bad_record_names_file_line_field(tmp_path, kind, record, field, what):
    path = write_jsonl(tmp_path, [GOOD[kind], "", record])  # the bad record is on line 3
    with pytest.raises(DataError, match=where(path, 3, field) + re.escape(what)) as info:
        load_examples(str(path), kind)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 3, field)


def test_no_format_lists_accepted_formats(tmp_path):
    path = write_jsonl(tmp_path, [{"text": "a"}])
    with pytest.raises(DataError, match=r"implicit prompt\) or \{\"prompt\", \"responses\""):
        load_examples(str(path), "preference")


def test_on_error_skip_counts_and_limit(tmp_path):
    good = GOOD["preference"]
    rows = [good, {"prompt": "a", "chosen": 1, "rejected": "b"}, good, {"prompt": "a"}, good]
    path = write_jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=where(path, 2, "chosen")):
        load_examples(str(path), "preference")
    examples, stats = load_examples(str(path), "preference", on_error="skip")
    assert (stats.n_read, stats.n_kept, stats.n_skipped) == (5, 3, 2)
    assert [e["_line"] for e in examples] == [1, 3, 5]
    assert re.match(where(path, 2, "chosen"), stats.skipped_reasons[0])
    assert re.match(where(path, 4) + "matches no preference format", stats.skipped_reasons[1])
    assert "skipped 2 malformed" in stats.summary()
    # limit applies after validation: skipped records do not count, a later bad record still raises
    limited, _ = load_examples(str(path), "preference", on_error="skip", limit=2)
    assert [e["_line"] for e in limited] == [1, 3]
    with pytest.raises(DataError, match=where(path, 2, "chosen")):
        load_examples(str(path), "preference", limit=1)


def test_limit_keeps_all_pairs_of_a_ranking(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2, 3]}, GOOD["preference"]])
    examples, _ = load_examples(str(path), "preference", limit=1)
    assert [e["group"] for e in examples] == [0, 0, 0]


def test_empty_file_and_all_skipped(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: contains no records")):
        load_examples(str(path), "sft")
    path = write_jsonl(tmp_path, [{"prompt": "a"}], name="bad.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{path}: has no valid sft examples (1 of 1 records skipped")):
        load_examples(str(path), "sft", on_error="skip")


# ================================================================ tokenisation
def sft_example(prompt="hi", completion="hello", line=1, source="d.jsonl"):
    return {"prompt": [{"role": "user", "content": prompt}], "completion": completion,
            "_source": source, "_line": line}


def test_render_prompt_chat_template_and_system(tok):
    msgs = [{"role": "user", "content": "hi"}]
    assert render_prompt(tok, msgs, None) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, msgs, "be kind") == (
        "<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    own = [{"role": "system", "content": "mine"}, *msgs]
    assert render_prompt(tok, own, "be kind").startswith("<|im_start|>system\nmine<|im_end|>")


def test_render_prompt_fallback_without_template():
    plain = tiny_tokenizer()
    plain.chat_template = None
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert render_prompt(plain, msgs, None) == "s\n\nq\n\n"
    assert render_prompt(plain, msgs[1:], "sys") == "sys\n\nq\n\n"


def test_tokenize_sft_exact_split_and_eos(tok):
    """Prompt 'hi' renders to '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n' = 21 tokens
    (3 special + 18 characters); response 'hello' + eos = 6 tokens, the last one id 2."""
    (out,), stats = tokenize_sft([sft_example()], tok, DataConfig(max_length=64))
    ids, mask = out["input_ids"], out["response_mask"]
    assert len(ids) == 27 and mask == [0] * 21 + [1] * 6
    prompt_text = render_prompt(tok, [{"role": "user", "content": "hi"}], None)
    assert ids[:21] == tok(prompt_text, add_special_tokens=False)["input_ids"]
    response = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(response) == "hello<|im_end|>"
    assert response[-1] == tok.eos_token_id == 2
    assert (stats.n_examples, stats.prompts_truncated, stats.responses_truncated) == (1, 0, 0)
    assert (stats.max_prompt_tokens, stats.max_total_tokens) == (21, 27)


def test_left_truncation_keeps_prompt_tail(tok):
    """max_prompt_length 5 keeps the last 5 of the 21 prompt tokens; the prompt ends '...assistant\\n',
    one character per token, so the kept tail decodes to 'tant\\n'."""
    cfg = DataConfig(max_length=64, max_prompt_length=5)
    (out,), stats = tokenize_sft([sft_example()], tok, cfg)
    assert tok.decode(out["input_ids"][:5]) == "tant\n"
    assert out["response_mask"] == [0] * 5 + [1] * 6
    assert (stats.prompts_truncated, stats.responses_truncated, stats.max_prompt_tokens) == (1, 0, 21)
    assert "1 prompts truncated (left)" in stats.summary()


def test_right_truncation_of_response_counted(tok):
    """max_length 24 leaves 24 - 21 = 3 response tokens: 'hel', and no EOS."""
    (out,), stats = tokenize_sft([sft_example()], tok, DataConfig(max_length=24))
    response = [t for t, m in zip(out["input_ids"], out["response_mask"]) if m]
    assert tok.decode(response) == "hel" and tok.eos_token_id not in response
    assert (stats.responses_truncated, stats.max_total_tokens) == (1, 27)
    assert "1 responses truncated (right)" in stats.summary()


def test_prompt_leaves_no_room_error_and_skip(tok):
    cfg = DataConfig(max_length=21)
    with pytest.raises(DataError, match=where("d.jsonl", 4, "prompt") + re.escape(
        "prompt leaves no room for the response (21 prompt tokens, max_length 21); set data.max_prompt_length")):
        tokenize_sft([sft_example(line=4)], tok, cfg)
    cfg = DataConfig(max_length=21, on_error="skip")
    out, stats = tokenize_sft([sft_example(line=4), sft_example(prompt="h", line=5)], tok, cfg)
    assert len(out) == 1 and (stats.n_examples, stats.n_skipped) == (1, 1)
    assert out[0]["response_mask"] == [0] * 20 + [1]  # 20-token prompt, one response token left


def test_tokenize_pair_helper():
    ids, mask, cut = tokenize_pair(None, [5, 6], [7, 8, 9], max_length=4)
    assert (ids, mask, cut) == ([5, 6, 7, 8], [0, 0, 1, 1], True)
    assert tokenize_pair(None, [5], [7], 4) == ([5, 7], [0, 1], False)
    with pytest.raises(ValueError, match="no room"):
        tokenize_pair(None, [5, 6], [7], 2)


def test_tokenize_preference(tok):
    ex = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no!", "group": 3,
          "_source": "d.jsonl", "_line": 1}
    (out,), stats = tokenize_preference([ex], tok, DataConfig(max_length=64))
    assert out["chosen_input_ids"][:21] == out["rejected_input_ids"][:21]
    assert out["chosen_response_mask"] == [0] * 21 + [1] * 4
    assert tok.decode(out["rejected_input_ids"][21:]) == "no!<|im_end|>"
    assert (out["group"], out["margin"]) == (3, 0.0)
    assert out["prompt_text"] == render_prompt(tok, ex["prompt"], None)
    (out,), _ = tokenize_preference([{**ex, "margin": 1.5}], tok, DataConfig(max_length=64))
    assert out["margin"] == 1.5
    assert stats.max_total_tokens == 25


def test_tokenize_kto_and_prompts(tok):
    ex = {**sft_example(), "label": False}
    (out,), _ = tokenize_kto([ex], tok, DataConfig(max_length=64))
    assert out["label"] is False
    assert out["input_ids"] == out["prompt_input_ids"] + out["completion_input_ids"]
    assert tok.decode(out["completion_input_ids"]) == "hello<|im_end|>"
    (p,), _ = tokenize_prompts([{"prompt": ex["prompt"], "answer": "4", "_source": "d", "_line": 1}], tok,
                               DataConfig(max_length=64, system_prompt="sys"))
    # the record's own fields, plus the prompt as messages (system prompt included) for reward models
    assert p["extras"] == {"answer": "4", "prompt_messages": [{"role": "system", "content": "sys"}, *ex["prompt"]]}
    assert p["prompt_text"].startswith("<|im_start|>system\nsys<|im_end|>")
    assert p["prompt_input_ids"] == tok(p["prompt_text"], add_special_tokens=False)["input_ids"]


# ================================================================ collators
def test_pad_sequences_left_and_right():
    seqs = [[1, 2, 3], [4]]
    assert_close(pad_sequences(seqs, 0), torch.tensor([[1, 2, 3], [4, 0, 0]]))
    assert_close(pad_sequences(seqs, 9, "left"), torch.tensor([[1, 2, 3], [9, 9, 4]]))
    with pytest.raises(ValueError, match="side must be 'left' or 'right', got 'up'"):
        pad_sequences(seqs, 0, "up")


def test_collate_sft():
    batch = collate_sft([{"input_ids": [5, 6, 7], "response_mask": [0, 1, 1]},
                         {"input_ids": [8, 9], "response_mask": [0, 1]}], pad_token_id=0)
    assert_close(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 9, 0]]))
    assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert_close(batch["response_mask"], torch.tensor([[0, 1, 1], [0, 1, 0]]))
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate_sft([], None)


def test_collate_preference_order_and_padding():
    """Rows 0..B-1 chosen, B..2B-1 rejected, one length T = 5 (longest is rejected of pair 1), pad 0."""
    examples = [
        {"chosen_input_ids": [5, 6, 7], "chosen_response_mask": [0, 1, 1],
         "rejected_input_ids": [5, 6], "rejected_response_mask": [0, 1], "group": 0, "margin": 0.0},
        {"chosen_input_ids": [8, 9], "chosen_response_mask": [0, 1],
         "rejected_input_ids": [8, 9, 10, 11, 12], "rejected_response_mask": [0, 1, 1, 1, 1], "group": 0,
         "margin": 2.5},
    ]
    batch = collate_preference(examples, pad_token_id=0)
    assert_close(batch["input_ids"], torch.tensor([
        [5, 6, 7, 0, 0], [8, 9, 0, 0, 0],  # chosen
        [5, 6, 0, 0, 0], [8, 9, 10, 11, 12],  # rejected
    ]))
    assert_close(batch["attention_mask"], torch.tensor([
        [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]))
    assert_close(batch["response_mask"], torch.tensor([
        [0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 1, 1]]))
    assert_close(batch["margin"], torch.tensor([0.0, 2.5]))
    assert_close(batch["group"], torch.tensor([0, 0]))


def test_collate_prompts_left_padding():
    batch = collate_prompts([{"prompt_input_ids": [5, 6, 7], "extras": {"answer": "1"}},
                             {"prompt_input_ids": [8], "extras": {"answer": "2"}}], pad_token_id=0)
    assert_close(batch["input_ids"], torch.tensor([[5, 6, 7], [0, 0, 8]]))
    assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1]]))
    assert batch["extras"] == [{"answer": "1"}, {"answer": "2"}]


def test_end_to_end_file_to_batch(tmp_path, tok):
    """JSONL -> validated -> tokenised -> collated: response tokens of row 0 decode to completion + EOS."""
    path = write_jsonl(tmp_path, [{"prompt": "hi", "chosen": "yes", "rejected": "no"}])
    examples, _ = load_examples(str(path), "preference")
    tokenised, _ = tokenize_preference(examples, tok, DataConfig(max_length=64))
    batch = collate_preference(tokenised, tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 25)
    chosen = batch["input_ids"][0][batch["response_mask"][0].bool()].tolist()
    rejected = batch["input_ids"][1][batch["response_mask"][1].bool()].tolist()
    assert (tok.decode(chosen), tok.decode(rejected)) == ("yes<|im_end|>", "no<|im_end|>")
    assert batch["input_ids"][1, -1].item() == tok.pad_token_id == 0


def test_split_train_eval_holds_out_a_seeded_fraction():
    """10 examples, eval_fraction 0.2 -> 2 held out (original order kept on both sides), the same for the same
    seed; no split with an eval file, a fraction of 0, or a single example."""
    from alignkit.data.pipeline import split_train_eval

    examples = list(range(10))
    data = DataConfig(eval_fraction=0.2)
    train, held = split_train_eval(examples, data, seed=0)
    assert len(held) == 2 and sorted(train + held) == examples
    assert train == sorted(train) and held == sorted(held)
    assert split_train_eval(examples, data, seed=0) == (train, held)
    assert any(split_train_eval(examples, data, seed=s)[1] != held for s in range(1, 6))
    assert split_train_eval(examples, DataConfig(eval_fraction=0.2, eval="x.jsonl"), 0) == (examples, [])
    assert split_train_eval(examples, DataConfig(eval_fraction=0.0), 0) == (examples, [])
    assert split_train_eval([7], data, 0) == ([7], [])
