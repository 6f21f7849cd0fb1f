"""A miniature reproduction of the paper's claim: VasoMIM vs MAE vs no pre-training, judged by vessel
segmentation after fine-tuning (DSC and clDice mean ± std over folds × seeds).

  .venv/bin/python benchmarks/reproduce_small.py --pretrain_data NAME[,NAME...] --seg_data NAME --data_dir DIR \
      --out results.json [--workdir DIR] [--pretrain_steps 300] [--finetune_steps 200] [--folds 4] [--seeds 0,1]

NAME are TFDS names built in DIR with our builders (pre-training: one or several builds with vessel maps, mixed
into one shuffled stream, e.g. angio_folder/r256 on the ARCADE images plus synthetic_angio/small; segmentation: a
vessel_seg_folder build, e.g. the 40 CIMAT images).
Arms: "vasomim" (guided masking β 0→0.5 + consistency loss), "mae" (random masking, no consistency), "scratch"
(random init). Folds: the segmentation train split in record order cut into K contiguous blocks; fold f
evaluates on block f and fine-tunes on the rest. The same pre-trained encoder is fine-tuned with every seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import tensorflow_datasets as tfds

import tfds_builders  # noqa: F401  (registers the builders)
from configs import common
from vasomim_jax import train as pretrain_lib
from vasomim_jax.finetune import train as finetune_lib

ARMS = ("vasomim", "mae", "scratch")


def model_cfg(args):
    m = common.model_config(args.size, args.patch, args.img, in_chans=1)
    m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads = 128, 2, 4
    return m


def pretrain_config(args, arm: str):
    c = common.pretrain_config()
    c.dataset.name, c.dataset.data_dir = args.pretrain_data, args.data_dir
    c.batch_size, c.epochs, c.total_steps = args.batch, 0, args.pretrain_steps
    c.log_every_steps = min(10, args.pretrain_steps)  # the vessel_share curves need logged steps
    c.model = model_cfg(args)
    c.masking.beta_per = "step"
    c.loss.frangi_sigmas = (1.0, 2.0)
    c.optim.base_lr = 1.5e-4 * 8
    c.checkpoint.every_steps = args.pretrain_steps
    c.metrics.tensorboard = False
    if arm == "mae":
        c.masking.beta_start = c.masking.beta_end = 0.0
        c.loss.consistency_weight = 0.0
    return c


def finetune_config(args, init_from: str, fold: int, n: int, seed: int):
    c = common.finetune_config("segmentation")
    c.dataset.name, c.dataset.data_dir = args.seg_data, args.data_dir
    a, b = fold * n // args.folds, (fold + 1) * n // args.folds
    c.dataset.split = "+".join(s for s in (f"train[:{a}]" if a else "", f"train[{b}:]" if b < n else "") if s)
    c.dataset.eval_split = f"train[{a}:{b}]"
    c.model = model_cfg(args)
    c.batch_size, c.total_steps = args.ft_batch, args.finetune_steps
    c.log_every_steps, c.eval_every_steps = 10, 0
    c.checkpoint.every_steps = args.finetune_steps
    c.metrics.tensorboard = False
    c.optim.lr = 1e-3
    c.seed, c.init_from = seed, init_from
    return c


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain_data", required=True,
                    help="NAME[,NAME...]: TFDS builds with vessel maps, their train splits mixed for pre-training")
    ap.add_argument("--seg_data", required=True)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="reproduce_out")
    ap.add_argument("--size", default="ti")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ft_batch", type=int, default=8)
    ap.add_argument("--pretrain_steps", type=int, default=300)
    ap.add_argument("--finetune_steps", type=int, default=200)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args()
    arms = args.arms.split(",")
    for arm in arms:
        if arm not in ARMS:
            raise SystemExit(f"--arms: unknown arm {arm!r} (use {ARMS})")
    n = len(tfds.data_source(args.seg_data, split="train", data_dir=args.data_dir))
    if not 2 <= args.folds <= n:
        raise SystemExit(f"--folds={args.folds}: needs 2..{n} (the {args.seg_data} train split has {n} records)")
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.workdir)
    # Every fine-tuning run compiles the same step: compile it once.
    jax.config.update("jax_compilation_cache_dir", str(root.absolute() / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    results = {"args": vars(args), "arms": {}}
    for arm in arms:
        t0 = time.time()
        init_from, curves = "", {}
        if arm != "scratch":
            pre_dir = root / arm / "pretrain"
            pretrain_lib.train(pretrain_config(args, arm), pre_dir)
            rows = read_jsonl(pre_dir / "metrics.jsonl")
            curves = {k: [(r["step"], r[k]) for r in rows if k in r] for k in ("vessel_share", "vessel_share_random",
                                                                               "loss_rec", "beta")}
            init_from = str(pre_dir)
        runs = []
        for fold in range(args.folds):
            for seed in seeds:
                ft_dir = root / arm / f"fold{fold}_seed{seed}"
                finetune_lib.train(finetune_config(args, init_from, fold, n, seed), ft_dir)
                last = [r for r in read_jsonl(ft_dir / "metrics.jsonl") if "dice" in r][-1]
                runs.append({"fold": fold, "seed": seed, "dice": last["dice"], "cldice": last["cldice"]})
        dice, cl = np.array([r["dice"] for r in runs]), np.array([r["cldice"] for r in runs])
        results["arms"][arm] = {"dice_mean": dice.mean(), "dice_std": dice.std(), "cldice_mean": cl.mean(),
                                "cldice_std": cl.std(), "runs": runs, "pretrain_curves": curves,
                                "minutes": (time.time() - t0) / 60}
        Path(args.out).write_text(json.dumps(results, indent=2, default=float))
    print("| arm | DSC mean ± std | clDice mean ± std | runs |\n|---|---|---|---|")
    for arm, r in results["arms"].items():
        print(f"| {arm} | {100 * r['dice_mean']:.2f} ± {100 * r['dice_std']:.2f} | "
              f"{100 * r['cldice_mean']:.2f} ± {100 * r['cldice_std']:.2f} | {len(r['runs'])} |")


if __name__ == "__main__":
    main()
