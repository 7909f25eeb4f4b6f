"""The `pipeline` command: parses options into each stage's config and calls the stage."""
from __future__ import annotations

import logging
import sys
import types
import typing
from pathlib import Path

import click

from data.errors import PipelineError
from data.options import flag, from_options, option_defaults, option_fields
from evaluate.config import ScoreConfig
from export.config import ExportConfig
from extract.config import ExtractConfig
from fuse.config import FuseConfig
from search.config import SearchConfig


def config_options(config_cls):
    """Turn every field of a stage's config dataclass into a click option (help from the field's metadata)."""

    def decorate(fn):
        for f, hint in reversed(option_fields(config_cls)):
            meta, name = f.metadata, flag(f.name)
            optional = isinstance(hint, types.UnionType)
            base = [a for a in typing.get_args(hint) if a is not type(None)][0] if optional else hint
            kwargs = dict(help=meta.get("help"), show_default=f.default is not None and not meta.get("required"))
            if base is bool:
                fn = click.option(f"{name}/--no-{name[2:]}", f.name, default=f.default, **kwargs)(fn)
                continue
            if meta.get("multiple"):
                fn = click.option(name, f.name, multiple=True, help=meta.get("help"))(fn)
                continue
            ptype = click.Choice(meta["choices"]) if "choices" in meta else \
                click.IntRange(min=meta.get("min"), max=meta.get("max")) if "min" in meta or "max" in meta else base
            # click 8.2+ treats an explicit default (even None) as a value: a required option must have none.
            default = {} if meta.get("required") else {"default": f.default}
            fn = click.option(name, f.name, type=ptype, required=meta.get("required", False), **default, **kwargs)(fn)
        return fn
    return decorate


def run_stage(fn, *args):
    """Call a stage; bad input becomes one clear line on stderr and exit status 2, not a traceback.

    A file-system refusal (a --cache that is a file, a folder without write permission, a full disk) is
    reported the same way, naming the path; ``-v`` logs its traceback too.
    """
    try:
        return fn(*args)
    except PipelineError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        logging.getLogger("pipeline").debug("file-system error", exc_info=True)
        click.echo(f"Error: {e.strerror or e}: {e.filename}" if e.filename else f"Error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted: completed shards and checkpoints are kept; rerun to resume.", err=True)
        sys.exit(130)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def cli(verbose: bool) -> None:
    """HADA graph fusion of pretrained retrieval backbones, from an offline feature cache."""
    from data.logs import configure

    configure(verbose)


@cli.command()
def backbones() -> None:
    """List the backbone families (spec syntax) and the open_clip model names with their pretrained tags."""
    from extract.backbones import available
    from extract.backbones.clip import open_clip_models

    specs = available()
    width = max(map(len, specs))
    for syntax, summary in specs.items():
        click.echo(f"{syntax:{width}s}  {summary}")
    click.echo("\nopen_clip models (open_clip:<model>[@<tag>]; no tag listed: name a local weights file or folder):")
    for model, tags in open_clip_models().items():
        click.echo(f"  {model}" + (f"  @{', @'.join(tags)}" if tags else ""))


@cli.command()
@config_options(ExtractConfig)
def extract(**options) -> None:
    """Run each backbone once over each split of a dataset and write its node features to HDF5 shards."""
    from extract.run import plan_runs, run_extract

    for cfg, index in run_stage(plan_runs, ExtractConfig(**options)):
        click.echo(extract_summary(run_stage(run_extract, cfg, index)))


def extract_summary(summary: dict) -> str:
    """One line per store: what was (or, with --dry-run, would be) written."""
    from extract.run import human

    est, rows = summary["estimate"], summary["rows"]
    if summary.get("dry_run"):
        return (f"would write {summary['shards']} shards to {summary['store']}: {rows['images']} image rows, "
                f"{rows['texts']} caption rows, about {human(est['total'])} ({human(est['bytes_per_image'])}/image, "
                f"{human(est['bytes_per_caption'])}/caption)")
    return (f"{summary['store']}: {rows['images']} image rows, {rows['texts']} caption rows "
            f"in {summary['shards']} shards ({summary['shards_written']} written now), {human(summary['bytes'])} "
            f"on disk, {summary['seconds']:.1f} s; {summary['bad_images']} bad images skipped, "
            f"{summary['truncated_captions']} captions truncated")


@cli.command()
@config_options(FuseConfig)
@click.pass_context
def fuse(ctx, **options) -> None:
    """Train the HADA graph fusion from the cached train/val features; write fused val/test embeddings."""
    from fuse.run import run_fuse, settle_targets

    cfg = run_stage(from_options, FuseConfig, options)  # bad values are refused before the cache is looked at
    cfg = run_stage(settle_targets, cfg)
    given = frozenset(k for k in options if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE)
    summary = run_stage(run_fuse, cfg, given)
    click.echo(f"{summary['run']}: {summary['epochs']} epochs, best validation rsum {summary['best_rsum']:.2f}; "
               f"fused embeddings for {', '.join(summary['encoded']) or 'no split'}")


@cli.command("import-hada")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, help="dataset whose cached val/test splits the run will score")
@click.option("--backbones", required=True, help="the checkpoint's two backbones, in its order (e.g. blip,clip)")
@click.option("--run", required=True, help="name of the run to write")
@click.option("--cache", default="cache", show_default=True, help="feature cache folder")
@click.option("--runs", default="runs", show_default=True, help="folder for runs")
@click.option("--weighted/--no-weighted", default=None,
              help="the second stage's weighted score (default: when the checkpoint's weight_1 is a tensor)")
@click.option("--reference-bug/--no-reference-bug", default=True, show_default=True,
              help="encode with the reference's forward bug, as the published checkpoints were trained")
@click.option("--strict", is_flag=True,
              help="refuse features that differ from the reference's (other weights, precision or captions) "
                   "instead of recording them in the run and its score tables")
def import_hada_command(checkpoint, dataset, backbones, run, cache, runs, weighted, reference_bug, strict) -> None:
    """Import a HADA-LAVIS checkpoint (best.pth.tar) as a run: `pipeline score --run NAME` then scores it."""
    from fuse.hada_import import import_hada

    run_dir = run_stage(import_hada, checkpoint, dataset, backbones, run, cache, runs, weighted, reference_bug,
                        strict)
    click.echo(f"{run_dir}: imported {checkpoint}; score it with `pipeline score --dataset {dataset} --run {run}`")


@cli.command()
@config_options(ScoreConfig)
def score(**options) -> None:
    """Recall from cached embeddings: each backbone alone, late fusion, and the fused model (hada)."""
    from data.discover import dataset_in_cache

    if not options["sims"] or not options["dataset"]:
        options["dataset"] = run_stage(dataset_in_cache, options["cache"], options["dataset"])
    cfg = run_stage(from_options, ScoreConfig, options)
    result = run_stage(_score, cfg)
    from evaluate.plot import plot_recall_curves
    from evaluate.table import eccv_by_method, format_tables, write_scores

    click.echo(format_tables(result["rows"], result.get("coco_1k")))
    for key, note in result["notes"].items():
        click.echo(f"{key}: {note}")
    extra = {"notes": result["notes"], "config": cfg.to_dict(),
             **({"coco_1k": result["coco_1k"]} if "coco_1k" in result else {})}
    if result.get("fusion"):
        extra["fusion"] = result["fusion"]
        learned = result["fusion"]["learned"]
        click.echo(f"hada ({result['fusion']['name']}, best epoch {result['fusion']['best_epoch']}) learned: "
                   + ", ".join(f"{k} {v:.4g}" for k, v in learned.items()))
    if cfg.json:
        path = run_stage(write_scores, cfg.json, result["dataset"], result["split"], result["run"], result["rows"],
                         extra)
        click.echo(f"scores: {path} and {path.with_suffix('.md')}")
    if cfg.plot:
        run_stage(plot_recall_curves, result["curves"], cfg.plot, f"{cfg.dataset} {cfg.split}",
                  result.get("curves_1k"), eccv_by_method(result["rows"]))
        click.echo(f"recall@K plot: {cfg.plot}")
    if cfg.gallery:
        from evaluate.gallery import gallery

        click.echo(f"gallery: {run_stage(gallery, cfg, result)}")


def _score(cfg: ScoreConfig) -> dict:
    """Wire the stages: the fused model's embeddings come from fuse/, the scoring from evaluate/."""
    from data.datasets import load_split, resolve
    from data.index import SplitIndex, index_path
    from evaluate.score import backbone_names, cached_for, latest_run, run_backbones, run_score, score_external

    if cfg.sims:
        path = index_path(cfg.cache, cfg.dataset, cfg.split)
        index = SplitIndex.load(path) if path.is_file() else load_split(resolve(cfg.dataset, cfg.data_root), cfg.split)
        return score_external(cfg, index)
    run = cfg.run or latest_run(cfg.runs, cfg.dataset)
    names = run_backbones(cfg.runs, run, cfg.dataset) if run else backbone_names(cfg.cache, cfg.dataset, cfg.split)
    if not names:
        raise PipelineError(f"nothing to score: no backbone store in {Path(cfg.cache) / cfg.dataset / cfg.split}")
    fused = {}
    if run:
        from fuse.run import encode_run, run_summary

        logging.getLogger("pipeline.score").info("scoring run %s (backbones %s)", run, ", ".join(names))
        for split in dict.fromkeys([cfg.split, "val"] + (["train"] if cfg.needs_train else [])):
            if split == cfg.split or cached_for(cfg, split, names):  # a split that is not cached is skipped
                fused[split] = encode_run(Path(cfg.runs) / run, split, cfg.cache, cfg.device, cfg.memory_gb)
        summary = run_summary(Path(cfg.runs) / run)
        result = run_score(cfg, names, run, fused)
        if summary["provenance"]:  # an imported run scored on features the reference did not make
            result["notes"]["hada"] = summary["provenance"]
        return {**result, "fusion": summary}
    return run_score(cfg, names, run, fused)


@cli.command()
@config_options(ExportConfig)
def export(**options) -> None:
    """Write a split's embeddings (--run: fused, --backbone: one backbone's) in clip-retrieval's layout."""
    from data.discover import dataset_in_cache
    from export.run import run_export

    options["dataset"] = run_stage(dataset_in_cache, options["cache"], options["dataset"])
    summary = run_stage(run_export, ExportConfig(**options))
    click.echo(f"{summary['out']}: {summary['images']} images of {summary['dataset']}/{summary['split']} "
               f"({summary['source']}; {summary['missing_images']} not in the store), {summary['dim']}-d "
               f"{summary['dtype']}, L2-normalised, in {len(summary['parts'])} part(s): img_emb/, text_emb/ (each "
               f"image's first caption), metadata/ (image_path, caption, row)")


@cli.command()
@click.argument("text", required=False)
@config_options(SearchConfig)
def search(text, **options) -> None:
    """Search a cached split with a trained run: TEXT (or --image PATH) -> the top images (or captions)."""
    from data.atomic import write_json
    from search.run import format_results, run_search

    cfg = run_stage(from_options, SearchConfig, options)
    doc, meta = run_stage(run_search, cfg, text)
    click.echo(format_results(doc, meta))
    if cfg.json:
        run_stage(write_json, cfg.json, doc)
        click.echo(f"results: {cfg.json}")


# The demo's fusion is narrower than HADA's defaults so that it trains in minutes on a 2-core CPU.
DEMO_FUSE = dict(width=256, embed_dim=256, queue_size=4096, lr=5e-4, dropout=0.1, attention="dense-eager")
DEMO_BACKBONES = "blip-demo,clip-demo"


@cli.command()
@click.option("--data-root", default="datasets", show_default=True, help="where the demo dataset is generated")
@click.option("--cache", default="cache", show_default=True,
              help="feature cache folder (the demo backbones' trained weights go to <cache>/demo-weights/)")
@click.option("--runs", default="runs", show_default=True, help="folder for runs")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1), help="fusion epochs")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0), help="image decoding threads")
@click.option("--backbones", default=DEMO_BACKBONES, show_default=True,
              help="backbones to extract and fuse: the trained blip-demo and clip-demo, or the random-initialised "
                   "blip-tiny, clip-tiny, blip2-tiny (run demo-<backbones> when not the default)")
@click.pass_context
def demo(ctx, data_root: str, cache: str, runs: str, epochs: int, workers: int, backbones: str) -> None:
    """The whole method on generated data with tiny backbones: train them (demo ones), extract, fuse, score."""
    import time

    from data.backbone_spec import parse_specs
    from data.demo import VIEWS, generate_demo
    from data.logs import without_warning
    from extract.backbones.demo_training import RECIPES, demo_weights, weights_folder
    from fuse.train import NO_VIEWS

    t0 = time.perf_counter()
    names = [str(spec) for spec in run_stage(parse_specs, backbones)]
    trained = [n for n in names if n in RECIPES]
    steps = 1 + len(trained) + len(names) + 1
    step = iter(range(1, steps + 1))
    click.echo(f"[{next(step)}/{steps}] demo dataset in {data_root}/demo (generated once, then reused)")
    run_stage(generate_demo, data_root)
    checkpoints = {}
    for name in trained:
        recipe = RECIPES[name]
        click.echo(f"[{next(step)}/{steps}] train {name} for {recipe.steps} steps on the {recipe.view} view: "
                   f"captions true only in {VIEWS[recipe.view]} (once, then reused)")
        checkpoints[name] = str(run_stage(demo_weights, name, data_root, weights_folder(cache, name, data_root)))
    for backbone in names:
        click.echo(f"[{next(step)}/{steps}] extract {backbone}: train, val and test")
        ctx.invoke(extract, **{**option_defaults(ExtractConfig), "backbone": backbone, "dataset": "demo",
                               "data_root": data_root, "cache": cache, "workers": workers, "batch_size": 128,
                               "checkpoint": checkpoints.get(backbone)})
    run = "demo" if ",".join(names) == DEMO_BACKBONES else f"demo-{'+'.join(names)}"
    click.echo(f"[{next(step)}/{steps}] fuse {' + '.join(names)} on clean images (the reference's augmentation "
               f"flips and recolours images, which would falsify the demo captions' left/right and colours), "
               f"then score the test split")
    with without_warning("pipeline.fuse", NO_VIEWS):  # said just above, for this dataset
        ctx.invoke(fuse, **{**option_defaults(FuseConfig), "dataset": "demo", "backbones": ",".join(names),
                            "cache": cache, "runs": runs, "run": run, "epochs": epochs, **DEMO_FUSE,
                            "resume": (Path(runs) / run / "last.pt").is_file()})
    ctx.invoke(score, **{**option_defaults(ScoreConfig), "dataset": "demo", "cache": cache, "runs": runs, "run": run,
                         "json": f"{runs}/{run}/scores.json", "plot": f"{runs}/{run}/recall.png"})
    what = (f"trained on the train split, each on one view of the scenes ({', '.join(trained)})" if trained
            else "random-initialised, so alone they rank near chance")
    click.echo(f"demo finished in {time.perf_counter() - t0:.0f} s. Results: {runs}/{run}/scores.json (+ .md), "
               f"{runs}/{run}/recall.png, training curves {runs}/{run}/curves.png. The backbones were {what}; "
               f"the hada row is what the fusion learned from their features on the train split.")


if __name__ == "__main__":
    cli()
