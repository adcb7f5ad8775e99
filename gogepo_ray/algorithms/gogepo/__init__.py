"""GoGePo: a generator G(c) that writes a policy's weights for a commanded return c, and a
critic V that judges policies by their actions on learned probing states. The method itself
is pure torch in ``gogepo_ray.core`` (generator, critic, buffer, ``core.learner.Learner``)."""

from gogepo_ray.algorithms import Algorithm

ALGORITHM = Algorithm(
    name="gogepo",
    learner="gogepo_ray.core.learner:Learner",
    takes_commands=True,
    takes_contexts=True,
    rllib_name="GoGePo",
    summary="the generator of policies (Faccio et al., AAAI 2023)",
)
