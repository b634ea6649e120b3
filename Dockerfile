# One image for every atlas-pipeline service (worker, ingestor, migrate, producer); compose.yaml picks the
# command. Runtime dependencies only: the dev extras (pytest, ruff, mypy, testcontainers) stay out.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid, so files the ingestor writes to the jsonl volume have a predictable owner.
RUN groupadd --system --gid 10001 atlas \
    && useradd --system --uid 10001 --gid atlas --home-dir /app --shell /usr/sbin/nologin atlas

WORKDIR /app

# The source tree (.dockerignore keeps out .venv, var, .git, tests and caches) is installed as a regular
# package into site-packages, then removed: the image runs the console scripts, not a checkout.
COPY . /tmp/atlas-src
RUN pip install --no-cache-dir /tmp/atlas-src \
    && rm -rf /tmp/atlas-src \
    && mkdir -p /data/jsonl \
    && chown atlas:atlas /app /data/jsonl

# /data/jsonl exists and belongs to atlas in the image, so a new named volume mounted there starts with
# that owner and the ingestor (non-root) can write its JSONL files.
USER atlas

# The console scripts: atlas-worker, atlas-ingestor, atlas-migrate, atlas-producer.
CMD ["atlas-worker"]
