"""Decoding, windowing and bad-file checks of tfds_builders.images (no dataset is built here)."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from tfds_builders import images


def _png(arr: np.ndarray) -> bytes:
    return cv2.imencode(".png", arr)[1].tobytes()


def test_dicom_linear_window_follows_the_standard_formula():
    x = np.array([[0, 1000, 1500, 2000, 4095]], np.uint16)
    c, w = 1500.0, 1000.0
    ref = np.clip((x.astype(np.float64) - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255
    np.testing.assert_array_equal(images.window_to_uint8(x, c, w), np.round(ref).astype(np.uint8))


def test_percentile_window_maps_0p5_and_99p5_percentiles_to_0_and_255():
    x = np.random.default_rng(0).integers(0, 65535, (64, 64)).astype(np.uint16)
    lo, hi = np.percentile(x.astype(np.float64), [0.5, 99.5])
    ref = np.round(np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(images.window_to_uint8(x), ref)
    assert not images.window_to_uint8(np.full((4, 4), 7, np.uint16)).any()  # constant image → zeros


def test_16bit_png_is_windowed_and_8bit_kept(tmp_path):
    x16 = np.random.default_rng(1).integers(0, 4096, (32, 40)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), x16)
    np.testing.assert_array_equal(images.read_image(tmp_path / "a.png"), images.window_to_uint8(x16))
    x8 = np.random.default_rng(2).integers(0, 256, (32, 40)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "b.tif"), x8)
    np.testing.assert_array_equal(images.read_image(tmp_path / "b.tif"), x8)


def test_rgb_becomes_pil_luma_grey(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (20, 24, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    np.testing.assert_array_equal(images.read_image(tmp_path / "c.bmp"),
                                  np.asarray(Image.fromarray(rgb).convert("L")))


@pytest.mark.parametrize("name,data,reason", [
    ("empty.png", b"", "empty file"),
    ("garbage.png", b"this is not an image at all", "cannot decode"),
])
def test_unusable_bytes_are_bad_files(tmp_path, name, data, reason):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(images.BadFileError, match=reason) as e:
        images.read_image(tmp_path / name)
    assert e.value.path == str(tmp_path / name)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_files_are_bad_not_grey_filled(tmp_path, ext):
    img = np.random.default_rng(4).integers(0, 256, (64, 64)).astype(np.uint8)
    data = cv2.imencode(ext, img)[1].tobytes()
    (tmp_path / f"t{ext}").write_bytes(data[: len(data) // 2])
    with pytest.raises(images.BadFileError, match="cannot decode"):
        images.read_image(tmp_path / f"t{ext}")


def test_maps_accept_01_and_0255_and_count_grey(tmp_path):
    m = np.zeros((10, 20), np.uint8)
    m[2:5, 3:9] = 1
    (tmp_path / "m01.png").write_bytes(_png(m))
    out, grey = images.read_map(tmp_path / "m01.png", (10, 20))
    np.testing.assert_array_equal(out, m)
    assert grey == 0
    m255 = m * 255
    m255[0, 0] = 200  # one anti-aliased pixel (0.5 %) → binarised, counted
    (tmp_path / "m255.png").write_bytes(_png(m255))
    out, grey = images.read_map(tmp_path / "m255.png", (10, 20))
    expected = m.copy()
    expected[0, 0] = 1
    np.testing.assert_array_equal(out, expected)
    assert grey == 1


def test_grey_maps_and_size_mismatch_are_bad(tmp_path):
    grey = np.full((10, 10), 128, np.uint8)
    (tmp_path / "g.png").write_bytes(_png(grey))
    with pytest.raises(images.BadFileError, match="not a binary map"):
        images.read_map(tmp_path / "g.png", (10, 10))
    with pytest.raises(images.BadFileError, match="differs from its image"):
        images.read_map(tmp_path / "g.png", (10, 12))


def test_scan_ignores_hidden_and_non_image_files(tmp_path):
    for rel in ["a/x.png", "a/y.JPG", "a/README", "notes.txt", "meta.json", ".hidden.png", ".git/z.png", "b.dcm"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found, ignored = images.scan_tree(tmp_path)
    assert [str(p.relative_to(tmp_path)) for p in found] == ["b.dcm", "a/x.png", "a/y.JPG"]
    assert sorted(str(p.relative_to(tmp_path)) for p in ignored) == [".hidden.png", "a/README", "meta.json",
                                                                      "notes.txt"]


def test_scan_follows_symlinked_folders_and_files_and_enters_a_loop_once(tmp_path):
    store, root = tmp_path / "store", tmp_path / "root"
    for rel in ["train/x.png", "test/y.png"]:
        (store / rel).parent.mkdir(parents=True, exist_ok=True)
        (store / rel).write_bytes(b"x")
    root.mkdir()
    (root / "training").symlink_to(store / "train")  # a split folder that is a link
    (root / "z.png").symlink_to(store / "test" / "y.png")  # a file that is a link
    (store / "train" / "loop").symlink_to(root)  # a link back up: walked once, not forever
    found, ignored = images.scan_tree(root)
    assert [str(p.relative_to(root)) for p in found] == ["z.png", "training/x.png"]
    assert ignored == []


def _write_dicom(path, frames: np.ndarray, *, center=None, width=None, photometric="MONOCHROME2", voi_lut=None):
    pydicom = pytest.importorskip("pydicom", reason="pydicom (the dicom extra) is not installed")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.NumberOfFrames = frames.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if voi_lut is not None:  # (first input value, output bits, table)
        item = pydicom.Dataset()
        item.LUTDescriptor = [len(voi_lut[2]), voi_lut[0], voi_lut[1]]
        item.LUTData = np.asarray(voi_lut[2], np.uint16).tobytes()  # OW: raw little-endian words
        ds.VOILUTSequence = [item]
    ds.PixelData = frames.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_multiframe_dicom_gives_one_windowed_image_per_frame(tmp_path):
    frames = np.random.default_rng(5).integers(0, 4096, (3, 16, 20)).astype(np.uint16)
    _write_dicom(tmp_path / "cine.dcm", frames, center=2048, width=2000)
    out = images.read_frames(tmp_path / "cine.dcm")
    assert len(out) == 3
    for got, f in zip(out, frames):
        np.testing.assert_array_equal(got, images.window_to_uint8(f, 2048, 2000))


def test_dicom_without_window_uses_percentiles_and_monochrome1_is_inverted(tmp_path):
    frames = np.random.default_rng(6).integers(0, 4096, (1, 16, 16)).astype(np.uint16)
    _write_dicom(tmp_path / "m1.dcm", frames, photometric="MONOCHROME1")
    (got,) = images.read_frames(tmp_path / "m1.dcm")
    np.testing.assert_array_equal(got, 255 - images.window_to_uint8(frames[0]))


def test_resize_shorter_keeps_aspect_and_maps_stay_binary():
    m = (np.random.default_rng(7).random((300, 400)) > 0.5).astype(np.uint8)
    r = images.resize_shorter(m, 256, nearest=True)
    assert r.shape == (256, 341) and set(np.unique(r)) <= {0, 1}
    assert images.resize_shorter(m, 0) is m


def test_png_bytes_round_trip():
    x = np.random.default_rng(8).integers(0, 256, (13, 17)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(images.png_bytes(x)))), x)


def test_padded_batches_have_power_of_two_tails_per_shape():
    from tfds_builders import common

    a, b = np.zeros((8, 8), np.uint8), np.ones((4, 6), np.uint8)
    out = common.padded_batch([a] * 19 + [b] * 5, 16)
    shapes = [x.shape for x in out]
    assert shapes[:24] == [(8, 8)] * 19 + [(4, 6)] * 5  # the caller's images first, in order
    assert shapes.count((8, 8)) == 16 + 4 and shapes.count((4, 6)) == 8


def test_16bit_rgb_is_luma_then_windowed_not_truncated(tmp_path):
    bgr = np.random.default_rng(9).integers(0, 65535, (16, 16, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), bgr)
    expected = images.window_to_uint8(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    np.testing.assert_array_equal(images.read_image(tmp_path / "c16.png"), expected)


def test_dicom_voi_lut_sequence_is_applied_and_its_range_scaled(tmp_path):
    frames = np.random.default_rng(10).integers(0, 4096, (1, 8, 8)).astype(np.uint16)
    table = np.arange(4096) // 16  # 8-bit output
    _write_dicom(tmp_path / "lut.dcm", frames, voi_lut=(0, 8, table))
    (got,) = images.read_frames(tmp_path / "lut.dcm")
    np.testing.assert_array_equal(got, (frames[0] // 16).astype(np.uint8))


def test_dicom_with_an_invalid_window_is_a_bad_file(tmp_path):
    _write_dicom(tmp_path / "w.dcm", np.zeros((1, 4, 4), np.uint16), center=10, width=0)
    with pytest.raises(images.BadFileError, match="cannot window DICOM"):
        images.read_frames(tmp_path / "w.dcm")
