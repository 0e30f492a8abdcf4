"""python -m shards {build,inspect,show}"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from .cli import dispatch


def _policy_overrides(args) -> dict:
    return json.loads(args.policy) if getattr(args, "policy", None) else {}


def cmd_build(args) -> int:
    from .build import build

    summary = build(
        args.out,
        src=args.src,
        demo=args.demo,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        demo_size=args.demo_size,
        seed=args.seed,
    )
    print(json.dumps(summary))
    return 0


def cmd_inspect(args) -> int:
    from .manifest import Manifest, verify

    m = Manifest.load(args.dir)
    problems = verify(args.dir, m)
    summary = {
        "dir": str(args.dir),
        "source": m.source,
        "classes": len(m.classes),
        "splits": {
            k: {"shards": len(v), "samples": m.num_samples(k), "bytes": sum(s.bytes for s in v)}
            for k, v in m.splits.items()
        },
        "policy_id": m.policy().policy_id,
        "ok": not problems,
        "problems": problems,
    }
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    print(json.dumps(summary))
    return 0 if not problems else 1


def cmd_show(args) -> int:
    from .augment import augment, decode_image, to_pil
    from .manifest import Manifest
    from .stream import SkipCounter, iter_shard

    m = Manifest.load(args.dir)
    policy = m.policy(**_policy_overrides(args))
    skips = SkipCounter()
    all_shards = [s for shards in m.splits.values() for s in shards]
    for shard in tqdm(all_shards, desc="searching", unit="shard", disable=len(all_shards) < 20):
        for raw in iter_shard(Path(args.dir) / shard.name, skips):
            if raw.key == args.key:
                crop = augment(decode_image(raw.data), raw.key, args.seed, policy)
                to_pil(crop, policy).save(args.out, format="PNG")
                print(
                    json.dumps(
                        {
                            "key": raw.key,
                            "seed": args.seed,
                            "label": raw.label,
                            "class": m.classes[raw.label],
                            "shard": shard.name,
                            "policy_id": policy.policy_id,
                            "out": str(args.out),
                        }
                    )
                )
                return 0
    print(f"ERROR key {args.key!r} not found in {args.dir}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shards", description="Webdataset shards with seeded augmentation.")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build shards and manifest.json from an image folder or the demo data set")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", type=Path, help="image folder, one sub-folder per class (ImageNet train layout)")
    src.add_argument("--demo", choices=["digits"], help="bundled demo data set (scikit-learn digits)")
    b.add_argument("--out", type=Path, required=True, help="output directory for .tar shards and manifest.json")
    b.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    b.add_argument(
        "--val-fraction", type=float, default=0.0, help="fraction of --src images held out as val (stable hash split)"
    )
    b.add_argument("--demo-size", type=int, default=32, help="demo image side in pixels (default 32)")
    b.add_argument("--seed", type=int, default=0, help="seed of the fixed sample order inside shards")
    b.set_defaults(fn=cmd_build)

    i = sub.add_parser("inspect", help="summarize shards and verify their checksums (non-zero exit on problems)")
    i.add_argument("dir", type=Path)
    i.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("show", help="write the augmented crop that (KEY, seed) produces as a PNG")
    s.add_argument("dir", type=Path)
    s.add_argument("key")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--policy", help="JSON of augmentation policy overrides, e.g. '{\"input_size\": 64}'")
    s.set_defaults(fn=cmd_show)
    return p


def main(argv=None) -> int:
    return dispatch(build_parser(), argv, (FileNotFoundError, ValueError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
