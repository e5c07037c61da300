"""File checks and the bad-file policy (`data.on_bad_file`), one place for every path that reads images.

Before any batch is planned, every file of a sample list is checked for everything that would make a loader fail on
it later (`check_image`):

- it is a regular file (a named pipe, device or socket is never opened: opening a pipe blocks until a writer comes);
- it can be opened (permissions, a dangling or looping symlink) and is not empty;
- PIL identifies its format and parses its header; its size is at most PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`,
  about 89 megapixels), which the torchvision loader enforces and which DALI would exhaust memory on;
- it decodes: JPEGs at 1/8 scale (`Image.draft`: every entropy-coded block is still read, so truncation and broken
  headers, tables or scans fail, at a fraction of a full decode's cost), other formats fully.

`screen` applies the policy to the result: "error" raises one DataError naming the first bad file; "skip" drops
them, logs each, and returns them for the run folder's skipped_files.txt. `build_loader` calls it once per sample
list, for every loader; the loaders themselves apply no policy. Under torchrun each rank checks a strided
1/world of the files and the bad lists are all-gathered, so every rank drops exactly the same files (the batch plans
of all ranks stay consistent) and the check costs 1/world of the time.

Loaders open files through `open_regular`, which refuses special files too, so a file replaced after the check
still fails with one line naming it, never a hang.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from fastft.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fastft.data.index import Sample
    from fastft.parallel.env import DistEnv

log = logging.getLogger("fastft")

BAD_FILE_POLICIES = ("error", "skip")
_SPECIAL = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}
_OBJECT_REPR = re.compile(r"\s*<_io\.\w+ (object )?at 0x[0-9a-f]+>")


def _pil_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for unreadable files: OSError (incl. UnidentifiedImageError, truncation), SyntaxError and
    struct.error (broken chunks), ValueError/EOFError (bad headers), DecompressionBombError (over twice the limit)."""
    import struct

    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def reason_of(err: BaseException) -> str:
    """One line saying why a file is unusable, without the in-memory buffer PIL names instead of the file."""
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        return "not an image PIL can identify (unknown format or broken header)"
    if isinstance(err, OSError) and err.strerror:  # an OS error: "Permission denied", "Too many levels of ..."
        return err.strerror
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return _OBJECT_REPR.sub("", text)


def open_regular(path: str) -> io.BufferedReader:
    """Open a file for reading only if it is a regular file (symlinks followed); raise DataError naming it otherwise.

    The type is checked before opening, so a pipe or device is never opened, and again on the open descriptor (opened
    non-blocking), so a file swapped for a pipe in between cannot block either."""
    try:
        _require_regular(os.stat(path).st_mode, path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"unreadable image file {path}: {reason_of(e)}") from None
    try:
        _require_regular(os.fstat(fd).st_mode, path)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _require_regular(mode: int, path: str) -> None:
    if not stat.S_ISREG(mode):
        kind = _SPECIAL.get(stat.S_IFMT(mode), "not a regular file")
        raise DataError(f"unreadable image file {path}: {kind}, not a regular file (never opened)")


def check_size(width: int, height: int) -> str | None:
    """Why an image of this size is refused (over PIL's pixel limit), or None."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        return f"{width}x{height} pixels is over the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)"
    return None


def check_image(path: str) -> str | None:
    """Why one file cannot be loaded, or None when it can (see the module docstring for what is checked)."""
    import warnings

    from PIL import Image

    try:
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_size == 0:
                return "empty file"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked below
                with Image.open(f) as im:
                    too_big = check_size(*im.size)
                    if too_big:
                        return too_big
                    if im.format == "JPEG":
                        im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
    except DataError as e:  # a special file, or open failed
        return str(e).split(": ", 1)[1]
    except _pil_errors() as e:
        return reason_of(e)
    except Exception as e:  # anything else PIL raises on a hostile file still names the file, never a traceback
        return f"{type(e).__name__}: {reason_of(e)}"
    return None


def scan_images(paths: Sequence[str], *, threads: int = 4) -> list[tuple[str, str]]:
    """`check_image` every file in parallel (decoding releases the GIL); [(path, reason)] of the bad ones, in order."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        reasons = list(pool.map(check_image, paths, chunksize=16))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def find_bad_files(paths: Sequence[str], *, threads: int, env: DistEnv | None = None) -> list[tuple[str, str]]:
    """[(path, reason)] of the unusable files, identical on every rank: under torchrun each rank checks a strided
    1/world of `paths` and the results are all-gathered."""
    if env is None or not env.distributed:
        return scan_images(paths, threads=threads)
    import torch.distributed as dist

    mine = scan_images(list(paths)[env.rank :: env.world_size], threads=threads)
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, mine)
    bad = dict(item for part in gathered for item in part)
    return [(p, bad[p]) for p in paths if p in bad]


def screen(
    samples: list[Sample], *, on_bad_file: str, threads: int, env: DistEnv | None = None
) -> tuple[list[Sample], list[str]]:
    """Apply `data.on_bad_file` to a sample list: returns (the samples to load, the skipped paths).

    Raises:
        DataError: `on_bad_file="error"` and a file is unusable (the message names the first one).
    """
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ConfigError(f"on_bad_file must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}")
    bad = find_bad_files([p for p, _ in samples], threads=threads, env=env)
    if bad and on_bad_file == "error":
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"unreadable image file {path}: {reason}{more}; set data.on_bad_file=skip to drop such files")
    for path, reason in bad:
        log.warning("fastft: skipping unreadable image %s: %s", path, reason)
    skipped = {p for p, _ in bad}
    return [s for s in samples if s[0] not in skipped], [p for p, _ in bad]


def find_undecodable(paths: Sequence[str], *, threads: int = 4, limit: int = 20_000) -> tuple[str, str] | None:
    """The first of `paths` that `check_image` refuses, as (path, reason), or None; gives up after `limit` files.

    Used only to name the file behind a decoder failure whose message does not (a file changed after the check, or
    one DALI's decoder refuses while PIL reads it)."""
    paths = list(paths)[:limit]
    chunk = 16 * max(1, threads)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            for path, reason in zip(part, pool.map(check_image, part)):
                if reason is not None:
                    return path, reason
    return None
