"""The rollout's sequential test: McNemar on the discordant pairs, as a mixture sequential
probability ratio test (mSPRT), valid however often it is checked.

Only the labelled requests the two models answered differently tell them apart: `wins` where
only the challenger was right, `losses` where only the champion was. If both are equally
accurate, each discordant pair is a fair coin: wins ~ Binomial(wins + losses, 1/2). The test
weighs that against every other coin bias p, averaged over a Beta(a, a) prior:

    Λ_n = ∫ p^wins (1-p)^losses Beta(p; a, a) dp / (1/2)^n      n = wins + losses

Under equal accuracy Λ_n is a martingale with mean 1, so by Ville's inequality the chance it
*ever* reaches 1/α, over any number of peeks, is at most α. The test decides when Λ_n ≥ 1/α,
for the challenger if wins > losses, else for the champion.

Why mSPRT rather than alpha spending: a spending function needs the test's final size fixed
in advance, and a rollout's number of discordant pairs is not known (it depends on the
traffic, the labels that come back and how often the models disagree); recomputing group
sequential boundaries after every label is also costly. mSPRT has no horizon and a closed
form; its price is somewhat more labels than a fixed-size test of the same power.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import betaln
from scipy.stats import binom


@dataclass
class Verdict:
    wins: int  # discordant pairs only the challenger got right
    losses: int  # … only the champion
    log_lr: float  # log Λ
    threshold: float  # log(1/α)
    decided: str | None  # "challenger", "champion" or None (not yet)

    def as_dict(self) -> dict:
        return {
            "wins": self.wins, "losses": self.losses, "log_likelihood_ratio": round(self.log_lr, 4),
            "threshold": round(self.threshold, 4), "decided": self.decided,
        }  # fmt: skip


def log_lr(wins, losses, prior: float = 1.0):
    """log Λ of the mixture test; works on arrays (vectorised simulations)."""
    wins, losses = np.asarray(wins, float), np.asarray(losses, float)
    mixture = betaln(prior + wins, prior + losses) - betaln(prior, prior)
    return mixture + (wins + losses) * math.log(2)


def verdict(wins: int, losses: int, alpha: float, prior: float = 1.0) -> Verdict:
    value = float(log_lr(wins, losses, prior))
    threshold = math.log(1 / alpha)
    decided = None
    if value >= threshold and wins != losses:
        decided = "challenger" if wins > losses else "champion"
    return Verdict(wins, losses, value, threshold, decided)


def decided_by(p_win: float, alpha: float, prior: float, max_discordant: int) -> np.ndarray:
    """P(the test has decided within k discordant pairs), k = 0..max_discordant, when each
    discordant pair goes to the challenger with probability p_win (exact: the distribution of
    wins among the paths that have not crossed yet, one discordant pair at a time)."""
    alive = np.array([1.0])  # alive[w]: P(not decided, w wins so far)
    done = np.zeros(max_discordant + 1)
    threshold = math.log(1 / alpha)
    for n in range(1, max_discordant + 1):
        step = np.zeros(n + 1)
        step[1:] += alive * p_win
        step[:-1] += alive * (1 - p_win)
        wins = np.arange(n + 1)
        crossed = (log_lr(wins, n - wins, prior) >= threshold) & (2 * wins != n)
        done[n] = done[n - 1] + step[crossed].sum()
        step[crossed] = 0
        alive = step
    return done


def labels_for_power(
    p_champion: float, p_challenger: float, alpha: float, prior: float = 1.0,
    power: float = 0.8, max_labels: int = 20_000,
) -> int | None:  # fmt: skip
    """Labelled requests for the test to decide with probability `power`, for two models of
    these accuracies whose errors are independent; None past max_labels. Each label is
    discordant with probability q, so P(decided within n labels) = E[decided_by(K)] with
    K ~ Binomial(n, q); the number of labels doubles until it reaches `power`, then a
    bisection finds the first n that does."""
    q_win = p_challenger * (1 - p_champion)
    q = q_win + p_champion * (1 - p_challenger)
    if q == 0:
        return None

    def chance(n: int, by_discordant: np.ndarray) -> float:
        k = np.arange(len(by_discordant))
        return float((binom.pmf(k, n, q) * by_discordant).sum())

    low, high = 1, 64
    while True:
        cap = min(high, int(q * high + 10 * math.sqrt(high) + 50))  # K beyond: negligible
        by_discordant = decided_by(q_win / q, alpha, prior, cap)
        if chance(high, by_discordant) >= power:
            break
        if high >= max_labels:
            return None
        low, high = high + 1, min(2 * high, max_labels)
    while low < high:
        middle = (low + high) // 2
        if chance(middle, by_discordant) >= power:
            high = middle
        else:
            low = middle + 1
    return low


def simulate(p_champion: float, p_challenger: float, rollouts: int, settings,
             seed: int, chunk: int = 500) -> dict:  # fmt: skip
    """Rollouts of two models of these accuracies (independent errors), the test checked after
    every label from settings.min_pairs on, as the controller does; vectorised over rollouts.
    Per rollout: outcome (1 the challenger, -1 the champion, 0 none) and labels used."""
    rng = np.random.default_rng(seed)
    q_win = p_challenger * (1 - p_champion)
    q_loss = p_champion * (1 - p_challenger)
    threshold = np.log(1 / settings.alpha)
    labels = settings.max_labels
    outcome = np.zeros(rollouts, int)  # 1 challenger, -1 champion, 0 none
    used = np.full(rollouts, labels)
    for begin in range(0, rollouts, chunk):
        n = min(chunk, rollouts - begin)
        draw = rng.random((n, labels), dtype=np.float32)
        wins = np.cumsum(draw < q_win, axis=1, dtype=np.int32)
        losses = np.cumsum((draw >= q_win) & (draw < q_win + q_loss), axis=1, dtype=np.int32)
        crossed = (log_lr(wins, losses, settings.prior) >= threshold) & (wins != losses)
        crossed[:, : settings.min_pairs - 1] = False  # no decision before min_pairs labels
        first = crossed.argmax(axis=1)
        decided = crossed[np.arange(n), first]
        rows = np.arange(n)[decided]
        sign = np.sign(wins[rows, first[decided]] - losses[rows, first[decided]])
        outcome[begin : begin + n][decided] = sign
        used[begin : begin + n][decided] = first[decided] + 1
    return {"outcome": outcome, "labels": used}


def wilson_upper(successes: int, trials: int, z: float = 1.959964) -> float:
    """The Wilson score interval's upper end (95 % by default)."""
    if trials == 0:
        return 1.0
    rate = successes / trials
    centre = rate + z * z / (2 * trials)
    spread = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials))
    return (centre + spread) / (1 + z * z / trials)
