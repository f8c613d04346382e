"""Training-data builders: trajectories -> TrainingExample records (consumed by the trainer)."""

from evolve.synth.chats import privileged_examples, sft_examples, trajectory_messages

__all__ = ["privileged_examples", "sft_examples", "trajectory_messages"]
