"""The `mesh` command: one entry point whose subcommands import their role only when chosen.

Every option has help text and an environment variable (shown in --help), so a donor's container
can be configured without a command line.
"""

from __future__ import annotations

import argparse
import os
import sys


def _env(name: str, default=None):
    return os.environ.get(name, default)


def _option(parser: argparse.ArgumentParser, flag: str, env: str, help: str, default=None, **kwargs):
    value = _env(env, default)
    if kwargs.get("type") is int and value is not None:
        value = int(value)
    parser.add_argument(flag, default=value, help=f"{help} [env: {env}]", **kwargs)


def _add_check(subparsers) -> None:
    parser = subparsers.add_parser(
        "check", help="run a model as chained shards on this device and compare it with transformers",
        description="Load the model's edges and a chain of layer ranges on this device, decode greedily, "
                    "and compare logits and tokens with transformers. Without --model, a small random Llama "
                    "is created (once, cached) so the check works offline.")
    _option(parser, "--model", "MESH_MODEL", "local model directory or hub id (default: embedded tiny model)")
    _option(parser, "--shards", "MESH_CHECK_SHARDS", "split the layers evenly into this many shards", 2, type=int)
    _option(parser, "--splits", "MESH_CHECK_SPLITS", "explicit half-open layer ranges, e.g. 0:3,3:6")
    _option(parser, "--device", "MESH_DEVICE", "auto, cuda[:N], rocm[:N], mps or cpu", "auto")
    _option(parser, "--dtype", "MESH_DTYPE", "auto, bfloat16, float16 or float32", "auto")
    _option(parser, "--quant", "MESH_QUANT", "quantize the shards' weights: int8 or nf4", choices=["int8", "nf4"])
    _option(parser, "--new-tokens", "MESH_CHECK_NEW_TOKENS", "tokens to generate", 16, type=int)
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison with transformers")
    parser.set_defaults(run=_run_check)


def _run_check(args) -> int:
    from shards.errors import ShardError
    from shards.selfcheck import format_report, run_check

    splits = [s.strip() for s in args.splits.split(",")] if args.splits else None
    try:
        report = run_check(args.model, shards=args.shards, splits=splits, device=args.device, dtype=args.dtype,
                           quant=args.quant, new_tokens=args.new_tokens, compare=not args.no_compare)
    except ShardError as err:
        print(f"mesh check: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if report.reference_tokens is not None and report.tokens != report.reference_tokens and not args.quant:
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description="A peer-to-peer LLM inference mesh.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_check(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
