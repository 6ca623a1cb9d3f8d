"""Keras and Flax NNX: test accuracy with the moving statistics vs after bnstats' exact ones.

A small MLP with batch norm (each framework's default momentum, 0.99) is trained for a short
run on scikit-learn's handwritten digits; its test accuracy is measured with the moving
statistics training left, then after ``bnstats.keras.recalibrate`` /
``bnstats.flax.recalibrate_nnx`` over the training set. Also the time of a recalibration vs
one ``model.predict`` pass over the same data. Needs ``pip install "bnstats[keras,flax,demo]"``;
runs on the CPU in about a minute::

    KERAS_BACKEND=jax python examples/keras_flax_digits.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import bnstats.flax  # noqa: E402
import bnstats.keras  # noqa: E402

EPOCHS, BATCH, SEED = 2, 64, 0


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    return train_test_split(x, y, test_size=0.3, random_state=SEED, stratify=y)


def keras_run(x_train, y_train, x_test, y_test) -> dict[str, float]:
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128),
            keras.layers.BatchNormalization(),  # momentum 0.99, Keras' default
            keras.layers.ReLU(),
            keras.layers.Dense(64),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(10),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile("adam", loss, metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=EPOCHS, batch_size=BATCH, verbose=0)
    moving = model.evaluate(x_test, y_test, verbose=0)[1]
    start = time.perf_counter()
    bnstats.keras.recalibrate(model, x_train, batch_size=BATCH, progress=False)
    recalibration = time.perf_counter() - start
    exact = model.evaluate(x_test, y_test, verbose=0)[1]
    predict = []
    for _ in range(2):  # the first call compiles
        start = time.perf_counter()
        model.predict(x_train, batch_size=BATCH, verbose=0)
        predict.append(time.perf_counter() - start)
    start = time.perf_counter()
    bnstats.keras.recalibrate(model, x_train, batch_size=BATCH, progress=False)
    again = time.perf_counter() - start
    return {
        "moving": moving,
        "exact": exact,
        "recalibrate_s": recalibration,
        "recalibrate_again_s": again,
        "predict_first_s": predict[0],
        "predict_s": predict[1],
    }


class FlaxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1, self.bn1 = nnx.Linear(64, 128, rngs=rngs), nnx.BatchNorm(128, rngs=rngs)
        self.l2, self.bn2 = nnx.Linear(128, 64, rngs=rngs), nnx.BatchNorm(64, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)  # BatchNorm momentum 0.99, Flax's default

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.l1(x)))
        return self.out(nnx.relu(self.bn2(self.l2(x))))


def flax_run(x_train, y_train, x_test, y_test) -> dict[str, float]:
    model = FlaxMLP(nnx.Rngs(SEED))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads)

    rng = np.random.default_rng(SEED)
    model.train()
    for _ in range(EPOCHS):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order), BATCH):
            index = order[start : start + BATCH]
            if len(index) > 1:
                step(model, optimizer, x_train[index], y_train[index])
    model.eval()

    def accuracy() -> float:
        return float((np.asarray(model(x_test)).argmax(axis=1) == y_test).mean())

    moving = accuracy()
    batches = [x_train[i : i + BATCH] for i in range(0, len(x_train), BATCH)]
    start = time.perf_counter()
    bnstats.flax.recalibrate_nnx(model, batches, progress=False)
    recalibration = time.perf_counter() - start
    return {"moving": moving, "exact": accuracy(), "recalibrate_s": recalibration}


def main() -> None:
    data = digits()
    print(
        f"digits: {len(data[0])} training, {len(data[1])} test images; {EPOCHS} epochs of {BATCH}"
    )
    print(f"Keras {keras.__version__} ({keras.backend.backend()}), JAX {jax.__version__}")
    k = keras_run(data[0], data[2], data[1], data[3])
    f = flax_run(data[0], data[2], data[1], data[3])
    print("| model | test accuracy, moving statistics | after recalibration |")
    print("|---|---|---|")
    print(f"| Keras Sequential MLP | {k['moving']:.4f} | {k['exact']:.4f} |")
    print(f"| Flax NNX MLP | {f['moving']:.4f} | {f['exact']:.4f} |")
    print(
        f"Keras: recalibrate {k['recalibrate_s']:.2f} s (again: {k['recalibrate_again_s']:.2f} s), "
        f"predict {k['predict_first_s']:.2f} s first, {k['predict_s']:.2f} s compiled; "
        f"Flax recalibrate_nnx {f['recalibrate_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
