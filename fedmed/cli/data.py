"""``fedmed data import|synth|deidentify|check``: a site's data, from the source to a checked folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmed.cli._common import add_config_args
from fedmed.errors import UsageError

__all__ = ["register"]


def _cmd_import(args: argparse.Namespace) -> int:
    from fedmed.data.importers import get_importer

    if args.kind == "ham10000":
        report = get_importer("ham10000")(Path(args.src), Path(args.out), copy_images=args.copy_images)
    elif args.kind == "heart-disease":
        report = get_importer("heart-disease")(Path(args.src), Path(args.out))
    else:
        if not args.table:
            raise UsageError("fedmed data import folder needs --table CSV")
        report = get_importer("folder")(
            Path(args.src), Path(args.table), Path(args.out), site_column=args.site_column,
            id_column=args.id_column, label_column=args.label_column,
            image_column=args.image_column, site_name=args.site_name,
        )
    print(report.table())
    print(f"\nwrote {args.out} (data section for your config: {Path(args.out) / 'fedmed-data.yaml'})")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from fedmed.data.importers import get_importer

    report = get_importer("synth")(
        Path(args.out), sites=args.sites, patients_per_site=args.patients,
        image_size=args.image_size, seed=args.seed, central=args.central,
    )
    print(report.table())
    print(f"\nwrote {args.out}")
    return 0


def _cmd_deidentify(args: argparse.Namespace) -> int:
    from fedmed.data.deid import deidentify_site

    salt_file = Path(args.salt_file)
    if not salt_file.exists():
        import secrets

        salt_file.write_bytes(secrets.token_bytes(32))
        salt_file.chmod(0o600)
        print(f"created a new secret salt in {salt_file}: keep it at the site, reuse it for later imports")
    counts = deidentify_site(Path(args.site_dir), Path(args.out), salt=salt_file.read_bytes(),
                             notes=args.notes, notes_column=args.notes_column,
                             unlabelled=args.unlabelled_burned_in)
    print(f"wrote {args.out}: {counts['records']} records, {counts['images']} images "
          f"({counts['dicom']} DICOM de-identified); patient ids are salted pseudonyms")
    if args.notes in ("drop", "scrub"):
        print(f"notes: {args.notes} ({counts['notes_changed']} note(s) changed)")
    if counts["refused"] or counts["review"]:
        print(f"{counts['refused']} image(s) refused and {counts['review']} written for review "
              f"(burned-in annotation or unreadable): see {Path(args.out) / 'review.csv'} "
              "(images.csv line and reason)")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from fedmed.config import load_config
    from fedmed.data.checks import check_site, format_checks
    from fedmed.data.images import ImageCache, Preprocess
    from fedmed.task import site_dirs

    cfg = load_config(args.config, args.overrides)
    cache = None if args.no_images else ImageCache(cfg.data.cache_dir, Preprocess.from_config(cfg.data))
    checks = [check_site(path, cfg.data, name=name, cache=cache)
              for name, path in site_dirs(cfg.data).items()]
    if args.verbose:
        for c in checks:
            print(c.summary + "\n" if c.summary else "")
    print(format_checks(checks))
    bad = [c.name for c in checks if not c.ok]
    print(f"\n{len(checks) - len(bad)} of {len(checks)} site(s) ok" + (f"; errors at {bad}" if bad else ""))
    return 1 if bad else 0


def register(sub: Any) -> None:
    """``fedmed data`` and its four actions."""
    data = sub.add_parser("data", help="import, synthesize or check site data").add_subparsers(
        dest="data_command", required=True)
    imp = data.add_parser("import", help="import a public dataset into per-site folders")
    imp.add_argument("kind", choices=["ham10000", "heart-disease", "folder"])
    imp.add_argument("src", help="source folder (for 'folder': the images folder)")
    imp.add_argument("--out", required=True, help="output folder (one sub-folder per site)")
    imp.add_argument("--copy-images", action="store_true", help="copy images instead of linking paths")
    imp.add_argument("--table", help="folder import: CSV with one row per image")
    imp.add_argument("--site-column", help="folder import: column naming each row's site")
    imp.add_argument("--site-name", default="site", help="folder import: site name when no column")
    imp.add_argument("--id-column", default="patient_id")
    imp.add_argument("--label-column", default="label")
    imp.add_argument("--image-column", default="image")
    imp.set_defaults(func=_cmd_import)

    syn = data.add_parser("synth", help="write a synthetic multi-site DICOM + records cohort")
    syn.add_argument("--out", required=True)
    syn.add_argument("--sites", type=int, default=3)
    syn.add_argument("--patients", type=int, default=None, help="patients per site (default: skewed sizes)")
    syn.add_argument("--image-size", type=int, default=64)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--central", type=int, default=0,
                     help="also write <out>/central with N patients (the server's held-out set)")
    syn.set_defaults(func=_cmd_synth)

    deid = data.add_parser("deidentify", help="de-identified copy of a site (DICOM basic profile, pseudonyms)")
    deid.add_argument("site_dir")
    deid.add_argument("--out", required=True)
    deid.add_argument("--salt-file", required=True, help="secret salt (created if absent); keep it at the site")
    deid.add_argument("--notes", choices=["drop", "scrub", "keep"], default=None,
                      help="what happens to the records' free-text notes column (required when "
                           "there is one: no default); scrub is best effort, drop is safe")
    deid.add_argument("--notes-column", default="notes", help="the free-text column (default: notes)")
    deid.add_argument("--unlabelled-burned-in", choices=["refuse", "review"], default="refuse",
                      help="US/secondary-capture/XA/... images without BurnedInAnnotation: refuse "
                           "(default) or write and list them in review.csv; YES is always refused")
    deid.set_defaults(func=_cmd_deidentify)

    chk = data.add_parser("check", help="validate every site folder of a config (tables, ranges, ids, "
                          "split, every image decoded once); exit 1 on any error")
    add_config_args(chk)
    chk.add_argument("--no-images", action="store_true", help="skip decoding the images")
    chk.add_argument("--verbose", "-v", action="store_true", help="also print each site's summary")
    chk.set_defaults(func=_cmd_check)
