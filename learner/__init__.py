"""The GRPO learner: advantages and losses (pure tensor maths), batching, trainer, checkpoints."""
