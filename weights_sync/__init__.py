"""Publishing refreshed policy weights from the learner to the rollout engines."""
