"""``secateurs eval DIR --ppl text.txt``: perplexity (and lm-eval zero-shot tasks) of a saved LM.

Zero-shot: ``--tasks arc_easy,hellaswag`` (lm-eval downloads them), ``--include-path DIR`` for
your own task YAMLs, or ``--cloze text.txt`` for an offline cloze over held-out text.

DIR is any Hugging Face model directory or hub id, or one written by ``secateurs prune``
(its compressed checkpoint is used when it holds no dense weights). Perplexity follows the
Wanda/SparseGPT protocol: non-overlapping windows of the context length, exp of mean NLL.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from .threads import add_threads_argument, apply_threads, note_oversubscription


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity / zero-shot accuracy of a (pruned) language model", description=__doc__)
    p.add_argument("model", help="model directory (e.g. written by `secateurs prune`) or hub id")
    p.add_argument("--ppl", nargs="+", metavar="TEXT_FILE", help="text file(s) to measure perplexity on")
    p.add_argument("--seqlen", type=int, help="window length (default: 2048 capped to the model's context)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. arc_easy,hellaswag (needs lm-eval)")
    p.add_argument("--limit", type=int, help="lm-eval: examples per task (for quick checks)")
    p.add_argument(
        "--include-path",
        dest="include_path",
        action="append",
        metavar="DIR",
        help="lm-eval: a folder of your own task YAMLs (repeatable); runs offline on local data",
    )
    p.add_argument(
        "--cloze",
        metavar="TEXT_FILE",
        help="lm-eval: zero-shot two-way cloze built from this text (task 'text_cloze'; offline)",
    )
    p.add_argument("--cloze-count", dest="cloze_count", type=int, default=1000, help="items of the --cloze task")
    p.add_argument("--compressed", action="store_true", help="load the compressed checkpoint even if dense exists")
    p.add_argument("--json", help="also write the results as JSON to this file (refused up front if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    add_threads_argument(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..io import refuse_existing, write_text

    if not args.ppl and not args.tasks and not args.cloze:
        raise ConfigError("nothing to evaluate: pass --ppl TEXT_FILE, --tasks TASK[,TASK] and/or --cloze TEXT_FILE")
    apply_threads(args)
    if args.tasks or args.cloze:
        from ..llm.zeroshot import require_lm_eval

        require_lm_eval()  # before the model is loaded, not after
    if args.json:
        refuse_existing(Path(args.json), args.overwrite)  # before minutes of evaluation, not after
    note_oversubscription()
    with tempfile.TemporaryDirectory() as tmp:
        results = _evaluate(args, Path(tmp))
    if args.json:
        write_text(args.json, json.dumps(results, indent=2) + "\n", overwrite=args.overwrite)
    return 0


def _evaluate(args: argparse.Namespace, scratch: Path) -> dict:
    from ..export import load_sparse
    from ..hf import load_tokenizer
    from ..llm.cloze import cloze_task
    from ..llm.perplexity import perplexity
    from ..llm.zeroshot import zero_shot

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    include = list(args.include_path or [])
    if args.cloze:
        include.append(cloze_task(args.cloze, scratch / "tasks", count=args.cloze_count))
        tasks.append("text_cloze")
    model = load_sparse(args.model, prefer="compressed" if args.compressed else "auto")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    results: dict = {"model": args.model, "perplexity": {}, "zero_shot": {}}
    for path in args.ppl or []:
        start = time.perf_counter()
        ppl = perplexity(model, path, tokenizer, seqlen=args.seqlen, batch_size=args.batch_size)
        # the default length is the model's context (capped at 2048), which need not be what it was trained on
        source = "--seqlen" if args.seqlen else "default: min(2048, the model's context)"
        results["perplexity"][path] = {**vars(ppl), "seqlen_source": source, "seconds": time.perf_counter() - start}
        print(f"perplexity {ppl.perplexity:.4f} on {path} ({ppl.windows} windows of {ppl.seqlen} tokens; {source})")
    if tasks:
        results["zero_shot"] = zero_shot(
            model, tokenizer, tasks, batch_size=args.batch_size, limit=args.limit, include_path=include
        )
        for task, metrics in results["zero_shot"].items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return results
