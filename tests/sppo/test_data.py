"""Tests of `sppo/data.py`: loading, rendering and checking prompts, and the round split.

Every kind of bad row is checked in both modes: `skip` keeps the good rows and reports the bad
one with its index and reason; `error` raises a DataError naming them. Files are written here;
the tokenizer is the tiny one built by `sppo.tiny`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sppo.config import DataConfig
from sppo.data import BadRow, DataError, PromptSet, load_prompts, split_rounds
from sppo.records import Prompt

REPO = Path(__file__).resolve().parents[2]
GOOD_1 = {"id": "g1", "prompt": "explain why the sky is blue"}
GOOD_2 = {"id": "g2", "prompt": "write a short poem about the sea"}


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache of local files under the test's tmp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (dumped) or raw strings (written as the line itself)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def cfg_for(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


# --------------------------------------------------------------------------- bad rows

# (case, the middle line of a 3-line file, config fields, expected BadRow.id, reason fragment)
BAD_PROMPT_ROWS = [
    ("missing-column", {"id": "m", "text": "hello"}, {}, "m", "missing column 'prompt'"),
    ("none", {"id": "m", "prompt": None}, {}, "m", "'prompt' is null"),
    ("non-string-int", {"id": "m", "prompt": 7}, {}, "m", "'prompt' is not a string (got int"),
    ("non-string-list", {"id": "m", "prompt": ["hi"]}, {}, "m", "not a string (got list"),
    ("empty", {"id": "m", "prompt": ""}, {}, "m", "'prompt' is empty"),
    ("whitespace", {"id": "m", "prompt": " \n\t "}, {}, "m", "'prompt' is whitespace-only"),
    ("too-long", {"id": "m", "prompt": "the sky " * 40}, {"max_prompt_length": 30}, "m",
     "tokens after the chat template, over data.max_prompt_length=30"),
    ("duplicate-id", {"id": "g1", "prompt": "say hello"}, {}, "g1", "duplicate id 'g1'"),
    ("missing-id", {"prompt": "say hello"}, {}, None, "id column 'id' is missing or null"),
    ("non-string-bool", {"id": "m", "prompt": True}, {}, "m", "not a string (got bool: True)"),
    ("non-string-dict", {"id": "m", "prompt": {"text": "hi"}}, {}, "m",
     "not a string (got dict: {'text': 'hi'})"),
    # NBSP, ideographic space, em space: Unicode whitespace counts as whitespace.
    ("unicode-whitespace", {"id": "m", "prompt": "\u00a0\u3000\u2003"}, {}, "m",
     "'prompt' is whitespace-only"),
    # Zero-width spaces, or NULs and a bell: nothing the model could read.
    ("invisible-only", {"id": "m", "prompt": "\u200b \u200b"}, {}, "m",
     "'prompt' has no visible characters"),
    ("control-only", {"id": "m", "prompt": "\x00\x07"}, {}, "m",
     "'prompt' has no visible characters"),
    ("id-float", {"id": 1.5, "prompt": "hi"}, {}, None,
     "id column 'id' must be a string or integer (got float)"),
    ("id-bool", {"id": True, "prompt": "hi"}, {}, None,
     "id column 'id' must be a string or integer (got bool)"),
    ("id-object", {"id": {"n": 1}, "prompt": "hi"}, {}, None,
     "id column 'id' must be a string or integer (got dict)"),
    ("id-empty", {"id": "", "prompt": "hi"}, {}, None, "id column 'id' is empty"),
    ("id-whitespace", {"id": " \t", "prompt": "hi"}, {}, None,
     "id column 'id' is whitespace-only"),
    ("invalid-json", '{"id": "m", "prompt": "hi",}', {}, None, "invalid JSON"),
    ("not-an-object", '["a", "list"]', {}, None, "expected a JSON object, got list"),
]

BAD_MESSAGE_ROWS = [
    ("none", None, "'messages' is null"),
    ("not-a-list", "hello", "must be a list of {role, content} (got str)"),
    ("empty-list", [], "is an empty list"),
    ("not-a-dict", ["hello"], "message 0 must be {role: str, content: str}"),
    ("no-content", [{"role": "user"}], "message 0 must be"),
    ("content-not-string", [{"role": "user", "content": 3}], "message 0 must be"),
    ("role-not-string", [{"role": None, "content": "hi"}], "message 0 must be"),
    ("ends-with-assistant", [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}],
     "the last message must be from the user (got role 'assistant')"),
    ("empty-user-turn", [{"role": "user", "content": "  "}],
     "the last user message is whitespace-only"),
]


def _bad_prompt_file(tmp_path, middle) -> Path:
    return write_jsonl(tmp_path / "p.jsonl", [GOOD_1, middle, GOOD_2])


@pytest.mark.parametrize("case,middle,fields,bad_id,reason", BAD_PROMPT_ROWS,
                         ids=[c[0] for c in BAD_PROMPT_ROWS])
def test_bad_row_skipped_and_reported(tmp_path, tok, caplog, case, middle, fields, bad_id,
                                      reason):
    path = _bad_prompt_file(tmp_path, middle)
    with caplog.at_level(logging.WARNING, logger="sppo.data"):
        ps = load_prompts(cfg_for(path, id_column="id", **fields), tok)
    assert [p.id for p in ps.prompts] == ["g1", "g2"]  # the others are kept, in order
    assert ps.total_rows == 3
    assert len(ps.bad_rows) == 1
    bad = ps.bad_rows[0]
    assert (bad.index, bad.line, bad.id) == (1, 2, bad_id)
    assert reason in bad.reason
    # The skip is not silent: a warning names the file, the row and the reason.
    assert str(path) in caplog.text and "row 1 (line 2)" in caplog.text and reason in caplog.text
    assert "1 bad row(s) skipped" in ps.summary()


@pytest.mark.parametrize("case,middle,fields,bad_id,reason", BAD_PROMPT_ROWS,
                         ids=[c[0] for c in BAD_PROMPT_ROWS])
def test_bad_row_raises_in_error_mode(tmp_path, tok, case, middle, fields, bad_id, reason):
    path = _bad_prompt_file(tmp_path, middle)
    with pytest.raises(DataError) as err:
        load_prompts(cfg_for(path, id_column="id", on_bad_row="error", **fields), tok)
    msg = str(err.value)
    assert str(path) in msg and "row 1 (line 2)" in msg and reason in msg
    assert [b.index for b in err.value.bad_rows] == [1]


def test_too_long_reports_length_and_limit(tmp_path, tok):
    prompt = "the sky " * 40
    n = len(tok(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                        add_generation_prompt=True),
                add_special_tokens=False)["input_ids"])
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt}, GOOD_1])
    ps = load_prompts(cfg_for(path, max_prompt_length=n - 1), tok)
    assert ps.bad_rows[0].reason.startswith(f"prompt is {n} tokens")
    assert f"max_prompt_length={n - 1}" in ps.bad_rows[0].reason
    # Exactly at the limit is fine.
    assert len(load_prompts(cfg_for(path, max_prompt_length=n), tok).prompts) == 2


@pytest.mark.parametrize("case,messages,reason", BAD_MESSAGE_ROWS,
                         ids=[c[0] for c in BAD_MESSAGE_ROWS])
@pytest.mark.parametrize("mode", ["skip", "error"])
def test_malformed_messages(tmp_path, tok, case, messages, reason, mode):
    good = {"messages": [{"role": "user", "content": "hello there"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [good, {"messages": messages}, good])
    cfg = cfg_for(path, messages_column="messages", on_bad_row=mode)
    if mode == "error":
        with pytest.raises(DataError, match=r"row 1 \(line 2\)") as err:
            load_prompts(cfg, tok)
        assert reason in str(err.value)
        return
    ps = load_prompts(cfg, tok)
    assert [p.id for p in ps.prompts] == ["row-0", "row-2"]
    assert [(b.index, b.id) for b in ps.bad_rows] == [(1, "row-1")]
    assert reason in ps.bad_rows[0].reason


def test_chat_template_errors_are_bad_rows(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(tiny_llama_dir)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('only user and assistant roles') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}")
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]},
    ])
    ps = load_prompts(cfg_for(path, messages_column="messages"), strict)
    assert len(ps.prompts) == 1
    assert "chat template rejected them: only user and assistant roles" in ps.bad_rows[0].reason


def test_truncated_last_line(tmp_path, tok):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD_1) + "\n" + json.dumps(GOOD_2) + "\n" + '{"id": "g3", "pro')
    ps = load_prompts(cfg_for(path, id_column="id"), tok)
    assert [p.id for p in ps.prompts] == ["g1", "g2"]
    (bad,) = ps.bad_rows
    assert (bad.index, bad.line) == (2, 3)
    assert "invalid JSON" in bad.reason and "truncated" in bad.reason
    with pytest.raises(DataError, match=r"(?s)t\.jsonl.*row 2 \(line 3\).*truncated"):
        load_prompts(cfg_for(path, id_column="id", on_bad_row="error"), tok)


@pytest.mark.parametrize("mode", ["skip", "error"])
def test_non_utf8_bytes_are_a_data_error(tmp_path, tok, mode):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD_1).encode() + b"\n"
                     + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: line 2 is not valid UTF-8 \(byte 0xe9\)"):
        load_prompts(cfg_for(path, on_bad_row=mode), tok)


def test_duplicate_ids_compare_as_strings(tmp_path, tok):
    """An integer id and the same digits as a string are one id: the later row is the
    duplicate, named with the id and its line."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": 7, "prompt": "hi"}, GOOD_1,
                                              {"id": "7", "prompt": "yo"}])
    ps = load_prompts(cfg_for(path, id_column="id"), tok)
    assert [p.id for p in ps.prompts] == ["7", "g1"]
    (bad,) = ps.bad_rows
    assert (bad.index, bad.line, bad.id) == (2, 3, "7")
    assert "duplicate id '7'" in bad.reason


def test_duplicate_of_a_bad_row_is_reported_too(tmp_path, tok):
    """The first row with an id is bad (empty prompt) and a later one reuses the id: both are
    reported, each with its own reason, and neither becomes a prompt (ids must be unique in
    the file, not only among the good rows)."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": ""}, GOOD_1,
                                              {"id": "a", "prompt": "hi"}])
    ps = load_prompts(cfg_for(path, id_column="id"), tok)
    assert [p.id for p in ps.prompts] == ["g1"]
    assert [(b.index, b.id) for b in ps.bad_rows] == [(0, "a"), (2, "a")]
    assert "'prompt' is empty" in ps.bad_rows[0].reason
    assert "duplicate id 'a'" in ps.bad_rows[1].reason


def test_visible_text_with_invisible_characters_is_kept(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi\u200b there"}, {"prompt": " x "}])
    ps = load_prompts(cfg_for(path), tok)
    assert ps.bad_rows == [] and [p.raw for p in ps.prompts] == ["hi\u200b there", " x "]


def test_blank_lines_are_not_rows_and_line_numbers_stay_right(tmp_path, tok):
    path = tmp_path / "b.jsonl"
    path.write_text("\n" + json.dumps(GOOD_1) + "\n\n   \n" + '{"prompt": ""}\n\n')
    ps = load_prompts(cfg_for(path), tok)
    assert ps.total_rows == 2
    assert [p.id for p in ps.prompts] == ["row-0"]
    assert (ps.bad_rows[0].index, ps.bad_rows[0].line) == (1, 5)


def test_unicode_line_separator_inside_a_string_is_not_a_line_break(tmp_path, tok):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": "one\u2028two"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    ps = load_prompts(cfg_for(path), tok)
    assert ps.bad_rows == [] and ps.prompts[0].raw == "one\u2028two"


def test_error_mode_lists_every_bad_row_before_returning(tmp_path, tok):
    rows = [GOOD_1, {"prompt": None}, GOOD_2, {"prompt": 3}, "{not json", {"prompt": " "}]
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_prompts(cfg_for(path, on_bad_row="error"), tok)
    msg = str(err.value)
    assert "4 bad row(s) of 6" in msg
    for fragment in ("row 1 (line 2)", "is null", "row 3 (line 4)", "not a string",
                     "row 4 (line 5)", "invalid JSON", "row 5 (line 6)", "whitespace-only"):
        assert fragment in msg
    assert [b.index for b in err.value.bad_rows] == [1, 3, 4, 5]


def test_summary_lists_the_first_rows_and_counts_the_rest(tmp_path, tok):
    path = write_jsonl(tmp_path / "s.jsonl", [GOOD_1] + [{"prompt": ""}] * 15)
    ps = load_prompts(cfg_for(path), tok)
    text = ps.summary(max_listed=10)
    assert text.startswith(f"1 prompts from 16 rows of {path}; 15 bad row(s) skipped")
    assert "row 10 (line 11)" in text and "row 11 (line 12)" not in text
    assert "... and 5 more" in text


def test_several_problems_in_one_row_are_all_named(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_1, {"id": "g1", "prompt": ""}])
    (bad,) = load_prompts(cfg_for(path, id_column="id"), tok).bad_rows
    assert "duplicate id 'g1'" in bad.reason and "'prompt' is empty" in bad.reason


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ""}, "{oops"])
    with pytest.raises(DataError, match=r"no usable prompts.*0 prompts from 2 rows"):
        load_prompts(cfg_for(path), tok)


def test_empty_file_is_an_error(tmp_path, tok):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_prompts(cfg_for(path), tok)


@pytest.mark.parametrize("fields,column", [({"prompt_column": "question"}, "question"),
                                           ({"id_column": "uid"}, "uid"),
                                           ({"messages_column": "chat"}, "chat")])
def test_a_column_absent_from_every_row_is_one_clear_error(tmp_path, tok, fields, column):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_1, GOOD_2])
    with pytest.raises(DataError, match=f"column '{column}' not found in any row; "
                                        r"columns: \['id', 'prompt'\]"):
        load_prompts(cfg_for(path, **fields), tok)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.json", "missing.parquet",
                                  "sub/dir/missing.jsonl"])
def test_missing_local_file_names_the_path(tmp_path, tok, name):
    path = tmp_path / name
    with pytest.raises(DataError, match="data file not found") as err:
        load_prompts(cfg_for(path), tok)
    assert str(path) in str(err.value)


def test_missing_relative_path_names_the_path(tok):
    with pytest.raises(DataError, match=r"data file not found: '\./nowhere/prompts' "
                                        r"\(looked for '/.*/nowhere/prompts'\)"):
        load_prompts(DataConfig(path="./nowhere/prompts"), tok)


def test_unreachable_dataset_name_is_a_data_error(tok, hf_cache, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load dataset 'someone/no-such-prompts'"):
        load_prompts(DataConfig(path="someone/no-such-prompts"), tok)


# --------------------------------------------------------------------------- rendering


def test_chat_template_applied_and_tokenized_once(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_1])
    (p,) = load_prompts(cfg_for(path), tok).prompts
    expected = tok.apply_chat_template([{"role": "user", "content": GOOD_1["prompt"]}],
                                       tokenize=False, add_generation_prompt=True)
    assert p.text == expected
    assert p.text.startswith("<|user|>\n") and p.text.endswith("<|assistant|>\n")
    assert p.raw == GOOD_1["prompt"]
    assert list(p.token_ids) == tok(expected, add_special_tokens=False)["input_ids"]
    assert p.id == "row-0" and p.reference is None


def _tokenizer_with_bos(tiny_llama_dir):
    """The tiny tokenizer made to behave like Llama's: the tokenizer adds a BOS and the chat
    template writes one too. `<|system|>` stands in for the BOS token."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_llama_dir)
    bos_id = t.convert_tokens_to_ids("<|system|>")
    t.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|system|> $A", special_tokens=[("<|system|>", bos_id)])
    t.chat_template = "<|system|>" + t.chat_template
    assert t("hi")["input_ids"][0] == bos_id  # the stand-in works
    return t, bos_id


def test_special_tokens_are_not_added_twice(tmp_path, tiny_llama_dir):
    t, bos_id = _tokenizer_with_bos(tiny_llama_dir)
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_1])
    (p,) = load_prompts(cfg_for(path), t).prompts
    assert p.token_ids[0] == bos_id and p.token_ids.count(bos_id) == 1
    # Without the template, the tokenizer's own special tokens are the only ones: added once.
    (plain,) = load_prompts(cfg_for(path, use_chat_template=False), t).prompts
    assert plain.text == plain.raw == GOOD_1["prompt"]
    assert plain.token_ids[0] == bos_id and plain.token_ids.count(bos_id) == 1


def test_messages_column_renders_the_conversation(tmp_path, tok):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "tell me a story"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages, "prompt": "ignored"}])
    (p,) = load_prompts(cfg_for(path, messages_column="messages"), tok).prompts
    assert p.text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert p.raw == "tell me a story"  # the final user turn, for display and judges
    assert list(p.token_ids) == tok(p.text, add_special_tokens=False)["input_ids"]


def test_messages_need_the_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="messages_column needs data.use_chat_template"):
        load_prompts(cfg_for(path, messages_column="messages", use_chat_template=False), tok)


def test_tokenizer_without_a_chat_template_is_a_clear_error(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_llama_dir)
    t.chat_template = None
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_1])
    with pytest.raises(DataError, match="no chat template.*use_chat_template=false"):
        load_prompts(cfg_for(path), t)
    assert len(load_prompts(cfg_for(path, use_chat_template=False), t).prompts) == 1


def test_integer_ids_become_strings(tmp_path, tok):
    rows = [{"id": 7, "prompt": "hi"}, {"id": "x", "prompt": "yo"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ps = load_prompts(cfg_for(path, id_column="id"), tok)
    assert [p.id for p in ps.prompts] == ["7", "x"]


# --------------------------------------------------------------------------- datasets formats


def test_parquet_through_datasets(tmp_path, tok, hf_cache):
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({
        "uid": ["a", "b", "c", "a"],
        "prompt": ["explain why the sky is blue", None, "write a poem", "a duplicate"],
    }).to_parquet(str(path))
    ps = load_prompts(cfg_for(path, id_column="uid"), tok)
    assert [p.id for p in ps.prompts] == ["a", "c"]
    assert [(b.index, b.id, b.line) for b in ps.bad_rows] == [(1, "b", None), (3, "a", None)]
    assert "is null" in ps.bad_rows[0].reason and "duplicate id 'a'" in ps.bad_rows[1].reason
    assert ps.source == str(path)


def test_parquet_messages_through_datasets(tmp_path, tok, hf_cache):
    import datasets

    path = tmp_path / "m.parquet"
    datasets.Dataset.from_dict({"messages": [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    ]}).to_parquet(str(path))
    ps = load_prompts(cfg_for(path, messages_column="messages"), tok)
    assert [p.raw for p in ps.prompts] == ["hi"]
    assert "last message must be from the user" in ps.bad_rows[0].reason


def test_parquet_missing_column_lists_the_columns(tmp_path, tok, hf_cache):
    import datasets

    path = tmp_path / "q.parquet"
    datasets.Dataset.from_dict({"question": ["hi"], "answer": ["yo"]}).to_parquet(str(path))
    with pytest.raises(DataError, match=r"column 'prompt' not found in any row; "
                                        r"columns: \['answer', 'question'\]"):
        load_prompts(cfg_for(path), tok)
    (p,) = load_prompts(cfg_for(path, prompt_column="question"), tok).prompts
    assert p.raw == "hi"


def test_json_array_through_datasets(tmp_path, tok, hf_cache):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([GOOD_1, {"id": "g2", "prompt": ""}, {"id": "g3", "prompt": "hi"}]))
    ps = load_prompts(cfg_for(path, id_column="id"), tok)
    assert [p.id for p in ps.prompts] == ["g1", "g3"]
    assert [(b.index, b.id) for b in ps.bad_rows] == [(1, "g2")]
    with pytest.raises(DataError, match=r"row 1 id='g2': column 'prompt' is empty"):
        load_prompts(cfg_for(path, id_column="id", on_bad_row="error"), tok)


@pytest.mark.parametrize("mode", ["skip", "error"])
def test_non_utf8_json_file_names_the_line(tmp_path, tok, hf_cache, mode):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"prompt": "hi"},\n {"prompt": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"latin1\.json: line 2 is not valid UTF-8 \(byte 0xe9\)"):
        load_prompts(cfg_for(path, on_bad_row=mode), tok)


def test_truncated_parquet_names_the_file_and_the_cause(tmp_path, tok, hf_cache):
    import datasets

    path = tmp_path / "cut.parquet"
    datasets.Dataset.from_dict({"prompt": ["hello there"] * 50}).to_parquet(str(path))
    path.write_bytes(path.read_bytes()[:200])  # as if a copy stopped half way
    with pytest.raises(DataError, match=r"cannot load .*cut\.parquet") as err:
        load_prompts(cfg_for(path), tok)
    assert "Parquet" in str(err.value)  # pyarrow's reason, not only a wrapper's


def test_broken_json_file_names_the_file(tmp_path, tok, hf_cache):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "hi"}, {"prompt": ')
    with pytest.raises(DataError, match=r"cannot load .*broken\.json"):
        load_prompts(cfg_for(path), tok)


# --------------------------------------------------------------------------- demo data


def test_demo_prompts_load_cleanly(tok):
    path = REPO / "data" / "demo_prompts.jsonl"
    ps = load_prompts(DataConfig(path=str(path)), tok)
    assert isinstance(ps, PromptSet) and ps.bad_rows == []
    assert 100 <= len(ps.prompts) == ps.total_rows <= 200
    assert max(len(p.token_ids) for p in ps.prompts) <= 40
    with_ids = load_prompts(DataConfig(path=str(path), id_column="id", on_bad_row="error"), tok)
    assert with_ids.prompts[0].id == "demo-0001"
    assert len({p.raw for p in ps.prompts}) == len(ps.prompts)  # no repeated prompts


# --------------------------------------------------------------------------- split_rounds


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(id=f"p{i}", text=f"t{i}", token_ids=(i,)) for i in range(n)]


def _ids(prompts) -> list[str]:
    return [p.id for p in prompts]


def test_split_is_deterministic_under_the_seed():
    ps = _prompts(30)
    a, b = split_rounds(ps, 3, seed=1, eval_prompts=4), split_rounds(ps, 3, seed=1, eval_prompts=4)
    assert _ids(a.eval) == _ids(b.eval)
    assert [_ids(s) for s in a.shards] == [_ids(s) for s in b.shards]
    c = split_rounds(ps, 3, seed=2, eval_prompts=4)
    assert [_ids(s) for s in a.shards] != [_ids(s) for s in c.shards]
    assert _ids(ps) == [f"p{i}" for i in range(30)]  # the input is not shuffled in place


@pytest.mark.parametrize("n,rounds,sizes", [(9, 3, [3, 3, 3]), (10, 3, [4, 3, 3]),
                                            (11, 3, [4, 4, 3]), (3, 3, [1, 1, 1]),
                                            (5, 1, [5])])
def test_shards_are_disjoint_cover_everything_and_near_equal(n, rounds, sizes):
    split = split_rounds(_prompts(n), rounds, seed=0)
    assert [len(s) for s in split.shards] == sizes
    flat = [p for s in split.shards for p in s]
    assert sorted(_ids(flat)) == sorted(_ids(_prompts(n))) and len(set(_ids(flat))) == n
    assert split.eval == []


def test_eval_is_held_out_and_stable_under_max_prompts():
    ps = _prompts(40)
    full = split_rounds(ps, 3, seed=5, eval_prompts=6)
    capped = split_rounds(ps, 3, seed=5, eval_prompts=6, max_prompts=10)
    assert len(full.eval) == 6 and _ids(full.eval) == _ids(capped.eval)
    train = {p.id for s in full.shards for p in s}
    assert not train & set(_ids(full.eval)) and len(train) == 34
    assert [len(s) for s in capped.shards] == [4, 3, 3]
    assert not {p.id for s in capped.shards for p in s} & set(_ids(capped.eval))


def test_max_prompts_larger_than_the_set_is_harmless():
    split = split_rounds(_prompts(7), 2, seed=0, max_prompts=100)
    assert [len(s) for s in split.shards] == [4, 3]


@pytest.mark.parametrize("n,rounds,eval_prompts,max_prompts", [(2, 3, 0, None), (5, 3, 3, None),
                                                                (10, 3, 0, 2)])
def test_too_few_prompts_for_the_rounds(n, rounds, eval_prompts, max_prompts):
    with pytest.raises(ValueError, match=rf"{n} prompts leave \d+ for training.*"
                                         rf"fewer than the {rounds} rounds"):
        split_rounds(_prompts(n), rounds, seed=0, eval_prompts=eval_prompts,
                     max_prompts=max_prompts)


@pytest.mark.parametrize("kw,match", [({"rounds": 0}, "rounds must be > 0"),
                                      ({"eval_prompts": -1}, "eval_prompts must be >= 0"),
                                      ({"max_prompts": 0}, "max_prompts must be > 0")])
def test_split_argument_checks(kw, match):
    args = {"rounds": 3, "seed": 0} | kw
    with pytest.raises(ValueError, match=match):
        split_rounds(_prompts(10), **args)


def test_bad_row_str():
    assert str(BadRow(3, "x", "why", line=5)) == "row 3 (line 5) id='x': why"
    assert str(BadRow(3, None, "why")) == "row 3: why"
