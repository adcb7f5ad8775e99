"""gogepo-ray: Goal-Conditioned Generators of Deep Policies (Faccio et al., AAAI 2023),
trained on a Ray cluster and tracked in MLflow."""

__version__ = "0.1.0"
