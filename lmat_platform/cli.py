"""The ``lmat`` command (spec section 8): argument parsing, progress, one-line errors.

Every command prints a one-line JSON summary on stdout on success. On bad input it prints one
line ``lmat: error: ...`` on stderr naming the file, row or argument at fault and exits 2,
without a traceback (set ``LMAT_DEBUG=1`` to see one). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from lmat_platform.tenants import Tenant

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"lmat: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _int_us(name: str) -> Callable[[str], int]:
    def parse(v: str) -> int:
        try:
            return int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name}: expected integer microseconds since the epoch, but got {v!r}"
            ) from None

    return parse


def _user_id(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer user id, but got {v!r}") from None


def _progress(msg: str) -> None:
    if os.environ.get("LMAT_QUIET") != "1":
        print(f"  .. {msg}", file=sys.stderr, flush=True)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str, separators=(",", ":")))


def _tenant(path: str, name: str) -> tuple[Tenant, dict[str, Tenant]]:
    from lmat_platform.exceptions import TenantError
    from lmat_platform.tenants import load_tenants

    tenants = load_tenants(path)
    if name not in tenants:
        raise TenantError(f"--tenant: no tenant '{name}' in {path} (have: {', '.join(tenants)})")
    return tenants[name], tenants


def cmd_init(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.store import init_store

    st = init_store(a.store, n_buckets=a.buckets, row_group_rows=a.row_group_rows,
                    retention_hours=a.retention_hours)
    return {"store": st.root, "store_id": st.store_id, "n_buckets": st.n_buckets}


def cmd_ingest(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.store import ingest_files

    return ingest_files(a.store, a.files, progress=_progress, engine=_engine(a)).as_dict()


def cmd_snapshot(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.store import publish_snapshot

    return publish_snapshot(a.store, a.watermark, published_at=a.published_at,
                            engine=_engine(a)).as_dict()


def cmd_thin(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.protocol import write_thin

    return write_thin(a.store, a.requests, a.out, path=a.command, engine=_engine(a))


def cmd_materialize(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.reconstruct import materialize
    from lmat_platform.store import open_store

    store = open_store(a.store)
    tenant, _ = _tenant(a.tenants, a.tenant)
    return materialize(store, a.thin, tenant, a.out, verify=not a.no_verify)


def cmd_fat_rows(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.fatrows import write_fat_rows
    from lmat_platform.store import open_store

    store = open_store(a.store)
    if a.tenant:
        tenant, _ = _tenant(a.tenants, a.tenant)
        target: Any = tenant
    else:
        from lmat_platform.tenants import load_tenants

        target = list(load_tenants(a.tenants).values())
    return write_fat_rows(store, a.requests, target, a.out, progress=_progress)


def cmd_forget(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.store import forget_users, vacuum

    removed = forget_users(a.store, a.user)
    out: dict[str, Any] = {"users": len(set(a.user)), "removed": removed}
    if a.vacuum:
        out["vacuumed_files"] = sum(vacuum(a.store, retention_hours=0).values())
    return out


def cmd_vacuum(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.store import vacuum

    files = vacuum(a.store, retention_hours=a.retention_hours)
    return {"vacuumed_files": sum(files.values()), "tables": files}


def cmd_compact(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.exceptions import LmatError
    from lmat_platform.protocol.thin import compact_thin, open_thin
    from lmat_platform.store import compact_buckets, open_store

    if a.min_files < 1:
        raise LmatError(f"compact: --min-files must be >= 1, but got {a.min_files}")
    st = open_store(a.store)
    for uri in a.thin or []:
        open_thin(st, uri)  # a wrong --thin is refused before the tier is touched
    out: dict[str, Any] = compact_buckets(st, min_files=a.min_files, engine=_engine(a),
                                          stripes_as_of=a.stripes_as_of)
    for uri in a.thin or []:
        out.setdefault("thin", {})[uri] = compact_thin(st, uri, min_files=a.min_files)
    return out


def _engine(a: argparse.Namespace) -> Any:
    """``--engine``: where the step's files are written (lmat_platform.engines)."""
    from lmat_platform.engines import get_engine

    return None if a.engine == "local" else get_engine(a.engine, address=a.ray_address)


def _engine_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--engine", choices=["local", "ray"],
                   default=os.environ.get("LMAT_ENGINE") or "local",
                   help="run the step here, or as Ray tasks, one per bucket or file, "
                        "committed here (default: $LMAT_ENGINE, else local)")
    s.add_argument("--ray-address", default=os.environ.get("LMAT_RAY_ADDRESS") or "auto",
                   help="with --engine ray: the cluster (default: $LMAT_RAY_ADDRESS, else the "
                        "running local one)")


def cmd_info(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.store import disk_bytes, list_snapshots, open_store
    from lmat_platform.store.snapshots import publish_intents

    st = open_store(a.store)
    snaps = list_snapshots(st)
    # A publish that started and did not finish (ingest fences at its watermark until a re-run).
    unfinished = {k: w for k, w in publish_intents(st).items() if k >= len(snaps)}
    return {
        "store": st.root,
        "store_id": st.store_id,
        "n_buckets": st.n_buckets,
        "snapshots": len(snaps),
        "latest_watermark": snaps[-1].watermark if snaps else None,
        "unfinished_publish": (
            {"snapshot_id": min(unfinished), "watermark": unfinished[min(unfinished)]}
            if unfinished else None
        ),
        "bytes": disk_bytes(st),
    }


def cmd_validate(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.exceptions import ImmutabilityError
    from lmat_platform.store import open_store
    from lmat_platform.validate import check_uih_commits, delta_log_entries, read_commits

    st = open_store(a.store)
    rep = check_uih_commits(read_commits(delta_log_entries(st.table_uri("uih"))))
    if not rep.ok:
        raise ImmutabilityError(f"{st.table_uri('uih')}: {rep.problems[0]}")
    return rep.as_dict()


def cmd_demo(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.demo import format_summary, run_demo

    s = run_demo(a.dir, scale=a.scale, days=a.days, seed=a.seed, progress=_progress)
    print(format_summary(s), file=sys.stderr)
    if not s["ok"]:
        from lmat_platform.exceptions import LmatError

        raise LmatError("demo: parity or leakage check failed (see summary above)")
    return {k: v for k, v in s.items() if k not in ("parity",)} | {
        "parity_ok": s["ok"]
    }


def cmd_ui(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.ui import launch_ui

    def say(msg: str) -> None:
        print(f"lmat ui: {msg}", file=sys.stderr, flush=True)

    code = launch_ui(a.demo, a.home, port=a.port, verbose=a.ui_verbose or a.verbose, say=say)
    return {"exit_code": code}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmat", description="Versioned late materialization of user histories.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("init", help="create an empty store")
    s.add_argument("store")
    s.add_argument("--buckets", type=int, default=16, help="user buckets (default 16)")
    s.add_argument("--row-group-rows", type=int, default=8192)
    s.add_argument("--retention-hours", type=int, default=168)
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("ingest", help="ingest event Parquet files")
    s.add_argument("store")
    s.add_argument("files", nargs="+")
    _engine_args(s)
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("snapshot", help="publish a snapshot")
    s.add_argument("store")
    s.add_argument("--watermark", required=True, type=_int_us("--watermark"))
    s.add_argument("--published-at", type=_int_us("--published-at"), default=None)
    _engine_args(s)
    s.set_defaults(func=cmd_snapshot)

    for name, text in (("log", "streaming path: thin rows with pointer and tail"),
                       ("examples", "batch path: thin rows with pointer only")):
        s = sub.add_parser(name, help=text)
        s.add_argument("store")
        s.add_argument("requests")
        s.add_argument("--out", required=True, help="thin Delta table (created or appended)")
        _engine_args(s)
        s.set_defaults(func=cmd_thin)

    s = sub.add_parser("materialize", help="rebuild a tenant's sequences")
    s.add_argument("store")
    s.add_argument("thin")
    s.add_argument("--tenants", required=True)
    s.add_argument("--tenant", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--no-verify", action="store_true", help="skip pointer checksum checks")
    s.set_defaults(func=cmd_materialize)

    s = sub.add_parser("fat-rows", help="write the fat-row baseline (one tenant or the union)")
    s.add_argument("store")
    s.add_argument("requests")
    s.add_argument("--tenants", required=True)
    s.add_argument("--tenant", default=None, help="one tenant; default: union of all")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_fat_rows)

    s = sub.add_parser("forget", help="forget users everywhere")
    s.add_argument("store")
    s.add_argument("--user", type=_user_id, action="extend", nargs="+", required=True,
                   metavar="ID", help="user ids: --user 1 2 3, or --user 1 --user 2")
    s.add_argument("--vacuum", action="store_true", help="also vacuum now (retention 0)")
    s.set_defaults(func=cmd_forget)

    s = sub.add_parser("vacuum", help="delete unreferenced files older than the retention")
    s.add_argument("store")
    s.add_argument("--retention-hours", type=int, default=None)
    s.set_defaults(func=cmd_vacuum)

    s = sub.add_parser("compact", help="merge each bucket's tier files (layout only)")
    s.add_argument("store")
    s.add_argument("--min-files", type=int, default=2)
    s.add_argument("--stripes-as-of", type=int, default=None, metavar="SNAPSHOT",
                   help="rank the stripes as of this snapshot (the oldest one the thin rows "
                        "still read point at), not the newest")
    s.add_argument("--thin", action="append", metavar="URI",
                   help="also merge this thin table's files to one per bucket (repeatable)")
    _engine_args(s)
    s.set_defaults(func=cmd_compact)

    s = sub.add_parser("info", help="describe a store")
    s.add_argument("store")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("validate", help="check the UIH tier's history is appends and layout only")
    s.add_argument("store")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("demo", help="run the whole flow on generated data")
    s.add_argument("--dir", default="lmat-demo", help="demo folder (recreated; default lmat-demo)")
    s.add_argument("--scale", default="small", help="tiny | small | medium (default small)")
    s.add_argument("--days", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("ui", help="the Dagster UI on the demo's store, materialized")
    s.add_argument("--demo", default=None,
                   help="demo folder to serve (default ./lmat-demo when it holds a demo)")
    s.add_argument("--home", default=None,
                   help="without a demo: folder for a generated workload (default ~/.lmat/ui)")
    s.add_argument("--port", type=int, default=3000)
    s.add_argument("--verbose", dest="ui_verbose", action="store_true",
                   help="show Dagster's own log (default: in files under dagster_home/)")
    s.set_defaults(func=cmd_ui)

    from lmat_platform.datasets.commands import add_commands  # import, train (real data)

    add_commands(sub, _progress)
    from lmat_platform.summaries.commands import add_commands as add_summary_commands

    add_summary_commands(sub, _progress)  # train-summarizer, summarize (VISTA)
    return p


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) < 500 else msg[:497] + "..."


def _write_refused(e: BaseException, a: argparse.Namespace) -> str | None:
    """One line for a write the file system refused (a read-only store, folder or file),
    naming what could not be written; None for any other error."""
    import errno

    store = getattr(a, "store", None)
    where = f" (store {store} is read-only here)" if store else ""
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = e.filename or store or "a file"
        if store and os.path.basename(str(what)) == "_lock":
            return f"{what}: could not write the store's writer lock: {e.strerror}{where}"
        return f"{what}: could not be written: {e.strerror}{where}"
    text = str(e)
    if "Permission denied" in text or "Read-only file system" in text:
        return f"{store or 'lmat'}: could not write to the store (read-only here?): {_one_line(e)}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from lmat_platform.exceptions import LmatError

    try:
        _emit(args.func(args))
        return 0
    except LmatError as e:
        print(f"lmat: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, OSError) as e:
        if os.environ.get("LMAT_DEBUG"):
            raise
        print(f"lmat: error: {_write_refused(e, args) or _one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("lmat: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: one line, no trace
        if os.environ.get("LMAT_DEBUG"):
            raise
        refused = _write_refused(e, args)
        if refused:
            print(f"lmat: error: {refused}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"lmat: internal error: {type(e).__name__}: {_one_line(e)} "
              "(set LMAT_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
