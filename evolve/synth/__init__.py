"""Training-data builders: trajectories -> TrainingExample records (consumed by the trainer)."""

from evolve.synth.chats import privileged_context, privileged_examples, sft_examples, step_example_messages

__all__ = ["privileged_context", "privileged_examples", "sft_examples", "step_example_messages"]
