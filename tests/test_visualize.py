"""Pictures: panels show the training mask exactly, tiles carry content and labels, the pasted reconstruction
borrows nothing from hidden patches, plots and overlays are drawn, encoder-only weights are refused."""

import functools
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import common
from vasomim_jax import export, masking, models, plots, synthetic, visualize

SIZE, P = 32, 8


def tiny_config():
    c = common.pretrain_config()
    c.model = common.model_config("ti", patch_size=P, img_size=SIZE, in_chans=1)
    c.model.update(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    c.loss.frangi_sigmas = (1.0, 2.0)
    c.masking.beta_per = "step"
    return c


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    model = models.build_mae(config.model)
    params = models.init_params(model, jax.random.PRNGKey(0), (1, SIZE, SIZE, 1))
    images, vessels = synthetic.angiograms([3, 4, 5], 64)
    batch = {"image": images[:, 16:48, 16:48], "vessel_map": vessels[:, 16:48, 16:48],
             "index": np.array([7, 8, 9], np.int32)}
    return config, model, params, batch


@pytest.fixture(scope="module")
def panels(setup):
    """Panels of the first two examples at step 150 of 300 (β = 0.25: guided and random patches both present)."""
    config, model, params, batch = setup
    rng, step = jax.random.PRNGKey(5), 150
    fn = visualize.make_panel_fn(model, config, total_steps=300, steps_per_epoch=10, max_examples=2)
    return rng, step, fn(params, batch, rng, step)


def _tiles(path):
    """(labels, [tile (H, W, 3) at panel scale], [label strip]) read back from a saved panel."""
    png = Image.open(path)
    labels, geo = json.loads(png.text["labels"]), json.loads(png.text["tile_geometry"])
    arr = np.asarray(png.convert("RGB"))
    (cw, ch), pad, cols, lh = geo["cell"], geo["pad"], geo["columns"], geo["label_height"]
    tiles, strips = [], []
    for i in range(len(labels)):
        x, y = pad + (i % cols) * (cw + pad), pad + (i // cols) * (ch + pad)
        strips.append(arr[y:y + lh, x:x + cw])
        tiles.append(arr[y + lh:y + ch, x:x + cw][::geo["scale"], ::geo["scale"]])
    return labels, tiles, strips


def test_panel_mask_is_the_training_mask_and_its_colours_sit_exactly_on_maskresult(setup, panels, tmp_path):
    config, _, _, batch = setup
    rng, step, pictures = panels
    assert len(pictures) == 4  # full + pasted for 2 examples
    mk, _ = masking.mask_batch({k: jnp.asarray(v) for k, v in batch.items()}, rng, step, config.masking,
                               patch_size=P, total_steps=300, steps_per_epoch=10)
    mask, guided = np.asarray(mk.mask) > 0, np.asarray(mk.guided)
    assert guided.any() and (mask & ~guided).any()  # both colours present at β = 0.25
    for i in range(2):
        path = visualize.save_png(pictures[2 * i], tmp_path / f"p{i}.png")
        labels, tiles, _ = _tiles(path)
        tile = tiles[3]
        assert labels[3].startswith(f"mask: {guided[i].sum()} guided")
        for k in range(mask.shape[1]):
            r, c = divmod(k, SIZE // P)
            block = tile[r * P:(r + 1) * P, c * P:(c + 1) * P].reshape(-1, 3)
            if guided[i, k]:
                assert (block == visualize.GUIDED_RGB).all()
            elif mask[i, k]:
                assert (block == visualize.RANDOM_RGB).all()
            else:  # visible: the grey angiogram itself
                expected = batch["image"][i, r * P:(r + 1) * P, c * P:(c + 1) * P].reshape(-1)
                np.testing.assert_array_equal(block, np.repeat(expected[:, None], 3, axis=1))


def test_panel_tiles_have_content_and_labels_are_stored_and_inked(panels, tmp_path):
    full, pasted = panels[2][:2]
    for picture, rec_label in ((full, "(leaks)"), (pasted, "visible-patch stats")):
        labels, tiles, strips = _tiles(visualize.save_png(picture, tmp_path / "p.png"))
        assert len(labels) == 8 and labels[0] == "angiogram" and rec_label in labels[5]
        for label, tile, strip in zip(labels, tiles, strips):
            assert len(np.unique(tile.reshape(-1, 3), axis=0)) > 1, f"tile {label!r} is blank"
            assert (strip < 128).any(), f"label strip of {label!r} has no ink"


def test_pasted_reconstruction_keeps_visible_pixels_and_ignores_hidden_ones(setup):
    config, model, params, batch = setup
    b = {k: jnp.asarray(v) for k, v in batch.items()}  # 3 examples
    # One step in all: β = beta_end = 0.5 at step 0.
    fn = jax.jit(functools.partial(visualize.intermediates, model, config, total_steps=1, steps_per_epoch=1))
    rng = jax.random.PRNGKey(1)
    out = fn(params, b, rng, 0)
    hidden = np.kron(np.asarray(out["mask"]).reshape(-1, SIZE // P, SIZE // P), np.ones((P, P))) > 0
    # Visible pixels are the input's own (through preprocess and back).
    np.testing.assert_allclose(np.asarray(out["reconstruction_pasted"])[~hidden], batch["image"][~hidden],
                               atol=1e-3)
    # Scrambling the hidden pixels changes the leaky picture, not the honest one.
    scrambled = np.where(hidden, 255 - batch["image"], batch["image"]).astype(np.uint8)
    out2 = fn(params, dict(b, image=jnp.asarray(scrambled)), rng, 0)
    np.testing.assert_allclose(np.asarray(out2["reconstruction_pasted"]), np.asarray(out["reconstruction_pasted"]),
                               atol=1e-3)
    assert np.abs(np.asarray(out2["reconstruction"]) - np.asarray(out["reconstruction"]))[hidden].max() > 1.0


def test_encoder_only_weights_are_refused_with_a_clear_message(setup, tmp_path):
    config, _, params, _ = setup
    path = export.save_state_dict(export.to_timm(params, config.model), tmp_path / "enc.safetensors", fmt="timm",
                                  model_cfg=config.model, extra={"config": config.to_dict()})
    with pytest.raises(ValueError, match="encoder-only weights .* no MAE decoder"):
        visualize.pretrain_pictures(str(path), tmp_path / "out")


def test_plots_keep_the_last_record_of_a_resumed_step_and_tolerate_a_torn_last_line(tmp_path):
    rows = [dict(step=s, loss=1.0 / s, loss_rec=0.8 / s, loss_cons=0.2 / s, beta=s / 40, vessel_share=0.2 + s / 100,
                 vessel_share_random=0.2) for s in (10, 20, 30)]
    rows.append(dict(rows[1], loss=9.0))  # step 20 again after a resume
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)) + '\n{"step": 40, "lo')
    m = plots.read_metrics(path)
    np.testing.assert_array_equal(m["step"], [10, 20, 30])
    assert m["loss"][1] == 9.0
    written = plots.plot_metrics(path, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["losses.png", "vessel_share.png"]
    for p in written:
        arr = np.asarray(Image.open(p).convert("RGB"))
        assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 10  # curves, legend and axes, not a blank canvas


def test_segmentation_overlays_colour_each_error_kind():
    gt = np.zeros((16, 16), np.uint8)
    gt[4:12, 6:9] = 1
    prob = np.zeros((16, 16), np.float32)
    prob[4:8, 6:9] = 0.9  # true positives
    prob[0:2, 0:2] = 0.8  # false positives
    err = visualize.error_rgb(prob >= 0.5, gt)
    assert (err[4:8, 6:9] == visualize.TP_RGB).all() and (err[0:2, 0:2] == visualize.FP_RGB).all()
    assert (err[8:12, 6:9] == visualize.FN_RGB).all() and (err[14:, 14:] == 0).all()
    panel = visualize.segmentation_panel(np.full((16, 16), 100, np.uint8), prob, gt)
    labels = json.loads(panel.info["labels"])
    assert labels[-1] == f"errors: FP red, FN blue (Dice {2 * 12 / (16 + 24):.3f})"


def test_log_panels_writes_images_tensorboard_can_read(tmp_path):
    from tensorboardX.proto import event_pb2

    pictures = [np.full((20, 30, 3), v, np.uint8) for v in (10, 200)]
    visualize.log_panels(tmp_path, 7, pictures)
    tags = {}
    for f in tmp_path.rglob("events.out.tfevents.*"):
        data, pos = f.read_bytes(), 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                tags[v.tag] = (event.step, v.image.width, v.image.height)
    assert tags == {"panels/example0_full": (7, 30, 20), "panels/example0_pasted": (7, 30, 20)}
