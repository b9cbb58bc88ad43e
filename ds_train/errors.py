"""Error types shared across modules: kept here so that the modules raising and catching them need not import
each other (cli catches all of them; cache, prepare and validate share DataError)."""

from __future__ import annotations

# Exit codes of every ds-train command (run.sh passes them through and explains them; README "Exit codes").
EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED, EXIT_PREEMPTED = 0, 1, 2, 3, 4, 75


def on_this_rank(e: Exception) -> Exception:
    """Mark an error that this rank may have hit alone (a local disk, a write): it reports it itself, naming the
    rank. Unmarked errors come from checks every rank runs on the same inputs, so rank 0 alone reports them."""
    e.on_this_rank = True
    return e


class ConfigError(ValueError):
    """A setting that is unknown, malformed or contradicts another one (exit code 2)."""


class DataError(ValueError):
    """One report of every bad sample (manifest, line, reason) (exit code 3)."""

    def __init__(self, bad: list[dict], where: str):
        self.bad = bad
        lines = [f"  {b['source']}: {b['reason']}" for b in bad[:50]]
        more = [f"  ... and {len(bad) - 50} more"] if len(bad) > 50 else []
        super().__init__(
            f"{len(bad)} bad sample(s) in {where}:\n" + "\n".join(lines + more)
            + "\nFix them, or set data.skip_bad=true to skip and count them (report: OUTPUT_DIR/data_report.json)."
        )


class CacheMismatchError(DataError):
    """The cache was made with other settings or tokenizers: reusing it would mix codes of two setups."""

    def __init__(self, cache, changes: list[str]):
        self.bad = []
        ValueError.__init__(self, f"cache {cache} was made with a different {'; '.join(changes)}.\n"
                                  "Delete it to rebuild, or set data.cache_dir to a new folder.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, damaged or written by another setup."""
