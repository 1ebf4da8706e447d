"""Task selectors: which taskset rows the explorer's batches hold (``data_selector``).

The original's ``data_selector.selector_type`` with its arguments. A selector maps a batch (its
number and its slice ``[start, stop)`` of the reader's stream of tasks) to taskset rows:

- ``sequential``: rows in file order, wrapping at the end of each epoch;
- ``shuffle``: a new permutation each epoch, seeded by ``(seed, epoch)``;
- ``random``: each batch drawn afresh, without replacement inside the batch, seeded by
  ``(seed, batch)``; there are no epochs, so a row may come back in the next batch;
- ``offline_easy2hard``: rows sorted once by the ``feature_keys`` columns, largest (easiest) first,
  then served in that order every epoch;
- ``difficulty_based``: an online curriculum. Each row's pass rate is a Beta(alpha, beta) belief,
  seeded by two ``feature_keys`` columns (reference pass rates of a weak and a strong model) and
  updated from the pass rates the ``pass_rate_calculator`` experience operator measures; a batch
  favours rows whose expected pass rate is near ``target_reward``.

All but ``difficulty_based`` are functions of the batch number alone, so a resumed run
(``TasksetReader.skip_batches``) reads the batches the interrupted one would have.
``difficulty_based`` resumes at the right position with its beliefs back at their priors (the
original checkpoints only the position too).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trinity.config import ConfigError

# difficulty_based's kwargs and their defaults (the original's)
DIFFICULTY_KWARGS = {
    "m": 16,
    "lamb": 0.2,
    "rho": 0.2,
    "adaptive_rho": False,
    "do_sample": False,
    "target_reward": 1.0,
    "tau": 1.0,
}
CAPABILITY_DISCOUNT = 0.9  # EMA of the model's capability between the two reference models


class EpochOrder:
    """Stream item ``i`` is row ``order(epoch)[offset]``, ``epoch, offset = divmod(i, rows)``."""

    def __init__(self, size: int, order: Callable[[int], list[int]]):
        self.size, self.order = size, order
        self._epoch, self._rows = -1, []

    def rows(self, batch: int, start: int, stop: int) -> list[int]:
        out = []
        for index in range(start, stop):
            epoch, offset = divmod(index, self.size)
            if epoch != self._epoch:
                self._epoch, self._rows = epoch, self.order(epoch)
            out.append(self._rows[offset])
        return out

    def feedback(self, pass_rates: dict[int, float]) -> None:
        """Fixed orders learn nothing."""


def _draw_without_replacement(
    size: int, count: int, pick: Callable[[list[int], int], list[int]]
) -> list[int]:
    """``count`` rows, distinct within each run of ``size`` (a batch larger than the taskset)."""
    out: list[int] = []
    while len(out) < count:
        out += pick(list(range(size)), min(size, count - len(out)))
    return out


class RandomBatches:
    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def rows(self, batch: int, start: int, stop: int) -> list[int]:
        rng = random.Random(f"{self.seed}:{batch}")
        return _draw_without_replacement(self.size, stop - start, rng.sample)

    def feedback(self, pass_rates: dict[int, float]) -> None:
        """Uniform draws learn nothing."""


class DifficultyBased:
    """Beta beliefs over each row's pass rate, pulled towards measured rates and towards an
    interpolation ``p~ = clip(f0 + c (f1 - f0), 0, 1)`` between the reference pass rates ``f0``,
    ``f1``, where ``c`` (the model's capability) is an EMA of what the measured rates imply.

    Update with measured rates ``r`` on rows ``R`` (every row decays by ``lamb``; on rows in
    ``R``, ``p~`` is ``r``):
    ``alpha <- (1-lamb) alpha + lamb + (1-rho) m r [rows in R] + rho m p~`` (``beta`` with 1-r, 1-p~).
    Selection scores ``-|target_reward - E[p]|`` (or a Beta draw with ``do_sample``): the top
    ``n`` with ``tau: 0``, else ``n`` distinct rows drawn from ``softmax(score / tau)``.
    """

    def __init__(self, features_N_2: np.ndarray, seed: int, **kwargs: Any):
        args = {**DIFFICULTY_KWARGS, **kwargs}
        self.features_N_2 = features_N_2
        self.seed = seed
        self.m, self.lamb, self.rho = float(args["m"]), float(args["lamb"]), float(args["rho"])
        self.adaptive_rho = bool(args["adaptive_rho"])
        self.do_sample = bool(args["do_sample"])
        self.target = float(args["target_reward"])
        self.tau = float(args["tau"])
        size = len(features_N_2)
        self.alpha_N = np.ones(size)
        self.beta_N = np.ones(size)
        self.capability: float | None = None

    def expected_pass_rates(self) -> np.ndarray:
        return self.alpha_N / (self.alpha_N + self.beta_N)

    def rows(self, batch: int, start: int, stop: int) -> list[int]:
        rng = np.random.default_rng([self.seed, start])
        size = len(self.alpha_N)
        if self.do_sample:
            pass_rates_N = rng.beta(self.alpha_N, self.beta_N)
        else:
            pass_rates_N = self.expected_pass_rates()
        scores_N = -np.abs(self.target - pass_rates_N)
        if self.tau == 0:
            order = np.argsort(-scores_N, kind="stable").tolist()
            return _draw_without_replacement(size, stop - start, lambda _, n: order[:n])
        logits_N = scores_N / self.tau
        probs_N = np.exp(logits_N - logits_N.max())
        probs_N /= probs_N.sum()

        def draw(_: list[int], n: int) -> list[int]:
            return rng.choice(size, size=n, replace=False, p=probs_N).tolist()

        return _draw_without_replacement(size, stop - start, draw)

    def feedback(self, pass_rates: dict[int, float]) -> None:
        if not pass_rates:
            return
        rows = np.array(sorted(pass_rates))
        rates = np.array([pass_rates[row] for row in rows.tolist()])
        weak, strong = self.features_N_2[rows].mean(axis=0)
        estimate = (rates.mean() - weak) / (strong - weak + 1e-6)
        self.capability = (
            estimate
            if self.capability is None
            else CAPABILITY_DISCOUNT * self.capability + (1 - CAPABILITY_DISCOUNT) * estimate
        )
        f0, f1 = self.features_N_2[:, 0], self.features_N_2[:, 1]
        prior_N = np.clip(f0 + self.capability * (f1 - f0), 0.0, 1.0)
        if self.adaptive_rho and np.abs(prior_N[rows] - rates).mean() >= 0.25:
            self.rho *= 0.5  # the interpolation predicts badly: trust it less
        prior_N[rows] = rates
        successes_N = np.zeros_like(self.alpha_N)
        successes_N[rows] = rates * self.m
        failures_N = np.zeros_like(self.beta_N)
        failures_N[rows] = (1 - rates) * self.m
        keep, lamb, rho, m = 1 - self.lamb, self.lamb, self.rho, self.m
        self.alpha_N = keep * self.alpha_N + lamb + (1 - rho) * successes_N + rho * prior_N * m
        self.beta_N = keep * self.beta_N + lamb + (1 - rho) * failures_N + rho * (1 - prior_N) * m


def build_selector(
    selector_type: str,
    *,
    size: int,
    seed: int,
    feature_keys: Sequence[str],
    kwargs: dict[str, Any],
    column: Callable[[str], list[Any]],
    where: str,
) -> Any:
    """The selector for ``size`` rows; ``column(key)`` reads a feature column. Bad features or
    kwargs raise a ConfigError naming ``where`` (the taskset)."""
    kind = selector_type.lower()
    if kind == "sequential":
        return EpochOrder(size, lambda epoch: list(range(size)))
    if kind == "shuffle":

        def permutation(epoch: int) -> list[int]:
            order = list(range(size))
            random.Random(f"{seed}:{epoch}").shuffle(order)
            return order

        return EpochOrder(size, permutation)
    if kind == "random":
        return RandomBatches(size, seed)
    features_N_F = _features(feature_keys, column, where, size)
    if kind == "offline_easy2hard":
        # descending by the feature tuple; ties by the larger row first, as the original sorts
        easy_first = sorted(range(size), key=lambda row: (*features_N_F[row], row), reverse=True)
        return EpochOrder(size, lambda epoch: easy_first)
    if kind == "difficulty_based":
        if features_N_F.shape[1] != 2:
            raise ConfigError(
                f"{where}.feature_keys: difficulty_based needs exactly 2 "
                f"(the pass rates of a weaker and a stronger reference model), got {len(feature_keys)}"
            )
        return DifficultyBased(features_N_F, seed, **kwargs)
    raise ConfigError(f"{where}.selector_type: unknown selector '{selector_type}'")


def _features(
    keys: Sequence[str], column: Callable[[str], list[Any]], where: str, size: int
) -> np.ndarray:
    if not keys:
        raise ConfigError(f"{where}.feature_keys: this selector needs feature columns")
    columns = []
    for key in keys:
        try:
            values = column(key)
        except (KeyError, ValueError):  # a list of rows / a datasets.Dataset without it
            values = None
        if values is None or len(values) != size or any(v is None for v in values):
            raise ConfigError(f"{where}.feature_keys: rows lack a value for '{key}'")
        try:
            columns.append(np.asarray(values, dtype=float))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.feature_keys: column '{key}' is not numeric") from None
    return np.stack(columns, axis=1)
