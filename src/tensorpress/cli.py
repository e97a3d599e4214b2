"""The ``tensorpress`` command: compress, decompress, inspect and verify checkpoint folders.

Exit status: 0 on success, 1 when tensorpress rejects the input or the
folder fails verification (the message goes to stderr, without a
traceback), 2 for usage errors (argparse's own status).

Under ``torchrun --nproc_per_node=N -m tensorpress compress ...`` (or
decompress) the ranks split the work (see `tensorpress.distributed`); only
rank 0 prints the result and shows progress bars.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tensorpress.distributed import Ranks, ranks_from_environment
from tensorpress.errors import InvalidOptionsError, TensorpressError

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``tensorpress`` command."""
    parser = argparse.ArgumentParser(
        prog="tensorpress", description="Compressed-tensors checkpoints from safetensors folders."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compress = commands.add_parser("compress", help="compress a safetensors checkpoint folder")
    compress.add_argument("source", metavar="SRC", help="the checkpoint folder to read")
    compress.add_argument("destination", metavar="DST", help="the folder to write")
    compress.add_argument("--scheme", required=True, help="compressed-tensors preset, for example W4A16, W8A8, FP8_DYNAMIC, NVFP4A16")
    compress.add_argument("--targets", nargs="+", default=["Linear"], help="modules to quantize: class names, names or re:regexes (default: Linear)")
    compress.add_argument("--ignore", nargs="*", default=["lm_head"], help="modules to leave dense (default: lm_head)")
    compress.add_argument("--format", dest="quantization_format", help="force this quantization format for every module")
    compress.add_argument("--sparsity", metavar="FORMAT", help="sparsity format (sparse-bitmask, sparse-24-bitmask); needs sparse compression support")
    compress.add_argument("--max-shard-size", default="5GB", help="largest output shard, for example 5GB or 500MB (default: 5GB)")
    _add_common(compress)
    compress.add_argument("--allow-pickle", action="store_true", help="convert .bin/.pt weights with torch.load(weights_only=True) when there is no safetensors file")

    decompress = commands.add_parser("decompress", help="write a dense copy that transformers loads")
    decompress.add_argument("source", metavar="SRC", help="the compressed folder to read")
    decompress.add_argument("destination", metavar="DST", help="the folder to write")
    decompress.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")
    _add_common(decompress)

    inspect = commands.add_parser("inspect", help="show format, schemes, ignore list, sizes and compression ratio")
    inspect.add_argument("folder", metavar="DIR")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")

    verify = commands.add_parser("verify", help="check every tensor's name, dtype and shape against config.json")
    verify.add_argument("folder", metavar="DIR")
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive_int, default=1, help="modules processed at once, on threads (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log messages")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _ProgressBars:
    """tqdm bars for the stages that compress_checkpoint reports, or nothing when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            unit = "shard" if stage == "write" else "module"
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _compress(args: argparse.Namespace, progress: _ProgressBars, ranks: Ranks | None) -> int:
    from tensorpress.checkpoint import compress_checkpoint
    from tensorpress.options import CompressionOptions

    extra: dict[str, Any] = {}
    if args.quantization_format:
        extra["quantization_format"] = args.quantization_format
    if args.sparsity:
        extra["sparsity_config"] = {"format": args.sparsity, "targets": args.targets, "ignore": args.ignore}
    options = CompressionOptions.for_scheme(args.scheme, targets=args.targets, ignore=args.ignore, **extra)
    try:
        result = compress_checkpoint(
            args.source,
            args.destination,
            options,
            max_shard_size=args.max_shard_size,
            workers=args.workers,
            progress=progress,
            allow_pickle=args.allow_pickle,
            ranks=ranks,
        )
    except InvalidOptionsError as error:
        if args.sparsity:
            raise InvalidOptionsError(f"--sparsity {args.sparsity}: {error}") from None
        raise
    if ranks is None or ranks.is_main:
        print(f"wrote {result.path} ({', '.join(result.weight_files)})")
        print(f"module classes: {result.module_kinds}")
    return 0


def _decompress(args: argparse.Namespace, progress: _ProgressBars, ranks: Ranks | None) -> int:
    from tensorpress.checkpoint import decompress_checkpoint

    result = decompress_checkpoint(
        args.source,
        args.destination,
        max_shard_size=args.max_shard_size,
        workers=args.workers,
        progress=progress,
        ranks=ranks,
    )
    if ranks is None or ranks.is_main:
        print(f"wrote {result.path} ({', '.join(result.weight_files)})")
    return 0


def _log_format() -> str:
    # Under torchrun every rank logs to the same terminal, so name the rank.
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        return f"%(levelname)s: rank {os.environ.get('RANK', '?')}: %(message)s"
    return "%(levelname)s: %(message)s"


def _inspect(args: argparse.Namespace) -> int:
    from tensorpress.checkpoint.inspect import inspect_checkpoint

    summary = inspect_checkpoint(args.folder)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"folder:            {summary['path']}")
    print(f"architecture:      {summary['architecture']}")
    print(f"format:            {summary['format'] or 'dense (no quantization_config)'}")
    for group, scheme in summary["schemes"].items():
        print(f"{group}:           targets {scheme['targets']}, weights {scheme['weights']}, "
              f"input activations {scheme['input_activations']}")
    print(f"ignore:            {summary['ignore']}")
    print(f"sparsity:          {summary['sparsity_config'] or 'none'}")
    print(f"quantized modules: {summary['quantized_modules']} {summary['modules_per_format']}")
    print(f"tensors:           {summary['tensor_count']} in {len(summary['weight_files'])} file(s)")
    print(f"stored bytes:      {summary['stored_bytes']:,}")
    print(f"dense bytes:       {summary['dense_bytes']:,}")
    print(f"compression ratio: {summary['compression_ratio']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tensorpress.checkpoint.inspect import verify_checkpoint

    problems = verify_checkpoint(args.folder)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{args.folder}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{args.folder}: every tensor agrees with config.json")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format=_log_format())
    if quiet:
        logging.getLogger().setLevel(logging.ERROR)
    progress = _ProgressBars(enabled=not quiet and sys.stderr.isatty())
    try:
        if args.command in ("compress", "decompress"):
            with ranks_from_environment() as ranks:
                if ranks is not None and not ranks.is_main:
                    progress.enabled = False
                if args.command == "compress":
                    return _compress(args, progress, ranks)
                return _decompress(args, progress, ranks)
        if args.command == "inspect":
            return _inspect(args)
        return _verify(args)
    except TensorpressError as error:
        print(f"tensorpress: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of stdout (for example `head`) exited; that is not a failure.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        progress.close()
