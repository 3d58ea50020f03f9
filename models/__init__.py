"""Policy models: loading/saving HF causal-LM directories, tiny presets, the offline tokenizer."""
