"""The ``fastgen`` command line: export, build, inspect, bench, generate, score, serve, demo.

Bad input or a bad environment prints one line (``error: ...``) on stderr and exits with code 2,
with no traceback: fastgen's own errors, and the environment's (a path that cannot be written, is a
folder or is not one, a full or read-only disk, text that is not UTF-8, memory that runs out). Exit
code 1 means a bug in fastgen; ``FASTGEN_DEBUG=1`` shows its traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from fastgen.cli.options import dataclass_options, engine_cache, nonempty, pop_config, printable
from fastgen.engines.config import BuildConfig, ExecutionOptions
from fastgen.engines.trt_options import TensorRTOptions
from fastgen.errors import FastgenError, InvalidArgumentError, NumericalError, VerificationError
from fastgen.export.config import ExportConfig
from fastgen.version import __version__

logger = logging.getLogger("fastgen.cli")

#: Most timed (or warm-up) runs per batch size: enough for any percentile, and a typo cannot run for days.
MAX_BENCH_RUNS = 100_000

MODEL_HELP = "a preset (tiny, sd15, sdxl) or a local checkpoint: diffusers or transformers folder, .safetensors file"


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal (CI logs, pipes) rich assumes 80 columns, which folds every table: use more.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, width=width)


def _profile(value: str | None):
    if not value:
        return None
    from fastgen.models.spec import ShapeProfile

    return ShapeProfile.parse(value)


def _int_list(argument: str, value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        items = []
    if not items or any(i < 1 for i in items):
        raise InvalidArgumentError(argument, value, "comma-separated integers >= 1, e.g. 1,4,8")
    return items


def _dims(argument: str, value: str | None) -> dict[str, int]:
    if not value:
        return {}
    out = {}
    for part in value.split(","):
        name, _, num = part.partition("=")
        # ASCII digits: str.isdigit() also takes superscripts ("\u00b2"), which int() then rejects.
        if not name.strip() or not num.strip().isascii() or not num.strip().isdigit() or int(num) < 1:
            raise InvalidArgumentError(argument, part, "NAME=N pairs, comma-separated, e.g. height=512,width=512")
        if name.strip() in out:
            raise InvalidArgumentError(argument, part, reason=f"{name.strip()} is given twice")
        out[name.strip()] = int(num)
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="fastgen")
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
def cli(verbose: int) -> None:
    """fastgen: export, build, inspect and benchmark diffusion and classifier engines."""
    from rich.logging import RichHandler

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=_console(True), show_path=False)])
    logging.getLogger("fastgen").setLevel(level)


@cli.command("export")
@click.argument("model", callback=nonempty)
@click.option("--component", "-c", help="Component to export: unet, vae-decoder, vae-encoder, text-encoder, "
              "text-encoder-2, classifier, text-classifier (what the model has).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), callback=nonempty,
              help="Output directory.")
@click.option("--profile", help="Shape profile overrides, e.g. batch=1:2:8,height=256:512:1024.")
@dataclass_options(ExportConfig)
def export_cmd(model: str, component: str | None, out: str, profile: str | None, **kwargs: Any) -> None:
    """Export one component of MODEL to ONNX and verify it against PyTorch.

    MODEL is a preset (tiny, sd15, sdxl) or a local checkpoint (diffusers or transformers folder,
    .safetensors file).
    """
    from fastgen.cli import report
    from fastgen.export.api import export

    config = pop_config(ExportConfig, kwargs)
    result = export(model, out, component=component, config=config, profile=_profile(profile), progress=True)
    report.export_summary(_console(), result)


@cli.command("build")
@click.argument("model", callback=nonempty)
@click.option("--component", "-c", help="Component to build (see `fastgen export --help`), or `all` (each into "
              "OUT/<component>, the layout `fastgen generate --model OUT` reads); not for .onnx files.")
@click.option("--out", "-o", type=click.Path(file_okay=False), callback=nonempty,
              help="Also write the engine directory here.")
@click.option("--profile", help="Shape profile overrides, e.g. batch=1:4:8,height=512.")
@click.option("--cache-dir", type=click.Path(file_okay=False), callback=nonempty,
              help="Engine cache root (default: $FASTGEN_CACHE_DIR or ~/.cache/fastgen/engines).")
@click.option("--no-cache", is_flag=True, help="Build without the cache (needs --out).")
@click.option("--trt-profile", "trt_profiles", multiple=True,
              help="tensorrt: an extra optimization profile (repeatable), e.g. height=512,width=512.")
@click.option("--trt-bucket-profiles", is_flag=True,
              help="tensorrt: one extra profile per text bucket of the runtime (components with a seq dim).")
@dataclass_options(BuildConfig)
@dataclass_options(ExportConfig)
@dataclass_options(ExecutionOptions)
@dataclass_options(TensorRTOptions, prefix="trt_")
def build_cmd(model: str, component: str | None, out: str | None, profile: str | None, cache_dir: str | None,
              no_cache: bool, trt_profiles: tuple[str, ...], trt_bucket_profiles: bool, **kwargs: Any) -> None:
    """Build an engine for one component of MODEL, or for any .onnx file (MODEL_OR_ONNX).

    Engines are content-addressed in the cache: a second build of the same inputs is a cache hit.
    """
    from fastgen.cli import report
    from fastgen.engines.build import build

    for text in trt_profiles:  # their syntax now, not after the export
        if not text.strip():
            raise InvalidArgumentError("trt-profile", text, "NAME=N pairs, comma-separated, e.g. height=512,width=512")
        _profile(text)
    export_cfg = pop_config(ExportConfig, kwargs)
    execution = pop_config(ExecutionOptions, kwargs)
    buckets = None
    if trt_bucket_profiles:
        from fastgen.runtime.config import RuntimeConfig

        buckets = RuntimeConfig().text_buckets
    tensorrt = pop_config(TensorRTOptions, kwargs, extra_profiles=trt_profiles or None, seq_buckets=buckets)
    config = pop_config(BuildConfig, kwargs, profile=_profile(profile), export=export_cfg, execution=execution,
                        tensorrt=tensorrt)
    if no_cache and out is None:
        raise InvalidArgumentError("out", None, reason="required with --no-cache (where else would the engine go?)")
    cache: Any = False if no_cache else engine_cache(cache_dir)  # checked before the export
    if component == "all":
        from fastgen.models import model_components

        if out is None:
            raise InvalidArgumentError("out", None, reason="required with --component all")
        for name in model_components(model):
            engine = build(model, component=name, config=config, out=Path(out) / name, cache=cache, progress=True)
            report.build_summary(_console(), engine)
        return
    engine = build(model, component=component, config=config, out=out, cache=cache, progress=True)
    report.build_summary(_console(), engine)


@cli.command("inspect")
@click.argument("engine", callback=nonempty)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect_cmd(engine: str, as_json: bool) -> None:
    """Show IO names, dtypes, dims, backend, precision, cache key and build time of an engine or .onnx file."""
    from fastgen.cli import report

    info = report.describe_path(engine)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        report.inspect_tables(_console(), info)


@cli.command("bench")
@click.argument("engine", callback=nonempty)
@click.option("--batch", "batches", default="1,4,8", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--shape", help="Sizes of other dims, e.g. height=512,width=512 (default: the profile's opt).")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0, MAX_BENCH_RUNS),
              help="Untimed runs per batch size.")
@click.option("--iters", default=20, show_default=True, type=click.IntRange(1, MAX_BENCH_RUNS),
              help="Timed runs per batch size.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Run on this device (default: the engine's).")
@click.option("--profile", help="Profile overrides for a third-party .onnx file with unknown dims, e.g. N=1:4:16.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@dataclass_options(ExecutionOptions)
def bench_cmd(engine: str, batches: str, shape: str | None, warmup: int, iters: int, device: str | None,
              profile: str | None, as_json: bool, **kwargs: Any) -> None:
    """Measure p50/p99 latency and throughput of ENGINE (an engine directory or .onnx file).

    Batch sizes and --shape must lie in the engine's profile (see `fastgen inspect`), and be sizes the
    component takes: all are checked before the first run. --profile widens the range of an .onnx file.
    """
    from fastgen.cli import report
    from fastgen.engines.bench import benchmark
    from fastgen.engines.loading import load_engine

    batch_list = _int_list("batch", batches)
    dims = _dims("shape", shape)
    execution = pop_config(ExecutionOptions, kwargs)
    if device == "auto":
        from fastgen.engines.device import resolve_device

        device = str(resolve_device("auto"))
    eng = load_engine(engine, device=device, execution=execution)
    if profile:
        eng.spec = eng.spec.with_profile(_profile(profile))
    unknown = set(dims) - eng.spec.symbols
    if unknown:
        raise InvalidArgumentError("shape", sorted(unknown)[0], sorted(eng.spec.symbols) or "none")
    results = benchmark(eng, batches=batch_list, shape=dims, warmup=warmup, iters=iters, strict=True)
    rows = [r.to_dict() for r in results]
    if as_json:
        click.echo(json.dumps({"engine": eng.describe(), "results": rows}, indent=2, default=str))
    else:
        report.bench_table(_console(), eng, rows)


@cli.command("demo")
@click.option("--out", "-o", default="fastgen-out/demo", show_default=True, type=click.Path(file_okay=False),
              callback=nonempty, help="Where the PNGs and summary.json are written (a new or empty folder, or a "
              "previous demo's).")
@click.option("--cache-dir", type=click.Path(file_okay=False), callback=nonempty, help="Engine cache root.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 1000), help="Denoising steps.")
@click.option("--candidates", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Best-of-N: candidates per prompt (all of them are held in memory at once).")
def demo_cmd(out: str, cache_dir: str | None, steps: int, candidates: int) -> None:
    """The main job on the embedded `tiny` preset: with the torch and the onnxruntime backends, build the
    engines (cached), generate ad-style images, score them and the ad copy, run best-of-N, and compare."""
    from fastgen.cli.demo import check_demo_out, run_demo

    check_demo_out(Path(out))
    cache = engine_cache(cache_dir)
    run_demo(Path(out), cache_dir=str(cache.root), steps=steps, candidates=candidates, console=_console())


@cli.group("cache")
@click.option("--cache-dir", type=click.Path(file_okay=False), callback=nonempty,
              help="Engine cache root (default: $FASTGEN_CACHE_DIR or ~/.cache/fastgen/engines).")
@click.pass_context
def cache_cmd(ctx: click.Context, cache_dir: str | None) -> None:
    """List, verify or clear the engine cache."""
    # Listing only reads; verify and clear remove entries, so the root must be writable.
    ctx.obj = engine_cache(cache_dir, write=ctx.invoked_subcommand not in (None, "list"))


@cache_cmd.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def cache_list(cache, as_json: bool) -> None:
    """One row per cached engine: key, component, backend, precision, size, build date."""
    from rich.table import Table

    rows = cache.entries()
    if as_json:
        click.echo(json.dumps({"root": str(cache.root), "entries": rows}, indent=2, default=str))
        return
    table = Table(title=f"engine cache {cache.root} ({len(rows)} entries)")
    for col in ("key", "component", "backend", "precision", "MB", "built", "origin"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key"][:12], str(r.get("component")), str(r.get("backend")), str(r.get("precision")),
                      f"{r['bytes'] / 1e6:.1f}", str(r.get("built_at")), str(r.get("origin")))
    _console().print(table)


@cache_cmd.command("verify")
@click.option("--repair", is_flag=True, help="Remove damaged and outdated entries (without it nothing is deleted).")
@click.pass_obj
def cache_verify(cache, repair: bool) -> None:
    """Check every entry against its manifest's sha256; with --repair, remove the damaged ones."""
    rows = cache.verify_entries(repair=repair)
    bad = [r for r in rows if r["status"] != "ok"]
    for row in bad:
        click.echo(f"{row['key'][:12]} {row['status']}: {row['error']}")
    line = f"{len(rows) - len(bad)} intact, {len(bad)} damaged or outdated"
    if repair:
        removed = sum(1 for r in bad if r["removed"])
        failed = [r for r in bad if not r["removed"]]
        line += f"; {removed} removed" + (f", {len(failed)} could not be removed ({failed[0]['remove_error']})"
                                          if failed else "")
        click.echo(line)
        if failed:
            sys.exit(2)
        return
    click.echo(line + ("; run `fastgen cache verify --repair` to remove them" if bad else ""))


@cache_cmd.command("clear")
@click.pass_obj
def cache_clear(cache) -> None:
    """Delete every cached engine."""
    click.echo(f"removed {cache.clear()} entries from {cache.root}")


def _register_pipeline_commands() -> None:
    # Defined in their own modules (heavy imports happen inside the commands, not here).
    from fastgen.cli.generate import generate
    from fastgen.cli.score import score
    from fastgen.cli.serve import serve

    cli.add_command(generate)
    cli.add_command(score)
    cli.add_command(serve)


_register_pipeline_commands()


#: OSError errnos that mean the environment, not fastgen: exit 2 naming the path.
_ENV_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EISDIR,
               errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}
_ENV_HINTS = {errno.EACCES: "choose a path this user can write", errno.EPERM: "choose a path this user can write",
              errno.EROFS: "the file system is read-only; choose another path",
              errno.ENOSPC: "the disk is full; free space or choose another --out / --cache-dir",
              errno.EDQUOT: "the disk quota is exceeded; free space or choose another --out / --cache-dir"}


def environment_error(exc: BaseException) -> str | None:
    """The one-line message of an error the environment caused (None for anything else, i.e. a bug)."""
    if isinstance(exc, OSError) and (exc.errno in _ENV_ERRNOS or isinstance(
            exc, (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError))):
        paths = " -> ".join(repr(printable(p)) for p in (exc.filename, exc.filename2) if p is not None)
        code = errno.errorcode.get(exc.errno or 0)
        text = f"{paths or 'a file'}: {exc.strerror or exc}" + (f" [{code}]" if code else "")
        hint = _ENV_HINTS.get(exc.errno or 0)
        return text + (f"; {hint}" if hint else "")
    if isinstance(exc, UnicodeError):
        shown = ""
        if isinstance(exc, (UnicodeEncodeError, UnicodeDecodeError)):
            shown = f" {printable(exc.object[exc.start:exc.end])!r} ({exc.reason})"
        return (f"text that is not valid UTF-8:{shown or ' ' + printable(exc)}; pass UTF-8 arguments and file "
                "contents (for file names and output, a UTF-8 locale, e.g. PYTHONUTF8=1)")
    if isinstance(exc, MemoryError):
        return f"out of memory ({printable(exc) or 'an allocation failed'}); lower the batch size, image size or count"
    return None


def _fail(message: str, code: int) -> None:
    # Whitespace (newlines of a wrapped library message) collapses to spaces first; what is left that
    # could break the line or the stream (control characters, bytes that are not UTF-8) is escaped.
    click.echo(f"error: {printable(' '.join(message.split()))}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    # The command owns its process, so it may choose OpenMP's barrier policy (a library import must
    # not): idle OpenMP threads that sleep instead of spinning keep torch on the CPU from collapsing
    # when another process holds a core (docs/reliability.md, "CPU contention"). OpenMP reads it once,
    # when torch loads, so only before that; a user's own setting wins.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    debug = os.environ.get("FASTGEN_DEBUG", "") not in ("", "0")
    try:
        cli.main(args=argv, prog_name="fastgen", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # usage errors: one line, exit 2
        _fail(e.format_message(), 2)
    except (VerificationError, NumericalError) as e:  # the model misbehaved, not the arguments: exit 1
        _fail(str(e), 1)
    except FastgenError as e:
        _fail(str(e), 2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        message = environment_error(e)
        if message is not None:
            _fail(message, 2)
        if debug:
            raise
        _fail(f"internal error ({type(e).__name__}): {str(e)[:500]} (set FASTGEN_DEBUG=1 for the traceback)", 1)


if __name__ == "__main__":
    main()
