"""``secateurs eval DIR --ppl text.txt``: perplexity (and lm-eval zero-shot tasks) of a saved LM.

DIR is any Hugging Face model directory or hub id, or one written by ``secateurs prune``
(its compressed checkpoint is used when it holds no dense weights). Perplexity follows the
Wanda/SparseGPT protocol: non-overlapping windows of the context length, exp of mean NLL.
"""

from __future__ import annotations

import argparse
import json
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity / zero-shot accuracy of a (pruned) language model", description=__doc__)
    p.add_argument("model", help="model directory (e.g. written by `secateurs prune`) or hub id")
    p.add_argument("--ppl", nargs="+", metavar="TEXT_FILE", help="text file(s) to measure perplexity on")
    p.add_argument("--seqlen", type=int, help="window length (default: 2048 capped to the model's context)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. arc_easy,hellaswag (needs lm-eval)")
    p.add_argument("--limit", type=int, help="lm-eval: examples per task (for quick checks)")
    p.add_argument("--compressed", action="store_true", help="load the compressed checkpoint even if dense exists")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..export import load_pruned
    from ..io import write_text
    from ..llm.perplexity import perplexity
    from ..llm.zeroshot import zero_shot
    from .llm_prune import _tokenizer

    if not args.ppl and not args.tasks:
        raise ConfigError("nothing to evaluate: pass --ppl TEXT_FILE and/or --tasks TASK[,TASK]")
    model = load_pruned(args.model, prefer="compressed" if args.compressed else "auto")
    tokenizer = _tokenizer(args.tokenizer or args.model)
    results: dict = {"model": args.model, "perplexity": {}, "zero_shot": {}}
    for path in args.ppl or []:
        start = time.perf_counter()
        ppl = perplexity(model, path, tokenizer, seqlen=args.seqlen, batch_size=args.batch_size)
        results["perplexity"][path] = {**vars(ppl), "seconds": time.perf_counter() - start}
        print(f"perplexity {ppl.perplexity:.4f} on {path} ({ppl.windows} windows of {ppl.seqlen} tokens)")
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        results["zero_shot"] = zero_shot(model, tokenizer, tasks, batch_size=args.batch_size, limit=args.limit)
        for task, metrics in results["zero_shot"].items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.json:
        write_text(args.json, json.dumps(results, indent=2) + "\n", overwrite=args.overwrite)
    return 0
