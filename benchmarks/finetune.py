"""Fine-tuning costs, each as a ratio against a reference measured in the same run (CPU time and wall time).

1. Train step of ViT + UNETR decoder vs the same ViT encoder alone (loss on the tokens): the decoder's overhead.
2. Host-side scoring of one 512² mask: clDice (two skeletonisations) vs Dice.

.venv/bin/python benchmarks/finetune.py [--size ti] [--img 224] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import common
from vasomim_jax import synthetic
from vasomim_jax.finetune import encoder as encoder_lib
from vasomim_jax.finetune import heads, seg_metrics

from timing import median_times  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def step_fns(size: str, img: int, batch: int):
    m = common.model_config(size, 16, img, in_chans=1)
    enc = encoder_lib.build_encoder(m, 0.1)
    seg = heads.SegmentationModel(enc, heads.UNETRDecoder(16, 16))
    x = jax.random.normal(jax.random.key(0), (batch, img, img, 1))
    y = (jax.random.uniform(jax.random.key(1), (batch, img, img, 1)) > 0.9).astype(jnp.float32)
    tx = optax.adamw(1e-4)

    def make(model, loss):
        params = jax.jit(lambda k: model.init(k, x, train=False)["params"])(jax.random.key(2))
        opt = tx.init(params)

        @jax.jit
        def step(p, o):
            g = jax.grad(lambda p: loss(model.apply({"params": p}, x, train=True,
                                                    rngs={"dropout": jax.random.key(3)})))(p)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o

        return lambda: jax.block_until_ready(step(params, opt))

    seg_step = make(seg, lambda out: optax.sigmoid_binary_cross_entropy(out, y).mean())
    enc_step = make(enc, lambda tokens: jnp.mean(tokens**2))
    return seg_step, enc_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="ti")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    seg_step, enc_step = step_fns(args.size, args.img, args.batch)
    (sw, sc), (ew, ec) = median_times(seg_step, args.repeats), median_times(enc_step, args.repeats)
    print(f"train step ViT-{args.size}/16 {args.img}px batch {args.batch}: encoder+UNETR {sw:.3f} s wall "
          f"{sc:.3f} s CPU; encoder alone {ew:.3f} s wall {ec:.3f} s CPU; ratio {sw / ew:.2f} wall, "
          f"{sc / ec:.2f} CPU")

    _, gt = synthetic.angiogram(0, 512)
    pred = np.roll(gt, 2, axis=1)
    (dw, dc), (cw, cc) = (median_times(lambda: seg_metrics.dice(pred, gt), 20),
                          median_times(lambda: seg_metrics.cldice(pred, gt), 20))
    print(f"scoring one 512² mask: dice {1e3 * dw:.2f} ms wall {1e3 * dc:.2f} ms CPU; cldice {1e3 * cw:.2f} ms "
          f"wall {1e3 * cc:.2f} ms CPU; ratio {cw / dw:.1f} wall, {cc / dc:.1f} CPU")


if __name__ == "__main__":
    main()
