"""Write a random-init DeepSeek V3.2 checkpoint of any preset in HF format (config.json + safetensors).

    python scripts/make_checkpoint.py --preset tiny --out ckpt/tiny --dtype fp8
    python scripts/make_checkpoint.py --preset v32 --set num_hidden_layers=4 n_routed_experts=32 --out ckpt/v32-4l

Weights come from cp_attn.checkpoint.RandomSource (seeded per tensor name), so the same preset and
seed always give the same checkpoint. --dtype fp8 stores the weights DeepSeek ships in FP8 as e4m3
with 128x128 block scales (`weight_scale_inv`), the rest in bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from cp_attn.checkpoint import RandomSource, save_checkpoint
from cp_attn.config import PRESETS, ModelConfig, preset


def parse_overrides(items: list[str]) -> dict:
    """FIELD=VALUE pairs; VALUE is read as JSON (numbers, true, null, lists) or else kept as a string."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes FIELD=VALUE, got {item!r}")
        if key not in fields:
            raise SystemExit(f"--set {key}: not a ModelConfig field")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                    help="model shape (cp_attn.config.PRESETS; default tiny); v32 is the full 671B model")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override config fields")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp8"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="split into shards of at most this size")
    args = ap.parse_args(argv)
    try:
        cfg = preset(args.preset, **parse_overrides(args.set))
        path = save_checkpoint(args.out, RandomSource(cfg, args.seed), dtype=args.dtype,
                               max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (ValueError, FileExistsError) as e:  # a bad --set value, an --out that exists: one line
        raise SystemExit(f"make_checkpoint.py: {e}") from None
    print(f"wrote {args.preset} ({args.dtype}, seed {args.seed}) to {path}")


if __name__ == "__main__":
    main()
