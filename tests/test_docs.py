"""Every fenced example in README.md and docs/*.md runs, as a reader would run it, and the
README's examples collapse no layer.

Each document runs top to bottom in its own empty folder and its own Python namespace, so a block
may use what an earlier block of the same document defined (``model``, ``recipe.yaml``):

- ``python``: executed;
- ``bash``/``sh``/``shell``: each command (``\\`` continuations joined, comments dropped); ``secateurs
  ...`` and ``python -m secateurs ...`` run in-process through ``secateurs.cli.main``, the function
  the console script calls, anything else through ``bash``; a non-zero exit fails;
- a block whose first line is ``# <file name>`` (``# recipe.yaml``, ``# my_models.py``) is a file
  the reader creates: it is written to the folder;
- ``text``: not code.

A fence without a language fails: every block either runs or says it is text. The one visible
way out is a first line ``# docs-test: skip <why>`` (or ``# docs-test: needs <module>``, run when
the module imports); ``test_skips_are_rare_and_say_why`` keeps those few. The folder holds the
stand-ins for the reader's own files: ``my-llama/`` (a tiny random Llama with a tokenizer, so the
LLM examples run in seconds with their default sizes), ``calib.txt`` and ``test.txt``. The README
then runs a second time in the same folder: examples must be re-runnable.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from secateurs.cli import main
from secateurs.report import Report

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"#\s*docs-test:\s*(?P<kind>skip|needs)\s+(?P<what>.+)")
FILE_HEADER = re.compile(r"#\s*(?P<name>[\w.-]+\.(?:py|ya?ml|json|txt))\s*$")
PYTHON, SHELL, TEXT = {"python", "py"}, {"bash", "sh", "shell"}, {"text"}


@dataclass
class Block:
    document: str
    line: int
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.code.split("\n", 1)[0].strip()


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    return [Block(name, text.count("\n", 0, m.start()) + 1, m["lang"].strip(), m["code"]) for m in FENCE.finditer(text)]


def skip_reason(block: Block) -> str | None:
    """Why ``block`` does not run here, from its visible marker; None: it runs."""
    marker = MARKER.fullmatch(block.first_line)
    if marker is None:
        return None
    if marker["kind"] == "needs":
        module = marker["what"].split()[0]
        return None if importlib.util.find_spec(module) is not None else f"needs {module}, not installed"
    return marker["what"]


def run_shell(block: Block, folder: Path) -> None:
    joined = re.sub(r"\\\n", " ", block.code)
    for command in joined.splitlines():
        argv = shlex.split(command, comments=True)
        if not argv:
            continue
        if argv[0] == "secateurs":
            code = main(argv[1:])
        elif argv[:3] == ["python", "-m", "secateurs"]:
            code = main(argv[3:])
        else:  # the venv's tools first, as after `source .venv/bin/activate`
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
            code = subprocess.run(["bash", "-c", command], cwd=folder, env=env, timeout=300).returncode
        assert code == 0, f"{block.where}: `{command.strip()}` exited with {code}"


def run_document(path: Path, folder: Path) -> None:
    """Run every block of ``path`` in ``folder``, in order, in one namespace."""
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(path):
        if block.lang in TEXT or skip_reason(block) is not None:
            continue
        header = FILE_HEADER.fullmatch(block.first_line)
        if header is not None:
            (folder / header["name"]).write_text(block.code)
        elif block.lang in PYTHON:
            exec(compile(block.code, block.where, "exec"), namespace)
        elif block.lang in SHELL:
            run_shell(block, folder)
        else:
            pytest.fail(f"{block.where}: a {block.lang!r} block must start with '# <file name>' (or be 'text')")


def _tiny_llama(folder: Path) -> None:
    """A 4-block Llama (context 64) and a byte-level BPE tokenizer trained on the calibration text."""
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder / "my-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator([(folder / "calib.txt").read_text()], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")
    fast.save_pretrained(folder / "my-llama")


def reader_folder(folder: Path) -> Path:
    """What a reader has beside the examples: their model, calibration and held-out text."""
    code = "".join(f"def function_{i}(x):\n    return x * {i} + len('pruning')\n\n" for i in range(400))
    (folder / "calib.txt").write_text(code)
    # held-out text: lines of ten words and more (the cloze task cuts lines in half)
    (folder / "test.txt").write_text("".join(f"function {i} returns its argument times {i} plus the length of "
                                             f"the word pruning, line {i}\n" for i in range(1200)))  # fmt: skip
    _tiny_llama(folder)
    return folder


@pytest.fixture
def returned_reports(monkeypatch) -> list[Report]:
    """Every masking report prune() hands back while the examples run (the API and the CLI both call
    secateurs.api.prune; a refused collapse returns none, so only what a reader really got counts)."""
    import secateurs
    import secateurs.api

    reports: list[Report] = []
    original = secateurs.api.prune

    def recording(*args, **kwargs):
        report = original(*args, **kwargs)
        if isinstance(report, Report):
            reports.append(report)
        return report

    monkeypatch.setattr(secateurs.api, "prune", recording)
    monkeypatch.setattr(secateurs, "prune", recording)
    return reports


@pytest.fixture(scope="session")
def reader_files(tmp_path_factory) -> Path:
    """Built once per worker (training the tokenizer takes seconds), copied for each document."""
    return reader_folder(tmp_path_factory.mktemp("reader"))


@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.relative_to(ROOT).as_posix() for p in DOCUMENTS])
def test_every_example_runs(path, tmp_path, monkeypatch, returned_reports, reader_files):
    shutil.copytree(reader_files, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    runs = 2 if path.name == "README.md" else 1  # the README twice: re-running must not trip over its own output
    for _ in range(runs):
        run_document(path, tmp_path)
    if path.name == "README.md":
        collapsed = [(r.config.get("method"), r.collapsed_layers) for r in returned_reports if r.collapsed_layers]
        disconnected = [r.config.get("method") for r in returned_reports if r.connected is False]
        assert not collapsed and not disconnected, f"README examples collapse layers: {collapsed or disconnected}"
        assert returned_reports, "the README prunes nothing?"


def test_every_fence_says_what_it_is():
    unlabeled = [b.where for path in DOCUMENTS for b in blocks(path) if not b.lang]
    runnable = PYTHON | SHELL | TEXT
    unknown = [f"{b.where} ({b.lang})" for path in DOCUMENTS for b in blocks(path)
               if b.lang and b.lang not in runnable and not FILE_HEADER.fullmatch(b.first_line)]  # fmt: skip
    assert not unlabeled, f"label these fences (python, bash, text, or a '# file' block): {unlabeled}"
    assert not unknown, f"blocks that neither run nor are files: {unknown}"


def test_skips_are_rare_and_say_why():
    marked = [(b.where, MARKER.fullmatch(b.first_line)) for p in DOCUMENTS for b in blocks(p)]
    marked = [(where, m) for where, m in marked if m is not None]
    skipped = [(where, m["what"]) for where, m in marked if m["kind"] == "skip"]
    assert len(skipped) <= 3, f"too many examples skip the docs test: {skipped}"
    for where, why in skipped:
        assert len(why.split()) >= 4, f"{where}: say why it cannot run here, not just that it cannot"


@pytest.mark.parametrize(
    ("markdown", "error"),
    [
        ("```python\nraise ValueError('broken example')\n```\n", ValueError),
        ("```python\nx = 1\n```\n\n```python\nassert x == 2, 'the namespace carries over'\n```\n", AssertionError),
        ("```bash\nfalse\n```\n", AssertionError),
        ("```bash\nsecateurs prune no_such_module:f --sparsity 0.5 --out o\n```\n", AssertionError),
        ("```yaml\nmethod: magnitude\n```\n", pytest.fail.Exception),
    ],
    ids=["python-raises", "namespace", "shell-fails", "secateurs-fails", "yaml-without-file-name"],
)
def test_a_broken_example_fails_the_run(markdown, error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "doc.md").write_text(markdown)
    with pytest.raises(error):
        run_document(tmp_path / "doc.md", tmp_path)


def test_a_marked_block_is_skipped_and_a_file_block_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "doc.md").write_text(
        "```bash\n# docs-test: skip (this would fail anywhere: a demonstration)\nfalse\n```\n\n"
        "```yaml\n# recipe.yaml\nmethod: magnitude\n```\n\n"
        "```python\nassert open('recipe.yaml').read().endswith('method: magnitude\\n')\n```\n"
    )
    run_document(tmp_path / "doc.md", tmp_path)
