"""How far a starting vLLM engine has got, read from its log: the console's loading progress.

vLLM's OpenAI server (0.32, CPU and CUDA alike) logs one line at the start of each phase; the
markers below are the texts of those lines, in the order they appear. The phase shown is the one
after the last marker found, so a log with none is still at its first phase. A model's log holds
every start of its engine under this gateway, each after a :data:`RUN_BANNER` line
(``server.engines``): only the text after the last one counts.
"""

from __future__ import annotations

from dataclasses import dataclass

RUN_BANNER = "=== vramgate: starting "  # what server.engines writes before each start's output

# (what the log says when a phase ends, the phase that begins then)
MARKERS = (
    ("non-default args", "starting the engine core"),
    ("Initializing a V1 LLM engine", "starting the workers"),
    ("Starting to load model", "loading the weights"),
    ("Loading weights took", "profiling and allocating the KV cache"),
    ("init engine (profile, create kv cache, warmup model) took", "starting the API server"),
    ("Application startup complete", "waiting for the health check"),
)
FIRST = "starting the process"


@dataclass(frozen=True)
class StartPhase:
    """A starting engine's phase: ``step`` of ``steps`` (1-based; ``steps`` is
    ``len(MARKERS) + 1``) and its ``name``."""

    step: int
    steps: int
    name: str

    def as_dict(self) -> dict[str, object]:
        return {"step": self.step, "steps": self.steps, "phase": self.name}


def start_phase(log_text: str) -> StartPhase:
    """The phase of the engine whose log (or its tail) is ``log_text``: its last start's."""
    step, name, at = 1, FIRST, max(0, log_text.rfind(RUN_BANNER))
    for i, (marker, phase) in enumerate(MARKERS):
        found = log_text.find(marker, at)
        if found < 0:
            continue
        step, name, at = i + 2, phase, found
    return StartPhase(step, len(MARKERS) + 1, name)
