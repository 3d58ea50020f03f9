"""The stages before RL, each a pure function of its inputs (`estuary.warm_start` runs and caches them):
copy pretraining (`copy_pretrain`), answer pretraining (`answer_pretrain`), SFT on the environments' reference answers (`sft`) and MTP
heads fitted on the policy's own generations (`train_mtp`). They reach environments through
`environments`, and generate with the torch engine (`rollout`)."""
