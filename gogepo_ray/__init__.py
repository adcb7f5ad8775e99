"""gogepo-ray: Goal-Conditioned Generators of Deep Policies (Faccio et al., AAAI 2023),
trained on a Ray cluster and tracked in MLflow."""

from gogepo_ray.integrations import rllib_hook

__version__ = "0.1.0"

# `tune.Tuner("GoGePo", ...)` works after `import gogepo_ray`, without importing Ray here.
rllib_hook.install()
