"""An offline zero-shot task from any held-out text, in lm-eval's task format.

lm-eval's standard tasks download their datasets. Where that is impossible, or the domain is
your own, a two-way cloze over your text is a quick zero-shot check: each line's first half
is the context, and the model must prefer the line's own second half to the second half of
another line. Pruning damage shows as accuracy falling towards chance (0.5).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_dir

_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def cloze_task(
    text_file: str | os.PathLike,
    folder: str | os.PathLike,
    name: str = "text_cloze",
    count: int = 1000,
    min_words: int = 10,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write ``<folder>/<name>.yaml`` and ``<name>.jsonl``; pass ``folder`` as lm-eval's include path.

    ``count`` lines of at least ``min_words`` words are drawn under ``seed``; the task reports
    ``acc`` and length-normalised ``acc_norm``."""
    source = Path(text_file)
    if not source.is_file():
        raise ConfigError(f"cloze source {str(source)!r} is not a text file")
    if not _TASK_NAME.match(name):
        raise ConfigError(f"task name {name!r} must be an identifier (letters, digits, underscores)")
    if count < 1 or min_words < 2:
        raise ConfigError(f"need count >= 1 and min_words >= 2, got count={count}, min_words={min_words}")
    lines = [" ".join(line.split()) for line in source.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if len(line.split()) >= min_words]
    if len(lines) < count + 1:
        raise ConfigError(
            f"{source} has {len(lines)} lines of >= {min_words} words; a {count}-item cloze needs {count + 1} "
            "(one more, for distractors). Lower count or min_words, or use a longer text"
        )
    rng = random.Random(seed)
    chosen = rng.sample(range(len(lines)), count)
    docs = []
    for i in chosen:
        words = lines[i].split()
        j = rng.randrange(len(lines) - 1)
        other = lines[j + (j >= i)].split()  # any line but this one
        right, wrong = " " + " ".join(words[len(words) // 2 :]), " " + " ".join(other[len(other) // 2 :])
        label = rng.randrange(2)
        choices = [right, wrong] if label == 0 else [wrong, right]
        docs.append({"context": " ".join(words[: len(words) // 2]), "choices": choices, "label": label})
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        data = Path(folder).resolve() / f"{name}.jsonl"
        (tmp / data.name).write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        (tmp / f"{name}.yaml").write_text(_yaml(name, data), encoding="utf-8")
    return Path(folder)


def _yaml(name: str, data: Path) -> str:
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: acc_norm\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
