"""Pairing of the two arms' propensity strata."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from canary.stats._types import PROPENSITY_DECIMALS, ArmMoments, FloatArray


@dataclass(frozen=True, eq=False)
class PairedStrata:
    """Cells of both arms aligned on the candidate propensity ``pi`` of each stratum."""

    pi: FloatArray
    n_c: FloatArray
    s_c: FloatArray
    q_c: FloatArray
    n_p: FloatArray
    s_p: FloatArray
    q_p: FloatArray


def pair_strata(production: ArmMoments, candidate: ArmMoments) -> PairedStrata:
    """Align strata by ``p_candidate = 1 - p_production``; a missing cell counts as empty."""
    keys_c = np.round(candidate.propensity, PROPENSITY_DECIMALS)
    keys_p = np.round(1.0 - production.propensity, PROPENSITY_DECIMALS)
    pi = np.union1d(keys_c, keys_p)

    def align(keys: FloatArray, arm: ArmMoments) -> tuple[FloatArray, FloatArray, FloatArray]:
        idx = np.searchsorted(pi, keys)
        n = np.zeros(pi.size)
        s = np.zeros(pi.size)
        q = np.zeros(pi.size)
        n[idx] = arm.n
        s[idx] = arm.sum
        q[idx] = arm.sumsq
        return n, s, q

    n_c, s_c, q_c = align(keys_c, candidate)
    n_p, s_p, q_p = align(keys_p, production)
    return PairedStrata(pi=pi, n_c=n_c, s_c=s_c, q_c=q_c, n_p=n_p, s_p=s_p, q_p=q_p)


__all__ = [
    "PairedStrata",
    "pair_strata",
]
