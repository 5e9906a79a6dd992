"""The command line, in one place: ``similar-finder <command>`` (or ``python -m similar_finder <command>``).

Commands: ``extract``, ``cluster``, ``recommend``, ``evaluate``, ``adapt``,
``duplicates``, ``projector``, ``run-all``, ``app``. One spelling per meaning, in
every command (``tests/test_cli_flags.py`` walks the parser to keep it so):

- ``--features-file CSV``: the feature CSV, written by ``extract`` and read by the
  rest. Left out, it is ``data/features.csv``, except where a command is given a
  folder of photos to embed for its own purpose (``evaluate``, ``adapt``, ``app``):
  that folder gets its own file, ``data/<eval|adapt|libraries>/<folder>.csv``, so
  a labelled test set never mixes with or overwrites your library.
- ``--out DIR``: always a folder. ``--adapter FILE``: the adapter, written by
  ``adapt``, embedded through by ``extract``/``run-all``/``app``.
- ``-n/--results N``: how many results per query. ``--clusters K``: a fixed K-Means
  k (``--clusters-file``: the clusters CSV). ``--kind``: what is compared, a feature
  kind (``duplicates``: one of the hash kinds).

Old spellings (``--n-sample``, ``-k``, ``--k``, ``--hash``, a file-valued ``--out``,
...) still work for one release, with one ``warning: ... is deprecated`` line on
stderr: see :func:`_renamed`. Only the project's own errors
(:class:`SimilarFinderError`) become a one-line message and exit status 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ._io import DATA_DIR, DEFAULT_CLUSTERS, DEFAULT_FEATURES, DEFAULT_K_RANGE, DEFAULT_MODEL, OUTPUT_DIR
from ._quiet import install as quiet_tensorflow
from .backbones import (DEFAULT_BACKBONE, GEM_P, OFFLINE_BACKBONE, POOLINGS, REGISTRY, TOKEN_POOLINGS, sizes_help,
                        weights_value)
from .errors import SimilarFinderError

PROG = "similar-finder"


# --- old spellings, kept for one release -------------------------------------------------

def _deprecation_note(namespace, old: str, new: str) -> None:
    """One ``warning:`` line on stderr per old spelling and command line, however often it is given."""
    noted = namespace.__dict__.setdefault("_deprecated", set())
    if old not in noted:
        noted.add(old)
        print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)


class _Renamed(argparse.Action):
    """An old spelling of another option: stores into that option's ``dest``, after a deprecation note."""

    def __init__(self, option_strings, dest, *, use: str, **kwargs):
        kwargs.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # never overrides the new default
        super().__init__(option_strings, dest, **kwargs)
        self.use = use

    def __call__(self, parser, namespace, values, option_string=None):
        _deprecation_note(namespace, option_string, self.use)
        setattr(namespace, self.dest, values)


def _note_old_spellings(parser, text: str) -> None:
    parser.epilog = (f"{parser.epilog} " if parser.epilog else
                     "Old spellings, still accepted until the next release (with a warning): ") + text


def _renamed(parser, old: str, new: argparse.Action, **overrides) -> None:
    """Accept ``old`` as a deprecated spelling of ``new`` (what ``add_argument`` returned for it).

    The value is converted and checked as ``new``'s is (``overrides`` replace ``type``, ``choices``, ...) and lands
    in ``new.dest``; ``--help`` hides ``old`` from the options and names it in its last lines.
    """
    use = "/".join(new.option_strings)
    kwargs = {"type": new.type, "choices": new.choices, "metavar": new.metavar, **overrides}
    parser.add_argument(old, action=_Renamed, dest=new.dest, use=use, **kwargs)
    _note_old_spellings(parser, f"{old} (now {use}).")


def _backbone_options(parser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", default=None, metavar="NAME",
                       help=f"network to embed with: {', '.join(REGISTRY)}, a KerasHub preset (dinov2_small, "
                            f"clip_vit_base_patch16, siglip_base_patch16_224, ...; downloaded once, or a preset "
                            f"folder given with --weights DIR), or several joined with '+' (an ensemble, e.g. "
                            f"efficientnet_lite0+efficientnet_lite2). Default: the one the features file already "
                            f"uses, else {DEFAULT_BACKBONE}, or {OFFLINE_BACKBONE} when offline")
    group.add_argument("--pooling", default=None,
                       help=f"{'|'.join(POOLINGS)} for the CNNs (default {POOLINGS[0]}; gem: generalised mean, "
                            f"p={GEM_P:g}), "
                            f"{'|'.join(TOKEN_POOLINGS)} for KerasHub transformers (default: cls for DINO, "
                            f"pooled for CLIP/SigLIP)")
    group.add_argument("--input-size", type=int, default=None,
                       help=f"square input side in pixels (default: the backbone's native size: {sizes_help()})")
    group.add_argument("--weights", type=weights_value, default="imagenet",
                       help="'imagenet' (downloaded by Keras), the path of a local weights file, a KerasHub "
                            "preset folder, or 'none' for random weights (tests only)")


def _backbone_kwargs(args, *, through_adapter: bool = True) -> dict:
    kwargs = {"backbone": args.backbone, "pooling": args.pooling, "input_size": args.input_size,
              "weights": args.weights}
    if through_adapter and getattr(args, "adapter", None):  # `adapt --adapter` is the file it writes
        kwargs["adapter"] = args.adapter
    return kwargs


def _adapter_option(parser, default=None,
                    help="embed through an adapter trained with `adapt` (e.g. models/adapter.keras)"):
    return parser.add_argument("--adapter", default=default, metavar="FILE", help=help)


def _features_file(parser, default=str(DEFAULT_FEATURES),
                   help="feature CSV written by `extract` (default: %(default)s)"):
    return parser.add_argument("--features-file", default=default, metavar="CSV", help=help)


def _own_features_file(parser, purpose: str, why: str):
    """``--features-file`` of a command that embeds a folder of photos for its own purpose (see the docstring)."""
    return _features_file(parser, default=None,
                          help=f"feature CSV to embed the photos into, or to reuse (default: data/{purpose}/<folder>"
                               f".csv, not data/features.csv: {why})")


def _kind(parser, default: str = "cnn", choices=None,
          help="what the nearest-neighbour recommender compares (default: %(default)s)"):
    from .kinds import KINDS

    return parser.add_argument("--kind", choices=list(choices or KINDS), default=default, help=help)


def _results(parser, help: str):
    return parser.add_argument("-n", "--results", type=int, default=5, metavar="N",
                               help=f"{help} (default: %(default)s)")


def _out(parser, default, what: str):
    """``--out``: in every command a folder, never a file."""
    return parser.add_argument("--out", default=default, metavar="DIR", help=f"folder for {what}")


def _quiet(parser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# --- commands ----------------------------------------------------------------------------

def _extract(args) -> None:
    from .demo import ensure_demo_library
    from .features import extract_features

    images = args.images_dir if args.images_dir is not None else ensure_demo_library()
    library = extract_features(images, args.features_file, **_backbone_kwargs(args), batch_size=args.batch_size,
                               workers=args.workers, checkpoint_every=args.checkpoint_every,
                               overwrite=args.overwrite, progress=not args.quiet, engine=args.engine,
                               address=args.address, num_gpus_per_worker=args.num_gpus_per_worker,
                               actors=args.actors, store_format=args.format)
    if library.stats.skipped:
        print(f"{library.stats.skipped} files skipped; reasons in {library.files.skipped}", file=sys.stderr)


def _cluster(args) -> None:
    from .clustering import fit_baseline

    model = fit_baseline(args.features_file, k=args.clusters, k_range=range(args.k_min, args.k_max + 1),
                         model_path=args.model, clusters_csv=args.clusters_file, normalize=not args.no_normalize)
    print(f"chosen k = {model.k_}; model saved to {args.model}, clusters to {args.clusters_file}")


def _gate(text: str) -> float:
    """``--gate``: a gate score, or ``off`` (no gate: infinity, as ``gate=np.inf`` in Python)."""
    if text.strip().lower() == "off":
        return float("inf")
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'off'") from None


def _recommend(args) -> None:
    from .recommender import NO_RESULTS

    if args.approach == "kmeans":
        from .clustering import recommend_by_cluster
        from .errors import UsageError

        if args.kind != "cnn" or args.threshold is not None or args.gate is not None:
            raise UsageError("--approach kmeans clusters CNN features and always answers: "
                             "--kind, --threshold and --gate apply to the cosine approach only")

        result = recommend_by_cluster(args.file, args.results, library=args.features_file, model=args.model)
    else:
        from .recommender import recommend

        result = recommend(args.file, args.results, args.threshold, gate=args.gate, kind=args.kind,
                           library=args.features_file)
    print(result.to_string(index=False, float_format=lambda x: f"{x:.4f}") if len(result) else NO_RESULTS)


def _evaluate(args) -> None:
    from .evaluate import evaluate

    others = [b for b in args.other_backbones.split(",") if b]
    evaluation = evaluate(args.labelled_dir, features_csv=args.features_file, other_backbones=others,
                          other_domains=args.ood, adapt_split=args.adapt_split,
                          adapt_unseen_classes=args.adapt_unseen_classes, fine_tune_blocks=args.fine_tune_blocks,
                          k=args.results, out_dir=args.out,
                          progress=not args.quiet, **_backbone_kwargs(args))
    print(f"\nbackbone: {evaluation.backbone}")
    print(evaluation.to_markdown())
    if evaluation.adaptation is not None:
        print("\nadapted to the labelled photos (scored on photos never trained on):")
        print(evaluation.adaptation.to_markdown(index=False, floatfmt=".3f"))
    print(f"\nwritten: {Path(args.out) / 'evaluation.csv'} and evaluation.md")


def _duplicates(args) -> None:
    from .near_duplicates import write_duplicates

    root = Path(args.images_dir)
    out = Path(args.out) if args.out else OUTPUT_DIR / root.resolve().name / "duplicates"
    # A library of this folder (the one named, else the app's) lends its CNN vectors; else the folder is embedded
    # once, in a temporary library.
    libraries = [args.features_file, DATA_DIR / "libraries" / f"{root.resolve().name}.csv"]
    left_out: dict[str, str] = {}
    groups = write_duplicates(root, out, args.max_distance, args.kind, library=libraries, left_out=left_out)
    for path, why in left_out.items():
        print(f"left out {path}: {why}")
    if not groups:
        how = "verified" if args.max_distance is None and args.kind is None else "perceptual hash"
        print(f"no near-duplicates found under {root} ({how})")
        return
    for i, group in enumerate(groups):
        print(f"group {i}: keep {group.keeper}; " + ", ".join(f"{p} ({group.relation[p]})" for p in group[1:]))
    print(f"{len(groups)} groups, {sum(map(len, groups))} images; listed in {out / 'duplicates.csv'}, "
          f"pictures beside it")


def _adapt(args) -> None:
    from .adapt import adapt

    result = adapt(args.labelled_dir, args.adapter, features_csv=args.features_file, loss=args.loss,
                   epochs=args.epochs, fine_tune_blocks=args.fine_tune_blocks, progress=not args.quiet,
                   **_backbone_kwargs(args, through_adapter=False))
    print(f"validation photos (never trained on), precision@5: {result.before['precision@5']:.3f} plain, "
          f"{result.after['precision@5']:.3f} adapted; mAP {result.before['mAP']:.3f} -> {result.after['mAP']:.3f}")
    print(f"adapter saved to {result.path}; use it with `similar-finder extract DIR --adapter {result.path}`")


def _projector(args) -> None:
    from .projector import write_projector

    out = write_projector(args.features_file, args.out)
    print(f"projector files in {out}\nopen them with:  tensorboard --logdir {out}   (then the PROJECTOR tab)")


def _run_all(args) -> None:
    from .pipeline import run_all

    maps = [m for m in args.maps.split(",") if m]
    only = [p for p in args.only.split(",") if p] if args.only is not None else None
    summary = run_all(args.images_dir, out=args.out, n_sample=args.results, limit=args.limit, kind=args.kind,
                      maps=maps, only=only, progress=not args.quiet, **_backbone_kwargs(args))
    if "report" in summary.parts:
        print(f"\nreport: {summary.report} (and report.md)")
    if "grids" in summary.parts:
        print(f"grids:  {summary.out / 'rec'}/{summary.approach} and /kmeans ({summary.grids} each)")
    drawn = [f"{m}.png" for m in maps] if "maps" in summary.parts else []
    print(f"plots:  {', '.join(drawn + ['silhouette.png', 'distances.png'])} in {summary.out}")


def _app(args) -> None:
    from .app import serve

    serve(args.images_dir, features_file=args.features_file, host=args.host, port=args.port,
          originals=args.originals, open_browser=args.open, max_upload_mb=args.max_upload_mb,
          max_upload_mp=args.max_upload_mp, progress=not args.quiet, watch=args.watch, **_backbone_kwargs(args))


class _ClustersOrOldFile(argparse.Action):
    """``cluster --clusters``: a whole number is the k to use; anything else is the clusters CSV it named before."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, int(values))
        except ValueError:
            _deprecation_note(namespace, "--clusters FILE",
                              "--clusters-file (--clusters is now the number of clusters)")
            namespace.clusters_file = values


def build_parser() -> argparse.ArgumentParser:
    from .descriptors import DUPLICATE_BITS, HASH_KINDS

    parser = argparse.ArgumentParser(prog=PROG, description="Find visually similar images with pretrained CNN "
                                                            "features.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("extract", help="embed every photo of a folder into a feature CSV (incremental)",
                            description="Embed every photo under IMAGES_DIR with a pretrained CNN and write a "
                                        "feature CSV. Re-running only embeds new or changed photos.")
    p.add_argument("images_dir", nargs="?", default=None,
                   help="folder of photos, searched recursively (default: the embedded demo library)")
    features = _features_file(p, help="feature CSV to write, the one every other command reads (default: "
                                      "%(default)s)")
    _renamed(p, "--out", features)
    _backbone_options(p)
    _adapter_option(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decoding threads")
    p.add_argument("--checkpoint-every", type=int, default=512,
                   help="save progress every N images, so an interrupted run resumes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing features file made with other "
                                                            "settings")
    p.add_argument("--format", choices=("csv", "parquet"), default=None,
                   help="store the vectors as CSV (+ .npy) or as Parquet parts, for very large libraries (default: "
                        "parquet for a --features-file ending in .parquet, else the store's own format, else csv)")
    group = p.add_argument_group("engine")
    group.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="embed in this process (default) or on Ray: parallel decoding, one model per actor")
    group.add_argument("--address", default=None,
                       help="with --engine ray: the cluster to join (e.g. ray://head:10001); default: a local Ray "
                            "on this machine's cores")
    group.add_argument("--num-gpus-per-worker", type=float, default=0, help="with --engine ray: GPUs per model actor")
    group.add_argument("--actors", type=int, default=None,
                       help="with --engine ray: model actors at once (default: one per GPU share, else one per 4 CPUs)")
    _quiet(p)
    p.set_defaults(run=_extract)

    p = commands.add_parser("cluster", help="fit the K-Means baseline (k by silhouette)",
                            description="Fit the K-Means baseline: k chosen by silhouette score, model saved "
                                        "with joblib.")
    _features_file(p)
    p.add_argument("--k-min", type=int, default=DEFAULT_K_RANGE.start, help="smallest k tried (default: %(default)s)")
    p.add_argument("--k-max", type=int, default=DEFAULT_K_RANGE.stop - 1, help="largest k tried (default: %(default)s)")
    clusters = p.add_argument("--clusters", action=_ClustersOrOldFile, default=None, metavar="K",
                              help="use this many clusters instead of choosing k by silhouette (a value that is not "
                                   "a whole number is taken, for one release, as the clusters CSV that --clusters "
                                   "named before: use --clusters-file for that)")
    _renamed(p, "--k", clusters, type=int)
    p.add_argument("--model", default=str(DEFAULT_MODEL), metavar="FILE",
                   help="K-Means model to write (default: %(default)s)")
    p.add_argument("--clusters-file", default=str(DEFAULT_CLUSTERS), metavar="CSV",
                   help="CSV of each photo's cluster to write (default: %(default)s)")
    _note_old_spellings(p, "--clusters FILE (now --clusters-file).")
    p.add_argument("--no-normalize", action="store_true", help="cluster raw vectors, not unit vectors")
    p.set_defaults(run=_cluster)

    p = commands.add_parser("recommend", help="the most similar library photos to one photo",
                            description="Print the library photos most similar to FILE (or 'No similar images "
                                        "found').")
    p.add_argument("file", help="a photo: one of the library's, or a new one")
    _results(p, "how many results at most")
    _features_file(p)
    _kind(p)
    p.add_argument("--approach", choices=("cosine", "kmeans"), default="cosine",
                   help="thresholded nearest neighbours (default) or the K-Means baseline")
    p.add_argument("--threshold", type=float, default=None,
                   help="distance limit for the results; 0 refuses every photo (default: the calibrated one). "
                        "The gate still applies: see --gate")
    p.add_argument("--gate", type=_gate, default=None, metavar="SCORE|off",
                   help="domain gate: a query whose gate score (mean distance to its 3 nearest photos) is not "
                        "under it gets no results; 'off' turns it off, --threshold still applies (default: the "
                        "calibrated gate)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), metavar="FILE",
                   help="K-Means model written by `cluster`, with --approach kmeans (default: %(default)s)")
    p.set_defaults(run=_recommend)

    p = commands.add_parser("evaluate", help="score every approach and feature kind on a labelled folder",
                            description="Leave-one-out retrieval scores on a folder with one subfolder per class.")
    p.add_argument("labelled_dir", help="folder with one subfolder of photos per class")
    _own_features_file(p, "eval", "a labelled test set keeps its own file, never mixed with your library")
    _backbone_options(p)
    p.add_argument("--other-backbones", default="", help="comma-separated backbones to compare too, each "
                                                         "NAME or NAME:POOLING, e.g. resnet50,efficientnet_lite2:gem")
    p.add_argument("--ood", nargs="+", default=[], metavar="DIR",
                   help="folders of photos from other domains: how often each kind says 'No similar images found'")
    p.add_argument("--adapt-split", type=float, default=None, metavar="SHARE",
                   help="also train an adapter on a stratified 1-SHARE of the photos and score plain against "
                        "adapted retrieval among the other SHARE (e.g. 0.5)")
    p.add_argument("--adapt-unseen-classes", action="store_true",
                   help="also train on half of the classes and score on the other half")
    p.add_argument("--fine-tune-blocks", type=int, default=0,
                   help="with --adapt-split: the adapters also fine-tune the backbone's last N blocks")
    _renamed(p, "-k", _results(p, "results per query scored: precision@N, recall@N"))
    _out(p, str(OUTPUT_DIR), "evaluation.csv / .md (default: %(default)s)")
    _quiet(p)
    p.set_defaults(run=_evaluate)

    p = commands.add_parser("adapt", help="train an adapter on photos sorted into class folders",
                            description="Train a small metric-learning head on the backbone's frozen features of "
                                        "photos sorted into one folder per class; extract --adapter uses it.")
    p.add_argument("labelled_dir", help="folder with one subfolder of photos per class")
    _renamed(p, "--out", _adapter_option(p, default="models/adapter.keras",
                                         help="adapter file to write, the one `extract --adapter` reads "
                                              "(default: %(default)s)"))
    _own_features_file(p, "adapt", "plain backbone features of the labelled photos, kept apart from your "
                                   "library (which may be adapted)")
    _backbone_options(p)
    p.add_argument("--loss", choices=("arcface", "supcon"), default="arcface")
    p.add_argument("--epochs", type=int, default=60, help="at most this many (training stops early)")
    p.add_argument("--fine-tune-blocks", type=int, default=0, help="backbone blocks to unfreeze (0: frozen)")
    _quiet(p)
    p.set_defaults(run=_adapt)

    p = commands.add_parser("duplicates", help="groups of near-identical photos (verified by local features)",
                            description="List groups of near-identical images (resized, recompressed, cropped, "
                                        "mirrored, tilted or retouched copies), the one to keep first and how each "
                                        "other differs; write duplicates.csv and one picture per group.")
    p.add_argument("images_dir")
    p.add_argument("--max-distance", type=int, default=None,
                   help=f"pure perceptual-hash answer instead: differing bits of 64 still called a copy (e.g. "
                        f"{DUPLICATE_BITS})")
    _renamed(p, "--hash", _kind(p, None, HASH_KINDS, help="pure perceptual-hash answer instead, by this hash (one "
                                                         "of the hash kinds; with --max-distance "
                                                         f"{DUPLICATE_BITS} unless given)"))
    _features_file(p, help="library whose CNN vectors propose the candidates, used when it is of IMAGES_DIR "
                           "(default: %(default)s; else the app's data/libraries/<folder>.csv; else the folder is "
                           "embedded first)")
    _out(p, None, "duplicates.csv and the pictures (default: output/<folder>/duplicates)")
    p.set_defaults(run=_duplicates)

    p = commands.add_parser("projector", help="files for TensorBoard's embedding projector",
                            description="Write tensors, metadata and a sprite for TensorBoard's projector.")
    _features_file(p)
    _out(p, None, "the files (default: output/projector)")
    p.set_defaults(run=_projector)

    p = commands.add_parser("run-all", help="everything: features, both approaches, grids, plots, report",
                            description="Features, both recommenders, grids, plots and a report.")
    p.add_argument("images_dir", nargs="?", default=None, help="folder of photos (default: the embedded demo "
                                                               "library)")
    _out(p, None, "everything, features.csv included (default: output/<folder name>)")
    _backbone_options(p)
    _adapter_option(p)
    _renamed(p, "--n-sample", _results(p, "recommendations per image"))
    p.add_argument("--limit", type=int, default=None, help="draw grids for an even sample of N images")
    p.add_argument("--only", default=None, metavar="PART[,PART]",
                   help="make only these of grids, maps, evaluation, report (default: all), e.g. maps,report "
                        "for a library too large for a grid per photo")
    p.add_argument("--maps", default="tsne", metavar="METHOD[,METHOD]",
                   help="2-D maps to draw: tsne, umap or tsne,umap (default: %(default)s; UMAP compiles its code "
                        "for half a minute in every run)")
    _kind(p)
    _quiet(p)
    p.set_defaults(run=_run_all)

    p = commands.add_parser("app", help="the local web app: browse, search by photo, map, duplicates",
                            description="Serve a page to browse the library, click or drop a photo and see the "
                                        "similar ones. With IMAGES_DIR its features are extracted first "
                                        "(incrementally); with only --features-file that library is served.")
    p.add_argument("images_dir", nargs="?", default=None, help="folder of photos (default: the embedded demo "
                                                               "library, or the library of --features-file)")
    _renamed(p, "--features", _features_file(
        p, default=None, help="feature CSV to serve, or to embed IMAGES_DIR into (default: data/libraries/<folder>"
                              ".csv, not data/features.csv: each folder served keeps its own library)"))
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                                                       "only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--originals", default=None, metavar="DIR",
                   help="folder with the same relative paths in full resolution, for the large view and downloads")
    p.add_argument("--open", action="store_true", help="open the page in the browser")
    p.add_argument("--watch", action="store_true", help="follow the folder while serving: photos added, changed, "
                                                        "moved or removed there are taken into the library")
    p.add_argument("--max-upload-mb", type=float, default=25, help="largest photo accepted (default: %(default)s)")
    p.add_argument("--max-upload-mp", type=float, default=50,
                   help="most megapixels an uploaded photo may have; larger ones are refused before they are "
                        "decoded (default: %(default)s)")
    _backbone_options(p)
    _adapter_option(p)
    _quiet(p)
    p.set_defaults(run=_app)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A command's warnings are for its user: one line each, not a source location.
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv=None) -> int:
    """Run one command; user errors and Ctrl-C become one line and an exit status."""
    import warnings

    args = build_parser().parse_args(argv)
    quiet_tensorflow()  # before anything imports TensorFlow: its native start-up lines are noise to a user
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    warnings.showwarning = _show_warning
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("interrupted: what was finished is saved; run the same command again to resume", file=sys.stderr)
        return 130
    except SimilarFinderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main_for(command: str, argv=None) -> int:
    """``python -m similar_finder.run_all`` and the like: the same as ``similar-finder <command>``."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
