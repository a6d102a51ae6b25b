"""Options and output of `sparseseg-suggest` (registered in sparseseg/cli.py, which adds the
shared error handling)."""

from __future__ import annotations

import json

import click


def suggest_options(fn):
    opts = [
        click.argument("image"),
        click.option("--budget", required=True, help="slices to suggest per plane: N, or P% of the plane's slices"),
        click.option("--planes", help="comma-separated: xy (z fixed), xz (y fixed), yz (x fixed); "
                     "default: every plane the image has"),
        click.option("--features", type=click.Choice(["filterbank", "autoencoder"]), default="filterbank",
                     show_default=True, help="slice embedding: training-free filter-bank histograms, or a small "
                     "autoencoder trained on the volume's own slices"),
        click.option("--annotated", help="labels already painted: their slices count as chosen"),
        click.option("--template", help="write a labels volume (OME-Zarr, all ignore value) to paint"),
        click.option("--overwrite", is_flag=True, help="replace an existing --template"),
        click.option("--ignore-label", type=click.IntRange(0, 255), default=255, show_default=True),
        click.option("--size", type=click.IntRange(16), default=256, show_default=True,
                     help="slices are shrunk to at most this many pixels per side before embedding"),
        click.option("--max-block-voxels", type=click.IntRange(1024), default=1 << 24, show_default=True,
                     help="the most voxels read at once"),
        click.option("--ae-steps", type=click.IntRange(1), default=300, show_default=True,
                     help="autoencoder training steps"),
        click.option("--ae-seconds", type=click.FloatRange(1), default=120.0, show_default=True,
                     help="autoencoder training time bound"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def run_suggest(image, budget, planes, features, annotated, template, overwrite, ignore_label, size,
                max_block_voxels, ae_steps, ae_seconds, seed, as_json):
    from sparseseg.suggest.features import AutoencoderConfig
    from sparseseg.suggest.run import SuggestConfig, suggest

    cfg = SuggestConfig(budget=budget, planes=tuple(planes.split(",")) if planes is not None else None, features=features, size=size,
                        ignore_label=ignore_label, max_block_voxels=max_block_voxels,
                        autoencoder=AutoencoderConfig(steps=ae_steps, seconds=ae_seconds, seed=seed))
    res = suggest(image, cfg, annotated=annotated, template=template, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(res))
        return
    for p, r in res["planes"].items():
        done = f", {len(r['annotated'])} already annotated (coverage {r['coverage_before']:.3f})" \
            if r["annotated"] else ""
        click.echo(f"plane {p} ({r['slices']} slices, {r['axis']} fixed{done}):")
        for rank, s in enumerate(r["suggested"], 1):
            click.echo(f"  {rank:3d}. {r['axis']}={s['index']:<6d} gain {s['gain']:10.3f}   coverage {s['coverage']:.3f}")
    if "template" in res:
        click.echo(f"template to paint: {res['template']}")
