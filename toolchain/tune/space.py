"""The search space of ``edgefleet tune``: what one trial trains and how the build compresses it.

Optuna samples it define-by-run (``suggest``): the architecture first, then only the knobs that
architecture has. Every knob is a parameter of the real pipeline: ``build_architecture``'s width,
depth, resolution and MobileNetV2 alpha, ``train_model``'s learning rate and epochs, the build's
``prune`` and ``quantize``. Choices are module constants so tests and benchmarks can narrow them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from toolchain.steps.architectures import ARCHITECTURES

WIDTHS = (0.5, 1.0, 1.5, 2.0)  # mlp/cnn: multiplies the units or filters of the fixed architecture
DEPTHS = (1, 3)  # mlp hidden layers / cnn conv blocks, inclusive range (the fixed ones have 2)
ALPHAS = (0.35, 0.5, 0.75, 1.0)  # MobileNetV2 width multipliers
RESOLUTIONS = (0.5, 0.75, 1.0)  # fraction of the image's height and width the model works at
LEARNING_RATES = (1e-4, 1e-2)  # log-uniform range
SPARSITIES = (0.0, 0.25, 0.5, 0.75)  # 0 = no pruning
QUANTIZE = ("ptq", "qat")
# Weight clustering (issue 16 item 1, ``--cluster K``) joins the search here once the build takes it:
# add the choices (0 = off) and pass ``settings.cluster`` to ``build_bundles`` in toolchain.tune.trial.
CLUSTERS: tuple[int, ...] = ()
# The shortest training tried is this fraction of --epochs (at least 1).
MIN_EPOCHS_FRACTION = 1 / 3


@dataclass(frozen=True)
class TrialSettings:
    """What one trial trains and builds; ``arch_options`` go to ``build_architecture``."""

    arch: str
    learning_rate: float
    epochs: int
    sparsity: float
    quantize: str
    arch_options: dict[str, Any] = field(default_factory=dict)
    cluster: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as plain JSON values (pareto.json's ``settings``)."""
        return asdict(self)


def applicable_archs(sample_shape: Sequence[int]) -> tuple[str, ...]:
    """Return the built-in architectures that take samples of this shape (images: all; else mlp)."""
    return ARCHITECTURES if len(sample_shape) == 3 else ("mlp",)


def epoch_range(max_epochs: int) -> tuple[int, int]:
    """Return the inclusive range of epochs a trial may train for, given ``--epochs``."""
    return max(1, round(max_epochs * MIN_EPOCHS_FRACTION)), max_epochs


def suggest(trial: Any, archs: Sequence[str], max_epochs: int, images: bool) -> TrialSettings:
    """Sample one trial's settings from ``trial`` (an ``optuna.Trial``)."""
    arch = trial.suggest_categorical("arch", list(archs))
    options: dict[str, Any] = {}
    if arch in ("mlp", "cnn"):
        options["width"] = trial.suggest_categorical("width", list(WIDTHS))
        options["depth"] = trial.suggest_int("depth", DEPTHS[0], DEPTHS[1])
    else:
        options["alpha"] = trial.suggest_categorical("alpha", list(ALPHAS))
    if images and arch != "mlp":
        options["resolution"] = trial.suggest_categorical("resolution", list(RESOLUTIONS))
    lo, hi = epoch_range(max_epochs)
    cluster = trial.suggest_categorical("cluster", list(CLUSTERS)) if CLUSTERS else 0
    return TrialSettings(
        arch=arch,
        learning_rate=trial.suggest_float("learning_rate", *LEARNING_RATES, log=True),
        epochs=trial.suggest_int("epochs", lo, hi),
        sparsity=trial.suggest_categorical("sparsity", list(SPARSITIES)),
        quantize=trial.suggest_categorical("quantize", list(QUANTIZE)),
        arch_options=options,
        cluster=cluster,
    )
