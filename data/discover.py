"""What is on disk: datasets under a data root, datasets in a feature cache, backbones cached for given splits.

The commands use these to fill in an omitted --dataset or --backbones, and to name what was found when
a name is wrong or a choice is ambiguous.
"""
from __future__ import annotations

from pathlib import Path

from data.atomic import read_json
from data.backbone_spec import parse_specs
from data.errors import PipelineError

FUSE_SPLITS = ("train", "val")  # fusion trains on train and picks its best epoch on val


def datasets_under(data_root: str | Path) -> list[str]:
    """Names with a Karpathy split file at ``<data_root>/<name>/dataset_<name>.json``, sorted."""
    return sorted(p.parent.name for p in Path(data_root).glob("*/dataset_*.json")
                  if p.name == f"dataset_{p.parent.name}.json")


def cached_datasets(cache: str | Path) -> list[str]:
    """Datasets with at least one split index in the cache, sorted."""
    return sorted({p.parent.parent.name for p in Path(cache).glob("*/*/index.json")})


def store_spec(manifest: dict, store: str) -> str:
    """The backbone spec a store was made from: recorded in its manifest (``spec``; stores made before it was
    recorded have it in their finished config), else the store's name."""
    return manifest.get("spec") or manifest.get("config", {}).get("backbone") or store


def cached_backbones(cache: str | Path, dataset: str, splits: tuple[str, ...]) -> dict[str, str]:
    """{store name: the spec it was made from} of the backbones whose store is complete for every one of
    ``splits``, sorted by store name (the spec of the first split's store)."""
    found: list[dict[str, str]] = []
    for split in splits:
        manifests = {m.parent.name: read_json(m) for m in (Path(cache) / dataset / split).glob("*/manifest.json")}
        found.append({name: store_spec(m, name) for name, m in manifests.items() if m.get("complete")})
    if not found:
        return {}
    common = set.intersection(*(set(f) for f in found))
    return {name: found[0][name] for name in sorted(common)}


def _listing(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def dataset_in_data_root(data_root: str | Path, dataset: str | None) -> str:
    """``dataset`` if given, else the one dataset under ``data_root``; none or several: stop, naming them."""
    if dataset:
        return dataset
    found = datasets_under(data_root)
    if len(found) == 1:
        return found[0]
    where = f"{data_root}/<name>/dataset_<name>.json"
    if not found:
        raise PipelineError(f"no dataset found at {where}: pass --dataset NAME (and --data-root DIR), "
                            f"or --dataset NAME --annotations FILE --images DIR")
    raise PipelineError(f"{len(found)} datasets under {data_root} ({_listing(found)}): pick one with --dataset")


def dataset_in_cache(cache: str | Path, dataset: str | None) -> str:
    """``dataset`` if it is in the cache, else the cache's one dataset; anything else stops, naming what is there."""
    found = cached_datasets(cache)
    if dataset and dataset in found:
        return dataset
    if dataset:
        raise PipelineError(f"no dataset {dataset!r} in the cache folder {cache} (found: {_listing(found)}); run "
                            f"`pipeline extract --dataset {dataset}` first, or pass --cache DIR or another --dataset")
    if len(found) == 1:
        return found[0]
    if not found:
        raise PipelineError(f"nothing extracted in the cache folder {cache}: run `pipeline extract --backbone NAME` "
                            f"first, or pass --cache DIR")
    raise PipelineError(f"{len(found)} datasets in the cache folder {cache} ({_listing(found)}): "
                        f"pick one with --dataset")


def fuse_backbones(cache: str | Path, dataset: str, backbones: str | None) -> list[str]:
    """The specs of the backbones to fuse: those named, or every backbone with complete train and val stores
    (the spec each store was made from).

    Without --backbones the order is that of the store names, alphabetical, so the first one (the weighted
    stage's) is the first store name in sorted order; name them with --backbones to choose another order.
    """
    ready = cached_backbones(cache, dataset, FUSE_SPLITS)
    listing = f"backbones with complete train and val stores of {dataset} in {cache}: {_listing(list(ready))}"
    if backbones is None:
        if len(ready) < 2:
            raise PipelineError(f"fusion needs two or more backbones; {listing}. Extract another with "
                                f"`pipeline extract --backbone NAME --dataset {dataset}`")
        return list(ready.values())
    specs = parse_specs(backbones)  # a spec with a typo is refused here, by name
    names = [str(spec) for spec in specs]
    missing = [f"{spec} (store {spec.store_name})" if spec.store_name != str(spec) else str(spec)
               for spec in specs if spec.store_name not in ready]
    if missing:
        raise PipelineError(f"--backbones: {', '.join(missing)} not cached for both train and val; {listing}. "
                            f"Run `pipeline extract --backbone SPEC --dataset {dataset}` for each")
    if len(names) < 2 or len({spec.store_name for spec in specs}) != len(names):
        raise PipelineError(f"--backbones {backbones!r}: name two or more different backbones, comma-separated; "
                            f"{listing}")
    return names
