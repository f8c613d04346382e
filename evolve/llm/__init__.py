"""Every model call: the OpenAI-compatible client, the one chat layout, local transformers models.

- :mod:`evolve.llm.client`: :class:`~evolve.llm.client.ChatClient` (retries, response-format
  negotiation, usage and cost, top-k log-probs, one error per failure kind).
- :mod:`evolve.llm.prompts`: the chat layout and answer parser shared by the policies, synth and
  the trainer (a training example is rendered by the same code the policy acts with).
- :mod:`evolve.llm.hf`: load a causal LM (directory or GGUF), batched generation and scoring with
  token ids and log-probs, on a path or a live model.
- :mod:`evolve.llm.gguf_export`: a trained checkpoint written back as GGUF (the base file's
  metadata and untouched quantised tensors kept), so llama.cpp can serve the student.

Heavy libraries (``openai``, ``torch``) are imported only when first used.
"""
