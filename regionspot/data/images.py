"""
One image reader for the demo, the data mappers and the feature extractor.

:func:`read_image` is a drop-in for detectron2's ``detection_utils.read_image`` (PIL, EXIF orientation
applied by detectron2's own helper, then detectron2's ``convert_PIL_to_numpy``), so 8-bit images give
exactly the same arrays. It differs where detectron2 gives garbage or an anonymous error:

* 16-bit images (PIL modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and ``I`` holding 0..65535) are
  brought to 8 bits as ``value >> 8``. PIL's own ``convert("RGB")`` clips them at 255, which turns
  almost every pixel white.
* 32-bit integer images with values outside 0..65535 and floating-point images (mode ``F``) have no
  defined 8-bit range and are refused rather than guessed.
* The whole file is decoded before returning (``Image.load()``), so a truncated file fails here and
  not later inside a conversion with PIL's anonymous "image file is truncated". PIL's global
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set: it would fill the missing part with grey.
* Every failure is one exception type, :class:`ImageReadError` (a ``ValueError``), whose message names
  the file, the cause (missing, empty, not an image, truncated or corrupt, unsupported) and the fix.

Grayscale, palette (with or without transparency), RGBA/LA and the other 8-bit modes are converted by
PIL exactly as detectron2 does; alpha is dropped, not composited, so results match detectron2's reader
(and the published evaluation numbers) for those files.
"""
import struct
import zlib
from typing import Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager

__all__ = ["ImageReadError", "probe_image", "read_image", "to_8bit"]

# The reasons an image cannot be read (ImageReadError.reason).
MISSING, EMPTY, NOT_AN_IMAGE, CORRUPT, UNSUPPORTED = "missing", "empty", "not an image", "truncated or corrupt", "unsupported"

# Modes whose samples are 16-bit integers (PIL's names for the byte orders).
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# What PIL raises while decoding a damaged file: OSError ("image file is truncated", "broken data
# stream"), SyntaxError (PNG chunk errors), ValueError, EOFError (GIF/TIFF ends), zlib and struct errors.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error)
_FIX_DAMAGED = "Re-download or re-export it, or remove it"


class ImageReadError(ValueError):
    """
    An image file cannot be read. The message names the file, the cause and the fix.

    Attributes:
        path: the file.
        reason: one of "missing", "empty", "not an image", "truncated or corrupt", "unsupported" (None
            for an error rebuilt from its message only, e.g. by a data-loader worker).
        cause, fix: the parts of the message.
    """

    # A single-message constructor, so that torch's data-loader workers (which re-create the
    # exception from its message in the main process) keep the type.
    def __init__(self, message: str, path: Optional[str] = None, reason: Optional[str] = None,
                 cause: Optional[str] = None, fix: Optional[str] = None):
        super().__init__(message)
        self.path, self.reason, self.cause, self.fix = path, reason, cause, fix

    @classmethod
    def build(cls, path: str, reason: str, cause: str, fix: str, context: Optional[str] = None) -> "ImageReadError":
        """``"Cannot read image <path> (<context>): <cause>. <fix>."`` with the parts as attributes."""
        where = f"{path} ({context})" if context else f"{path}"
        return cls(f"Cannot read image {where}: {cause}. {fix}.", path, reason, cause, fix)

    def with_context(self, context: str, fix: Optional[str] = None) -> "ImageReadError":
        """The same error with ``context`` after the file name (e.g. the image id) and another fix."""
        return type(self).build(self.path, self.reason, self.cause, fix or self.fix, context)

    def __reduce__(self):  # keeps the attributes through pickling (multiprocessing)
        return (type(self), (str(self), self.path, self.reason, self.cause, self.fix))


def _one_line(e: BaseException) -> str:
    # PIL's messages are short, but a warning must stay on one line whatever they hold.
    return " ".join(str(e).split()) or type(e).__name__


def _damage_cause(e: BaseException, otherwise: str) -> str:
    detail = _one_line(e)
    return f"{'the file is truncated' if 'truncated' in detail.lower() else otherwise} (PIL: {detail})"


def _not_an_image_cause(head: bytes) -> str:
    cause = "not an image file that PIL can read"
    text = head.lstrip()[:64]
    if text[:1] == b"<":  # what a failed download usually saved: an HTML or XML page
        shown = text.split(b"\n")[0][:40].decode("ascii", "replace")
        cause += f" (it starts with {shown!r}: an HTML/XML page, e.g. an error page saved under an image name?)"
    return cause


def _open_error(path: str, e: OSError) -> ImageReadError:
    if isinstance(e, FileNotFoundError):
        return ImageReadError.build(path, MISSING, "no such file", "Check the path")
    if isinstance(e, IsADirectoryError):
        return ImageReadError.build(path, MISSING, "it is a folder, not a file", "Check the path")
    return ImageReadError.build(path, MISSING, f"cannot open it ({_one_line(e)})", "Check the path and its permissions")


def _open_image(path: str, f) -> Image.Image:
    """PIL's lazy image of the open file ``f`` (header read only), or ImageReadError."""
    head = f.read(256)
    if not head:
        raise ImageReadError.build(path, EMPTY, "the file is empty (0 bytes)", _FIX_DAMAGED)
    f.seek(0)
    try:
        image = Image.open(f)
    except Image.DecompressionBombError as e:
        raise ImageReadError.build(
            path, UNSUPPORTED, f"too many pixels ({_one_line(e)})",
            "Downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file",
        ) from e
    except UnidentifiedImageError as e:
        raise ImageReadError.build(path, NOT_AN_IMAGE, _not_an_image_cause(head), "Replace it with the actual image, or remove it") from e
    except _DECODE_ERRORS as e:
        raise ImageReadError.build(path, CORRUPT, _damage_cause(e, "its header is unreadable"), _FIX_DAMAGED) from e
    if image.width <= 0 or image.height <= 0:
        raise ImageReadError.build(path, EMPTY, f"the image has no pixels (size {image.width}x{image.height})", _FIX_DAMAGED)
    return image


def probe_image(path: str) -> Tuple[int, int]:
    """
    Check that ``path`` is an image by its header only (no pixel is decoded), for a cheap check of
    many files before any model is built. A truncated file passes: only :func:`read_image` finds it.

    Returns:
        (width, height).

    Raises:
        ImageReadError: missing, empty or not an image.
    """
    try:
        with PathManager.open(path, "rb") as f:
            image = _open_image(path, f)
            return image.width, image.height
    except ImageReadError:
        raise
    except OSError as e:
        raise _open_error(path, e) from e


def to_8bit(image: Image.Image, path: str = "<image>") -> Image.Image:
    """
    ``image`` with 8-bit samples: 16-bit gray (``I;16*``, or ``I`` within 0..65535) becomes ``L`` as
    ``value >> 8``; 8-bit modes are returned unchanged (PIL converts them as detectron2 does).

    Raises:
        ImageReadError: a 32-bit integer image with values outside 0..65535, or a float image.
    """
    mode = image.mode
    if mode in _16BIT_MODES or mode == "I":
        samples = np.asarray(image)  # uint16 in the file's byte order, or int32 for "I"
        if mode == "I" and samples.size and (samples.min() < 0 or samples.max() > 65535):
            raise ImageReadError.build(
                path, UNSUPPORTED,
                f"32-bit integer pixels from {samples.min()} to {samples.max()} (mode I) have no defined 8-bit range",
                "Convert it to an 8-bit (or 16-bit) image first",
            )
        return Image.fromarray((samples.astype(np.uint32) >> 8).astype(np.uint8), "L")
    if mode == "F":
        raise ImageReadError.build(
            path, UNSUPPORTED, "floating-point pixels (mode F) have no defined 8-bit range",
            "Convert it to an 8-bit (or 16-bit) image first",
        )
    return image


def read_image(path: str, format: Optional[str] = "RGB") -> np.ndarray:
    """
    Read an image file as detectron2's ``detection_utils.read_image`` does, but decode it completely,
    bring 16-bit images to 8 bits by ``value >> 8`` and raise :class:`ImageReadError` for any file that
    cannot be read.

    Args:
        path: the image file (any path detectron2's ``PathManager`` opens).
        format: "RGB" (default), "BGR", "L", "YUV-BT.601" or another PIL mode, as in detectron2.

    Returns:
        An HWC array (uint8 for RGB/BGR/L), EXIF orientation applied.

    Raises:
        ImageReadError: the file is missing, empty, not an image, truncated or corrupt, or has pixels
            without a defined 8-bit range; the message names the file, the cause and the fix.
    """
    try:
        with PathManager.open(path, "rb") as f:
            image = _open_image(path, f)
            try:
                # PIL decodes lazily: without load() a truncated file would only fail inside a later
                # conversion (or, with LOAD_TRUNCATED_IMAGES, silently come back half grey).
                image.load()
            except Image.DecompressionBombError as e:
                raise ImageReadError.build(path, UNSUPPORTED, f"too many pixels ({_one_line(e)})", "Downscale it") from e
            except _DECODE_ERRORS as e:
                raise ImageReadError.build(path, CORRUPT, _damage_cause(e, "the file is corrupt"), _FIX_DAMAGED) from e
            mode = image.mode
            try:
                # As detectron2's reader: EXIF orientation, then PIL's conversion to `format`.
                image = to_8bit(_apply_exif_orientation(image), path)
                return convert_PIL_to_numpy(image, format)
            except ImageReadError:
                raise
            except (OSError, ValueError) as e:
                raise ImageReadError.build(
                    path, UNSUPPORTED, f"cannot convert its {mode} pixels to {format} ({_one_line(e)})",
                    "Convert it to an 8-bit RGB image first",
                ) from e
    except ImageReadError:
        raise
    except OSError as e:  # opening or reading the file itself
        raise _open_error(path, e) from e
