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
as moving averages. Each bucket tries both ways first, then takes the cheaper, and now and then
takes the other way for two steps (the engine measures only steps in the same mode as the one
before: a switch costs what neither mode does), so a crossover that moves is followed. How often
depends on how far apart the two ways are: every `explore_every`-th step while they are within
`GAP_UNIT` of each other, k times less often at k such units apart (up to `MAX_STRETCH`). A
check then costs about the same wherever it happens, at most 2 * GAP_UNIT / explore_every of
the steps' time (0.6%), where checking every 32nd step cost 2 * 0.6 / 32 = 3.7% on a round
whose drafts cost 1.6x (`bench.draft_round_bench`'s even round, session 43: 0.95-0.97 of drafts
off), and a crossover far from the batch sizes a round has is seldom re-tried.
"""

from __future__ import annotations

GAP_UNIT = 0.1  # the two ways' costs per token this far apart (10%): explore every `explore_every` steps ...
MAX_STRETCH = 8  # ... and k times less often at k such units apart, up to this many times


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
        gap = max(on, off) / max(min(on, off), 1e-12) - 1.0  # what a step the other way costs extra
        period = self.explore_every * min(MAX_STRETCH, max(1, round(gap / GAP_UNIT)))
        return (not better) if n % period >= period - 2 else better

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
