"""The reward role: scorers that turn (prompt, response) pairs into rewards, and the Ray Serve
deployment that serves them to the training loop (DeploymentHandle) and to people (HTTP)."""
