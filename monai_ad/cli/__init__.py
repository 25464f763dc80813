"""``monai-ad`` (also ``python -m monai_ad``): phantom data, train, infer, evaluate, demo, DICOMweb ingest, the MONAI Label app.

``parser`` builds the arguments, ``options`` reads and checks them, ``commands`` runs each sub-command.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Sequence

from monai_ad.allocator import keep_freed_memory
from monai_ad.errors import InputError


def main(argv: Sequence[str] | None = None) -> int:
    from monai_ad.cli.options import check_options
    from monai_ad.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    keep_freed_memory()
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: train and infer split their work
            from monai_ad import distributed

            distributed.init_from_environment()
        check_options(args)
        args.func(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # anything unexpected still gets one line; --verbose shows the traceback
        if args.verbose:
            raise
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
        return 1
    return 0
