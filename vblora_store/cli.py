"""The ``vblora-store`` command line: parse, call, render.

Exit codes:
    0  done
    1  a check failed (``report --max-bytes/--min-compression``, ``verify --tol``)
    2  bad input or usage: one or two lines on stderr name the file, the problem and the fix

Only click and the torch-free :mod:`vblora_store.choices` are imported at start:
each command imports what it uses, so ``--help``, ``--version`` and usage
errors cost no torch.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
import traceback
from typing import Optional

import click

from .choices import BankDtype, MergeDtype, ReportFormat, StorageForm, WeightsDtype
from .errors import VBLoRAStoreError, os_problem
from .results import EXIT_BAD_INPUT, EXIT_OK


class _Group(click.Group):
    """One line per error, exit code 2: usage errors, library errors, the operating system's refusals.

    A traceback only with ``--debug``.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "vblora-store"
            message = e.format_message().rstrip(".")
            _fail(f"error: {message[:1].lower()}{message[1:]}; see {where} --help")
        except click.ClickException as e:
            _fail(f"error: {e.format_message()}", e.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        sys.exit(code if isinstance(code, int) else EXIT_OK)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except VBLoRAStoreError as e:
            _debug(ctx)
            _fail(f"error: {e}")
        except Exception as e:  # the operating system's refusal, a bug, or input no check caught
            _debug(ctx)
            problem = os_problem(e)
            if problem is not None:
                where = getattr(e, "filename", None)
                _fail(
                    f"error: {problem.message('access', where) if where else problem.message('write', 'standard output')}"
                )
            _fail(f"error: unexpected {type(e).__name__}: {e}; rerun with --debug and report it.")


def _debug(ctx: click.Context) -> None:
    if ctx.obj and ctx.obj.get("debug"):
        traceback.print_exc()


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``message`` on stderr and exit; if stdout itself failed, drop what it still holds."""
    try:
        sys.stdout.flush()
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    click.echo(message, err=True)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="vblora_store")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Store, convert, verify, export and publish VB-LoRA adapters saved by PEFT; no base model needed."""
    ctx.obj = {"debug": debug}


def _sources(*names: str):
    """Let the arguments ``names`` be Hub repo ids too: add ``--revision`` and ``--subfolder``.

    Each value is replaced by the local folder :func:`vblora_store.hub.resolve_source` gives
    (a local path that exists wins; a repo id is downloaded, adapter files only).
    """

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, revision: Optional[str], subfolder: Optional[str], **kwargs):
            from .sources import resolve_source

            resolve = functools.partial(resolve_source, revision=revision, subfolder=subfolder)
            for name in names:
                value = kwargs[name]
                kwargs[name] = tuple(map(resolve, value)) if isinstance(value, tuple) else resolve(value)
            return command(*args, **kwargs)

        wrapper.__doc__ = (
            f"{inspect.cleandoc(command.__doc__)}\n\n{'/'.join(n.upper() for n in names)} may also be a Hub repo id "
            "(namespace/name); a local path that exists wins."
        )
        subfolder_help = "The adapter's folder inside each source (repo or local)."
        wrapper = click.option("--subfolder", help=subfolder_help)(wrapper)
        return click.option("--revision", help="Branch, tag or commit of Hub repo sources  [default: main]")(
            wrapper
        )

    return decorate


class _Number(click.ParamType):
    """A float at least ``minimum`` (infinity allowed, NaN refused: every comparison with it fails)."""

    name = "float"

    def __init__(self, minimum: float = 0.0):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if math.isnan(number) or number < self.minimum:
            self.fail(f"{value!r} is not a number >= {self.minimum:g}", param, ctx)
        return number


class _Choice(click.Choice):
    """A choice among the members of a ``str`` Enum or registry, read when used (forms registered later count)."""

    def __init__(self, members, keep=lambda member: True):
        self._members, self._keep = members, keep
        super().__init__([])

    @property
    def choices(self):
        return [m.value for m in self._members if self._keep(m)]

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns it
        pass


def _enum_option(flag: str, enum, default, help: str, *names: str, keep=lambda member: True):
    """A ``--flag`` choosing one member of a ``str`` Enum (or the storage forms) by value, default shown."""
    default = None if default is None else default.value
    return click.option(
        flag, *names, type=_Choice(enum, keep), default=default, show_default=default is not None, help=help
    )


def _format_option(command):
    """``--format text|json|markdown``: every command that prints a result takes it."""
    return _enum_option("--format", ReportFormat, ReportFormat.TEXT, "How to print the result.", "fmt")(
        command
    )


def _emit(result, fmt: str) -> None:
    """Print ``result`` in ``fmt`` and exit with its exit code: the one output and exit protocol."""
    click.echo(result.render(fmt))
    sys.exit(result.exit_code)


@main.command("inspect")
@_sources("path")
@click.argument("path", type=click.Path(path_type=str))
@_format_option
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
def inspect_cmd(path: str, fmt: str, as_json: bool) -> None:
    """Show the form, config, adapted modules and tensors of the adapters in PATH."""
    from .format import read_adapters
    from .inspection import Inspection

    _emit(Inspection.of(read_adapters(path)), "json" if as_json else fmt)


@main.command("convert")
@_sources("src")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@_enum_option("--to", StorageForm, StorageForm.TOPK, "Target storage form.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@_enum_option(
    "--weights-dtype",
    WeightsDtype,
    WeightsDtype.FLOAT32,
    "Packed form: top-k weights precision (float32 is lossless).",
)
@_enum_option(
    "--bank-dtype",
    BankDtype,
    BankDtype.FLOAT32,
    "Packed form: vector bank precision (float32 is lossless; int8 keeps a scale per vector).",
)
@click.option(
    "--recursive",
    is_flag=True,
    help="Convert every adapter folder under SRC into the same relative path under DST.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --recursive: worker processes.",
)
@_format_option
def convert_cmd(
    src: str,
    dst: str,
    to: str,
    force: bool,
    weights_dtype: str,
    bank_dtype: str,
    recursive: bool,
    jobs: int,
    fmt: str,
) -> None:
    """Convert the adapters in SRC into DST (same layout), then print DST's report.

    With --recursive, SRC and DST are trees: each adapter folder found under SRC is converted on its
    own (--force applies to each); a broken one is reported and the others go on; exit 2 if any failed.
    """
    if jobs != 1 and not recursive:
        raise click.UsageError("--jobs applies to --recursive conversions only.")
    from .accounting import account
    from .batch import convert_tree
    from .format import convert, read_adapters
    from .report import build_report

    options = dict(to=to, force=force, weights_dtype=weights_dtype, bank_dtype=bank_dtype)
    if recursive:
        result = convert_tree(src, dst, jobs=jobs, progress=_batch_progress(), **options)
        for item in result.failed:
            click.echo(f"error: {item.src}: {item.error}", err=True)
        _emit(result, fmt)
    convert(src, dst, **options)
    _emit(build_report([account(a) for a in read_adapters(dst)]), fmt)


def _batch_progress():
    """A progress bar on stderr when it is a terminal, else a plain line per adapter on stdout."""
    if not click.get_text_stream("stderr").isatty():
        return lambda done, total, item: click.echo(
            f"{'converted' if item.error is None else 'failed'} {item.src}"
        )
    bar = {}

    def advance(done: int, total: int, item) -> None:
        if not bar:
            bar["bar"] = click.progressbar(length=total, label="converting", file=sys.stderr)
        bar["bar"].update(1)
        if done == total:
            bar["bar"].render_finish()

    return advance


@main.command("report")
@_sources("paths")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@_format_option
@click.option("--max-bytes", type=click.IntRange(min=0), help="Exit 1 if a weights file is larger.")
@click.option(
    "--min-compression",
    type=_Number(0),
    help="Exit 1 if an adapter stores less than X times fewer parameters than a rank-r LoRA.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=str),
    help="Also write a PNG of bank-vector usage (needs the 'plot' extra: matplotlib).",
)
def report_cmd(
    paths: tuple[str, ...],
    fmt: str,
    max_bytes: Optional[int],
    min_compression: Optional[float],
    plot: Optional[str],
) -> None:
    """Report sizes and float32-equivalent parameter counts of the adapters in PATHS."""
    from .accounting import account
    from .format import read_adapters
    from .report import build_report
    from .usage import bank_usage, plot_usage

    adapters = [a for path in paths for a in read_adapters(path)]
    report = build_report(
        [account(a) for a in adapters], max_bytes=max_bytes, min_compression=min_compression
    )
    if plot:
        usages = [bank_usage(a) for a in adapters]
        plot_usage(usages, plot)
        for usage in usages:
            click.echo(
                f"{usage.adapter}: {len(usage.unused)} of {len(usage.counts)} bank vectors unused", err=True
            )
    _emit(report, fmt)


@main.command("verify")
@_sources("a", "b")
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option(
    "--tol",
    type=_Number(0),
    default=1e-6,
    show_default=True,
    help="Largest relative error allowed.",
)
@_format_option
def verify_cmd(a: str, b: str, tol: float, fmt: str) -> None:
    """Compare ΔW = B·A of every module of adapters A and B (any forms); exit 1 above --tol."""
    from .verify import verify_folders

    _emit(verify_folders(a, b, tol=tol), fmt)


@main.command("push")
@click.argument("path", type=click.Path(path_type=str))
@click.argument("repo_id")
@_enum_option(
    "--to",
    StorageForm,
    None,
    "Convert first, in a temporary folder (PATH is only read)  [default: push as stored]",
    keep=lambda form: not form.has_logits,
)
@click.option(
    "--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility)."
)
@click.option("--revision", help="Branch to push to; created from main if missing.")
@click.option("--commit-message", help="Commit message  [default: one naming the storage forms]")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@_format_option
def push_cmd(
    path: str,
    repo_id: str,
    to: Optional[str],
    private: bool,
    revision: Optional[str],
    commit_message: Optional[str],
    create_pr: bool,
    fmt: str,
) -> None:
    """Upload the adapters in PATH to the Hub repo REPO_ID with a model card; print the commit URL.

    The commit holds README.md (the card: compression report, how to load) and each adapter's
    adapter_config.json and weights file. The token comes from HF_TOKEN or `hf auth login`, the
    endpoint from HF_ENDPOINT; the token is never printed.
    """
    from .hub import push
    from .results import Summary

    url = push(
        path,
        repo_id,
        to=to,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
    )
    _emit(Summary(url, {"repo_id": repo_id, "url": url}), fmt)


@main.command("export-lora")
@_sources("src")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@_format_option
def export_lora_cmd(src: str, dst: str, force: bool, fmt: str) -> None:
    """Write the adapters in SRC (any form) as exact PEFT LoRA adapters of the same rank into DST."""
    from .export import export_lora
    from .results import Summary

    adapters = export_lora(src, dst, force=force)
    lines = [f"{a.name}: {len(a.modules)} modules, r={a.config.r}, lora_alpha={a.config.r}" for a in adapters]
    facts = {a.name: {"modules": len(a.modules), "r": a.config.r, "lora_alpha": a.config.r} for a in adapters}
    _emit(Summary("\n".join(lines + [f"wrote {dst}"]), {"adapters": facts, "dst": dst}), fmt)


@main.command("merge")
@_sources("adapter")
@click.argument("base_dir", type=click.Path(path_type=str))
@click.argument("adapter", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@_enum_option(
    "--dtype", MergeDtype, MergeDtype.AUTO, "Dtype of the merged weights; auto keeps the base checkpoint's."
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@_format_option
def merge_cmd(base_dir: str, adapter: str, out: str, dtype: str, force: bool, fmt: str) -> None:
    """Merge the adapter in ADAPTER into the safetensors checkpoint BASE_DIR, writing the checkpoint OUT."""
    from .merge import merge
    from .results import Summary

    summary = merge(base_dir, adapter, out, dtype=dtype, force=force)
    line = (
        f"merged {summary.merged_modules} modules, replaced {summary.replaced_tensors} tensors, "
        f"{summary.shards} shard(s): wrote {out}"
    )
    _emit(Summary(line, {**vars(summary), "out": out}), fmt)
