"""Model Rollouts: statistically valid progressive delivery for ML models on Kubernetes."""

__version__ = "0.1.0"
