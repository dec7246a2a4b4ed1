"""The ``vblora-store`` command line: parse, call, render.

Exit codes:
    0  done
    1  a check failed (``report --max-bytes/--min-compression``)
    2  bad input or usage: the message on stderr names the file, the problem and the fix
"""

from __future__ import annotations

import sys
import traceback
from typing import Optional

import click

from .accounting import account
from .errors import InvalidAdapterError, VBLoRAStoreError
from .format import StorageForm, convert, read_adapters
from .format.packed import BankDtype, WeightsDtype
from .inspection import describe, render_json, render_text
from .report import ReportFormat, build_report
from .verify import render as render_verification
from .usage import bank_usage, plot_usage
from .verify import verify_adapters

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Group(click.Group):
    """Turns library errors into one clean line and exit code 2 (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VBLoRAStoreError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # a bug, or input no check caught: never a bare traceback
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(
                f"error: unexpected {type(e).__name__}: {e}; rerun with --debug and report it.",
                err=True,
            )
            sys.exit(EXIT_BAD_INPUT)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="vblora_store")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Store, convert and report VB-LoRA adapters saved by PEFT; no base model needed."""
    ctx.obj = {"debug": debug}


@main.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_cmd(path: str, as_json: bool) -> None:
    """Show the form, config, adapted modules and tensors of the adapters in PATH."""
    descriptions = [describe(a) for a in read_adapters(path)]
    click.echo(render_json(descriptions) if as_json else render_text(descriptions))


@main.command("convert")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option(
    "--to",
    "to",
    type=click.Choice([f.value for f in StorageForm]),
    default=StorageForm.TOPK.value,
    show_default=True,
    help="Target storage form.",
)
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option(
    "--weights-dtype",
    type=click.Choice([d.value for d in WeightsDtype]),
    default=WeightsDtype.FLOAT32.value,
    show_default=True,
    help="Packed form: top-k weights precision (float32 is lossless).",
)
@click.option(
    "--bank-dtype",
    type=click.Choice([d.value for d in BankDtype]),
    default=BankDtype.FLOAT32.value,
    show_default=True,
    help="Packed form: vector bank precision (float32 is lossless; int8 keeps a scale per vector).",
)
def convert_cmd(src: str, dst: str, to: str, force: bool, weights_dtype: str, bank_dtype: str) -> None:
    """Convert the adapters in SRC into DST (same layout), then print DST's report."""
    convert(src, dst, to=to, force=force, weights_dtype=weights_dtype, bank_dtype=bank_dtype)
    report = build_report([account(a) for a in read_adapters(dst)])
    click.echo(report.render(ReportFormat.TEXT))


@main.command("report")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in ReportFormat]),
    default=ReportFormat.TEXT.value,
    show_default=True,
)
@click.option("--max-bytes", type=click.IntRange(min=0), help="Exit 1 if a weights file is larger.")
@click.option(
    "--min-compression",
    type=click.FloatRange(min=0),
    help="Exit 1 if an adapter stores less than X times fewer parameters than a rank-r LoRA.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=str),
    help="Also write a PNG of bank-vector usage (needs the 'plot' extra: matplotlib).",
)
def report_cmd(
    paths: tuple[str, ...], fmt: str, max_bytes: Optional[int], min_compression: Optional[float], plot: Optional[str]
) -> None:
    """Report sizes and float32-equivalent parameter counts of the adapters in PATHS."""
    adapters = [a for path in paths for a in read_adapters(path)]
    report = build_report([account(a) for a in adapters], max_bytes=max_bytes, min_compression=min_compression)
    if plot:
        usages = [bank_usage(a) for a in adapters]
        plot_usage(usages, plot)
        for usage in usages:
            click.echo(f"{usage.adapter}: {len(usage.unused)} of {len(usage.counts)} bank vectors unused", err=True)
    click.echo(report.render(ReportFormat(fmt)))
    sys.exit(report.exit_code)


@main.command("verify")
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option("--tol", type=click.FloatRange(min=0), default=1e-6, show_default=True, help="Largest relative error allowed.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def verify_cmd(a: str, b: str, tol: float, fmt: str) -> None:
    """Compare ΔW = B·A of every module of adapters A and B (any forms); exit 1 above --tol."""
    first = {x.name: x for x in read_adapters(a)}
    second = {x.name: x for x in read_adapters(b)}
    if set(first) != set(second):
        raise InvalidAdapterError(
            f"{b}: holds adapters {sorted(second)} but {a} holds {sorted(first)}; compare two forms of one folder."
        )
    verifications = [verify_adapters(first[name], second[name]) for name in first]
    click.echo(render_verification(verifications, tol=tol, as_json=fmt == "json"))
    sys.exit(EXIT_OK if max(v.max_rel_error for v in verifications) <= tol else EXIT_CHECK_FAILED)
