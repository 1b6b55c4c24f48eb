"""The control plane: desired state over Redis, rolling swaps, canary rollouts."""
