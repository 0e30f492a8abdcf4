"""python -m teacher_service {precompute,serve,labels}"""

from __future__ import annotations

import argparse
import json
import sys

from shards.cli import dispatch


def cmd_labels_stats(args) -> int:
    from .labels_admin import stats

    print(json.dumps(stats(args.url, args.namespace, progress=not args.quiet)))
    return 0


def cmd_labels_copy(args) -> int:
    from .labels_admin import copy

    print(json.dumps(copy(args.src, args.dst, args.namespace, progress=not args.quiet)))
    return 0


def add_labels_parser(sub) -> None:
    lab = sub.add_parser("labels", help="inspect and move label stores")
    lsub = lab.add_subparsers(dest="labels_cmd", required=True)
    st = lsub.add_parser("stats", help="counts, coverage per seed and bytes of each namespace in a store")
    st.add_argument("url", help="store URL: redis://host:port/db, rediss://..., file:///path.db or a path")
    st.add_argument("--namespace", help="namespace id (prefix) to report; default all")
    st.add_argument("--quiet", action="store_true", help="no progress bar")
    st.set_defaults(fn=cmd_labels_stats)
    cp = lsub.add_parser(
        "copy", help="merge one namespace's labels from SRC into DST (e.g. file store -> cluster Redis)"
    )
    cp.add_argument("src")
    cp.add_argument("dst")
    cp.add_argument("--namespace", help="namespace id (prefix); required when SRC holds several")
    cp.add_argument("--quiet", action="store_true", help="no progress bar")
    cp.set_defaults(fn=cmd_labels_copy)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m teacher_service", description="Teacher labels: precompute, serve, store admin."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    from .app.cli import add_parser as add_serve
    from .precompute import add_parser as add_precompute

    add_precompute(sub)
    add_serve(sub)
    add_labels_parser(sub)
    return p


def main(argv=None) -> int:
    from .engine import EngineError
    from .store import StoreError

    return dispatch(build_parser(), argv, (StoreError, EngineError, ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
