"""Only until pipelines/tune.py and pipelines/worker.py import from the modules below (another branch of
issue 23 edits them): the names they import, where they now live. New code imports the modules themselves.

- flags: a command's flags from its config dataclass
- running: running an entry point (signals, one-line errors, exit codes, Made)
- prepared: the prepared data a run reads
- outcomes: registering a model, a trial's progress line
"""
from pipelines.flags import make_parser
from pipelines.outcomes import print_trial
from pipelines.prepared import load_or_prepare
from pipelines.running import Made, run_entry_point

__all__ = ["Made", "load_or_prepare", "make_parser", "print_trial", "run_entry_point"]
