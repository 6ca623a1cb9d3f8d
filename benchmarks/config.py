"""The sizes every comparison runs at: full (the committed results), quick (CI), tiny (tests),
and the device they run on (:func:`on_device`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

RESNET18_WIDTHS = (64, 128, 256, 512)
FULL_EPOCHS = 20


@dataclass(frozen=True)
class Config:
    """How big and how often.

    ``repeats``: alternating timing rounds; ``budget``: seconds of timed calls per block
    for a comparison's nominal budget of 1; ``recalibration_batches``: (batches, batch size)
    of comparison a); ``seeds``, ``epochs``: training runs on digits (e, f).

    ``device``: where models and data live (``"cpu"``, ``"cuda"``, ``"cuda:1"``);
    ``train_batch``: images per training step (c); ``inference_batches``: batch sizes of the
    latency comparisons (b, g); ``train_precisions``: the training step in float32 and, for
    each other dtype named, under ``torch.autocast`` to it (c); ``fold_dtypes``: the dtypes
    the inference models run in (b); ``compile_dtype``, ``compile_backend``: the dtype and
    ``torch.compile`` backend of the fold-before-compile comparison (g).
    """

    name: str = "full"
    repeats: int = 9
    threads: int = 1
    resnet_widths: tuple[int, ...] = RESNET18_WIDTHS
    image_size: int = 64
    recalibration_batches: tuple[int, int] = (32, 32)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = FULL_EPOCHS
    budget: float = 1.0
    device: str = "cpu"
    train_batch: int = 32
    inference_batches: tuple[int, ...] = (1, 32)
    train_precisions: tuple[str, ...] = ("float32",)
    fold_dtypes: tuple[str, ...] = ("float32",)
    compile_dtype: str = "float32"
    compile_backend: str = "inductor"

    @property
    def quick(self) -> bool:
        return self.name != "full"

    @property
    def narrower_models(self) -> bool:
        """Whether the ResNet-shaped models are narrower than the full run's (quick and tiny
        on the CPU; on a GPU every run takes ResNet-18 itself): a fixed cost per layer then
        weighs more in a time ratio."""
        return tuple(self.resnet_widths) != RESNET18_WIDTHS

    @property
    def shorter_training(self) -> bool:
        """Whether the digits models train for fewer epochs than the full run's."""
        return self.epochs < FULL_EPOCHS

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def basis(self) -> str:
        """What times and ratios are measured in: on the CPU with one thread, the process's
        CPU time (the time the work held the core, not the time it waited for it); else
        wall-clock. On a GPU the host's CPU time says nothing of the device's work: the timed
        blocks there start and end with ``torch.cuda.synchronize()``."""
        return "cpu" if self.threads == 1 and not self.on_gpu else "wall"


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


def tiny_config(repeats: int | None = None, threads: int = 1) -> Config:
    """For the harness's own tests: everything minimal, two repeats; numbers meaningless.
    The narrow dtypes of the GPU rows run too (autocast to bfloat16, float16 models), so the
    CPU tests go through the same code, and the compile comparison uses the ``aot_eager``
    backend (inductor's C++ compilation takes tens of seconds per model on a CPU)."""
    return Config(
        name="tiny",
        repeats=repeats or 2,
        threads=threads,
        resnet_widths=(4, 8, 8, 8),
        image_size=32,
        recalibration_batches=(3, 8),
        seeds=(0,),
        epochs=1,
        budget=0.01,
        train_batch=8,
        inference_batches=(1, 4),
        train_precisions=("float32", "bfloat16"),
        fold_dtypes=("float32", "float16"),
        compile_dtype="float16",
        compile_backend="aot_eager",
    )


def on_device(config: Config, device: str) -> Config:
    """``config`` for ``device``. On a GPU the issue's rows are added: the training step under
    bfloat16 autocast, the inference models in float16, the compile comparison in float16.
    The full and the quick run both take ResNet-18 itself at its own input size (224x224,
    stages at 56/28/14/7), steps of 64 images, 24 recalibration batches of 64 and latency
    at batch 1 and 64: a GPU runs that in milliseconds, and the quick run's narrow model at
    64x64 would time kernel launches, not the work; quick keeps its fewer, shorter repeats.
    The tiny configuration keeps its sizes (the harness's tests)."""
    if device == "cpu":
        return replace(config, device=device)
    gpu: dict = {"device": device, "compile_dtype": "float16"}
    if config.name != "tiny":
        gpu.update(
            train_precisions=("float32", "bfloat16"),
            fold_dtypes=("float32", "float16"),
            resnet_widths=RESNET18_WIDTHS,
            image_size=224,
            train_batch=64,
            recalibration_batches=(24, 64),
            inference_batches=(1, 64),
        )
    return replace(config, **gpu)
