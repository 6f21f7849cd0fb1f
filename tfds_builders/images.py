"""Reading angiograms and vessel maps from disk: decoding, 8-bit windowing, bad-file checks, PNG encoding.

numpy / PIL / OpenCV only (pydicom when a DICOM file is met): these functions run in the worker processes
that decode and encode in parallel, and in Beam workers.

Windowing rule (16-bit / float images and DICOM → uint8), documented in the builders' READMEs:
  1. DICOM: the Modality LUT (RescaleSlope / RescaleIntercept) is applied first.
  2. DICOM with a VOI LUT Sequence: the first LUT is applied (PS3.3 C.11.2.1.1) and its output range
     [0, 2**bits - 1] maps to 0..255.
     DICOM with WindowCenter / WindowWidth: the first window is applied as the DICOM linear function
     (PS3.3 C.11.2.1.2.1): y = ((x - (c - 0.5)) / (w - 1) + 0.5) clipped to [0, 1], times 255.
  3. Otherwise (16-bit PNG/TIFF, DICOM without a window): the 0.5 and 99.5 percentiles map to 0 and 255 linearly,
     values outside are clipped; a constant image becomes all zeros.
  4. MONOCHROME1 DICOM is inverted after windowing so that, as everywhere else, vessels are dark.
  8-bit images are kept as they are; RGB is converted to grey with PIL's ITU-R 601-2 luma (``convert("L")``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".gif"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
# More than this fraction of grey (neither 0 nor 255) pixels makes a supplied map a bad file.
MAX_GREY_FRACTION = 0.01


class BadFileError(ValueError):
    """An input file that cannot become an example; `reason` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_dicom_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in DICOM_SUFFIXES


def is_image_path(path: str | Path, *, dicom: bool = True) -> bool:
    suffix = Path(path).suffix.lower()
    return suffix in IMAGE_SUFFIXES or (dicom and suffix in DICOM_SUFFIXES)


def scan_tree(root: Path, *, dicom: bool = True) -> tuple[list[Path], list[Path]]:
    """All image files under `root` (sorted, hidden files and folders skipped) and the ignored other files.

    Symbolic links to folders are followed (a manual_dir is often assembled from links to the data); a link to
    a folder that is already being walked (a loop) is not entered again — its files are listed once.
    """
    images, ignored = [], []
    chains = {os.fspath(root): {os.path.realpath(root)}}  # folder -> real paths of it and its ancestors
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain = chains.pop(dirpath)
        kept = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in chain:
                chains[os.path.join(dirpath, d)] = chain | {real}
                kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = Path(dirpath) / name
            (images if not name.startswith(".") and is_image_path(path, dicom=dicom) else ignored).append(path)
    return images, ignored


def window_to_uint8(x: np.ndarray, center: float | None = None, width: float | None = None) -> np.ndarray:
    """(H, W) any numeric dtype → uint8 by the DICOM linear window, or by the 0.5–99.5 percentiles (no window)."""
    x = x.astype(np.float64)
    if center is not None and width is not None:
        if width < 1:
            raise ValueError(f"window width must be >= 1, got {width}")
        if width == 1:  # DICOM: a step at the centre
            y = (x > center - 0.5).astype(np.float64)
        else:
            y = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    else:
        lo, hi = np.percentile(x, [0.5, 99.5])
        if hi <= lo:
            return np.zeros(x.shape, np.uint8)
        y = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return np.round(y * 255.0).astype(np.uint8)


def _pil_to_grey(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
        if arr.ndim != 2:
            raise ValueError(f"unsupported {img.mode} image with shape {arr.shape}")
        return window_to_uint8(arr)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8)


def _decode_16bit_multichannel(path: Path) -> np.ndarray | None:
    """16-bit RGB(A) PNG/TIFF, which PIL cannot hold: OpenCV reads it, grey by luma, then windowed."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        return None
    grey = cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2GRAY)
    return window_to_uint8(grey)


def read_image(path: str | Path) -> np.ndarray:
    """One non-DICOM image file → uint8 (H, W). Raises BadFileError (empty, truncated, corrupt, unreadable)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadFileError(str(path), f"unreadable ({e.strerror or e})") from None
    if not data:
        raise BadFileError(str(path), "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes now: a truncated file raises here instead of yielding grey rows
            # PIL reduces 16-bit colour to 8 bits by truncation: such files are read again by OpenCV.
            arr = _decode_16bit_multichannel(path) if img.mode in ("RGB", "RGBA") else None
            if arr is None:
                arr = _pil_to_grey(img)
    except BadFileError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
        raise BadFileError(str(path), f"cannot decode ({type(e).__name__}: {e})") from None
    if arr is None or arr.ndim != 2 or min(arr.shape) == 0:
        raise BadFileError(str(path), "cannot decode (no 2-D pixel data)")
    return np.ascontiguousarray(arr)


def read_dicom(path: str | Path) -> list[np.ndarray]:
    """A DICOM file → its frames as uint8 (H, W) (a cine file has many), windowed by the module rule."""
    try:
        import pydicom
    except ImportError:
        raise BadFileError(str(path), "DICOM file but pydicom is not installed (pip install pydicom)") from None
    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except Exception as e:
        raise BadFileError(str(path), f"cannot decode DICOM ({type(e).__name__}: {e})") from None
    frames = pixels if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 else pixels[None]
    if frames.ndim == 4:  # colour frames: luma as for RGB files
        frames = np.stack([cv2.cvtColor(np.asarray(f, np.float32), cv2.COLOR_RGB2GRAY) for f in frames])
    try:
        return [_window_dicom_frame(frame, ds) for frame in frames]
    except (ValueError, IndexError, KeyError) as e:  # a malformed LUT / window
        raise BadFileError(str(path), f"cannot window DICOM ({type(e).__name__}: {e})") from None


def _voi_lut(frame: np.ndarray, item, ds) -> np.ndarray:
    """PS3.3 C.11.2.1.1: values below the first mapped value take entry 0, above the table the last entry.
    (Written here: pydicom 3.0's apply_voi_lut wraps inputs > 255 around for 8-bit LUTs.)"""
    n, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    data = item.LUTData
    if isinstance(data, bytes):  # VR OW: raw 16-bit words in the file's byte order
        meta = getattr(ds, "file_meta", None)
        little = meta.TransferSyntaxUID.is_little_endian if meta is not None and "TransferSyntaxUID" in meta else True
        data = np.frombuffer(data, dtype="<u2" if little else ">u2")[:n]
    table = np.asarray(data, np.float64).reshape(-1)
    index = np.clip(np.asarray(frame, np.int64) - first, 0, len(table) - 1)
    return table[index]


def _window_dicom_frame(frame: np.ndarray, ds) -> np.ndarray:
    """One DICOM frame → uint8 by the module's rule (Modality LUT, then VOI LUT / window / percentiles)."""
    from pydicom.multival import MultiValue
    from pydicom.pixels import apply_modality_lut

    frame = apply_modality_lut(frame, ds)
    if "VOILUTSequence" in ds:
        y = _voi_lut(frame, ds.VOILUTSequence[0], ds)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        img = np.round(np.clip(y / (2**bits - 1), 0, 1) * 255).astype(np.uint8)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        first = lambda v: float(v[0]) if isinstance(v, MultiValue) else float(v)  # noqa: E731
        img = window_to_uint8(frame, first(ds.WindowCenter), first(ds.WindowWidth))
    else:
        img = window_to_uint8(frame)
    return 255 - img if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1" else img


def read_frames(path: str | Path) -> list[np.ndarray]:
    """Any supported file → list of uint8 (H, W) frames (one for a still image)."""
    return read_dicom(path) if is_dicom_path(path) else [read_image(path)]


def read_map(path: str | Path, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """A supplied vessel map → (uint8 {0,1} (H, W), number of grey pixels binarised at > 127).

    Maps may be {0,1} or {0,255}; a map of another size than its image, or with more than 1 % grey pixels,
    is a bad file.
    """
    m = read_image(path)
    if m.shape != tuple(shape):
        raise BadFileError(str(path), f"map size {m.shape[1]}x{m.shape[0]} differs from its image "
                                      f"{shape[1]}x{shape[0]}")
    if m.max() <= 1:
        return m, 0
    grey = int(np.count_nonzero((m != 0) & (m != 255)))
    if grey > MAX_GREY_FRACTION * m.size:
        raise BadFileError(str(path), f"not a binary map: {grey} grey pixels ({100 * grey / m.size:.1f}% > "
                                      f"{100 * MAX_GREY_FRACTION:.0f}%)")
    return (m > 127).astype(np.uint8), grey


def resize_shorter(img: np.ndarray, shorter: int, *, nearest: bool = False) -> np.ndarray:
    """Resize so the shorter side is `shorter` (aspect kept); area filter for images, nearest for maps."""
    h, w = img.shape
    if shorter <= 0 or min(h, w) == shorter:
        return img
    s = shorter / min(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    return cv2.resize(img, size, interpolation=interp)


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 (H, W) → PNG bytes (tfds.features.Image takes encoded bytes without TensorFlow)."""
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {img.shape}")
    return buf.tobytes()


@dataclasses.dataclass(frozen=True)
class Source:
    """One input file of a pre-training corpus: `file_name` is relative to the manual_dir (extension kept)."""

    path: str
    file_name: str
    source: str
    map_path: str = ""  # a supplied vessel map ("" = compute it)


def check_source(src: Source) -> tuple[int, int, tuple[int, int]] | BadFileError:
    """Decodes a file (and its map) completely: (number of frames, grey map pixels, frame shape) or the
    BadFileError."""
    try:
        frames = read_frames(src.path)
        grey = 0
        if src.map_path:
            if len(frames) != 1:
                raise BadFileError(src.map_path, "a supplied map cannot pair with a multi-frame file")
            grey = read_map(src.map_path, frames[0].shape)[1]
        return len(frames), grey, frames[0].shape
    except BadFileError as e:
        return e
