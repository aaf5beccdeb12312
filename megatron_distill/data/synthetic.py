"""Built-in synthetic data: token streams from a fixed random sparse Markov source.

Each token has a few possible successors with skewed probabilities, so a small model can learn
the source quickly and a teacher trained on it has a low-entropy distribution worth matching.
Every global batch is a pure function of ``(seed, iteration)``: all parallel layouts see the
same data, which is what the TP/PP equivalence tests rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MarkovSource:
    """A random first-order Markov chain over ``vocab_size`` tokens, ``branching`` successors each."""

    vocab_size: int
    branching: int
    seed: int

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        k = min(self.branching, self.vocab_size)
        self.successors = torch.stack(
            [torch.randperm(self.vocab_size, generator=gen)[:k] for _ in range(self.vocab_size)]
        )
        # Dirichlet(0.5) weights: skewed, so next-token entropy is well below log(k).
        gamma = torch.distributions.Gamma(torch.full((k,), 0.5), torch.ones(k))
        # Gamma sampling uses the global generator: seed it, then restore the caller's state.
        state = torch.get_rng_state()
        torch.manual_seed(self.seed)
        weights = torch.stack([gamma.sample() for _ in range(self.vocab_size)]) + 1e-3
        torch.set_rng_state(state)
        self.probs = weights / weights.sum(dim=-1, keepdim=True)

    def sample(self, num_sequences: int, length: int, stream_seed: int) -> torch.Tensor:
        """``[num_sequences, length]`` int64 token ids drawn from the chain."""
        gen = torch.Generator().manual_seed(stream_seed)
        out = torch.empty(num_sequences, length, dtype=torch.long)
        out[:, 0] = torch.randint(self.vocab_size, (num_sequences,), generator=gen)
        for t in range(1, length):
            choice = torch.multinomial(self.probs[out[:, t - 1]], 1, generator=gen).squeeze(-1)
            out[:, t] = self.successors[out[:, t - 1], choice]
        return out


@dataclass
class SyntheticBatches:
    """Global batches from a ``MarkovSource``, sliced for one data-parallel rank.

    ``get(iteration)`` returns this rank's list of micro-batches, each a dict of ``[b, s]``
    tensors: ``tokens``, ``labels`` (next tokens), ``loss_mask``, ``position_ids``.
    """

    source: MarkovSource
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    stream_offset: int = 0

    def global_batch(self, iteration: int) -> torch.Tensor:
        """``[global_batch_size, seq_length + 1]`` tokens of one iteration (same on every rank)."""
        seed = self.source.seed * 1_000_003 + self.stream_offset + iteration
        return self.source.sample(self.global_batch_size, self.seq_length + 1, seed)

    def get(self, iteration: int) -> list[dict[str, torch.Tensor]]:
        per_dp = self.global_batch_size // self.dp_size
        rows = self.global_batch(iteration)[self.dp_rank * per_dp : (self.dp_rank + 1) * per_dp]
        positions = torch.arange(self.seq_length).unsqueeze(0)
        micro = []
        for start in range(0, per_dp, self.micro_batch_size):
            chunk = rows[start : start + self.micro_batch_size]
            micro.append(
                {
                    "tokens": chunk[:, :-1].contiguous(),
                    "labels": chunk[:, 1:].contiguous(),
                    "loss_mask": torch.ones(chunk.shape[0], self.seq_length),
                    "position_ids": positions.expand(chunk.shape[0], -1).contiguous(),
                }
            )
        return micro

    def state_dict(self) -> dict:
        """Data position for a checkpoint: batches are a pure function of the index and seed."""
        return {"kind": "synthetic", "seed": self.source.seed, "stream_offset": self.stream_offset}

    def load_state_dict(self, state: dict) -> None:
        """Check that a checkpoint's data stream is this one (nothing else to restore)."""
        if state.get("seed", self.source.seed) != self.source.seed:
            raise ValueError(
                f"checkpoint was made with --data-seed {state['seed']}, this run uses {self.source.seed}"
            )
