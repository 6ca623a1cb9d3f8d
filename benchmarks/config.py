"""The sizes every comparison runs at: full (the committed results), quick (CI), tiny (tests)."""

from __future__ import annotations

from dataclasses import dataclass

RESNET18_WIDTHS = (64, 128, 256, 512)


@dataclass(frozen=True)
class Config:
    """How big and how often.

    ``repeats``: alternating timing rounds; ``budget``: seconds of timed calls per block
    for a comparison's nominal budget of 1; ``recalibration_batches``: (batches, batch size)
    of comparison a); ``seeds``, ``epochs``: training runs on digits (e, f).
    """

    name: str = "full"
    repeats: int = 9
    threads: int = 1
    resnet_widths: tuple[int, ...] = RESNET18_WIDTHS
    image_size: int = 64
    recalibration_batches: tuple[int, int] = (32, 32)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 20
    budget: float = 1.0

    @property
    def quick(self) -> bool:
        return self.name != "full"

    @property
    def basis(self) -> str:
        """What times and ratios are measured in: the process's CPU time with one thread
        (the time the work held the core, not the time it waited for it), else wall-clock."""
        return "cpu" if self.threads == 1 else "wall"


def full_config(repeats: int | None = None, threads: int = 1) -> Config:
    """ResNet-18 widths at 64x64, 32 batches of 32, 5 seeds of 20 epochs, 9 repeats."""
    return Config(repeats=repeats or 9, threads=threads)


def quick_config(repeats: int | None = None, threads: int = 1) -> Config:
    """A quarter of ResNet-18's widths, 16 batches for a), 2 seeds of 10 epochs, 5 repeats
    of short blocks: the whole run in well under 3 minutes on 2 loaded cores."""
    return Config(
        name="quick",
        repeats=repeats or 5,
        threads=threads,
        resnet_widths=(16, 32, 64, 128),
        recalibration_batches=(16, 32),
        seeds=(0, 1),
        epochs=10,
        budget=0.2,
    )


def tiny_config() -> Config:
    """For the harness's own tests: everything minimal, one repeat; numbers meaningless."""
    return Config(
        name="tiny",
        repeats=2,
        resnet_widths=(4, 8, 8, 8),
        image_size=32,
        recalibration_batches=(3, 8),
        seeds=(0,),
        epochs=1,
        budget=0.01,
    )
