import json

import pytest

from mu.data.tasks import NO_ANSWER, SQUAD_TEMPLATE, TASKS, encode_source, iter_text, load_examples
from mu.errors import MuError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


SQUAD_ROWS = [
    {"id": "a", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
     "answers": ["France", "in France"]},
    {"id": "b", "title": "T", "context": "Paris is in France.", "question": "Where is Rome?", "answers": []},
]


def test_squad_prompt_target_and_references(tmp_path):
    ex = load_examples("squad_v2", write_jsonl(tmp_path / "s.jsonl", SQUAD_ROWS))
    assert ex[0].source == ("Answer the following question based only on the context.\n###Question\nWhere is Paris?"
                            "\n###Context\nParis is in France.\n###Answer\n")
    assert (ex[0].target, ex[0].references) == ("France", ["France", "in France"])
    assert (ex[1].id, ex[1].target, ex[1].references) == ("b", NO_ANSWER, [])


def test_other_tasks_and_missing_ids(tmp_path):
    xs = load_examples("xsum", write_jsonl(tmp_path / "x.jsonl", [{"id": "1", "document": "Doc.", "summary": "Sum."}]))
    assert xs[0].source.endswith("###Document\nDoc.\n###Summary\n") and xs[0].references == ["Sum."]
    cs = load_examples("code2text", write_jsonl(tmp_path / "c.jsonl", [
        {"id": "c", "code": "def f(): pass", "docstring_tokens": ["Does", "nothing", "."], "docstring": "raw"}]))
    assert cs[0].target == "Does nothing ."  # CodeXGLUE's reference is the joined docstring tokens
    ss = load_examples("seq2seq", write_jsonl(tmp_path / "q.jsonl", ["", {"source": "S", "target": "T"},
                                                                       {"source": "S", "target": "T"}]))
    assert [(e.id, e.source, e.target) for e in ss] == [("2", "S", "T"), ("3", "S", "T")]  # id = line number


@pytest.mark.parametrize("line, message", [
    ('{"id": "x", "context": "c", "question": "q"', "line 2: not valid JSON"),
    ('{"id": "x", "context": "c", "answers": []}', "line 2: missing field 'question'"),
    ('{"id": "x", "context": "c", "question": "q", "answers": "yes"}', "line 2: field 'answers' should be a list"),
    ('{"id": "x", "context": 5, "question": "q", "answers": []}',
     "line 2: field 'context' should be a string, got int"),
    ('{"id": "x", "context": " ", "question": "q", "answers": []}', "line 2: field 'context' is empty"),
    ('["not", "an", "object"]', "line 2: expected a JSON object"),
    ('{"id": "a", "context": "c", "question": "q", "answers": []}', "line 2: id 'a' already used"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [SQUAD_ROWS[0], line])
    with pytest.raises(MuError, match=message) as e:
        load_examples("squad_v2", path)
    assert str(path) in str(e.value)


def test_missing_file_unknown_task_and_limit(tmp_path):
    with pytest.raises(MuError, match="no such file"):
        load_examples("squad_v2", tmp_path / "nope.jsonl")
    with pytest.raises(MuError, match="unknown task 'vqa'.*vision"):
        load_examples("vqa", tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "s.jsonl", SQUAD_ROWS + ["{broken"])
    assert [e.id for e in load_examples("squad_v2", path, limit=2)] == ["a", "b"]  # stops before the bad line


def test_official_squad_json_layout(tmp_path):
    data = {"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "q2", "question": "Where is Rome?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(data))
    ex = load_examples("squad_v2", tmp_path / "dev.json")
    assert [(e.id, e.target, e.references) for e in ex] == [("q1", "France", ["France"]), ("q2", NO_ANSWER, [])]


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([
        {"id": "h1", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
         "answers": {"text": ["France"], "answer_start": [12]}},
        {"id": "h2", "title": "T", "context": "Paris is in France.", "question": "Where is Rome?",
         "answers": {"text": [], "answer_start": []}}])
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "hf"))
    ex = load_examples("squad_v2", tmp_path / "hf")  # a single split is picked automatically
    assert [(e.id, e.target, e.references) for e in ex] == [("h1", "France", ["France"]), ("h2", NO_ANSWER, [])]
    assert [e.id for e in load_examples("squad_v2", f"{tmp_path / 'hf'}:validation")] == ["h1", "h2"]
    with pytest.raises(MuError, match="could not load"):
        load_examples("squad_v2", str(tmp_path / "not_a_dataset_dir_or_name"))


def test_iter_text_paragraphs_and_jsonl(tmp_path):
    (tmp_path / "c.txt").write_text("line one\nline two\n\n\n = Heading = \n\nlast\n")
    assert list(iter_text(tmp_path / "c.txt")) == ["line one\nline two", "= Heading =", "last"]
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": ""}, {"text": "b"}])
    assert list(iter_text(tmp_path / "c.jsonl")) == ["a", "b"]
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(MuError, match=r"bad.jsonl, line 2: missing field 'text'"):
        list(iter_text(tmp_path / "bad.jsonl"))


def test_encode_source_keeps_question_and_answer_marker():
    from mu.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    source = SQUAD_TEMPLATE.format(question="Who?", context="x" * 500)
    full, cut = encode_source(tok, source, None, "squad_v2")
    assert not cut and len(full) == len(source.encode())
    ids, cut = encode_source(tok, source, 100, "squad_v2")
    text = tok.decode(ids)
    assert cut and len(ids) == 100
    assert text.startswith("Answer the following question") and "Who?" in text and text.endswith("x\n###Answer\n")
    # seq2seq sources in the paper's format keep their trailing ###Answer line too
    ids, _ = encode_source(tok, source, 100, "seq2seq")
    assert tok.decode(ids).endswith("x\n###Answer\n")


def _expected(task: str, record: dict) -> tuple[list[str], str, list[str]]:
    """What a record must become, worked out here from the raw JSON: (texts the source must contain, target,
    references)."""
    if task == "squad_v2":
        answers = record["answers"]["text"] if isinstance(record["answers"], dict) else record["answers"]
        target = next((a.strip() for a in answers if a.strip()), NO_ANSWER)
        return [record["question"].strip(), record["context"].strip()], target, list(answers)
    if task == "xsum":
        return [record["document"].strip()], record["summary"].strip(), [record["summary"].strip()]
    if task == "code2text":
        doc = (" ".join(record["docstring_tokens"]) if "docstring_tokens" in record else record["docstring"]).strip()
        return [record["code"].strip("\n")], doc, [doc]
    return [record["source"]], record["target"], [record["target"]]


SHARED_TASK_FILES = [("squad_v2", "squad_v2_dev.jsonl"), ("squad_v2", "squad_v2_train.jsonl"),
                     ("squad_v2", "squad_v1_train.jsonl"), ("xsum", "xsum_train.jsonl"), ("xsum", "xsum_dev.jsonl"),
                     ("code2text", "codexglue_code2text_ruby_train.jsonl"),
                     ("code2text", "codexglue_code2text_ruby_dev.jsonl"),
                     ("code2text", "codexglue_code2text_python_dev.jsonl"), ("code2text", "mbpp_code2text.jsonl"),
                     ("seq2seq", "examples/train.jsonl"), ("seq2seq", "examples/val.jsonl")]


@pytest.mark.parametrize("task,name", SHARED_TASK_FILES)
def test_shared_files_load_record_for_record(shared_data, task, name):
    """Every line of a real file becomes one example, with its id, its text in the prompt, and the target and
    references the task's rules give (checked against the raw JSON, whatever the file holds)."""
    path = shared_data / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ex = load_examples(task, path)
    assert len(ex) == len(records)
    for lineno, (e, r) in enumerate(zip(ex, records), start=1):
        assert e.id == str(r.get("id", lineno)), f"{name}, line {lineno}"
        texts, target, references = _expected(task, r)
        assert all(t in e.source for t in texts) and (e.target, e.references) == (target, references), \
            f"{name}, line {lineno}"
        assert task == "seq2seq" or e.source.startswith(TASKS[task].template.split("{")[0])


def test_shared_squad_file_is_not_read_as_another_task(shared_data):
    with pytest.raises(MuError, match="line 1: missing field 'context'"):
        load_examples("squad_v2", shared_data / "xsum_dev.jsonl")


def test_shared_corpus_paragraphs_keep_every_line_in_order(shared_data):
    """Paragraphs split at blank lines: every line kept (stripped) in order, no blank line inside a paragraph."""
    path = shared_data / "corpus" / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    paragraphs = list(iter_text(path))
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    assert len(paragraphs) > 1 and all(p.strip() and "\n\n" not in p for p in paragraphs)
    assert [ln for p in paragraphs for ln in p.split("\n")] == [ln for ln in lines if ln]
