"""Carry a CIFAR-10 image tree as one file (for a GPU machine with a small upload limit), and back.

    python benchmarks/pack_cifar10.py pack TREE OUT.npz     # every .png/.jpg/.jpeg under TREE
    python benchmarks/pack_cifar10.py unpack IN.npz TREE    # writes those files again, byte for byte

The ``.npz`` (``np.savez_compressed``, read with ``allow_pickle=False``) holds

- ``data``: uint8 ``(total_bytes,)``, the files' bytes concatenated;
- ``offsets``: int64 ``(n + 1,)``, file ``i`` is ``data[offsets[i]:offsets[i + 1]]``;
- ``paths``: unicode ``(n,)``, POSIX paths relative to TREE, sorted;
- ``format``: the string ``alq-file-pack-v1``.

Hidden files and folders (``.git``, the loader's ``.alq-cache``) and other files
are left out. The CIFAR-10-images tree (60000 JPEGs, 55 MB of files) packs to
about 19 MB because the JPEG headers repeat. Needs only NumPy; the unpacked tree
is what ``alq-train --data cifar10 --data-dir TREE`` reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path, PurePosixPath

import numpy as np

FORMAT = "alq-file-pack-v1"
SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(tree: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``tree``, sorted; hidden entries skipped."""
    found = []
    for folder, dirs, files in os.walk(tree):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(tree)
        found += [(rel / f).as_posix() for f in files if not f.startswith(".") and f.lower().endswith(SUFFIXES)]
    return sorted(found)


def pack(tree: Path, out: Path) -> tuple[int, int]:
    """Pack the images under ``tree`` into ``out``; returns (number of files, bytes of files)."""
    if not tree.is_dir():
        raise SystemExit(f"pack: {str(tree)!r} is not a directory; expected an image tree (train/<class>/*.jpg ...)")
    paths = list_images(tree)
    if not paths:
        raise SystemExit(f"pack: no {'/'.join(SUFFIXES)} files under {str(tree)!r}; fix: point at the image tree")
    blobs = [(tree / p).read_bytes() for p in paths]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:  # a file object: savez would otherwise append ".npz" to other names
        np.savez_compressed(fh, data=data, offsets=offsets, paths=np.array(paths), format=np.array(FORMAT))
    return len(paths), int(offsets[-1])


def _checked(src: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        with np.load(src, allow_pickle=False) as z:
            fmt, data, offsets, paths = str(z["format"]), z["data"], z["offsets"], [str(p) for p in z["paths"]]
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"unpack: {str(src)!r} is not a pack of this script ({type(exc).__name__}: {exc})") from None
    if fmt != FORMAT:
        raise SystemExit(f"unpack: {str(src)!r} has format {fmt!r}; expected {FORMAT!r}")
    ok = (
        data.dtype == np.uint8
        and offsets.shape == (len(paths) + 1,)
        and offsets[0] == 0
        and offsets[-1] == data.size
        and bool(np.all(np.diff(offsets) >= 0))
    )
    if not ok:
        raise SystemExit(f"unpack: {str(src)!r} is damaged (offsets do not match the data); fix: pack it again")
    for p in paths:
        pp = PurePosixPath(p)
        if pp.is_absolute() or ".." in pp.parts or not p:
            raise SystemExit(f"unpack: {str(src)!r} holds the unsafe path {p!r}; refusing to write outside the tree")
    return data, offsets, paths


def unpack(src: Path, tree: Path, force: bool = False) -> tuple[int, int]:
    """Write the files packed in ``src`` under ``tree``; returns (number of files, bytes of files)."""
    data, offsets, paths = _checked(src)
    if not force:
        clash = next((p for p in paths if (tree / p).exists()), None)
        if clash is not None:
            raise SystemExit(f"unpack: {str(tree / clash)!r} exists; fix: unpack into an empty folder or pass --force")
    for i, p in enumerate(paths):
        dest = tree / p
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data[offsets[i] : offsets[i + 1]].tobytes())
    return len(paths), int(offsets[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="image tree -> one .npz")
    p.add_argument("tree", type=Path)
    p.add_argument("out", type=Path)
    u = sub.add_parser("unpack", help="one .npz -> image tree")
    u.add_argument("src", type=Path)
    u.add_argument("tree", type=Path)
    u.add_argument("--force", action="store_true", help="overwrite files that exist")
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        n, size = pack(args.tree, args.out)
        packed = args.out.stat().st_size
        print(
            f"packed {n} files ({size / 1e6:.1f} MB) into {args.out} ({packed / 1e6:.1f} MB, {packed / 2**20:.1f} MiB)"
        )
    else:
        n, size = unpack(args.src, args.tree, force=args.force)
        print(f"unpacked {n} files ({size / 1e6:.1f} MB) into {args.tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
