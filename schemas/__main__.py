"""``python -m schemas [DIR]``: write the JSON Schema of every wire message (default: the packaged copy)."""

from __future__ import annotations

import sys
from pathlib import Path

from schemas._export import JSONSCHEMA_DIR, write_json_schemas


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0]) if args else JSONSCHEMA_DIR
    for path in write_json_schemas(directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
