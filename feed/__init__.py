"""atlas-pipeline's training feed: complete sessions for GRPO and reward-model jobs, live or replayed.

Two paths, one line format (the ingestor's JSONL line, see ``docs/jsonl-format.md``):

- :func:`follow_sessions`: the ``<prefix>.sessions`` RabbitMQ stream, in order, live, from ``first``,
  ``last``, ``next``, an offset or a point in time; a named consumer resumes where it stopped; duplicates
  (the stream is at-least-once across ingestor crashes) are hidden.
- :func:`follow_files`: the directory of finalised JSONL files, for jobs that do not talk to the broker;
  exactly once per session, resumable by name.

``python -m feed follow|files`` prints sessions as JSONL on stdout.
"""

from feed._files import FileFollow, FileLine, follow_files
from feed._follow import FeedSession, Position, SessionFollow, Start, follow_sessions
from feed._settings import FeedSettings

__all__ = [
    "FeedSession",
    "FeedSettings",
    "FileFollow",
    "FileLine",
    "Position",
    "SessionFollow",
    "Start",
    "follow_files",
    "follow_sessions",
]
