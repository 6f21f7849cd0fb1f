"""The whole masking stage, jitted, vs the official XA-SSL per-image loop (PyTorch if importable, else numpy).

Stage: patch scores from 224² guidance maps → guided mask (γ = 0.5, β = 0.5) → gather the encoder's visible
input (batch 256, L = 196). The reference is the authors' algorithm as a per-image loop: torch.multinomial
without replacement for the guided part, argsort of uniform keys for the rest, argsort for ids_restore, then the
gather of the embedded tokens (D = 768 float32), as their model embeds every patch before masking. Ours is timed
as the training step runs it (uint8 maps; the visible patches gathered as uint8 grey bytes, which `MAE` embeds
afterwards, `models.vit.PatchEmbed`) and like-for-like (float32 maps, the same D = 768 float32 token gather).
Prints median times and the speed-ups.

    .venv/bin/python benchmarks/masking.py [--batch 256] [--reps 20]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vasomim_jax import masking, models

from timing import median_times  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

PATCH, IMG, DIM, RATIO, BETA = 16, 224, 768, 0.5, 0.5


def fake_guidance(batch: int, seed: int = 0) -> np.ndarray:
    """Binary (B, 224, 224) maps with vessels in about a quarter of the patches (as the real ARCADE maps)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((batch, IMG // PATCH, IMG // PATCH)) < 0.25
    fine = rng.random((batch, IMG, IMG)) < 0.3
    return (np.kron(coarse, np.ones((PATCH, PATCH), bool)) & fine).astype(np.float32)


def jax_stage(gather: str | None):
    """The jitted stage; ``gather`` "bytes" (uint8 image patches, as `MAE` does), "tokens" (D-wide float32
    tokens, as the reference) or None (scores and sampling only)."""
    @jax.jit
    def stage(keys, guidance, inputs, beta):
        scores = masking.patch_scores(guidance, PATCH)
        mk = masking.guided_mask(keys, scores, mask_ratio=RATIO, beta=beta)
        if gather is None:
            return mk.ids_keep, mk.mask, mk.ids_restore
        rows = models.patchify(inputs[..., None], PATCH) if gather == "bytes" else inputs
        return models.gather_patches(rows, mk.ids_keep), mk.mask, mk.ids_restore

    return stage


def numpy_official(guidance: np.ndarray, tokens: np.ndarray, rng: np.random.Generator, gather: bool = True):
    """The official loop in numpy (the reference when torch is missing)."""
    n, length, dim = tokens.shape
    len_keep = int(length * (1 - RATIO))
    num_mask = length - len_keep
    target = int(num_mask * BETA)
    g = guidance.reshape(n, IMG // PATCH, PATCH, IMG // PATCH, PATCH)
    scores = g.transpose(0, 1, 3, 2, 4).reshape(n, length, -1).sum(-1)
    probs = scores / (scores.sum(1, keepdims=True) + 1e-6)
    ids_shuffle = np.zeros((n, length), np.int64)
    for i in range(n):
        if scores[i].sum() == 0:
            ids_shuffle[i] = rng.permutation(length)
            continue
        k = min(target, int((probs[i] > 0).sum()))
        guided = rng.choice(length, k, replace=False, p=probs[i] / probs[i].sum()) if k else np.zeros(0, int)
        chosen = np.zeros(length, bool)
        chosen[guided] = True
        rest = np.flatnonzero(~chosen)
        rand = rest[np.argsort(rng.random(len(rest)))][:num_mask - k]
        mask_idx = np.concatenate([guided, rand])
        keep = np.ones(length, bool)
        keep[mask_idx] = False
        ids_shuffle[i] = np.concatenate([np.flatnonzero(keep), mask_idx])
    ids_restore = np.argsort(ids_shuffle, axis=1)
    if not gather:
        return ids_shuffle[:, :len_keep], ids_restore
    visible = np.take_along_axis(tokens, ids_shuffle[:, :len_keep, None], axis=1)
    mask = np.ones((n, length), np.float32)
    mask[:, :len_keep] = 0
    return visible, np.take_along_axis(mask, ids_restore, 1), ids_restore


def torch_official(guidance, tokens, gather: bool = True):
    """The official loop in PyTorch (torch tensors in, as in XA-SSL's guided_masking)."""
    import torch

    n, length, dim = tokens.shape
    len_keep = int(length * (1 - RATIO))
    num_mask = length - len_keep
    target = int(num_mask * BETA)
    g = guidance.reshape(n, IMG // PATCH, PATCH, IMG // PATCH, PATCH)
    scores = g.permute(0, 1, 3, 2, 4).reshape(n, length, -1).sum(-1)
    probs = scores / (scores.sum(1, keepdim=True) + 1e-6)
    ids_shuffle = torch.zeros((n, length), dtype=torch.long)
    every = torch.arange(length)
    for i in range(n):
        if scores[i].sum() == 0:
            ids_shuffle[i] = torch.randperm(length)
            continue
        k = min(target, int((probs[i] > 0).sum().item()))
        guided = torch.multinomial(probs[i], k, replacement=False) if k else torch.zeros(0, dtype=torch.long)
        chosen = torch.zeros(length, dtype=torch.bool)
        chosen[guided] = True
        rest = every[~chosen]
        rand = rest[torch.argsort(torch.rand(rest.shape[0]))][:num_mask - k]
        mask_idx = torch.cat([guided, rand])
        keep = torch.ones(length, dtype=torch.bool)
        keep[mask_idx] = False
        ids_shuffle[i] = torch.cat([every[keep], mask_idx])
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    if not gather:
        return ids_shuffle[:, :len_keep], ids_restore
    visible = torch.gather(tokens, 1, ids_shuffle[:, :len_keep, None].repeat(1, 1, dim))
    mask = torch.ones((n, length))
    mask[:, :len_keep] = 0
    return visible, torch.gather(mask, 1, ids_restore), ids_restore


def median_ms(fn, reps: int) -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads) per call, ms. On a shared, overloaded box the
    CPU time is the steadier figure: wall time then mostly measures waiting for a core."""
    wall, cpu = median_times(fn, reps)
    return 1e3 * wall, 1e3 * cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    b, length = args.batch, (IMG // PATCH) ** 2
    guidance = fake_guidance(b)
    tokens = np.random.default_rng(1).standard_normal((b, length, DIM), np.float32)

    images = np.random.default_rng(2).integers(0, 256, (b, IMG, IMG), dtype=np.uint8)
    g_dev, t_dev, img_dev = jax.device_put(guidance), jax.device_put(tokens), jax.device_put(images)
    # The training step receives the stored maps as uint8 (4x fewer bytes to read than float32).
    g_u8 = jax.device_put(guidance.astype(np.uint8))
    keys = jax.random.split(jax.random.key(0), b)
    beta = jnp.float32(BETA)
    stage = jax_stage("bytes")
    t0 = time.perf_counter()
    jax.block_until_ready(stage(keys, g_u8, img_dev, beta))
    compile_s = time.perf_counter() - t0
    ours = median_ms(lambda: jax.block_until_ready(stage(keys, g_u8, img_dev, beta)), args.reps)
    like = jax_stage("tokens")
    ours_tokens = median_ms(lambda: jax.block_until_ready(like(keys, g_dev, t_dev, beta)), args.reps)
    no_gather = jax_stage(None)
    ours_ng = median_ms(lambda: jax.block_until_ready(no_gather(keys, g_u8, t_dev, beta)), args.reps)

    scores = jax.jit(lambda g: masking.patch_scores(g, PATCH))(g_dev)
    sample = jax.jit(lambda k, s: masking.guided_mask(k, s, mask_ratio=RATIO, beta=beta))
    sample_only = median_ms(lambda: jax.block_until_ready(sample(keys, scores)), args.reps)
    # The floor any gather pays: writing the same bytes as the visible tokens, as a plain slice copy.
    keep = length - masking.num_masked(length, RATIO)
    copy = jax.jit(lambda t: t[:, :keep] + 0)
    copy_ms = median_ms(lambda: jax.block_until_ready(copy(t_dev)), args.reps)
    xla_sort = jax.jit(lambda s: jnp.argsort(s, axis=1))
    sort_ms = median_ms(lambda: jax.block_until_ready(xla_sort(scores)), args.reps)
    # What each side embeds around its stage: ours the gathered grey bytes (p*p inputs, the normalisation folded
    # into the kernel), the reference every patch of the 3-channel float image (p*p*3 inputs) before masking.
    visible = stage(keys, g_u8, img_dev, beta)[0]
    w_grey = jax.device_put(np.random.default_rng(3).standard_normal((PATCH * PATCH, DIM), np.float32))
    embed = jax.jit(lambda v, w: jnp.dot(v.astype(jnp.float32), w))
    embed_ms = median_ms(lambda: jax.block_until_ready(embed(visible, w_grey)), args.reps)
    all_patches = np.random.default_rng(4).standard_normal((b * length, PATCH * PATCH * 3), np.float32)
    w_rgb = np.random.default_rng(5).standard_normal((PATCH * PATCH * 3, DIM), np.float32)

    try:
        import torch

        torch.manual_seed(0)
        g_t, t_t = torch.from_numpy(guidance), torch.from_numpy(tokens)
        ref_name = f"PyTorch {torch.__version__} per-image loop"
        ref = median_ms(lambda: torch_official(g_t, t_t), max(3, args.reps // 4))
        ref_ng = median_ms(lambda: torch_official(g_t, t_t, gather=False), max(3, args.reps // 4))
        p_t, w_t = torch.from_numpy(all_patches), torch.from_numpy(w_rgb)
        ref_embed = median_ms(lambda: p_t @ w_t, max(3, args.reps // 4))
    except ImportError:
        rng = np.random.default_rng(0)
        ref_name = "numpy per-image loop (torch is not installed)"
        ref = median_ms(lambda: numpy_official(guidance, tokens, rng), max(3, args.reps // 4))
        ref_ng = median_ms(lambda: numpy_official(guidance, tokens, rng, gather=False), max(3, args.reps // 4))
        ref_embed = median_ms(lambda: all_patches @ w_rgb, max(3, args.reps // 4))

    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}); batch {b}, {IMG}² maps, L = {length}, D = {DIM}, "
          f"γ = {RATIO}, β = {BETA}; times are medians, wall / process CPU")
    print(f"JAX masking stage as trained (uint8 maps, visible patches gathered as uint8 bytes, "
          f"{b * keep * PATCH * PATCH / 1e6:.1f} MB): {ours[0]:8.2f} / {ours[1]:8.2f} ms (compile {compile_s:.1f} s)")
    print(f"  like-for-like (float32 maps, D = {DIM} float32 tokens):  {ours_tokens[0]:8.2f} / {ours_tokens[1]:8.2f} ms")
    print(f"  as trained without the gather (scores + sampling):   {ours_ng[0]:8.2f} / {ours_ng[1]:8.2f} ms")
    print(f"  of which sampling alone (guided_mask, 0 sorts):      {sample_only[0]:8.2f} / {sample_only[1]:8.2f} ms")
    print(f"  for scale, a plain copy of the visible tokens' bytes: {copy_ms[0]:8.2f} / {copy_ms[1]:8.2f} ms "
          f"({b * keep * DIM * 4 / 1e6:.1f} MB float32)")
    print(f"  for scale, one XLA argsort of ({b}, {length}):          {sort_ms[0]:8.2f} / {sort_ms[1]:8.2f} ms")
    print(f"official algorithm, {ref_name}: {ref[0]:8.2f} / {ref[1]:8.2f} ms")
    print(f"  without the gather:                                   {ref_ng[0]:8.2f} / {ref_ng[1]:8.2f} ms")
    print(f"speed-up as trained: {ref[0] / ours[0]:.1f}x wall, {ref[1] / ours[1]:.1f}x CPU time; like-for-like "
          f"token gather: {ref[0] / ours_tokens[0]:.1f}x wall, {ref[1] / ours_tokens[1]:.1f}x CPU time")
    print(f"speed-up without the gather: {ref_ng[0] / ours_ng[0]:.1f}x wall, {ref_ng[1] / ours_ng[1]:.1f}x CPU time")
    print(f"sampling alone vs the whole reference: {ref[0] / sample_only[0]:.0f}x wall")
    print(f"patch embedding outside the stage: ours {b}x{keep} grey patches x {PATCH * PATCH} inputs "
          f"{embed_ms[0]:.2f} ms, the reference's {b}x{length} patches x {PATCH * PATCH * 3} inputs "
          f"{ref_embed[0]:.2f} ms (wall); stage + embedding: {(ref[0] + ref_embed[0]) / (ours[0] + embed_ms[0]):.1f}x")


if __name__ == "__main__":
    main()
