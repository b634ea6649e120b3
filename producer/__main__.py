"""Entry point: ``python -m producer`` / ``atlas-producer``."""

from __future__ import annotations

from producer._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
