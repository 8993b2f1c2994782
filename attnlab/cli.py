"""The ``attnlab`` command: list | verify | bench | report | train | eval."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from attnlab.testing import Check

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="attnlab: attention methods behind one call, checked and measured.",
)
console = Console()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _check_device(name: str) -> None:
    """A device this machine has (ValueError naming what was given otherwise)."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this machine has no CUDA GPU (use --device cpu)")


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value else None


def _ints(value: str | None, option: str) -> tuple[int, ...]:
    """The comma-separated integers of ``option``'s ``value`` (ValueError naming the option, the value and
    what was expected otherwise)."""
    out = []
    for x in _csv(value) or ():
        try:
            out.append(int(x))
        except ValueError:
            raise ValueError(
                f"{option} {value!r}: {x!r} is not an integer; expected comma-separated integers (tokens), "
                "e.g. 1024,4096"
            ) from None
    return tuple(out)


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as one red error line; the Exit to raise (``raise _fail(...)``)."""
    console.print(f"[red]error[/red]: {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _unusable(path: Path) -> str | None:
    """Why files cannot be written into the folder ``path`` (created here, parents too, where missing), or
    None where they can."""
    import tempfile

    if path.exists() and not path.is_dir():
        return "it is a file, not a folder"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".attnlab-write-check-"):
            pass
    except OSError as e:
        return f"cannot create or write to it ({e.strerror or e})"
    return None


def _check_out_dir(path: Path, option: str) -> None:
    """Create the output folder ``path`` and check that it is writable, before any work; else one error line
    naming the option, the path and why, and exit 2."""
    why = _unusable(path)
    if why is not None:
        raise _fail(f"{option} {path}: {why}; expected a folder that can be created and written to")


def _check_out_file(path: Path, option: str) -> None:
    """Check that the file ``path`` can be written (not a folder; its folder created and writable), before
    any work; else one error line naming the option, the path and why, and exit 2."""
    if path.is_dir():
        raise _fail(f"{option} {path}: it is a folder; expected a file path")
    why = _unusable(path.parent)
    if why is not None:
        raise _fail(
            f"{option} {path}: its folder {path.parent}: {why}; expected a folder that can be written to"
        )


def _preset_default(name: str) -> str:
    """'(default: <CPU preset> on CPU; <CUDA preset> on CUDA)' for a BenchConfig field (help texts)."""
    from attnlab.bench.config import BenchConfig

    def show(value: object) -> str:
        if value is None:
            return "all"
        if isinstance(value, tuple):
            return ", ".join(str(getattr(v, "value", v)) for v in value)  # (spaces: help text can wrap)
        return str(value)

    cpu, cuda = (show(getattr(BenchConfig.preset(d), name)) for d in ("cpu", "cuda"))
    return f"(default: {cpu})" if cpu == cuda else f"(default: {cpu} on CPU; {cuda} on CUDA)"


@app.command("list")
def list_methods(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per method (for scripts)")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="the README's support matrix block")] = False,
) -> None:
    """The support matrix, generated from the registry."""
    import attnlab
    from attnlab.support import patterns_text, readme_block, records

    if as_json:
        print(json.dumps(records(), indent=1))
        return
    if markdown:
        print(readme_block())
        return
    table = Table(title="attnlab methods")
    table.add_column("method", no_wrap=True)
    for col in ("family", "parameters", "backends", "patterns", "GQA", "backward"):
        table.add_column(col)
    for spec in attnlab.methods().values():
        params = ", ".join(f"{k}={v}" for k, v in spec.make_params({}).as_dict().items()) or "-"
        backends = ", ".join(f"{b.name} ({b.where_text()})" for b in spec.backends)
        if spec.training_backends:
            backends += "; with gradients " + ", ".join(spec.training_backends) + " first"
        patterns = patterns_text(spec)
        table.add_row(
            spec.name,
            spec.family,
            params,
            backends,
            patterns,
            "yes" if spec.gqa else "no",
            "yes" if spec.backward else "no",
        )
    console.print(table)


@app.command()
def verify(
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available)")] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated method names (default: all)")] = None,
    out: Annotated[Path | None, typer.Option(help="also write one JSON line per check to this file")] = None,
    jobs: Annotated[int, typer.Option(help="worker processes, one (method, backend) at a time each")] = 1,
) -> None:
    """Check every backend of every method against its reference on this device (exit 1 on a failure).

    With --out, the file's first line is {"environment": {...}} (device, versions, commit, dirty flag)."""
    import torch

    dev = torch.device(device or _default_device())
    if dev.type == "cpu":  # Triton kernels can only run in the interpreter here (must precede their import)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import attnlab
    from attnlab.bench.env import environment
    from attnlab.verify import verify as run_verify
    from attnlab.verify import verify_cases

    for m in _csv(methods) or ():
        attnlab.get(m)  # unknown names fail now, with a suggestion (else nothing is checked and it "passes")
    env = environment(dev)
    total = sum(1 for _ in verify_cases(dev, _csv(methods)))
    sink = out.open("w") if out else None
    if sink:  # the first line says what ran: device, versions, commit and dirty flag
        sink.write(json.dumps({"environment": env}) + "\n")
    with _progress() as bar:
        task = bar.add_task(f"verify on {dev}", total=total)

        def progress(check: Check) -> None:
            bar.advance(task)
            if not check.skipped and not check.passed:  # failures show as they happen
                bar.console.print(
                    f"[red]FAIL[/red] {check.method}/{check.backend} {escape(check.case.label())}: "
                    + escape(check.summary())
                )
            if sink:  # one line per check, flushed, so an interrupted run leaves its results
                record = {
                    "method": check.method,
                    "backend": check.backend,
                    "case": check.case.label(),
                    "passed": check.passed,
                    "skipped": check.skipped,
                    "summary": check.summary(),
                }
                sink.write(json.dumps(record) + "\n")
                sink.flush()

        results = run_verify(dev, _csv(methods), progress=progress, jobs=jobs)
    if sink:
        sink.close()
    dirty = {True: ", dirty tree", False: "", None: ", dirty state unknown"}[env.get("dirty")]
    table = Table(title=f"attnlab verify on {dev} ({env['device']}) at {str(env['commit'])[:12]}{dirty}")
    for col in ("method", "backend", "pattern", "passed", "failed", "skipped (why)"):
        table.add_column(col)
    groups: dict[tuple[str, str, str], Counter[str]] = {}
    reasons: dict[tuple[str, str, str], str] = {}
    for c in results:
        key = (c.method, c.backend, c.case.pattern.value)
        status = "skipped" if c.skipped else ("passed" if c.passed else "failed")
        groups.setdefault(key, Counter())[status] += 1
        if c.skipped:
            reasons[key] = c.skipped
        elif not c.passed:
            reasons[key] = f"{c.case.label()}: {c.summary()}"
    for key, counts in groups.items():
        table.add_row(
            *key,
            str(counts["passed"]),
            str(counts["failed"]),
            f"{counts['skipped']} {reasons.get(key, '')}" if counts["skipped"] or counts["failed"] else "",
        )
    console.print(table)
    failed = [c for c in results if not c.skipped and not c.passed]
    passed = sum(1 for c in results if c.passed)
    console.print(f"{passed} passed, {len(failed)} failed, {sum(1 for c in results if c.skipped)} skipped")
    if failed:
        raise typer.Exit(1)


@app.command()
def bench(
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda if available, else cpu)")
    ] = None,
    lengths: Annotated[
        str | None,
        typer.Option(help=f"comma-separated sequence lengths in tokens {_preset_default('lengths')}"),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="comma-separated method names, or 'all' for every registered method "
            + _preset_default("methods")
        ),
    ] = None,
    patterns: Annotated[
        str | None,
        typer.Option(
            help="comma-separated, of causal_self,noncausal_self,causal_cross,noncausal_cross "
            + _preset_default("patterns")
        ),
    ] = None,
    modes: Annotated[
        str | None, typer.Option(help=f"comma-separated: fwd,fwd_bwd {_preset_default('modes')}")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help=f"float32, bfloat16 or float16 {_preset_default('dtype')}")
    ] = None,
    heads: Annotated[int | None, typer.Option(help=f"query heads {_preset_default('heads')}")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="key/value heads (GQA) (default: = heads)")] = None,
    head_dim: Annotated[
        int | None, typer.Option(help=f"head dimension {_preset_default('head_dim')}")
    ] = None,
    batch: Annotated[int | None, typer.Option(help=f"batch size {_preset_default('batch')}")] = None,
    budgets: Annotated[
        str | None,
        typer.Option(help=f"'all' parameter sets per method, or 'first' {_preset_default('budgets')}"),
    ] = None,
    workloads: Annotated[
        str | None,
        typer.Option(help=f"fidelity workloads: minilm,organism,random {_preset_default('workloads')}"),
    ] = None,
    no_fidelity: Annotated[bool, typer.Option("--no-fidelity", help="skip the fidelity part")] = False,
    no_efficiency: Annotated[bool, typer.Option("--no-efficiency", help="skip the timing part")] = False,
    out: Annotated[
        Path | None, typer.Option(help=f"results folder (database, report, PNGs) {_preset_default('out')}")
    ] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="do not write the HTML report")] = False,
    processes: Annotated[
        int | None,
        typer.Option(
            help="processes the timing runs in, one after another; a row's speedups are the median of theirs "
            "(default: 3 on a CPU, 1 on CUDA; ATTNLAB_BENCH_PROCESSES)"
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log every measurement")] = False,
) -> None:
    """Speed, memory and fidelity of every method on this device, into the results database and a report."""
    from attnlab.bench.config import BenchConfig
    from attnlab.bench.runner import planned_steps, run
    from attnlab.patterns import parse_pattern

    dev = device or _default_device()
    try:  # bad option values fail here, before a run is opened, with one line each
        _check_device(dev)
        cfg = BenchConfig.preset(dev).with_(
            lengths=_ints(lengths, "--lengths") or None,
            methods=_csv(methods),
            patterns=tuple(parse_pattern(p) for p in _csv(patterns) or ()) or None,
            modes=_csv(modes),
            dtype=dtype,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            batch=batch,
            budgets=budgets,
            workloads=_csv(workloads),
            out=out,
            processes=processes,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _check_out_dir(Path(cfg.out), "--out")  # before a run is opened: not after its work
    if no_fidelity:
        cfg = cfg.with_(fidelity=False)
    if no_efficiency:
        cfg = cfg.with_(efficiency=False)
    import attnlab

    for m in cfg.methods or ():
        attnlab.get(m)  # unknown names fail now, with a suggestion
    console.print(
        f"attnlab bench on {dev}: lengths {list(cfg.lengths)}, {cfg.dtype}, B={cfg.batch} "
        f"H={cfg.heads}/{cfg.n_kv_heads} D={cfg.head_dim} -> {cfg.out}/"
    )
    with _progress() as bar:
        task = bar.add_task("bench", total=planned_steps(cfg))
        log = (lambda s: bar.console.print(escape(s))) if verbose else (lambda s: None)
        result = run(cfg, log=log, advance=lambda n: bar.advance(task, n), report=not no_report)
    console.print(
        f"run {result.run_id}: {result.efficiency_rows} efficiency rows, {result.fidelity_rows} "
        f"fidelity rows -> {result.db_path}"
    )
    for note in result.notes:
        console.print(f"[yellow]note[/yellow]: {escape(note)}")
    if result.report:
        console.print(f"report: {result.report}")
    if result.failed_checks:
        console.print("[red]backends that failed their correctness check (not timed):[/red]")
        for f in result.failed_checks:
            console.print(f"  {escape(f)}")
        raise typer.Exit(1)


def _unpack_gz(packed: Path) -> Path:
    """``x.duckdb.gz`` unpacked into a new temporary folder as ``x.duckdb`` (the file given is left as it
    is); ValueError saying why where it is not a readable gzip file."""
    import gzip
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="attnlab-report-")) / packed.name[: -len(".gz")]
    try:
        target.write_bytes(gzip.decompress(packed.read_bytes()))
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(
            f"--db {packed}: cannot unpack it ({e}); expected a gzipped results database"
        ) from None
    return target


@app.command()
def report(
    db: Annotated[
        Path,
        typer.Option(
            help="results database file: results.duckdb; results.duckdb.gz (unpacked into a temporary file, "
            "the .gz left as it is); or a results.jsonl (written where duckdb is missing), first loaded into "
            "the .duckdb file beside it"
        ),
    ] = Path("attnlab-results/results.duckdb"),
    out: Annotated[
        Path | None, typer.Option(help="folder for report.html and PNGs (default: the db's)")
    ] = None,
    run: Annotated[str | None, typer.Option(help="run id (default: the latest)")] = None,
) -> None:
    """(Re)build the HTML report from the results database."""
    from attnlab.bench.report import write_report

    if not db.exists():
        console.print(f"[red]no results database at {db}[/red]; run `attnlab bench` first")
        raise typer.Exit(1)
    if db.is_dir():
        inside = [p.name for p in (db / "results.duckdb", db / "results.duckdb.gz") if p.is_file()]
        hint = f" (it holds {inside[0]}: --db {db / inside[0]})" if inside else ""
        raise _fail(
            f"--db {db}: it is a folder{hint}; expected a results database file (.duckdb, .duckdb.gz or .jsonl)"
        )
    target_out = out or db.parent
    _check_out_dir(target_out, "--out" if out else "--out (default: the database's folder)")
    if db.suffix == ".gz":
        try:
            db = _unpack_gz(db)
        except ValueError as e:
            raise _fail(str(e)) from None
    if db.suffix == ".jsonl":
        from attnlab.bench.store import load_jsonl

        target = db.with_suffix(".duckdb")
        try:
            done = load_jsonl(db, target)
        except (ValueError, KeyError, OSError) as e:  # a bad line or record, a value a column cannot hold
            why = e.args[0] if isinstance(e, KeyError) and e.args else e
            console.print(f"[red]cannot load {escape(str(db))}: {escape(str(why))}[/red]", soft_wrap=True)
            raise typer.Exit(2) from None
        for note in done.notes:
            console.print(f"[yellow]{escape(note)}[/yellow]")
        if done.skipped:
            console.print(f"already in {target}, not loaded again: run(s) {', '.join(done.skipped)}")
        if done.extended:
            console.print(f"added the rows written since to run(s) {', '.join(done.extended)}")
        runs = [*done.loaded, *done.extended]
        console.print(
            f"loaded {done.rows} rows of run(s) {', '.join(runs) or '(none new)'} from {db} into {target}"
        )
        db, run = target, run or (done.order[-1] if done.order else None)
    try:
        path = write_report(db, target_out, run)
    except (KeyError, ValueError, FileNotFoundError) as e:  # no such run; a record without a field it reads
        why = f"a record lacks the field {e.args[0]!r}" if isinstance(e, KeyError) and e.args else str(e)
        console.print(f"[red]cannot report {escape(str(db))}: {escape(why)}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as e:  # a file that is not a DuckDB database (duckdb's own errors)
        if not type(e).__module__.lstrip("_").startswith("duckdb"):
            raise
        raise _fail(f"--db {db}: cannot read it as a results database ({e})") from None
    console.print(f"report: {path}")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="training folder: step-* checkpoints, LATEST, and final/")],
    preset: Annotated[
        str, typer.Option(help="micro (2-core CPU, minutes, 2K tokens) or small (one GPU)")
    ] = "micro",
    config: Annotated[
        Path | None, typer.Option(help="JSON file of settings over the preset (keys of TrainConfig)")
    ] = None,
    max_seconds: Annotated[
        float | None, typer.Option(help="stop (saving a checkpoint) after this many seconds of the run")
    ] = None,
    eval_samples: Annotated[
        int | None, typer.Option(help="samples per task and length in the final evaluation (0: none)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint in --out")] = True,
    attention: Annotated[
        str | None,
        typer.Option(
            help="attnlab attention per layer: one method for every layer, or one per layer (comma-separated), "
            "e.g. gated_delta,softmax,gated_delta (default: the plain Llama's softmax through transformers)"
        ),
    ] = None,
    attention_params: Annotated[
        str | None,
        typer.Option(help='JSON parameters per method, e.g. \'{"sliding_window": {"window": 64}}\''),
    ] = None,
) -> None:
    """Train an organism (a small Llama causal LM) on the offline corpus and the long-context tasks."""
    from attnlab.organisms.config import TrainConfig
    from attnlab.organisms.config import preset as named
    from attnlab.organisms.errors import CheckpointError, ConfigError
    from attnlab.organisms.train import train as run_train

    try:
        cfg = named(preset)
        if config is not None:
            cfg = TrainConfig.from_dict(json.loads(config.read_text()), base=cfg)
        overrides: dict[str, Any] = {"max_seconds": max_seconds, "eval_samples": eval_samples}
        if attention is not None or attention_params is not None:
            names = [m.strip() for m in (attention or "").split(",") if m.strip()] or list(
                cfg.model.attention
            )
            if len(names) == 1:
                names *= cfg.model.layers  # one method for every layer
            overrides["model"] = {
                "attention": names,
                "attention_params": json.loads(attention_params) if attention_params else {},
            }
        cfg = TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None}, base=cfg)
        console.print(
            f"attnlab train {cfg.name}: {cfg.total_steps} steps, lengths "
            f"{[s.length for s in cfg.stages]} -> {out}/"
        )
        result = run_train(cfg, out, resume=resume, progress=True, log=lambda s: console.print(escape(s)))
    except (ConfigError, CheckpointError, json.JSONDecodeError) as e:
        console.print(f"[red]error[/red]: {escape(str(e))}")
        raise typer.Exit(2) from e
    state = result.state
    console.print(
        f"{len(state['curve'])} steps run, {state['tokens']:,} tokens; held-out loss "
        f"{state['heldout']['loss']:.3f} -> "
        f"{result.folder} (model card: {result.folder / 'README.md'})"
    )


#: the options of ``attnlab eval`` that say what to evaluate: refused with --load (which evaluates nothing)
EVAL_ONLY = (
    "model",
    "methods",
    "tasks",
    "lengths",
    "samples",
    "budgets",
    "perplexity",
    "decode_tokens",
    "max_seconds",
    "run_seconds",
    "device",
)


@app.command("eval")
def eval_tasks(
    ctx: typer.Context,
    model: Annotated[
        Path | None,
        typer.Option(help="local checkpoint folder (an organism, a training folder, or a Llama model)"),
    ] = None,
    methods: Annotated[
        str,
        typer.Option(
            help="comma-separated methods: name (its budgets, see --budgets), name:key=value:key=value, or "
            "'all' (every registered method that can run in the model); softmax is always run as the reference"
        ),
    ] = "",
    tasks: Annotated[
        str, typer.Option(help="comma-separated tasks (at least one)")
    ] = "passkey,niah_multikey",
    lengths: Annotated[
        str, typer.Option(help="comma-separated context lengths in tokens (integers, at least one)")
    ] = "1024",
    samples: Annotated[int, typer.Option(help="samples per task and length (seeds 0..N-1)")] = 10,
    budgets: Annotated[
        str,
        typer.Option(help="'all' or 'first' swept parameter sets per method, 'default', or 'default+tight'"),
    ] = "all",
    perplexity: Annotated[int, typer.Option(help="held-out perplexity windows per length (0: none)")] = 2,
    decode_tokens: Annotated[
        int, typer.Option(help="teacher-forced decode steps per perplexity window")
    ] = 16,
    max_seconds: Annotated[
        float | None, typer.Option(help="start no new run after this many seconds (the rest is listed)")
    ] = None,
    run_seconds: Annotated[
        float | None, typer.Option(help="stop a run after this many seconds (recorded as an error)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available)")] = None,
    out: Annotated[
        Path,
        typer.Option(
            help="JSON file of the results (rewritten after every run); with --load, where the loaded (merged) "
            "result is written (default with --load: not written)"
        ),
    ] = Path("attnlab-results/eval.json"),
    db: Annotated[
        Path | None,
        typer.Option(
            help="DuckDB file the run is added to (default: eval.duckdb next to --out; with --load and no "
            "--out, next to the first --load file); a result it already holds is not added again"
        ),
    ] = None,
    no_db: Annotated[
        bool, typer.Option("--no-db", help="write only the JSON (e.g. where duckdb is missing)")
    ] = False,
    report: Annotated[
        Path | None,
        typer.Option(
            help="folder of report.md/.html and Pareto PNGs (default: next to --out; with --load and no --out, "
            "next to the first --load file)"
        ),
    ] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="do not write the report")] = False,
    bench: Annotated[
        Path | None,
        typer.Option(
            help="folder of benchmark results.duckdb files: list their speedups too (the newest run on this "
            "eval's device per method and length; an error if the folder does not exist)"
        ),
    ] = None,
    load: Annotated[
        list[Path] | None,
        typer.Option(
            help="evaluate nothing: load this result JSON (e.g. from a GPU machine) into --db and report; "
            "given several times, the parts of one evaluation split across runs, merged into one result. "
            "The options that say what to evaluate (--model, --methods, --tasks, --lengths, --samples, "
            "--budgets, --perplexity, --decode-tokens, --max-seconds, --run-seconds, --device) are refused "
            "with it"
        ),
    ] = None,
    commit: Annotated[str | None, typer.Option(help="the code's commit, recorded with the run")] = None,
) -> None:
    """Long-context task accuracy (exact match), held-out perplexity, density and step time of a local causal
    LM per attention method and budget: prefill and decode run by the method through attnlab.hf. Results go
    to a JSON file, a DuckDB file and a report with accuracy-vs-density/speed Pareto plots."""
    from attnlab.errors import AttnlabError
    from attnlab.eval.tasks import EvalConfig, EvalResult, evaluate, planned_samples, table_rows

    def given(name: str) -> bool:
        """Whether the option was given (command line or environment), not left at its default."""
        source = ctx.get_parameter_source(name)  # (typer's own click: compared by name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    # every option checked before any work: a bad value or an unusable output location fails in one line now,
    # not after the first run's work
    if load:
        extra_opts = [f"--{name.replace('_', '-')}" for name in EVAL_ONLY if given(name)]
        if extra_opts:
            raise _fail(
                f"--load evaluates nothing, so {', '.join(extra_opts)} would be ignored: drop "
                f"{'it' if len(extra_opts) == 1 else 'them'} (the loaded result records what it evaluated)"
            )
        base = out if given("out") else load[0]
        write_to = out if given("out") else None
    else:
        if model is None:
            raise _fail("--model is required (or --load a result file)")
        base, write_to = out, out
    cfg = None
    if not load:
        try:
            dev = device or _default_device()
            _check_device(dev)
            task_names = _csv(tasks) or ()
            if not task_names:
                raise ValueError(f"--tasks {tasks!r}: expected at least one task name, e.g. passkey")
            length_values = _ints(lengths, "--lengths")
            if not length_values:
                raise ValueError(f"--lengths {lengths!r}: expected at least one length in tokens, e.g. 1024")
        except ValueError as e:
            raise _fail(str(e)) from None
        cfg = EvalConfig(
            model=model,  # type: ignore[arg-type]  # (checked above)
            methods=_csv(methods) or (),
            tasks=task_names,
            lengths=length_values,
            samples=samples,
            device=dev,
            budgets=budgets,
            perplexity=perplexity,
            decode_tokens=decode_tokens,
            max_seconds=max_seconds,
            run_seconds=run_seconds,
        )
    if bench is not None:
        from attnlab.bench.sources import database_folders

        if not bench.is_dir():
            what = "it is a file" if bench.exists() else "no such folder"
            raise _fail(f"--bench {bench}: {what}; expected a folder of benchmark results.duckdb files")
        if not database_folders(bench):
            console.print(
                f"[yellow]warning[/yellow]: --bench {escape(str(bench))}: no results.duckdb (or .duckdb.gz) "
                "under it; the report's bench column stays empty",
                soft_wrap=True,
            )
    if write_to is not None:
        _check_out_file(write_to, "--out")
    db_path = db or base.with_name("eval.duckdb")
    if not no_db:
        _check_out_file(db_path, "--db" if db else "--db (default: eval.duckdb next to --out)")
    report_dir = report or base.parent
    if not no_report:
        _check_out_dir(report_dir, "--report" if report else "--report (default: next to --out)")
    try:
        if load:
            parts = [EvalResult.read(p) for p in load]
            result = parts[0] if len(parts) == 1 else EvalResult.merge(parts)
            if commit:
                result.info["commit"] = commit
            if write_to is not None:
                console.print(f"results: {result.write(write_to)}")
        else:
            assert cfg is not None
            total = planned_samples(cfg)
            extra = {"commit": commit or os.environ.get("ATTNLAB_COMMIT")}

            def partial(res: EvalResult) -> None:
                res.info.update(extra)
                res.write(out)

            with _progress() as bar:
                task = bar.add_task("eval", total=total)
                result = evaluate(
                    cfg,
                    advance=lambda n: bar.advance(task, n),
                    log=lambda s: bar.console.print(escape(s)),
                    on_run=partial,
                )
            result.info.update(extra)
            console.print(f"results: {result.write(out)}")
    except (AttnlabError, ValueError) as e:
        console.print(f"[red]error[/red]: {escape(str(e))}")
        raise typer.Exit(2) from e
    cols, rows = table_rows(result)
    table = Table(
        title=f"attnlab eval: {result.info.get('model')} on {result.info.get('device')}, "
        f"{result.info.get('samples')} samples per cell (exact match)"
    )
    table.add_column("method (budget)", no_wrap=True)
    for c in cols:
        table.add_column(c)
    for label, cells in rows:
        table.add_row(escape(label), *cells)
    console.print(table)
    if not no_db:
        from attnlab.eval.store import EvalDB, store_result, stored_run

        with EvalDB(db_path) as store:
            existing = stored_run(store, result)
            run_id = existing or store_result(store, result)
        held = ", already stored: not added again" if existing else ""
        console.print(f"database: {db_path} (run {run_id}{held})")
    if not no_report:
        from attnlab.eval.report import write_report

        console.print(f"report: {write_report(result, report_dir, bench)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
