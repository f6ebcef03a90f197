"""Subcommands of the ``metering`` CLI, one module per area."""


def settle_heap(thresholds: tuple[int, int, int] | None = None) -> None:
    """After start-up: move everything built so far (modules, the app, clients), which lives as
    long as the process, out of the collector's way, so a full collection does not walk it in
    the middle of a request or a batch; ``thresholds``: the collector's, if not the
    interpreter's (``gc.set_threshold``)."""
    import gc

    gc.collect()
    gc.freeze()
    if thresholds is not None:
        gc.set_threshold(*thresholds)
