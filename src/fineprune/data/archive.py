"""One view of a dataset whether it sits in a folder or in its `.tar.xz` archive.

Users pass whatever they have: the archive, the extracted folder, or a "data root" holding either.
Loaders only see member names (posix paths relative to the folder / archive root) and their bytes,
and match names by pattern, so the same loader works for both. Archives are streamed with
`tarfile` and members decoded in memory: nothing is ever extracted to disk (no disk cost, no
path-traversal risk from crafted member names).
"""
from __future__ import annotations

import hashlib
import lzma
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fineprune.errors import BadInputError
from fineprune.progress import current
from fineprune.runtime import sha256_file as _sha256_bytes

ARCHIVE_SUFFIX = ".tar.xz"

# Hashing a 100 MB archive costs a fraction of a second, but loaders may be called many times in one
# process (tests, sweeps); remember the digest while the file's size and mtime are unchanged.
_SHA_MEMO: dict[tuple[str, int, int], str] = {}

def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, remembered while its size and mtime are unchanged."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = _sha256_bytes(path)
    return _SHA_MEMO[key]


@dataclass(frozen=True)
class Source:
    """A dataset location: `kind` is "dir" (an extracted folder) or "archive" (a .tar.xz file)."""

    path: Path
    kind: str

    def fingerprint(self, select: Callable[[str], bool]) -> str:
        """What the cache is keyed on: the archive's SHA-256, or for a folder a hash of the selected
        files' names, sizes and mtimes (hashing every file's bytes would cost as much as decoding)."""
        if self.kind == "archive":
            return "sha256:" + sha256_file(self.path)
        h = hashlib.sha256()
        for rel, full in self._dir_files(select):
            st = full.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return "dir:" + h.hexdigest()

    def members(self, select: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        """(relative posix name, bytes) of every regular file whose name `select` accepts.

        Archive order is the archive's; callers that need a stable order sort by name. Reading
        shows a bar on `fineprune.progress.current()` (the first decode of GTSRB takes minutes on a
        small machine; quiet unless the caller, e.g. the CLI, set a channel with `using`).
        """
        if self.kind == "archive":
            yield from self._archive_members(select)
        else:
            files = self._dir_files(select)
            with current().bar(len(files), f"reading {self.path.name}", unit="file", mininterval=1.0) as bar:
                for rel, full in files:
                    yield rel, full.read_bytes()
                    bar.update(1)

    def _dir_files(self, select: Callable[[str], bool]) -> list[tuple[str, Path]]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames.sort()
            base = Path(dirpath)
            for name in sorted(filenames):
                full = base / name
                rel = full.relative_to(self.path).as_posix()
                if select(rel) and full.is_file():
                    out.append((rel, full))
        return out

    def _archive_members(self, select: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        # The bar follows the compressed bytes consumed (the archive's size is the only total known
        # without a second pass), with the number of files read beside it.
        try:
            with (open(self.path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:xz") as tf,
                  current().bar(self.path.stat().st_size, f"reading {self.path.name}", unit="B", unit_scale=True,
                                unit_divisor=1024, mininterval=1.0) as bar):
                files = 0
                for member in tf:
                    bar.update(raw.tell() - bar.n)
                    if not member.isfile():
                        continue  # directories, links, devices: never followed
                    name = member.name
                    while name.startswith("./"):
                        name = name[2:]
                    if not select(name):
                        continue
                    fh = tf.extractfile(member)
                    if fh is not None:
                        data = fh.read()
                        files += 1
                        bar.set_postfix(files=files, refresh=False)
                        yield name, data
                bar.update(bar.total - bar.n)  # the end-of-archive blocks need not all be read
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as exc:
            raise BadInputError(
                f"cannot read archive {self.path}: {exc}. It should be a .tar.xz as distributed; "
                "check it is complete (compare its SHA-256) or pass the extracted folder instead."
            ) from exc

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def resolve_source(root: str | os.PathLike[str], stem: str, marker: str) -> Source:
    """Find a dataset from what the user passed.

    `stem` is the archive's name without `.tar.xz` (also the top folder inside it); `marker` is a
    folder that only this dataset has (e.g. "CroppedYale"). Accepted, in this order:
    the archive file itself; a folder containing `marker` (the extracted dataset folder); a data
    root containing `stem.tar.xz` (preferred: its content hash makes the cache key exact) or the
    extracted `stem/` folder; or the `marker` folder itself.
    """
    p = Path(root).expanduser()
    if not p.exists():
        raise BadInputError(
            f"dataset path {p} does not exist. Pass the {stem}{ARCHIVE_SUFFIX} archive, its extracted "
            f"folder, or a data folder that contains the archive."
        )
    if p.is_file():
        if not tarfile.is_tarfile(p):
            raise BadInputError(
                f"{p} is a file but not a tar archive. Pass the {stem}{ARCHIVE_SUFFIX} archive, its "
                "extracted folder, or the folder that contains the archive."
            )
        return Source(p, "archive")
    if (p / marker).is_dir():
        return Source(p, "dir")
    archive = p / f"{stem}{ARCHIVE_SUFFIX}"
    if archive.is_file():
        return Source(archive, "archive")
    if (p / stem / marker).is_dir():
        return Source(p / stem, "dir")
    if p.name == marker:
        return Source(p.parent, "dir")
    raise BadInputError(
        f"no {stem} dataset found in {p}: expected {stem}{ARCHIVE_SUFFIX}, an extracted "
        f"{stem}/ folder, or a folder containing {marker}/. Download or extract the dataset there, "
        "or pass the path of the archive itself."
    )
