"""Rollout workers and their engines: torch (with MTP drafts) and vLLM, plus reasoning-budget control."""
