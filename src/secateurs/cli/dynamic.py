"""``secateurs dynamic MODEL --calib calib.txt --out thresholds.safetensors``: activation sparsity (TEAL/CATS).

Calibrates per-layer thresholds on ``--calib`` once, writes them (with the allocation and the
target ``--sparsity``) to ``--out`` (safetensors, no pickle; load with
``secateurs.dynamic.load_activation_sparsity(model, path)``), and prints the speed/quality curve
over ``--levels``: perplexity on ``--ppl`` text and, with ``--speed``, batch-1 decode tokens/s and
the speed-up over dense measured side by side, with the bytes-read limit beside it. ``--thresholds``
reuses a saved calibration instead of ``--calib`` (the target changes without recalibrating).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .models import sparsity_list
from .threads import add_threads_argument, apply_threads, note_oversubscription


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dynamic", help="activation sparsity for LLMs: calibrate, save, measure speed/quality",
                       description=__doc__)  # fmt: skip
    p.add_argument("model", help="Hugging Face causal LM directory or hub id")
    p.add_argument("--calib", help="calibration text (thresholds are calibrated on it)")
    p.add_argument("--thresholds", help="a saved calibration to reuse instead of --calib")
    p.add_argument(
        "--method",
        choices=("teal", "cats"),
        default="teal",
        help="teal: each block Linear's input; cats: MLP gate (not with --thresholds)",
    )
    p.add_argument(
        "--allocation",
        choices=("greedy", "uniform"),
        default="greedy",
        help="TEAL's greedy or uniform (not with --thresholds)",
    )
    p.add_argument("--sparsity", type=float, default=0.5, help="the target stored in --out (default 0.5)")
    p.add_argument(
        "--levels", type=sparsity_list, default=[0.25, 0.4, 0.5], help="targets to measure (default 0.25,0.4,0.5)"
    )
    p.add_argument("--ppl", metavar="TEXT_FILE", help="held-out text: perplexity at each level")
    p.add_argument("--speed", action="store_true", help="batch-1 decode tokens/s at each level vs dense")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens per round (--speed)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, each decoding at every level (--speed)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration segments (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per segment and perplexity window (default 256)")
    p.add_argument("--max-sparsity", dest="max_sparsity", type=float, default=0.9, help="greedy: highest target")
    p.add_argument("--out", help="write the thresholds here (.safetensors; refused if it exists, unless --overwrite)")
    p.add_argument("--json", help="also write the curve as JSON")
    p.add_argument("--plot", help="also write the curve as PNG (needs matplotlib)")
    p.add_argument("--overwrite", action="store_true", help="replace --out, --json and --plot if they exist")
    add_threads_argument(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration import model_context, sample_segments
    from ..dynamic import load_activation_sparsity, sparsify_activations
    from ..dynamic.activation import check_target
    from ..dynamic.report import speed_quality
    from ..errors import ConfigError
    from ..hf import load_tokenizer
    from ..io import refuse_existing
    from ..llm.perplexity import perplexity
    from .models import load_model

    if bool(args.calib) == bool(args.thresholds):
        raise ConfigError(
            "give exactly one of --calib TEXT_FILE (calibrate) and --thresholds FILE (reuse a calibration)"
        )
    greedy_limit = args.max_sparsity if args.calib and args.method == "teal" and args.allocation == "greedy" else None
    check_target(args.sparsity, greedy_limit)  # above the greedy path's end: refused now, not after calibrating
    for level in args.levels:
        check_target(level, greedy_limit)
    if (args.json or args.plot) and not (args.ppl or args.speed):
        raise ConfigError("--json and --plot write the speed/quality curve: add --ppl TEXT_FILE and/or --speed")
    if args.tokens < 1 or args.rounds < 1:
        raise ConfigError(f"--tokens and --rounds must be positive, got {args.tokens} and {args.rounds}")
    for path in (args.out, args.json, args.plot):
        if path:
            refuse_existing(Path(path), args.overwrite)  # before minutes of calibration, not after
    if args.plot:
        from ..plotting import pyplot

        pyplot()  # matplotlib missing: say so now
    apply_threads(args)
    note_oversubscription()
    model = load_model(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    seqlen = min(args.seqlen, model_context(model) or args.seqlen)
    if args.thresholds:
        sparse = load_activation_sparsity(model, args.thresholds)
    else:
        segments = sample_segments(args.calib, tokenizer, args.nsamples, seqlen, seed=0)
        sparse = sparsify_activations(model, segments, method=args.method, allocation=args.allocation,
                                      max_sparsity=args.max_sparsity)  # fmt: skip
    limit = sparse.calibration.max_sparsity()  # a reused calibration's own limit, before anything is written
    for level in (args.sparsity, *args.levels):
        check_target(level, limit)
    sparse.set_sparsity(args.sparsity)
    if args.out:
        sparse.save(args.out, overwrite=args.overwrite)
        print(f"wrote {args.out} (target {args.sparsity:g}; change it at run time with set_sparsity())")
    if args.ppl or args.speed:
        quality = None
        if args.ppl:

            def quality() -> float:
                return perplexity(model, args.ppl, tokenizer, seqlen, progress=False).perplexity

        curve = speed_quality(sparse, args.levels, quality=quality, speed=args.speed, tokens=args.tokens,
                              rounds=args.rounds)  # fmt: skip
        print(curve.table())
        if args.json:
            curve.save_json(args.json, overwrite=args.overwrite)
        if args.plot:
            curve.plot(args.plot, overwrite=args.overwrite)
    return 0
