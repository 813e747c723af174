"""Perceptual image fingerprints: a 64-bit difference hash (Pillow only), and `etl.py fingerprint`.

The difference hash (dHash): the image in grey, shrunk to 9x8 pixels; bit i is set when a pixel is brighter
than its right-hand neighbour (row by row, most significant bit first). Resizing, recompression and small
colour changes keep most bits; unrelated photos differ in about half of them. A JPEG is decoded at 1/8 scale
(the decoder's draft mode, DCT scaling), so a 12-megapixel photo costs a few milliseconds, not a full decode.

The hash is stored in post_media.phash as a signed BIGINT (the same 64 bits), with its algorithm and version,
and found again through eight expression indexes on its 8-bit bands (sql/006_insights.sql).
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from etl.db import Database
from etl.db.insights import images_without_fingerprint, save_fingerprints
from etl.store import ObjectStore

log = logging.getLogger(__name__)

ALGORITHM = "dhash"
VERSION = 1
BANDS = 8  # 8-bit bands indexed in sql/006: any threshold up to BANDS - 1 finds every match (pigeonhole)
MAX_DISTANCE = BANDS - 1


def dhash_image(image: Any) -> int:
    """The 64-bit difference hash of a Pillow image, as an unsigned int."""
    from PIL import Image

    grey = image if image.mode == "L" else image.convert("L")
    # BOX averages every source pixel into its cell: the hash follows the picture, not the sampling grid.
    small = grey.resize((9, 8), Image.Resampling.BOX)
    pixels = small.tobytes()
    value = 0
    for row in range(8):
        base = row * 9
        for col in range(8):
            value = (value << 1) | (pixels[base + col] > pixels[base + col + 1])
    return value


def dhash_bytes(body: bytes) -> int:
    """The difference hash of an encoded image (JPEG decoded in draft mode, grey, at the smallest scale)."""
    from PIL import Image

    with Image.open(io.BytesIO(body)) as img:
        if img.format == "JPEG":
            img.draft("L", (max(9, img.width // 8), max(8, img.height // 8)))
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # an animated GIF/WebP: its first frame
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Transparent pixels count as white, as a viewer on a white page shows them.
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return dhash_image(Image.alpha_composite(background, rgba))
        return dhash_image(img)


def to_signed(value: int) -> int:
    """The unsigned 64-bit hash as PostgreSQL's BIGINT holds it (same bits)."""
    return value - (1 << 64) if value >= (1 << 63) else value


def to_unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def distance(a: int, b: int) -> int:
    """Hamming distance of two 64-bit hashes (signed or unsigned)."""
    return bin(to_unsigned(a) ^ to_unsigned(b)).count("1")


# -- `etl.py fingerprint`: hashes for stored images that have none ------------------------------------------


@dataclass
class FingerprintStats:
    """What a fingerprint pass did."""

    hashed: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] | None = None


def pending_batches(db: Database, batch_size: int) -> Iterator[list[tuple[int, str, str | None]]]:
    """Stored images without a hash, in id order, a batch at a time (keyset paging: flat memory)."""
    last = 0
    while True:
        rows = images_without_fingerprint(db, last, batch_size)
        if not rows:
            return
        last = rows[-1][0]
        yield rows


def save_hashes(db: Database, hashes: list[tuple[int, int, str | None]]) -> None:
    """(id, hash, the sha256 of the bytes hashed) of each image."""
    if not hashes:
        return
    ids = [media_id for media_id, _, _ in hashes]
    values = [to_signed(h) for _, h, _ in hashes]
    save_fingerprints(db, ids, values, [sha for _, _, sha in hashes], ALGORITHM, VERSION)


def fingerprint_stored(
    db: Database,
    store: ObjectStore,
    *,
    batch_size: int = 500,
    workers: int = 4,
    should_stop: Callable[[], bool] = lambda: False,
) -> FingerprintStats:
    """Hash every stored image without a fingerprint; each batch is committed, so a rerun resumes.

    An object that cannot be read or decoded, or whose bytes do not match the row's sha256, is counted and left
    without a hash (the next pass tries again).
    """
    stats = FingerprintStats(errors=[])
    started = time.monotonic()
    lock = threading.Lock()

    def one(row: tuple[int, str, str | None]) -> tuple[int, int, str | None] | None:
        media_id, key, sha256 = row
        try:
            data = store.read(key)
            if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
                # A damaged object would be hashed as another picture, and that hash kept: left for `verify`.
                raise ValueError("its bytes do not match the archived sha256 (damaged: `etl.py verify` marks it for repair)")
            return media_id, dhash_bytes(data), sha256
        except Exception as exc:  # one unreadable object must not stop the pass
            with lock:
                stats.failed += 1
                if len(stats.errors) < 20:
                    stats.errors.append(f"{key}: {type(exc).__name__}: {exc}")
            log.warning("no fingerprint for %s: %s: %s", key, type(exc).__name__, exc)
            return None

    with ThreadPoolExecutor(workers, thread_name_prefix="fingerprint") as pool:
        for rows in pending_batches(db, batch_size):
            hashes = [h for h in pool.map(one, rows) if h is not None]
            save_hashes(db, hashes)
            stats.hashed += len(hashes)
            log.info("fingerprinted %d images so far (%d failed)", stats.hashed, stats.failed)
            if should_stop():
                break
    stats.seconds = time.monotonic() - started
    return stats
