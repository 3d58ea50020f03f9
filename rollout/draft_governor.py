"""When MTP drafts pay, and how deep: a draft depth per decode step, by the size of the active batch.

    governor = DraftGovernor(max_batch=-1, max_depth=2)  # -1: measured; 0: always; N: while <= N active
    k = governor.depth(len(active))                  # this step drafts k tokens (0: a plain step)
    governor.record(len(active), k, seconds, tokens_emitted)

Speculation pays when few sequences are active (a decode step streams the weights whatever the
batch, so verifying K+1 tokens costs about one step) and costs when many are (the step is
compute-bound and rejected drafts are wasted work): the long tail of a rollout round, where a few
long answers run alone, is where it pays. How deep pays moves the same way: on the 100M policy
(session 43, `bench.mtp_bench`) two drafts a step gave 1.54-1.68x at batch 1 but 1.02x at batch
4, where one draft gave 1.24-1.27x (and 1.28-1.44x at batch 1). The crossovers depend on the
model, the machine and the heads' acceptance (which moves as the policy trains), so by default
they are measured as the engine runs: seconds per emitted token at each depth 0..max_depth, per
batch-size bucket (powers of two), as moving averages of seconds and of tokens (their ratio: a
step's tokens vary with what was accepted, 1 to k+1). Each bucket first measures every depth
`warmup` times (deepest first), then takes the cheapest, and now and then takes each other depth
for two steps (the engine measures only steps in the same mode as the one before, drafting or
not: a switch between them costs what neither does), so a crossover that moves is followed.

How often: a check costs its two steps' extra over the cheapest depth, plus about one step where
it switches drafting off or on (`SWITCH`). A depth whose check costs about k x 2 x `GAP_UNIT` of
a step is checked every k x `explore_every`-th step (k rounded, 1 to `MAX_STRETCH`), so each
other depth's checks cost about 2 * GAP_UNIT / explore_every of the steps' time (0.3%) up to
a check of 3.2 steps, and more beyond (the stretch is capped: drafts that cost 3x a plain step's
token, checked where plain steps are cheapest, cost 5/1024, 0.5%). Where drafting never pays
(the tiny quick-start policy, `bench.draft_round_bench`'s even round, session 45) a check of
both depths measured 10-30 ms, 4-10% of a 64-step round: at 10% units and a stretch of at most
8 it came every 256 steps, 1-2.5% of the time; now every 1024. The price is tracking: a depth
that becomes the cheapest as the heads' acceptance moves waits for its next check, up to 1024
steps of its bucket where it looked far dearer (about four tail rounds at batch 4 on the tiny
policy, seconds of decoding). Replayed on the 100M policy's recorded steps
(`bench.governor_replay`; fixed costs, so it cannot show that price), cost over the best depth
was 1.008-1.014 against 1.010-1.016 before. A check comes a period after the last one, by the period
as it is now: a check whose own measurement moved its period waits the new one. Each other depth has its own two steps (held, whatever the
first one measured): the one that switches mode ends the period, the other the two steps before,
never on the same steps.

The averages are slow (`smoothing` 0.05, a plain mean over the first 20 steps): a depth checked
now and then keeps its last estimate, so a noisy one can keep the wrong depth for hundreds of
steps. Replayed on the 100M policy's measured steps (`bench.governor_replay`, session 44: one
draft 16% dearer a token than two at batch 1, none 20% dearer than one at batch 4), averages at
0.2 with 4 warm-up steps cost 3.9% over the best depth at batch 1 and 4.9% in batch 4's bucket
1; at 0.05 with 8, 1.6% and 1.0%.
"""

from __future__ import annotations

GAP_UNIT = 0.05  # a check costing up to 2 x 5% of a step: every `explore_every` steps ...
MAX_STRETCH = 32  # ... and k times less often at k times that, up to this many times
SWITCH = 1.0  # a check that switches drafting off (or back) costs about one step more: the switch
# off feeds the tokens left for a speculative step (replayed on the 100M policy's measured steps,
# leaving it out made checks of plain steps cost 1.5-2% of a drafting bucket's time)
REPLAN = 8  # a bucket's plan (cheapest depth, checks' periods) is worked out again every this many
# steps, and at once after a check: working it out every step took 14 us, 1% of a tiny batch-4
# step (session 45), while the cheapest depth's own average moves by 5% of a step a step


def bucket(active: int) -> int:
    """Batch-size bucket: 1, 2, 4, 8, ... (the smallest power of two >= active)."""
    return 1 << max(0, active - 1).bit_length()


class DraftGovernor:
    def __init__(self, max_batch: int = -1, max_depth: int = 1, explore_every: int = 32,
                 smoothing: float = 0.05, warmup: int = 8) -> None:
        if max_batch < -1:
            raise ValueError(f"draft max_batch={max_batch}: use -1 (measured), 0 (always) or a batch size")
        if max_depth < 0:
            raise ValueError(f"draft max_depth={max_depth}: the deepest draft is 0 (none) or more tokens")
        if warmup < 1:
            raise ValueError(f"warmup={warmup}: each depth must be measured at least once before it is compared")
        if explore_every <= 2 * max_depth:
            raise ValueError(f"explore_every={explore_every}: each of the {max_depth} other depths checks "
                             f"for two steps a period, so the period must exceed {2 * max_depth}")
        self.max_batch, self.max_depth = max_batch, max_depth
        self.explore_every, self.smoothing, self.warmup = explore_every, smoothing, warmup
        self.depths = range(max_depth, -1, -1)  # measured first in this order: deepest first
        self.means: dict[tuple[int, int], list[float]] = {}  # (bucket, depth) -> [seconds, tokens, count]
        self.steps: dict[int, int] = {}
        self.held: dict[int, int] = {}  # bucket -> the depth of a check's second step
        self.warm: set[int] = set()  # buckets whose every depth has had its warm-up
        # bucket -> (cheapest depth, step to plan again at, checks as (period, step mod explore_every, depth))
        self.plans: dict[int, tuple[int, int, list[tuple[int, int, int]]]] = {}
        self.last: dict[tuple[int, int], int] = {}  # (bucket, depth) -> the first step of its last check

    def depth(self, active: int) -> int:
        """How many tokens a step with `active` sequences drafts (0: a plain step)."""
        if self.max_batch >= 0:
            return self.max_depth if self.max_batch == 0 or active <= self.max_batch else 0
        k = bucket(active)
        if k not in self.warm:
            for d in self.depths:
                if not self._measured(k, d):
                    return d
            self.warm.add(k)
        n = self.steps.get(k, 0)
        self.steps[k] = n + 1
        if k in self.held:  # a check's second step, whatever its first step's cost changed
            return self.held.pop(k)
        plan = self.plans.get(k)
        if plan is None or n >= plan[1]:
            plan = self.plans[k] = self._plan(k, n)
        for period, offset, d in plan[2]:
            # a check's first step: a period after the last one (by the period as it is now, so a
            # check whose measurement moved its period waits the new one), at its offset in a
            # block of `explore_every` steps (the ranks' offsets differ, so checks never meet)
            if n % self.explore_every == offset and n - self.last.get((k, d), offset - self.explore_every) >= period:
                self.last[(k, d)] = n
                self.held[k] = d
                return d
        return plan[0]

    def _plan(self, k: int, n: int) -> tuple[int, int, list[tuple[int, int, int]]]:
        """Bucket `k`'s cheapest depth and when to check each other one, for the next REPLAN steps."""
        costs = {d: self.cost(k, d) for d in self.depths}
        best, *others = sorted(costs, key=costs.get)
        # a check that switches mode goes last, just before the cheapest depth's steps: a check in
        # the same mode before it then has both its steps measured where the two meet
        others.sort(key=lambda d: ((d > 0) == (best > 0), costs[d]))
        checks = []
        for rank, d in enumerate(others):
            gap = costs[d] / max(costs[best], 1e-12) - 1.0  # what a step at depth d costs extra
            extra = 2 * gap + (SWITCH if (d > 0) != (best > 0) else 0.0)  # the check's cost, in steps
            period = self.explore_every * min(MAX_STRETCH, max(1, round(extra / (2 * GAP_UNIT))))
            checks.append((period, self.explore_every - 2 * (rank + 1), d))
        return best, n + REPLAN, checks

    def record(self, active: int, depth: int, seconds: float, tokens: int) -> None:
        """One step's cost: `tokens` emitted by `active` sequences in `seconds`, drafting `depth`."""
        if self.max_batch >= 0 or tokens <= 0:
            return
        k = bucket(active)
        m = self.means.get((k, depth))
        if m is None:
            m = self.means[(k, depth)] = [0.0, 0.0, 0]
        plan = self.plans.get(k)
        if plan is not None and plan[0] != depth:
            del self.plans[k]  # a check measured: plan again before the next step
        m[2] += 1
        rate = 1.0 / m[2] if m[2] * self.smoothing < 1.0 else self.smoothing  # a plain mean, then moving
        m[0] += rate * (seconds - m[0])
        m[1] += rate * (tokens - m[1])

    def _measured(self, k: int, depth: int) -> bool:
        """Whether `depth` has had its `warmup` steps in bucket `k`."""
        return self.means.get((k, depth), (0, 0, 0))[2] >= self.warmup

    def cost(self, k: int, depth: int) -> float:
        """Seconds per emitted token at `depth` in bucket `k` (inf: not measured)."""
        m = self.means.get((k, depth))
        return m[0] / m[1] if m and m[1] > 0 else float("inf")

    def chosen(self) -> dict[int, int]:
        """Bucket -> the cheapest depth measured there (buckets still warming up left out)."""
        buckets = sorted({k for k, _ in self.means})
        done = [k for k in buckets if all(self._measured(k, d) for d in self.depths)]
        return {k: min(self.depths, key=lambda d: self.cost(k, d)) for k in done}

    def crossover(self) -> int:
        """The largest measured bucket where drafting is cheaper (0: none measured or none cheaper)."""
        if self.max_batch >= 0:
            return self.max_batch
        return max((k for k, d in self.chosen().items() if d > 0), default=0)
