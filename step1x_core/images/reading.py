"""Input images: any mode Pillow opens becomes 8-bit RGB at the right scale, and a file it cannot open is named
with what it seems to be.

Scales: 16-bit modes (I;16 and its byte orders) divide by 65535; 32-bit integer 'I' and 32-bit float 'F' have no
fixed range, so their values decide (float 0-1, as TIFF and EXR exporters write them, then 0-255, 0-65535).
Transparency (RGBA, LA, PA, premultiplied RGBa/La, palette or colour-key transparency) is composited over white.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from ..finite import NonFiniteError
from ..release_files import describe_missing

__all__ = ["ImageFileError", "describe_image_file", "load_rgb", "to_rgb", "upright"]

EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_PREMULTIPLIED = {"La": "LA"}  # Pillow converts these to their straight-alpha mode only
_BIT_DEPTHS = {"F": "32-bit float", "I": "32-bit integer"}

# Magic bytes -> what the file is; the first match wins.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG image"), (b"\xff\xd8\xff", "JPEG image"), (b"GIF8", "GIF image"),
    (b"II*\x00", "TIFF image"), (b"MM\x00*", "TIFF image"), (b"BM", "BMP image"), (b"8BPS", "Photoshop (PSD) file"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000 image"), (b"%PDF", "PDF document"), (b"PK\x03\x04", "ZIP archive"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")
_RASTER = {"PNG image", "JPEG image", "GIF image", "TIFF image", "BMP image", "WebP image", "AVIF image",
           "JPEG 2000 image", "Photoshop (PSD) file"}
# Formats whose decoder a Pillow build may lack (features.check name); HEIC and JPEG XL it never has.
_OPTIONAL_DECODERS = {"WebP image": "webp", "AVIF image": "avif", "JPEG 2000 image": "jpg_2000"}
_UNSUPPORTED = {"HEIC/HEIF image": "a HEIC/HEIF photo", "JPEG XL image": "a JPEG XL image"}


class ImageFileError(ValueError):
    """An input image file that cannot be used; the message names the file, what it seems to be and the fix."""


def describe_image_file(path: str | Path) -> str:
    """What a file that Pillow could not open seems to be, with the fix: 'it is an SVG (vector) image, ...'."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as err:
        return f"it cannot be opened ({err.strerror or err})"
    if not head:
        return "the file is empty (0 bytes: an interrupted copy or download?); use the original image"
    kind = _kind(head)
    if kind in _OPTIONAL_DECODERS and not features.check(_OPTIONAL_DECODERS[kind]):
        return f"it is a {kind}, which this Pillow build cannot decode; convert it to PNG or JPEG first"
    if kind in _RASTER:
        return (f"it is a damaged or truncated {kind} (the copy or download was cut short?); use the original file "
                "or save it again as PNG")
    if kind in _UNSUPPORTED:
        return f"it is {_UNSUPPORTED[kind]}, which Pillow cannot decode; convert it to JPEG or PNG first"
    if kind == "SVG (vector) image":
        return "it is an SVG (vector) image, which has no pixels to edit; export it as PNG first"
    if kind is not None:
        return f"it is {'an' if kind[0] in 'AEHIOU' else 'a'} {kind}, not an image; give a PNG, JPEG or WebP file"
    return (f"its format is not one Pillow reads (it begins with {head[:8].hex(' ')}); save it as PNG or JPEG")


def _kind(head: bytes) -> str | None:
    kind = next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)
    if kind:
        return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP image"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL image"
    if head[4:8] == b"ftyp":
        return "AVIF image" if head[8:12] in (b"avif", b"avis") else \
            "HEIC/HEIF image" if head[8:12] in _HEIF_BRANDS else "MP4/QuickTime video"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text:
        return "SVG (vector) image"
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML page (a web page saved instead of the image?)"
    if text.startswith(b"version https://git-lfs"):
        return "Git LFS pointer (a clone without git-lfs?)"
    if all(32 <= c < 127 or c in b"\t\r\n" for c in text[:512]):
        return "text file"
    return None


def require_image_file(path: str | Path, what: str = "image") -> None:
    """Refuse a path that is no file before it is opened: FileNotFoundError for a missing one (or a link that
    leads nowhere, said so), ValueError for a folder. ``what`` names it in the message."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give an image file")
    if not path.exists():
        missing = describe_missing(path)
        raise FileNotFoundError(f"{what} {missing}: {path}" if missing == "not found" else f"{what} {path}: {missing}")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB, honouring EXIF rotation; alpha is composited over white. A file Pillow cannot
    read raises ImageFileError naming it and what it seems to be; see ``require_image_file`` for the others."""
    require_image_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img, source=str(path))
    except Image.DecompressionBombError as err:
        raise ImageFileError(f"{path}: {err} Downscale the image first (the edit works at about size_level² "
                             "pixels anyway).") from err
    except (ImageFileError, NonFiniteError):
        raise
    except Exception as err:  # noqa: BLE001  a decoder fed a hostile file raises about anything
        # Pillow's "cannot identify image file '<path>'" says less than the description; other reasons help.
        reason = "" if isinstance(err, UnidentifiedImageError) else f" ({err})"
        raise ImageFileError(f"{path}: cannot be read as an image{reason}; {describe_image_file(path)}") from err


def upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it: its EXIF orientation applied (the same image when it has none)."""
    if img.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return img
    return ImageOps.exif_transpose(img)


def _peak(values: np.ndarray, mode: str, source: str) -> float:
    """The value that means full white for a high-bit-depth image."""
    if mode.startswith("I;16"):
        return 65535.0
    if not np.isfinite(values).all():
        raise NonFiniteError(f"{source}: a {_BIT_DEPTHS.get(mode, mode)} image holding NaN or Inf pixel values; save "
                             "it again with finite values (an HDR image needs tone-mapping to 8 or 16 bits first)")
    top = float(values.max()) if values.size else 0.0
    if mode == "F" and top <= 1.0:
        return 1.0  # floating point images in 0-1, as TIFF/EXR exporters write them
    return 255.0 if top <= 255 else 65535.0 if top <= 65535 else top


def _to_grey8(img: Image.Image, source: str) -> Image.Image:
    """A 16-bit, 32-bit integer or 32-bit float greyscale image, scaled to 8 bits (Pillow would clip instead)."""
    values = np.asarray(img, dtype=np.float64)
    scaled = np.clip(values / _peak(values, img.mode, source) * 255.0 + 0.5, 0, 255)
    return Image.fromarray(scaled.astype(np.uint8))


def to_rgb(img: Image.Image, source: str = "the image") -> Image.Image:
    """RGB as viewers show it: EXIF orientation applied, transparency composited over white, high bit depths
    scaled to 8 bits. An upright RGB image is returned as it is (no copy: large photos are not duplicated)."""
    img = upright(img)
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_grey8(img, source)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        straight = img.convert(_PREMULTIPLIED[img.mode]) if img.mode in _PREMULTIPLIED else img
        rgba = straight.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise ImageFileError(f"{source}: Pillow cannot convert its mode {img.mode!r} to RGB ({err}); save it as an "
                             "8-bit RGB PNG or JPEG") from err
