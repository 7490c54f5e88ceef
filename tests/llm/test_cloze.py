"""The offline cloze task: deterministic, well-formed, and refused with the numbers when it cannot be built."""

from __future__ import annotations

import json

import pytest

from secateurs import ConfigError
from secateurs.io import OutputExistsError
from secateurs.llm import cloze_task, zero_shot

LINES = [f"line {i} says that the quick brown fox number {i} jumps over the lazy dog {i}" for i in range(40)]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text("\n".join(["short line", *LINES, ""]))
    return path


def test_each_item_pairs_a_line_with_its_own_ending_and_another_lines(text, tmp_path):
    folder = cloze_task(text, tmp_path / "tasks", name="fox", count=30, seed=3)
    docs = [json.loads(line) for line in (folder / "fox.jsonl").read_text().splitlines()]
    assert len(docs) == 30 and {d["label"] for d in docs} == {0, 1}
    for d in docs:
        source = next(line for line in LINES if line.startswith(d["context"] + " "))
        right, wrong = d["choices"][d["label"]], d["choices"][1 - d["label"]]
        assert d["context"] + right == source
        assert wrong != right and any(line.endswith(wrong.strip()) for line in LINES)
    yaml = (folder / "fox.yaml").read_text()
    assert "task: fox" in yaml and str((tmp_path / "tasks" / "fox.jsonl").resolve()) in yaml
    again = cloze_task(text, tmp_path / "again", name="fox", count=30, seed=3)
    assert (again / "fox.jsonl").read_text() == (folder / "fox.jsonl").read_text()


def test_bad_requests_are_refused_with_the_numbers(text, tmp_path):
    with pytest.raises(ConfigError, match=r"has 40 lines of >= 10 words; a 40-item cloze needs 41"):
        cloze_task(text, tmp_path / "t", count=40)
    with pytest.raises(ConfigError, match="identifier"):
        cloze_task(text, tmp_path / "t", name="my task")
    with pytest.raises(ConfigError, match="not a text file"):
        cloze_task(tmp_path / "missing.txt", tmp_path / "t")
    (tmp_path / "t").mkdir()
    with pytest.raises(OutputExistsError, match="overwrite"):
        cloze_task(text, tmp_path / "t", count=5)
    with pytest.raises(ConfigError, match="is not a folder of task YAML files"):
        zero_shot(None, None, ["fox"], include_path=tmp_path / "nowhere")
