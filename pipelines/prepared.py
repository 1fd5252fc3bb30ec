"""The prepared data a train or tune run reads: loaded, or prepared first where it is not, and said so when it
is the bundled sample standing in for the full set."""
from __future__ import annotations

from typing import TYPE_CHECKING

# cnnexp.data (torch) is imported by the functions that use it: `--help` and a mistyped flag stay instant.
if TYPE_CHECKING:
    from cnnexp.data import PreparedData


def load_or_prepare(config) -> PreparedData:
    """The prepared data a train or tune config names, prepared first where it is not (said in one line)."""
    from cnnexp.data import is_prepared, load_prepared, prepare

    real = is_prepared(config.data_dir, config.dataset, follow_stand_in=False)
    standing_in = not real and is_prepared(config.data_dir, config.dataset)
    # A named source outranks the bundled sample standing in since a failed download: the stand-in line
    # tells users to pass one, so passing one prepares the real set (it replaces the note).
    ready = real or (standing_in and not config.source)
    if ready:
        data = load_prepared(config.data_dir, config.dataset)
    else:
        if standing_in:
            print(f"{config.dataset} is only stood in for by the bundled sample in {config.data_dir}; preparing it "
                  f"from {config.source} first")
        else:
            print(f"{config.dataset} is not prepared in {config.data_dir}; preparing it first")
        data = prepare(config.prepare_config())[0]
    announce_stand_in(data, config.dataset, download_tried=not ready)
    return data


def announce_stand_in(data: PreparedData, dataset: str, download_tried: bool = True) -> None:
    """Says so when the data loaded for `dataset` is the bundled sample (a failed download fell back to it)."""
    from cnnexp.data import stand_in_notice

    notice = stand_in_notice(data, dataset, download_tried)
    if notice:
        print(notice)
