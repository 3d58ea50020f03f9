"""When MTP drafts pay: drafting on or off per decode step, by the size of the active batch.

    governor = DraftGovernor(max_batch=-1)      # -1: measured; 0: always draft; N: while <= N active
    if governor.draft(len(active)): ...          # this step speculates
    governor.record(len(active), drafted, seconds, tokens_emitted)

Speculation pays when few sequences are active (a decode step streams the weights whatever the
batch, so verifying K+1 tokens costs about one step) and costs when many are (the step is
compute-bound and rejected drafts are wasted work): the long tail of a rollout round, where a few
long answers run alone, is where it pays. The crossover depends on the model, the machine and
the heads' acceptance (which moves as the policy trains), so by default it is measured as the
engine runs: seconds per emitted token, drafting and not, per batch-size bucket (powers of two),
as moving averages. Each bucket tries both ways first, then takes the cheaper, and every
`explore_every`-th step there takes the other way for two steps (the engine measures only steps
in the same mode as the one before: a switch costs what neither mode does), so a crossover that
moves is followed.
"""

from __future__ import annotations


def bucket(active: int) -> int:
    """Batch-size bucket: 1, 2, 4, 8, ... (the smallest power of two >= active)."""
    return 1 << max(0, active - 1).bit_length()


class DraftGovernor:
    def __init__(self, max_batch: int = -1, explore_every: int = 32, smoothing: float = 0.2) -> None:
        if max_batch < -1:
            raise ValueError(f"draft max_batch={max_batch}: use -1 (measured), 0 (always) or a batch size")
        self.max_batch = max_batch
        self.explore_every = explore_every
        self.smoothing = smoothing
        self.cost: dict[tuple[int, bool], float] = {}  # (bucket, drafting) -> seconds per emitted token
        self.steps: dict[int, int] = {}

    def draft(self, active: int) -> bool:
        """Whether a step with `active` sequences should speculate."""
        if self.max_batch >= 0:
            return self.max_batch == 0 or active <= self.max_batch
        k = bucket(active)
        on, off = self.cost.get((k, True)), self.cost.get((k, False))
        if on is None or off is None:
            return on is None  # measure drafting first, then plain steps
        n = self.steps.get(k, 0)
        self.steps[k] = n + 1
        better = on <= off
        return (not better) if n % self.explore_every >= self.explore_every - 2 else better

    def record(self, active: int, drafted: bool, seconds: float, tokens: int) -> None:
        """One step's cost: `tokens` emitted by `active` sequences in `seconds`."""
        if self.max_batch >= 0 or tokens <= 0:
            return
        key, per_token = (bucket(active), drafted), seconds / tokens
        old = self.cost.get(key)
        self.cost[key] = per_token if old is None else old + self.smoothing * (per_token - old)

    def crossover(self) -> int:
        """The largest measured bucket where drafting is cheaper (0: none measured or none cheaper)."""
        if self.max_batch >= 0:
            return self.max_batch
        wins = [k for (k, drafted), c in self.cost.items() if drafted and c <= self.cost.get((k, False), -1.0)]
        return max(wins, default=0)
