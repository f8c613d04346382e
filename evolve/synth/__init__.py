"""Training-data builders: trajectories -> TrainingExample records (consumed by the trainer)."""

from evolve.synth.chats import privileged_context, privileged_examples, sft_examples, step_example_messages
from evolve.synth.preferences import preference_examples, state_key

__all__ = [
    "preference_examples",
    "privileged_context",
    "privileged_examples",
    "sft_examples",
    "state_key",
    "step_example_messages",
]
