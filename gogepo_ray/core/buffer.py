"""Replay buffer of (policy_params, context, return) entries with recency-weighted sampling.

The context is the task an episode was run on (``core.context``); a run without task
contexts stores contexts of 0 dimensions, which cost nothing.

Sampling favours recent entries (paper §3, appendix): the entry of age k (k = 1 for the
newest) is drawn with probability ∝ (1/k)^recency_exponent, with replacement. The buffer
holds at most ``capacity`` entries; the oldest is overwritten first. Storage grows with
the number of entries, so a short run never allocates the full capacity.
"""

from __future__ import annotations

import torch


class ReplayBuffer:
    def __init__(
        self,
        capacity: int,
        num_params: int,
        recency_exponent: float = 1.1,
        context_dim: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.num_params = num_params
        self.recency_exponent = recency_exponent
        self.context_dim = context_dim
        self._params: list[torch.Tensor] = []  # ring storage, each (D,)
        # returns and contexts as tensors over the same slots (nearest-neighbour queries of
        # ``core.context`` read them whole); grown by doubling up to the capacity
        self._returns = torch.zeros(0, dtype=torch.float64)
        self._contexts = torch.zeros(0, context_dim)
        self._head = 0  # slot of the next write once full
        self.total_added = 0
        ages = torch.arange(1, capacity + 1, dtype=torch.float64)
        self._age_weights = ages.pow(-recency_exponent)  # (capacity,), index k-1 -> weight of age k

    def __len__(self) -> int:
        return len(self._params)

    def add(
        self,
        policy_params: torch.Tensor,
        episode_return: float,
        context: torch.Tensor | None = None,
    ) -> None:
        """Store one (θ, x, R) entry; θ is (D,) and is copied to contiguous float32 CPU
        memory, x is (context_dim,) (None without contexts)."""
        p = policy_params.detach().to("cpu", torch.float32).reshape(-1).clone()
        if p.numel() != self.num_params:
            raise ValueError(f"expected {self.num_params} params, got {p.numel()}")
        x = torch.zeros(0) if context is None else torch.as_tensor(context, dtype=torch.float32)
        if x.numel() != self.context_dim:
            raise ValueError(f"expected a context of {self.context_dim} values, got {x.numel()}")
        if len(self._params) < self.capacity:
            slot = len(self._params)
            self._params.append(p)
            if slot >= len(self._returns):  # grow by doubling, up to the capacity
                size = min(self.capacity, max(16, 2 * slot))
                self._contexts = torch.cat(
                    [self._contexts, torch.zeros(size - slot, self.context_dim)]
                )
                self._returns = torch.cat(
                    [self._returns, torch.zeros(size - slot, dtype=torch.float64)]
                )
        else:
            slot = self._head
            self._params[slot] = p
            self._head = (self._head + 1) % self.capacity
        self._contexts[slot] = x.reshape(-1)
        self._returns[slot] = float(episode_return)
        self.total_added += 1

    def contexts_and_returns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored entry's context (n, context_dim) and return (n,), in slot order."""
        n = len(self)
        return self._contexts[:n], self._returns[:n]

    def _slot_of_age(self, ages: torch.Tensor) -> torch.Tensor:
        """Storage slot of entries with age k (k = 1 newest)."""
        next_slot = len(self) if len(self) < self.capacity else self._head
        return (next_slot - ages) % self.capacity

    def sample_probabilities(self) -> torch.Tensor:
        """Sampling probability of each age k = 1..len (index 0 is the newest)."""
        w = self._age_weights[: len(self)]
        return w / w.sum()

    def sample(
        self, batch_size: int, rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` entries: policy_params (B, D), returns (B,), contexts
        (B, context_dim)."""
        if len(self) == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        ages = (
            torch.multinomial(
                self.sample_probabilities(), batch_size, replacement=True, generator=rng
            )
            + 1
        )
        slots = self._slot_of_age(ages).tolist()
        return self.params_at(slots), self._returns[slots].float(), self._contexts[slots]

    def _oldest_first(self) -> list[int]:
        """Storage slots from the oldest entry to the newest."""
        n = len(self)
        return (
            list(range(n))
            if n < self.capacity
            else list(range(self._head, n)) + list(range(self._head))
        )

    def params_at(self, slots: list[int]) -> torch.Tensor:
        """The policy_params of storage slots, (len(slots), D)."""
        return torch.stack([self._params[s] for s in slots])

    def returns_in_order(self) -> list[float]:
        """All stored returns, oldest first."""
        return self._returns[self._oldest_first()].tolist()

    def state_dict(self) -> dict:
        n = len(self)
        order = self._oldest_first()
        params = (
            torch.stack([self._params[i] for i in order]) if n else torch.zeros(0, self.num_params)
        )
        state = {
            "params": params,  # (n, D), oldest first
            "returns": self._returns[order] if n else torch.zeros(0, dtype=torch.float64),
            "total_added": self.total_added,
        }
        if self.context_dim:  # (n, k), oldest first; runs without contexts keep their format
            state["contexts"] = self._contexts[order] if n else torch.zeros(0, self.context_dim)
        return state

    def load_state_dict(self, state: dict) -> None:
        params, returns = state["params"], state["returns"]
        if params.shape[0] and params.shape[1] != self.num_params:
            raise ValueError(
                f"buffer holds policies of {params.shape[1]} params, this policy has {self.num_params}"
            )
        contexts = state.get("contexts", torch.zeros(len(params), 0))
        if contexts.shape[1] != self.context_dim:
            raise ValueError(
                f"buffer holds contexts of {contexts.shape[1]} values, this run's have {self.context_dim}"
            )
        self._params, self._head = [], 0
        self._returns = torch.zeros(0, dtype=torch.float64)
        self._contexts = torch.zeros(0, self.context_dim)
        keep = slice(-self.capacity, None)
        for p, r, x in zip(params[keep], returns[keep].tolist(), contexts[keep]):
            self.add(p, r, x)
        self.total_added = int(state["total_added"])


class BucketBuffer(ReplayBuffer):
    """Replay buffer whose entries are grouped by return, in the manner of UDRLPG (Di Ventura
    et al. 2025, arXiv 2501.16288, "decoupling the sampling probability from the number of
    policies in the buffer").

    The return range [low, high] is cut into ``buckets`` equal buckets (returns outside it
    fall in the end buckets). Sampling first draws a bucket, bucket i (0 = lowest) with
    weight (i + 1)^bucket_exponent among the buckets that hold an entry, then an entry of
    that bucket uniformly: a handful of good policies is drawn as often as thousands of
    poor ones, and the higher buckets more often than the lower. When the buffer is full, a
    new entry replaces the oldest entry of the fullest bucket, so the few policies of a high
    bucket stay however many poor episodes follow them.
    """

    def __init__(
        self,
        capacity: int,
        num_params: int,
        low: float,
        high: float,
        buckets: int = 10,
        bucket_exponent: float = 1.0,
        context_dim: int = 0,
    ) -> None:
        super().__init__(capacity, num_params, 0.0, context_dim)
        if not high > low:
            raise ValueError("the bucket range needs high > low")
        if buckets < 1:
            raise ValueError("buckets must be at least 1")
        self.low, self.high, self.buckets = float(low), float(high), int(buckets)
        self.bucket_exponent = float(bucket_exponent)
        self._bucket_weights = torch.arange(1, buckets + 1, dtype=torch.float64).pow(
            bucket_exponent
        )  # (buckets,)
        self._bucket = torch.zeros(0, dtype=torch.int64)  # per slot
        self._order = torch.zeros(0, dtype=torch.int64)  # per slot: total_added when written

    def bucket_of(self, episode_return: float) -> int:
        frac = (float(episode_return) - self.low) / (self.high - self.low)
        return min(self.buckets - 1, max(0, int(frac * self.buckets)))

    def add(
        self,
        policy_params: torch.Tensor,
        episode_return: float,
        context: torch.Tensor | None = None,
    ) -> None:
        n = len(self)
        if n < self.capacity:
            slot = n
        else:  # the oldest entry of the fullest bucket makes room
            held = self._bucket[:n]
            fullest = int(torch.bincount(held, minlength=self.buckets).argmax())
            order = torch.where(held == fullest, self._order[:n], torch.iinfo(torch.int64).max)
            slot = int(order.argmin())
            self._head = slot  # the base class writes the slot at _head once full
        if slot >= len(self._bucket):
            size = min(self.capacity, max(16, 2 * slot))
            grow = size - len(self._bucket)
            self._bucket = torch.cat([self._bucket, torch.zeros(grow, dtype=torch.int64)])
            self._order = torch.cat([self._order, torch.zeros(grow, dtype=torch.int64)])
        self._bucket[slot] = self.bucket_of(episode_return)
        self._order[slot] = self.total_added
        super().add(policy_params, episode_return, context)

    def bucket_counts(self) -> torch.Tensor:
        """Entries held per bucket, (buckets,)."""
        return torch.bincount(self._bucket[: len(self)], minlength=self.buckets)

    def entry_probabilities(self) -> torch.Tensor:
        """Sampling probability of every stored entry, in slot order, (n,)."""
        held = self._bucket[: len(self)]
        counts = torch.bincount(held, minlength=self.buckets).double()
        per_entry = (self._bucket_weights / counts.clamp_min(1))[held]
        return per_entry / per_entry.sum()

    def sample(
        self, batch_size: int, rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(self) == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        slots = torch.multinomial(
            self.entry_probabilities(), batch_size, replacement=True, generator=rng
        ).tolist()
        return self.params_at(slots), self._returns[slots].float(), self._contexts[slots]

    def _oldest_first(self) -> list[int]:
        return torch.argsort(self._order[: len(self)]).tolist()

    def load_state_dict(self, state: dict) -> None:
        self._bucket = torch.zeros(0, dtype=torch.int64)
        self._order = torch.zeros(0, dtype=torch.int64)
        self.total_added = 0  # re-added oldest first, so their order numbers stay in order
        super().load_state_dict(state)
