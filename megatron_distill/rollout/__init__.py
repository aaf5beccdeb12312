"""On-policy rollouts: generation in place under the training layout, log-probs, RL terms.

* ``generate.py``: batched KV-cache generation from a live GPTModel stage (TP x PP).
* ``sampling.py``: vocab-parallel greedy / temperature / top-k / top-p sampling.
* ``logprobs.py``: per-token log-probabilities under vocab-parallel logits.
* ``rl.py``: rewards, group advantages, the REINFORCE-with-baseline loss term.
* ``sglang_backend.py`` / ``sglang_rollout.py``: the optional sglang rollout backend (an HTTP
  client of sglang's native API; weight sync and one request per data-parallel group).

Import from the submodules; ``generate`` needs Megatron-Core, the others only PyTorch.
"""
