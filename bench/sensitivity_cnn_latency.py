"""Channel removal under a measured-latency budget of 0.5x dense: sensitivity knapsack vs uniform.

A ResNet-18 layout (``small_resnet``: 2 basic blocks per stage, 4 stages, base width ``--width``)
trained briefly on scikit-learn's digits (8x8 upsampled to ``--size``, three channels). The
sensitivity analysis removes each group of coupled channels alone at each sparsity of ``--grid``
(default 25/50/75%; channel counts kept a multiple of ``--round-to``), measuring the loss on
calibration batches: resumable cells in ``--cache``, the same for both latency modes. In
``--latency measured`` each cell's model is then timed alternately with the dense model (batch of
8): the latency table, one row per group and sparsity, cached there as JSON (a rerun reuses it,
``--fresh-table`` measures it again). The
trained model is cached there too. The knapsack solves for 0.5x dense latency, the result is
measured, and the budget is corrected by asked/achieved for up to three rounds (``fit_budget``).
Uniform removal is then set to the *same measured latency* (bisection on its sparsity, each step
measured), and both are compared on held-out accuracy before and after the same short fine-tune
(``--finetune-steps``, about 2 epochs). Before the fine-tune the BatchNorm statistics of every pruned
model (and of every analysis cell) are re-estimated on ``--bn-batches`` calibration batches (adaptive
BatchNorm, EagleEye): without it any 0.5x model here falls to chance, and the raw figure is kept too.
The achieved latencies are measured again at the end, in the same run.

``--relinearize N``: the profile's costs were each measured with one group removed and all others
dense, and they do not add up under removal (a convolution's cost is bilinear in its input and
output widths, latency has fixed overheads), so the first solve overshoots and the asked/achieved
correction chases it. With ``N > 0`` the first ``N`` re-solves instead re-measure every group's cost
at dense and at each grid sparsity with all other groups at the last measured allocation
(``secateurs.analysis.relinearize``, HALP-style) and solve the knapsack over that first-order
expansion, asking the budget itself: 12 groups x 9 options = at most 108 extra measurements a
round (in ``--latency measured`` each a paired dense/pruned timing of ``--repeats`` runs).
``0`` (default) is the earlier behaviour.

Uniform at the same latency: uniform removal's latency is a step function of its sparsity (with
channel counts rounded to ``--round-to``, many groups change width at the same sparsity: with 8,
0.643x at 38.7% removed, 0.487x at 39.4%), so it usually cannot land on the knapsack's latency. The
bisection's measured points that bracket the knapsack's final latency most tightly, one slower and
one faster, are both evaluated, and their accuracies are interpolated linearly in latency at the
knapsack's latency ("uniform, interpolated"). The knapsack is *conclusively* ahead only where it
beats the slower bracket (uniform with more latency to spend); beating the interpolation is the
"same latency" comparison; beating only the faster bracket proves nothing.

``--validation-fraction F`` (0.2 in the fifth pass): the dense model is trained, BatchNorm re-estimated
and fine-tuned on the training images less a stratified share ``F``, and each cell's loss is read on
that share. Without it the loss is read on four *training* batches, which a model that fits its
training set (loss 2.6e-4 at width 32) scores near zero at most cells: 8 of the 12 groups added
less than 1e-3 to it at 60% removed (4 of 12 still at 80%), so the knapsack saw them as nearly free
and cut them hardest. The test images are never read before the final comparison.

``--arms-from RESULTS.json --finetune-seeds N``: the arms of that earlier run (the knapsack's allocation,
the two uniform brackets), rebuilt from its JSON on the same dense weights (checked), fine-tuned again in
``N`` batch orders; latencies are that run's, nothing is timed.

``--latency macs`` replaces every latency by the MACs ratio (a stand-in, for building and for the
accuracy figures on a loaded machine where timings mean nothing); ``--latency measured`` (default)
is the real bench. On a quiet 2-core machine, with the trained model and the analysis cells cached
(a ``--latency macs`` run with the same settings leaves both):

    OMP_NUM_THREADS=1 .venv/bin/python bench/sensitivity_cnn_latency.py --latency measured \
        --width 32 --grid 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8 --round-to 8

(without the cache it first trains, then analyses: several times longer).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results
from structural_models import BasicBlock, resnet_like

BATCH = 8


def small_resnet(width: int, classes: int = 10) -> nn.Module:
    """``resnet_like``'s layout (ResNet-18: 2 basic blocks per stage, 4 stages) at base width ``width``."""
    if width == 32:
        return resnet_like(classes)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def _digits(size: int, validation_fraction: float = 0.0):
    """(training, validation, test) batches; validation is ``None`` unless ``validation_fraction`` > 0,
    then a stratified share of the *training* images (``_common.validation_split``) that the dense
    model, the fine-tunes and the BatchNorm re-estimation never see, and the test images stay untouched."""
    from _common import validation_split
    from secateurs.demo.trained import digits

    d = digits(0)
    val = None
    if validation_fraction:
        d, held = validation_split(d, validation_fraction, seed=0)
        val = _batches(held.x_train, held.y_train, size, 64)
    order = torch.randperm(len(d.x_train), generator=torch.Generator().manual_seed(0))
    return _batches(d.x_train[order], d.y_train[order], size, 64), val, _batches(d.x_test, d.y_test, size, 150)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, batch: int) -> list:
    """(images, labels) batches in order, the 8x8 digits upsampled to ``size`` x ``size`` on three channels."""
    up = F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return [(up[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]


def _latency(dense, pruned, inputs, repeats=25):
    from secateurs.evaluation import compare_latency

    c = compare_latency(dense, pruned, inputs, repeats=repeats)
    return {
        "ratio": 1.0 / c.speedup.median,
        "speedup_iqr": [c.speedup.q1, c.speedup.q3],
        "dense_ms": c.dense_s.median * 1e3,
        "pruned_ms": c.pruned_s.median * 1e3,
    }


def _macs_ratio(dense, pruned, inputs) -> dict:
    from secateurs.evaluation import count_macs

    ratio = count_macs(pruned, inputs).total / count_macs(dense, inputs).total
    return {"ratio": ratio, "speedup_iqr": [1 / ratio, 1 / ratio], "dense_ms": None, "pruned_ms": None}


def _removed(model, sparsities: dict[str, float], inputs, round_to: int = 1):
    import secateurs

    pruned = copy.deepcopy(model)
    allocation = {name: s for name, s in sparsities.items() if s > 0}
    if allocation:
        secateurs.prune(
            pruned,
            "magnitude",
            mode="remove",
            allocation=allocation,
            example_inputs=inputs,
            structural={"latency": False, "round_to": round_to},
            progress=False,
        )
    return pruned


def _uniform(model, sparsity: float, inputs, round_to: int = 1):
    import secateurs

    pruned = copy.deepcopy(model)
    secateurs.prune(
        pruned,
        "magnitude",
        sparsity,
        mode="remove",
        example_inputs=inputs,
        structural={"latency": False, "round_to": round_to},
        progress=False,
    )
    return pruned


def _shuffled(batches: list, seed: int) -> list:
    """The same training batches in another order (a fine-tune seed changes the order, not the data)."""
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order]


def _reestimate_batchnorm(model: nn.Module, batches: list) -> nn.Module:
    """Recompute every BatchNorm's running statistics on calibration batches (forward passes, no gradient).

    Removing channels shifts the statistics the later BatchNorms were trained on; without this both
    allocations fall to chance before any fine-tune (10% on digits here), which compares nothing. This
    is the adaptive BatchNorm of EagleEye (Li et al., arXiv:2007.02491), applied alike to every model."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return model


def _trained(args: argparse.Namespace, train_batches: list) -> tuple[nn.Module, float, bool]:
    """The trained dense model, from the cache when an earlier run with the same settings left it there."""
    from safetensors.torch import load_file, save_file

    from secateurs.training import train

    model = small_resnet(args.width)
    path = Path(args.cache) / f"model_w{args.width}_s{args.size}_t{args.train_steps}{_val_tag(args)}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        model.eval()
        return model, 0.0, True
    torch.manual_seed(0)
    start = time.perf_counter()
    train(model, train_batches, args.train_steps)
    model.eval()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)  # atomic: an interrupted run never leaves half a model in the cache
    return model, seconds, False


def _accuracies(pruned: nn.Module, train_batches: list, test_batches: list, args: argparse.Namespace) -> dict:
    """Held-out accuracy and loss of one arm: raw, after the BatchNorm re-estimation, and after the same short
    fine-tune in ``--finetune-seeds`` batch orders (450 test images: one is 0.22 points, so seeds are averaged).
    ``pruned`` keeps its re-estimated BatchNorm statistics."""
    from secateurs.training import accuracy, train
    from secateurs.training.finetune import adam

    raw = accuracy(pruned, test_batches)
    if args.bn_batches:
        _reestimate_batchnorm(pruned, train_batches[: args.bn_batches])
    before = accuracy(pruned, test_batches)
    before_loss = _mean_loss(pruned, test_batches)
    tuned_accuracies, tuned_losses = [], []
    for seed in range(args.finetune_seeds):
        tuned = copy.deepcopy(pruned)
        tuned.train()
        torch.manual_seed(1 + seed)
        order = train_batches if seed == 0 else _shuffled(train_batches, seed)
        train(tuned, order, args.finetune_steps, optimizer=adam(args.finetune_lr))
        tuned.eval()
        tuned_accuracies.append(accuracy(tuned, test_batches))
        tuned_losses.append(_mean_loss(tuned, test_batches))
    return {
        "accuracy_raw": raw,
        "accuracy": before,
        "accuracy_finetuned": sum(tuned_accuracies) / len(tuned_accuracies),
        "accuracy_finetuned_seeds": tuned_accuracies,
        "test_loss": before_loss,
        "test_loss_finetuned": sum(tuned_losses) / len(tuned_losses),
        "test_loss_finetuned_seeds": tuned_losses,
    }


def _reevaluate(args: argparse.Namespace, model: nn.Module, train_batches: list, test_batches: list, inputs) -> None:
    """``--arms-from``: the arms of an earlier run (the knapsack's allocation and the bisection's two uniform
    brackets, rebuilt exactly from its JSON), fine-tuned again in ``--finetune-seeds`` batch orders. Latencies are
    the earlier run's, not re-measured: this settles accuracy noise without a quiet window."""
    import json

    earlier = json.loads(Path(args.arms_from).read_text())
    for key in ("width", "size", "round_to", "bn_batches", "finetune_steps", "finetune_lr", "validation_fraction"):
        if earlier.get(key, 0.0 if key == "validation_fraction" else None) != getattr(args, key):
            raise SystemExit(f"--arms-from {args.arms_from}: its {key} is {earlier.get(key)!r}, this run's "
                             f"{getattr(args, key)!r}; pass the same settings")  # fmt: skip
    from secateurs.analysis.cells import weights_digest

    if weights_digest(model) != earlier["profile"]["settings"]["weights"]:
        raise SystemExit(f"--arms-from {args.arms_from} was run on other dense weights (another --train-steps or "
                         "--cache?); pass the same settings")  # fmt: skip
    target = next(h["achieved"] for h in earlier["fit_history"] if h.get("chosen"))
    arms = _arms(model, earlier["sensitivity_sparsities"], earlier["uniform_search"], target, inputs, args.round_to)
    old_rows = {row["allocation"]: row for row in earlier["rows"]}
    rows = []
    for name, pruned in arms:
        kept = {k: old_rows[name][k] for k in ("ratio", "speedup_iqr", "dense_ms", "pruned_ms", "within_10pct")}
        params = sum(p.numel() for p in pruned.parameters())
        if params != old_rows[name]["params"]:
            raise SystemExit(f"{name}: {params} parameters, the earlier run had {old_rows[name]['params']}")
        rows.append({"allocation": name, **kept, "params": params,
                     **_accuracies(pruned, train_batches, test_batches, args)})  # fmt: skip
        print(rows[-1], flush=True)
    result = {**earlier, "rows": rows, "finetune_seeds": args.finetune_seeds, "arms_from": args.arms_from,
              "reevaluated": machine(), "load_reevaluated": os.getloadavg()}  # fmt: skip
    result["uniform_interpolated"] = _interpolated(rows)
    print(table(result))
    stem = re.sub(r"_seeds\d+$", "", Path(args.arms_from).stem)  # a rerun of a rerun does not stack suffixes
    write_results(f"{stem}_seeds{args.finetune_seeds}", result)


def _mean_loss(model: nn.Module, batches: list) -> float:
    """Mean cross-entropy per image (a short last batch weighs what it holds). On the test images it still
    separates models where accuracy sits at the ceiling (99.8% is one error in 450 here)."""
    model.eval()
    with torch.no_grad():
        total = sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in batches)
    return total / sum(len(y) for _, y in batches)


def _grid(text: str) -> tuple[float, ...]:
    try:
        grid = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid takes sparsities like 0.2,0.4,0.6; got {text!r}") from None
    if not grid or not all(0 < s < 1 for s in grid):
        raise argparse.ArgumentTypeError(f"--grid sparsities must lie in (0, 1), got {text!r}")
    return grid


def _table_dir(args: argparse.Namespace) -> Path:
    """The analysis cells (loss, parameters, MACs): the same in both latency modes, so a run under load
    leaves them for the quiet run, which then only measures latencies (``_latency_table``)."""
    name = f"table_macs_w{args.width}_s{args.size}_t{args.train_steps}_b{args.batch}_bn{args.bn_batches}"
    if args.grid != (0.25, 0.5, 0.75) or args.round_to != 1:  # the first runs' tables keep their names
        name += f"_g{'-'.join(f'{s:g}' for s in args.grid)}_r{args.round_to}"
    if args.cell_finetune:
        name += f"_ft{args.cell_finetune}_lr{args.finetune_lr:g}"
    return Path(args.cache) / (name + _val_tag(args))


def _val_tag(args: argparse.Namespace) -> str:
    """Another dense model (trained without the validation images), so other cache and result names."""
    return f"_val{args.validation_fraction:g}" if args.validation_fraction else ""


def _latency_table(model, profile, inputs, args: argparse.Namespace) -> dict[str, float]:
    """Each cell's whole-model latency / dense (its group removed alone, paired runs against the dense
    model, as ``sensitivity(costs=('latency',))`` measures it), on this machine, cached as JSON in
    ``--cache`` (``--fresh-table`` measures again)."""
    import json

    grid = "-".join(f"{s:g}" for s in args.grid)
    name = f"latency_w{args.width}_s{args.size}_t{args.train_steps}_b{args.batch}_g{grid}_r{args.round_to}"
    name += _val_tag(args)
    path = Path(args.cache) / f"{name}_x{args.repeats}.json"
    if path.exists() and not args.fresh_table:
        return json.loads(path.read_text())["ratios"]
    table = {}
    for cell in profile.cells:
        pruned = _removed(model, {cell.target: cell.sparsity}, inputs, args.round_to)
        table[f"{cell.target}@{cell.sparsity:g}"] = _latency(model, pruned, inputs, args.repeats)["ratio"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"ratios": table, "load": os.getloadavg()}, indent=1))
    os.replace(tmp, path)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", dest="train_steps", type=int, default=300)
    p.add_argument("--finetune-steps", dest="finetune_steps", type=int, default=40, help="about 2 epochs of digits")
    p.add_argument(
        "--finetune-lr", dest="finetune_lr", type=float, default=1e-3, help="Adam learning rate of the fine-tune"
    )
    p.add_argument("--finetune-seeds", dest="finetune_seeds", type=int, default=3, help="fine-tunes averaged")
    p.add_argument(
        "--bn-batches",
        dest="bn_batches",
        type=int,
        default=10,
        help="calibration batches the BatchNorm statistics are re-estimated on after removal (0: none)",
    )
    p.add_argument(
        "--cell-finetune",
        dest="cell_finetune",
        type=int,
        default=0,
        help="score each analysis cell after this many fine-tuning steps (NetAdapt's short-term fine-tune; 0: none)",
    )
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--fit-rounds", dest="fit_rounds", type=int, default=5, help="fit_budget's measured rounds at most")
    p.add_argument(
        "--grid",
        type=_grid,
        default=(0.25, 0.5, 0.75),
        help="the sparsities each group may take (the knapsack's options), comma-separated",
    )
    p.add_argument(
        "--round-to",
        dest="round_to",
        type=int,
        default=1,
        help="channel counts kept a multiple of this, alike in the analysis, the knapsack's model and uniform",
    )
    p.add_argument("--width", type=int, default=16, help="base width (32: structural_models.resnet_like)")
    p.add_argument("--size", type=int, default=32, help="input side (digits upsampled from 8x8)")
    p.add_argument("--batch", type=int, default=BATCH, help="batch of the latency measurements")
    p.add_argument("--repeats", type=int, default=15, help="paired dense/pruned runs per latency measurement")
    p.add_argument(
        "--latency",
        choices=("measured", "macs"),
        default="measured",
        help="measured: timed on this machine; macs: the MACs ratio stands in (for a loaded machine)",
    )
    p.add_argument("--cache", default=str(Path(__file__).resolve().parent / ".cache" / "sensitivity_cnn_latency"))
    p.add_argument("--fresh-table", dest="fresh_table", action="store_true", help="measure the latency table again")
    p.add_argument(
        "--relinearize",
        type=int,
        default=0,
        help="re-solves that re-measure every group's cost about the current allocation (0: the dense-context costs)",
    )
    p.add_argument(
        "--validation-fraction",
        dest="validation_fraction",
        type=float,
        default=0.0,
        help="hold out this stratified share of the training images and score the cells' loss on it (0: the "
        "first calibration batches, which the dense model was trained on)",
    )
    p.add_argument(
        "--arms-from",
        dest="arms_from",
        default=None,
        help="a results JSON of an earlier run: re-fine-tune its arms in --finetune-seeds orders (no timing)",
    )
    args = p.parse_args()
    if not 0.0 <= args.validation_fraction < 1.0:
        p.error(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    from secateurs.analysis import fit_budget, sensitivity
    from secateurs.training import accuracy, train
    from secateurs.training.finetune import adam

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    began = time.perf_counter()
    load = [os.getloadavg()]
    train_batches, val_batches, test_batches = _digits(args.size, args.validation_fraction)
    scored = val_batches if val_batches else train_batches[:4]  # the batches each cell's loss is read on
    model, train_seconds, cached = _trained(args, train_batches)
    dense_accuracy = accuracy(model, test_batches)
    inputs = torch.cat([x for x, _ in train_batches])[: args.batch]
    print(f"{'cached model' if cached else f'trained in {train_seconds:.0f} s'}: dense accuracy {dense_accuracy:.4f}",
          flush=True)  # fmt: skip
    if args.arms_from:
        _reevaluate(args, model, train_batches, test_batches, inputs)
        return
    measured = args.latency == "measured"

    bn_batches = train_batches[: args.bn_batches]

    def calibrated_loss(m: nn.Module) -> float:  # a cell's metric: loss after the BatchNorms are re-estimated
        if args.bn_batches:
            _reestimate_batchnorm(m, bn_batches)
        if args.cell_finetune:  # on a copy, on batches the loss below does not read
            m = copy.deepcopy(m).train()
            torch.manual_seed(0)
            train(m, train_batches if val_batches else train_batches[4:], args.cell_finetune,
                  optimizer=adam(args.finetune_lr))  # fmt: skip
            m.eval()
        return _mean_loss(m, scored)

    def latency(pruned, repeats=args.repeats) -> dict:
        return _latency(model, pruned, inputs, repeats) if measured else _macs_ratio(model, pruned, inputs)

    start = time.perf_counter()
    profile = sensitivity(
        model,
        train_batches[:4],
        targets="groups",
        metric=calibrated_loss if args.bn_batches or args.cell_finetune or val_batches else "loss",
        sparsities=args.grid,
        costs=("params", "macs"),
        example_inputs=inputs,
        structural={"latency": False, "round_to": args.round_to},
        out=_table_dir(args),
        progress=False,
    )
    analysis_seconds = time.perf_counter() - start
    start = time.perf_counter()
    measured_table = _latency_table(model, profile, inputs, args) if measured else {}
    for cell in profile.cells:  # measured, or the stand-in: each cell's whole-model MACs as a ratio of dense
        key = f"{cell.target}@{cell.sparsity:g}"
        cell.latency = measured_table[key] if measured else cell.macs / profile.dense["macs"]
    table_seconds = time.perf_counter() - start
    print(profile.table(), flush=True)
    print(f"analysis: {len(profile.cells)} cells in {analysis_seconds:.0f} s (in {_table_dir(args)}); latency table "
          f"{table_seconds:.0f} s", flush=True)  # fmt: skip

    def measure(sparsities):
        return latency(_removed(model, sparsities, inputs, args.round_to))["ratio"]

    start = time.perf_counter()
    sparsities, history = fit_budget(profile, {"latency": args.budget}, measure, rounds=args.fit_rounds,
                                     tolerance=0.03, relinearize=args.relinearize)  # fmt: skip
    for h in history:
        print(f"fit round: {h}", flush=True)
    relinearize_seconds = time.perf_counter() - start

    low, high, rounds = 0.0, 0.9, []
    target = next(h["achieved"] for h in history if h.get("chosen"))  # uniform at the same measured latency
    for _ in range(7):
        mid = (low + high) / 2
        ratio = latency(_uniform(model, mid, inputs, args.round_to))["ratio"]
        rounds.append({"sparsity": mid, "ratio": ratio})
        low, high = (mid, high) if ratio > target else (low, mid)
    arms = _arms(model, sparsities, rounds, target, inputs, args.round_to)
    fit_seconds = time.perf_counter() - start
    load.append(os.getloadavg())

    rows = []
    for name, pruned in arms:
        final = latency(pruned, repeats=2 * args.repeats)  # measured again, in this run
        params = sum(p.numel() for p in pruned.parameters())
        within = abs(final["ratio"] - args.budget) <= 0.1 * args.budget
        row = {"allocation": name, **final, "within_10pct": within, "params": params}
        rows.append({**row, **_accuracies(pruned, train_batches, test_batches, args)})
        print(rows[-1], flush=True)
    load.append(os.getloadavg())
    result = {
        "relinearize": args.relinearize,
        "fit_and_relinearize_seconds": relinearize_seconds,
        "uniform_interpolated": _interpolated(rows),
        "machine": machine(),
        "latency": args.latency,
        "width": args.width,
        "size": args.size,
        "batch": args.batch,
        "repeats": args.repeats,
        "bn_batches": args.bn_batches,
        "grid": list(args.grid),
        "round_to": args.round_to,
        "finetune_steps": args.finetune_steps,
        "finetune_seeds": args.finetune_seeds,
        "finetune_lr": args.finetune_lr,
        "cell_finetune": args.cell_finetune,
        "validation_fraction": args.validation_fraction,
        "validation_images": sum(len(y) for _, y in val_batches) if val_batches else 0,
        "training_images": sum(len(y) for _, y in train_batches),
        "load": load,
        "budget": args.budget,
        "dense_accuracy": dense_accuracy,
        "dense_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_seconds,
        "model_cached": cached,
        "analysis_seconds": analysis_seconds,
        "latency_table_seconds": table_seconds,
        "fit_seconds": fit_seconds,
        "total_seconds": time.perf_counter() - began,
        "fit_history": history,
        "fit_rounds": args.fit_rounds,
        "uniform_search": rounds,
        "sensitivity_sparsities": sparsities,
        "rows": rows,
        "profile": profile.to_dict(),
    }
    print(table(result))
    write_results(_result_name(args), result)


def _result_name(args: argparse.Namespace) -> str:
    """``sensitivity_cnn_latency[_macs]``, plus the settings that differ from the first runs' (so a
    run at another width, grid or budget does not overwrite their results)."""
    name = "sensitivity_cnn_latency" + ("" if args.latency == "measured" else "_macs")
    if args.width != 16:
        name += f"_w{args.width}"
    if args.grid != (0.25, 0.5, 0.75) or args.round_to != 1:
        # the count alone for the 8-point grid (the name its results were written under), else the grid itself
        grid = (
            len(args.grid)
            if args.grid == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
            else "-".join(f"{s:g}" for s in args.grid)
        )
        name += f"_g{grid}_r{args.round_to}"
    if args.budget != 0.5:
        name += f"_budget{args.budget:g}"
    if args.finetune_lr != 1e-3:
        name += f"_lr{args.finetune_lr:g}"
    if args.cell_finetune:
        name += f"_cellft{args.cell_finetune}"
    if args.relinearize:
        name += f"_relin{args.relinearize}"
    return name + _val_tag(args)


def _arms(model, sparsities: dict, rounds: list, target: float, inputs, round_to: int) -> list[tuple[str, nn.Module]]:
    """The compared models: the knapsack's allocation, and uniform removal at the bisection's two measured
    points that bracket the knapsack's latency (``_brackets``)."""
    arms = [("sensitivity (knapsack)", _removed(model, sparsities, inputs, round_to))]
    for side, r in _brackets(rounds, target).items():
        arms.append((f"uniform {r['sparsity']:.3f} ({side})", _uniform(model, r["sparsity"], inputs, round_to)))
    return arms


def _brackets(rounds: list[dict], target: float) -> dict[str, dict]:
    """The bisection's measured uniform points nearest the target on each side: the slowest one at
    or below it ('faster') and the fastest one above it ('slower'); one side may be missing."""
    out = {}
    slower = [r for r in rounds if r["ratio"] > target]
    faster = [r for r in rounds if r["ratio"] <= target]
    if slower:
        out["slower"] = min(slower, key=lambda r: (r["ratio"], -r["sparsity"]))
    if faster:
        out["faster"] = max(faster, key=lambda r: (r["ratio"], -r["sparsity"]))
    return out


_INTERPOLATED = ("accuracy_raw", "accuracy", "accuracy_finetuned", "test_loss", "test_loss_finetuned")


def _interpolated(rows: list[dict]) -> dict | None:
    """Uniform's accuracies linearly interpolated in the final measured latency at the knapsack's; None
    (with the reason) where the two brackets do not enclose it after the final re-measurement."""
    ours = rows[0]
    sides = {("slower" if "(slower)" in r["allocation"] else "faster"): r for r in rows[1:]}
    if set(sides) != {"slower", "faster"}:
        return {"reason": f"only the {', '.join(sides)} side was measured"}
    lo, hi = sides["faster"], sides["slower"]
    if not lo["ratio"] <= ours["ratio"] <= hi["ratio"] or hi["ratio"] == lo["ratio"]:
        return {"reason": f"the final latencies do not enclose the knapsack's ({lo['ratio']:.3f}, {ours['ratio']:.3f}, "
                          f"{hi['ratio']:.3f})"}  # fmt: skip
    w = (ours["ratio"] - lo["ratio"]) / (hi["ratio"] - lo["ratio"])
    return {"ratio": ours["ratio"], "weight_of_slower": w,
            **{k: lo[k] + w * (hi[k] - lo[k]) for k in _INTERPOLATED if k in lo and k in hi}}  # fmt: skip


def table(r: dict) -> str:
    lines = [
        f"dense accuracy {r['dense_accuracy']:.4f}, {r['dense_params']} params; budget {r['budget']}x dense latency "
        f"({r['latency']}); {r['total_seconds']:.0f} s in all",
        "| allocation | latency / dense (median) | speed-up IQR | within +-10% | params | accuracy (raw) | "
        "accuracy (BN re-estimated) | after fine-tune (mean of seeds) | test loss (BN re-estimated) | "
        "test loss after fine-tune |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        q1, q3 = row["speedup_iqr"]
        lines.append(
            f"| {row['allocation']} | {row['ratio']:.3f} | {q1:.2f}-{q3:.2f}x | {row['within_10pct']} | "
            f"{row['params']} | {row.get('accuracy_raw', float('nan')):.4f} | {row['accuracy']:.4f} | "
            f"{row['accuracy_finetuned']:.4f} | {row.get('test_loss', float('nan')):.4f} | "
            f"{row.get('test_loss_finetuned', float('nan')):.4f} |"
        )
    i = r.get("uniform_interpolated")
    if i and "ratio" in i:
        lines.append(f"| uniform, interpolated | {i['ratio']:.3f} | | | | {i['accuracy_raw']:.4f} | "
                     f"{i['accuracy']:.4f} | {i['accuracy_finetuned']:.4f} | {i.get('test_loss', float('nan')):.4f} | "
                     f"{i.get('test_loss_finetuned', float('nan')):.4f} |")  # fmt: skip
    elif i:
        lines.append(f"(uniform not interpolated: {i['reason']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
