"""`python -m hubforge.hub --data-dir DIR [--host H] [--port N]`: the local Hub in the foreground (Ctrl-C stops)."""
import argparse
import logging
from pathlib import Path

from . import cli_serve

parser = argparse.ArgumentParser(prog="python -m hubforge.hub", description=__doc__)
parser.add_argument("--data-dir", type=Path, required=True)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8088)
parser.add_argument("--verbose", action="store_true", help="log every request (paths only)")
args = parser.parse_args()
logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
cli_serve(args.data_dir, args.host, args.port)
