"""Scanned vs unrolled block stack: compile time and step time of an MAE gradient.

Default: ViT-B/16 MAE (encoder 12 x 768, decoder 8 x 512), batch 8, 224x224x3, 50% masked, float32, on whatever
backend JAX picks. Both variants have the same param tree; "unrolled" sets lax.scan's unroll to the full depth.

    .venv/bin/python benchmarks/model_scan.py [--size b] [--batch 8] [--steps 3] [--dtype float32]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from vasomim_jax import models


def masked_mse_grad(model):
    def loss(params, x, ids_keep, ids_restore, mask):
        pred = model.apply({"params": params}, x, ids_keep, ids_restore)
        err = ((pred - models.patchify(x, model.patch_size)) ** 2).mean(-1)
        return (err * mask).sum() / mask.sum()
    return jax.jit(jax.value_and_grad(loss))


def timed(fn):
    """(wall s, process CPU s over all threads) of fn(); CPU time stays meaningful on a shared, loaded box."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def measure(model, params, args, steps):
    """{"compile": (wall, cpu), "step": (median wall, median cpu)} of the jitted gradient."""
    compiled = []
    compile_t = timed(lambda: compiled.append(masked_mse_grad(model).lower(params, *args).compile()))
    step = compiled[0]
    jax.block_until_ready(step(params, *args))  # warm-up
    times = np.array([timed(lambda: jax.block_until_ready(step(params, *args))) for _ in range(steps)])
    return {"compile": compile_t, "step": tuple(np.median(times, axis=0))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--mask_ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()

    cfg = common.model_config(a.size, 16, a.img, in_chans=3)
    cfg.dtype = a.dtype
    model = models.build_mae(cfg)
    params = jax.jit(models.init_params, static_argnums=(0, 2))(model, jax.random.key(0), (1, a.img, a.img, 3))
    num = (a.img // 16) ** 2
    n_keep = int(num * (1 - a.mask_ratio))
    ids_shuffle = jnp.argsort(jax.random.uniform(jax.random.key(1), (a.batch, num)), axis=1).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    mask = jnp.take_along_axis(jnp.ones((a.batch, num)).at[:, :n_keep].set(0.0), ids_restore, axis=1)
    x = jax.random.normal(jax.random.key(2), (a.batch, a.img, a.img, 3))
    args = (x, ids_shuffle[:, :n_keep], ids_restore, mask)

    print(f"{jax.devices()[0].device_kind}: MAE ViT-{a.size.upper()}/16 {a.dtype}, batch {a.batch}, {a.img}^2, "
          f"{n_keep}/{num} visible, {a.steps} timed steps (median)")
    results = {}
    for name, unroll in (("scanned", 1), ("unrolled", max(cfg.depth, cfg.decoder_depth))):
        r = results[name] = measure(model.clone(scan_unroll=unroll), params, args, a.steps)
        print(f"  {name:9s} compile {r['compile'][0]:6.1f} s wall {r['compile'][1]:6.1f} s cpu   "
              f"step {r['step'][0]:6.2f} s wall {r['step'][1]:6.2f} s cpu")
    for what in ("compile", "step"):
        (ws, cs), (wu, cu) = results["scanned"][what], results["unrolled"][what]
        print(f"  unrolled / scanned {what}: wall x{wu / ws:.2f}, cpu x{cu / cs:.2f}")

if __name__ == "__main__":
    main()
