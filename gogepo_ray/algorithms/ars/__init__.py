"""Augmented Random Search V2-t (Mania et al. 2018), the GoGePo paper's baseline, on the
same workers: one policy, improved by antithetic random directions (``learner.ArsLearner``)."""

from gogepo_ray.algorithms import Algorithm

ALGORITHM = Algorithm(
    name="ars",
    learner="gogepo_ray.algorithms.ars.learner:ArsLearner",
    takes_commands=False,
    takes_contexts=False,
    rllib_name="GoGePoARS",
    summary="Augmented Random Search V2-t (Mania et al. 2018), the paper's baseline",
)
