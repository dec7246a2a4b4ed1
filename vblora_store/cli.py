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

import sys
from typing import Optional

import click

from .choices import BankDtype, MergeDtype, StorageForm, WeightsDtype
from .cli_support import Group, Number, emit, enum_option, format_option, print_now, sources


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="vblora_store")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Store, convert, verify, export and publish VB-LoRA adapters saved by PEFT; no base model needed."""
    ctx.obj = {"debug": debug}


@main.command("inspect")
@sources("path")
@click.argument("path", type=click.Path(path_type=str))
@format_option
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
def inspect_cmd(
    path: str, fmt: str, as_json: bool, revision: Optional[str], subfolder: Optional[str]
) -> None:
    """Show the form, config, adapted modules and tensors of the adapters in PATH."""
    from .format import read_adapters
    from .inspection import Inspection

    given = click.get_current_context().get_parameter_source("fmt") is not click.core.ParameterSource.DEFAULT
    if as_json and given and fmt != "json":
        raise click.UsageError(f"--json is --format json; it cannot go with --format {fmt}")
    adapters = read_adapters(path, revision=revision, subfolder=subfolder)
    emit(Inspection.of(adapters), "json" if as_json else fmt)


@main.command("convert")
@sources("src")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@enum_option("--to", StorageForm, StorageForm.TOPK, "Target storage form.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@enum_option(
    "--weights-dtype",
    WeightsDtype,
    WeightsDtype.FLOAT32,
    "Precision of the stored top-k weights, for the forms that take one (float32 is lossless).",
)
@enum_option(
    "--bank-dtype",
    BankDtype,
    BankDtype.FLOAT32,
    "Precision of the stored vector bank, for the forms that take one (float32 is lossless; int8 and "
    "int4 keep scales).",
)
@click.option(
    "--max-error",
    type=Number(0),
    help="Forms that take a precision: choose the fewest-bits bank and weights precision whose measured "
    "relative ΔW error is at most X (0: the smallest lossless form).",
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
@format_option
def convert_cmd(
    src: str,
    dst: str,
    to: str,
    force: bool,
    weights_dtype: str,
    bank_dtype: str,
    max_error: Optional[float],
    recursive: bool,
    jobs: int,
    fmt: str,
    revision: Optional[str],
    subfolder: Optional[str],
) -> None:
    """Convert the adapters in SRC into DST (same layout), then print DST's report.

    With --recursive, SRC and DST are trees: each adapter folder found under SRC is converted on its
    own (--force applies to each); a broken one is reported and the others go on; exit 2 if any failed.
    """
    if jobs != 1 and not recursive:
        raise click.UsageError("--jobs applies to --recursive conversions only.")
    from .accounting import account
    from .batch import convert_tree
    from .format import convert
    from .precision import convert_choosing
    from .report import build_report

    options = dict(to=to, force=force, revision=revision, subfolder=subfolder)
    ctx = click.get_current_context()
    for name, value in (("weights_dtype", weights_dtype), ("bank_dtype", bank_dtype)):
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            options[name] = value  # given: --max-error refuses it rather than override it
    if recursive:
        result = convert_tree(src, dst, jobs=jobs, progress=_batch_progress(fmt), max_error=max_error, **options)
        for item in result.failed:
            click.echo(f"error: {item.src}: {item.error}", err=True)
        emit(result, fmt)
    reports = []

    def show(written) -> None:  # before DST appears: a report that cannot be printed leaves no DST
        reports.append(build_report([account(a) for a in written]))
        print_now(reports[0].render(fmt))

    if max_error is None:
        convert(src, dst, before_commit=show, **options)
    else:
        for choice in convert_choosing(src, dst, max_error=max_error, before_commit=show, **options):
            click.echo(f"chose {choice.describe()} <= {max_error:g}", err=True)
    sys.exit(reports[0].exit_code)


def _batch_progress(fmt: str):
    """A progress bar on stderr when it is a terminal, else a plain line per adapter: on stdout with
    ``--format text``, on stderr otherwise (stdout then holds the JSON or Markdown alone)."""
    if not click.get_text_stream("stderr").isatty():
        return lambda done, total, item: click.echo(
            f"{'converted' if item.error is None else 'failed'} {item.src}", err=fmt != "text"
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
@sources("paths")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@format_option
@click.option("--max-bytes", type=click.IntRange(min=0), help="Exit 1 if a weights file is larger.")
@click.option(
    "--min-compression",
    type=Number(0),
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
    revision: Optional[str],
    subfolder: Optional[str],
) -> None:
    """Report sizes and float32-equivalent parameter counts of the adapters in PATHS."""
    from .accounting import account
    from .format import read_adapters
    from .report import build_report
    from .usage import bank_usage, plot_usage

    adapters = [a for path in paths for a in read_adapters(path, revision=revision, subfolder=subfolder)]
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
    emit(report, fmt)


@main.command("verify")
@sources("a", "b")
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option(
    "--tol",
    type=Number(0),
    default=1e-6,
    show_default=True,
    help="Largest relative error allowed.",
)
@format_option
def verify_cmd(
    a: str, b: str, tol: float, fmt: str, revision: Optional[str], subfolder: Optional[str]
) -> None:
    """Compare ΔW = B·A of every module of adapters A and B (any forms); exit 1 above --tol."""
    from .verify import verify_folders

    emit(verify_folders(a, b, tol=tol, revision=revision, subfolder=subfolder), fmt)


@main.command("push")
@click.argument("path", type=click.Path(path_type=str))
@click.argument("repo_id")
@enum_option(
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
@format_option
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
    emit(Summary(url, {"repo_id": repo_id, "url": url}), fmt)


@main.command("export-lora")
@sources("src")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@format_option
def export_lora_cmd(
    src: str, dst: str, force: bool, fmt: str, revision: Optional[str], subfolder: Optional[str]
) -> None:
    """Write the adapters in SRC (any form) as exact PEFT LoRA adapters of the same rank into DST."""
    from .export import export_lora
    from .results import Summary

    adapters = export_lora(src, dst, force=force, revision=revision, subfolder=subfolder)
    lines = [f"{a.name}: {len(a.modules)} modules, r={a.config.r}, lora_alpha={a.config.r}" for a in adapters]
    facts = {a.name: {"modules": len(a.modules), "r": a.config.r, "lora_alpha": a.config.r} for a in adapters}
    emit(Summary("\n".join(lines + [f"wrote {dst}"]), {"adapters": facts, "dst": dst}), fmt)


@main.command("merge")
@sources("adapter")
@click.argument("base_dir", type=click.Path(path_type=str))
@click.argument("adapter", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@enum_option(
    "--dtype", MergeDtype, MergeDtype.AUTO, "Dtype of the merged weights; auto keeps the base checkpoint's."
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@format_option
def merge_cmd(
    base_dir: str,
    adapter: str,
    out: str,
    dtype: str,
    force: bool,
    fmt: str,
    revision: Optional[str],
    subfolder: Optional[str],
) -> None:
    """Merge the adapter in ADAPTER into the safetensors checkpoint BASE_DIR, writing the checkpoint OUT."""
    from .merge import merge
    from .results import Summary

    summary = merge(base_dir, adapter, out, dtype=dtype, force=force, revision=revision, subfolder=subfolder)
    line = (
        f"merged {summary.merged_modules} modules, replaced {summary.replaced_tensors} tensors, "
        f"{summary.shards} shard(s): wrote {out}"
    )
    emit(Summary(line, {**vars(summary), "out": out}), fmt)
