"""`skinsense feedback ...`: confirmed diagnoses from the command line.

Whoever runs it writes to the monitoring database directly, so its access is the database's
(the SQLite file under SKINSENSE_HOME, or the Postgres login in SKINSENSE_LOG_DATABASE_URL
or in the stack's SKINSENSE_HOME/stack/log-database.url):
the app's login rule is for requests over the network.
"""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path

from skinsense.labels import CLASS_CODES
from skinsense.monitoring.feedback import DX_TYPES, LOCALIZATIONS, SEXES


def cmd_feedback(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from skinsense.monitoring.database import default_database_url, describe_url, url_origin

    try:
        return _feedback(args)
    except sa.exc.OperationalError as exc:  # unreachable or refused: say which and why
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise RuntimeError(
            f"the monitoring database {describe_url(default_database_url())} (from "
            f"{url_origin()}) cannot be used: {reason}. Start it, or point "
            f"SKINSENSE_LOG_DATABASE_URL at one that runs; nothing was written") from exc


def _feedback(args: argparse.Namespace) -> int:
    from skinsense.config import skinsense_home
    from skinsense.monitoring.database import default_database_url, describe_url
    from skinsense.monitoring.feedback import add_feedback, confirmed_cases

    if args.action == "list":
        cases = confirmed_cases()
        if cases.empty:
            print(f"no confirmed diagnoses yet in {describe_url(default_database_url())}")
            return 0
        columns = ["created_at", "image_sha256", "lesion_id", "dx", "dx_type", "top_class",
                   "entered_by"]
        print(cases[columns].assign(image_sha256=cases["image_sha256"].str[:16])
              .to_string(index=False))
        return 0
    if not args.image.is_file():
        raise FileNotFoundError(f"{args.image}: no such image file; give the file that was "
                                f"sent to the app")
    record = add_feedback(args.image, dx=args.dx, dx_type=args.dx_type, age=args.age,
                          sex=args.sex, localization=args.site, lesion_id=args.lesion_id,
                          keep_image=not args.no_image, home=skinsense_home(),
                          entered_by=args.entered_by or getpass.getuser())
    kept = f"image kept as {record.image_path}" if record.image_path else "image not kept"
    print(f"confirmed {record.dx} ({record.dx_type}) for {record.image_id}, lesion "
          f"{record.lesion_id}; {kept}")
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 (argparse's private subparsers type)
    """Add `feedback` to the `skinsense` command's subcommands."""
    p = sub.add_parser("feedback", help="confirmed diagnoses of images the app answered")
    actions = p.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="attach a confirmed diagnosis to an answered image")
    add.add_argument("image", type=Path,
                     help="the image file, as it was sent to the app")
    add.add_argument("--dx", required=True, help=f"confirmed class: {', '.join(CLASS_CODES)}")
    add.add_argument("--dx-type", required=True, help=f"how: {', '.join(DX_TYPES)}")
    add.add_argument("--age", type=float, help="age in years")
    add.add_argument("--sex", help=f"{', '.join(SEXES)}")
    add.add_argument("--site", help=f"body site: {', '.join(LOCALIZATIONS)}")
    add.add_argument("--lesion-id", help="several images of one lesion share it (default: "
                                         "one lesion per image)")
    add.add_argument("--no-image", action="store_true",
                     help="do not copy the image into the feedback store (the case then "
                          "counts for monitoring, never for training)")
    add.add_argument("--entered-by", help="who confirms it (default: your user name)")
    actions.add_parser("list", help="list the confirmed diagnoses")
    p.set_defaults(func=cmd_feedback)
