"""Heavy imports the end of a run needs, started on a background thread while the run sets up.

torchmetrics (the evaluation) and matplotlib (the report) take seconds to import: torchmetrics' package initialiser
also imports scipy.signal, and transformers where it is installed. A run first needs them at its first evaluation,
after the set-up and the feature cache build, whose time is mostly spent in torch kernels that release the GIL: the
imports run beside that work instead of after it. The thread only imports; the code that uses a module imports it
as before (Python's import lock makes it wait for an import in flight), so a module that fails to import raises
there, in its place, with its own error. The thread is not a daemon: a run that ends early lets the import finish
rather than stopping the interpreter in the middle of one.
"""

from __future__ import annotations

import importlib
import sys
import threading

RUN_END = ("torchmetrics", "matplotlib.pyplot")


def _import_all(names: tuple[str, ...]) -> None:
    for name in names:
        try:
            if name == "matplotlib.pyplot":
                import matplotlib

                matplotlib.use("Agg")  # what the report selects anyway: no display is looked for
            importlib.import_module(name)
        except Exception:  # raised again, with its own message, where the module is used
            pass


def start(names: tuple[str, ...] = RUN_END) -> threading.Thread | None:
    """Import `names` on a background thread; None when every one is imported already."""
    todo = tuple(n for n in names if n not in sys.modules)
    if not todo:
        return None
    thread = threading.Thread(target=_import_all, args=(todo,), name="fastft-preload")
    thread.start()
    return thread
