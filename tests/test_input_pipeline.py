"""Specifications of vasomim_jax.input_pipeline: torchvision crop sampling, paired crop/flip, per-example randomness
keyed by the global record index, process-count invariance of the global batch, exact iterator resume."""

import math
import pickle

import cv2
import jax
import numpy as np
import pytest
from absl import flags

from configs import common
from vasomim_jax import input_pipeline as ip
from vasomim_jax import sharding


def _source(n=23, h=40, w=36, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (h, w), dtype=np.uint8),
             "vessel_map": (rng.random((h, w)) > 0.7).astype(np.uint8)} for _ in range(n)]


def _batches(source, *, global_batch, pidx=0, pcount=1, n=3, state=None, seed=3, size=16, workers=0):
    input_cfg = common.pretrain_config().input
    input_cfg.num_workers = workers
    if workers:
        flags.FLAGS.mark_as_parsed()  # grain's mp_prefetch reads its absl flags (parsed by `vasomim` in a run)
    ds = ip.make_dataset(source, global_batch=global_batch, process_index=pidx, process_count=pcount, seed=seed,
                         input_cfg=input_cfg, size=size)
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    batches = [next(it) for _ in range(n)]
    it.close()  # stops mp_prefetch workers
    return batches, it.get_state()


def test_crop_params_follow_torchvision_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = ip.crop_params(rng, 50, 70, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 70
        # rounding of sqrt(area * ratio) moves the ratio/area a little off the sampled values
        assert 0.2 * 0.9 <= h * w / (50 * 70) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_crop_params_fall_back_to_the_centre_crop():
    # scale > 1 can never fit: torchvision's fallback is the centre crop clamped to the ratio range
    top, left, h, w = ip.crop_params(np.random.default_rng(0), 40, 100, (2.0, 3.0), (3 / 4, 4 / 3))
    assert (h, w) == (40, round(40 * 4 / 3)) and top == 0 and left == (100 - 53) // 2


def test_image_and_map_get_the_same_crop_and_flip():
    # image = column ramp, map = left half: after any crop/flip, the map marks the darker side of the image
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    left = (np.arange(64) < 32).astype(np.uint8)[None].repeat(64, 0)
    flips = set()
    for seed in range(30):
        img, vmap = ip.augment(ramp, left, np.random.default_rng(seed), size=32, scale=(0.2, 1.0),
                               ratio=(3 / 4, 4 / 3), hflip_prob=0.5)
        assert img.shape == vmap.shape == (32, 32) and img.dtype == vmap.dtype == np.uint8
        flipped = img[0, 0] > img[0, -1]
        flips.add(bool(flipped))
        if vmap.any() and not vmap.all():
            on, off = img[vmap == 1].mean(), img[vmap == 0].mean()
            assert on < off
            cols = np.flatnonzero(vmap[0])
            assert (cols[0] == 0) != flipped  # the map's ones sit on the left unless flipped
    assert flips == {True, False}


def test_image_resize_is_pil_bicubic_of_the_crop():
    image = np.random.default_rng(1).integers(0, 256, (80, 80), dtype=np.uint8)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    img, _ = ip.augment(image, np.zeros_like(image), rng_a, size=24, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                        hflip_prob=0.0)
    top, left, h, w = ip.crop_params(rng_b, 80, 80, (0.2, 1.0), (3 / 4, 4 / 3))
    from PIL import Image
    ref = np.asarray(Image.fromarray(image[top:top + h, left:left + w]).resize((24, 24), Image.BICUBIC))
    np.testing.assert_array_equal(img, ref)


def test_global_batch_is_the_same_for_any_process_count():
    src = _source()
    one, _ = _batches(src, global_batch=8)
    for pcount in (2, 4):
        blocks = [_batches(src, global_batch=8, pidx=p, pcount=pcount)[0] for p in range(pcount)]
        for s in range(3):
            for k in ("image", "vessel_map", "index"):
                np.testing.assert_array_equal(one[s][k], np.concatenate([b[s][k] for b in blocks]))


def test_examples_depend_on_global_index_not_on_batch_size():
    src = _source()
    a, _ = _batches(src, global_batch=8, n=3)
    b, _ = _batches(src, global_batch=4, n=6)
    for k in ("image", "vessel_map", "index"):
        np.testing.assert_array_equal(np.concatenate([x[k] for x in a]), np.concatenate([x[k] for x in b]))


def test_each_epoch_visits_every_record_once_in_a_new_order():
    src = _source(n=16)
    for i, ex in enumerate(src):  # tag each record by a pixel-independent fingerprint: its own map sum
        ex["vessel_map"] = np.zeros_like(ex["vessel_map"])
        ex["image"] = np.full_like(ex["image"], i * 10)
    batches, _ = _batches(src, global_batch=8, n=4, size=8)
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, np.arange(32))
    ids = np.concatenate([b["image"][:, 0, 0] // 10 for b in batches])
    assert sorted(ids[:16]) == list(range(16)) == sorted(ids[16:])
    assert not np.array_equal(ids[:16], ids[16:])


def test_restored_iterator_yields_exactly_the_next_batches():
    src = _source()
    straight, _ = _batches(src, global_batch=8, n=5)
    _, state = _batches(src, global_batch=8, n=2)
    resumed, _ = _batches(src, global_batch=8, n=3, state=state)
    for x, y in zip(straight[2:], resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("written_by, resumed_on, workers", [(1, 2, 0), (2, 1, 0), (2, 1, 2)])
def test_an_iterator_state_from_k_processes_positions_p_processes_on_the_straight_run(written_by, resumed_on,
                                                                                       workers):
    src = _source()
    straight, _ = _batches(src, global_batch=8, n=5)
    states = [_batches(src, global_batch=8, pidx=p, pcount=written_by, n=2)[1] for p in range(written_by)]
    assert all(s == {"next_global_batch": 2} for s in states)  # the same on every process: any one restores
    blocks = [_batches(src, global_batch=8, pidx=p, pcount=resumed_on, n=3, state=states[0], workers=workers)[0]
              for p in range(resumed_on)]
    for s, want in enumerate(straight[2:]):
        for k in want:
            np.testing.assert_array_equal(np.concatenate([b[s][k] for b in blocks]), want[k])


def test_seek_positions_the_iterator_at_a_global_batch():
    src = _source()
    straight, _ = _batches(src, global_batch=8, n=4)
    it = iter(ip.make_dataset(src, global_batch=8, process_index=1, process_count=2, seed=3,
                              input_cfg=common.pretrain_config().input, size=16))
    next(it)
    it.seek(3)
    np.testing.assert_array_equal(next(it)["index"], straight[3]["index"][4:])
    assert it.get_state() == {"next_global_batch": 4}
    with pytest.raises(ValueError, match="next_global_batch"):
        it.set_state({"next_index": 3})  # grain's own state: not this pipeline's


def test_png_bytes_decode_like_arrays():
    src = _source(n=5)
    encoded = [{k: cv2.imencode(".png", v)[1].tobytes() for k, v in ex.items()} for ex in src]
    a, _ = _batches(src, global_batch=4, n=2)
    b, _ = _batches(encoded, global_batch=4, n=2)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_bad_examples_are_named():
    src = _source(n=4)
    src[2]["vessel_map"] = src[2]["vessel_map"] * 255
    with pytest.raises(ValueError, match="vessel map holds values > 1"):
        _batches(src, global_batch=4, n=1)
    with pytest.raises(ValueError, match="differ in shape"):
        ip.augment(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8), np.random.default_rng(0), size=4,
                   scale=(0.2, 1), ratio=(1, 1), hflip_prob=0)
    with pytest.raises(ValueError, match="split over 3 processes"):
        _batches(src, global_batch=4, pcount=3)


def test_unknown_dataset_error_names_the_config_field(tmp_path):
    cfg = common.pretrain_config().dataset
    cfg.name, cfg.data_dir = "no_such_dataset_xyz", str(tmp_path)
    with pytest.raises(ValueError, match="config.dataset.name"):
        ip.tfds_source(cfg)


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """Tiny angio_folder/native (3 images) and angio_folder/r256 (2 images) builds, and a vessel_seg_folder build
    (no vessel maps), in one data_dir."""
    import tensorflow_datasets as tfds

    import tfds_builders  # noqa: F401  (registers the builders)
    from builders_testlib import synthetic, write

    root = tmp_path_factory.mktemp("builds")
    for name, files in (("angio_folder/native", ["a0", "a1", "a2"]), ("angio_folder/r256", ["b0", "b1"]),
                        ("vessel_seg_folder", ["c0"])):
        manual = root / name.replace("/", "_")
        seg = name == "vessel_seg_folder"
        for seed, stem in enumerate(files):
            img = synthetic(manual / ("images" if seg else "") / f"{stem}.png", seed, 48)
            if seg:
                write(manual / "masks" / f"{stem}_gt.png", (img > 128).astype(np.uint8) * 255)
        tfds.builder(name, data_dir=str(root / "tfds"), num_workers=1).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual)), file_format="array_record")
    return root / "tfds"


def test_comma_separated_names_read_every_build_as_one_source(two_builds):
    cfg = common.pretrain_config().dataset
    cfg.name, cfg.data_dir = "angio_folder/native, angio_folder/r256", str(two_builds)
    src = ip.tfds_source(cfg)
    assert len(src) == 5
    names = [src[i]["file_name"].decode() for i in range(len(src))]
    assert sorted(names) == ["a0.png", "a1.png", "a2.png", "b0.png", "b1.png"]
    assert names[3:] == [n for n in names if n.startswith("b")]  # builds one after another, in the order given
    assert [r["file_name"] for r in pickle.loads(pickle.dumps(src))] == [src[i]["file_name"] for i in range(5)]
    with pytest.raises(IndexError):
        src[5]
    # One global batch of 5 = one shuffled epoch over both builds (48 px and 256 px images alike).
    (batch,), _ = _batches(src, global_batch=5, n=1)
    assert batch["image"].shape == batch["vessel_map"].shape == (5, 16, 16)
    assert sorted(batch["index"].tolist()) == [0, 1, 2, 3, 4]


def test_a_build_without_vessel_maps_or_a_blank_name_is_named(two_builds):
    cfg = common.pretrain_config().dataset
    cfg.name, cfg.data_dir = "angio_folder/native,vessel_seg_folder", str(two_builds)
    with pytest.raises(ValueError, match=r"config\.dataset\.name=.*\(build 'vessel_seg_folder'\): "
                                         r"features \['vessel_map'\] missing"):
        ip.tfds_source(cfg)
    cfg.name = "angio_folder/native,no_such_build_xyz"
    with pytest.raises(ValueError, match=r"\(build 'no_such_build_xyz'\)"):
        ip.tfds_source(cfg)
    cfg.name = "angio_folder/native,"
    with pytest.raises(ValueError, match=r"config\.dataset\.name"):
        ip.tfds_source(cfg)


def test_host_batch_becomes_a_global_array():
    cfg = common.pretrain_config()
    mesh = sharding.make_mesh(cfg)
    batch, _ = _batches(_source(), global_batch=4, n=1)
    arrays = ip.to_global(batch[0], sharding.batch_sharding(mesh), 4)
    assert arrays["image"].shape == (4, 16, 16) and arrays["image"].dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(arrays["index"]), batch[0]["index"])
    assert math.prod(mesh.devices.shape) == jax.device_count()
