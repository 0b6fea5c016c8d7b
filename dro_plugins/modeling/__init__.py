"""The models and what feeds them: loading (:mod:`.loading`: Hugging Face models, LoRA, tiny models), causal-LM
plumbing (:mod:`.causal_lm`), prompt text and token ids (:mod:`.prompts`, :mod:`.tokenization`), the selector's
output grammar (:mod:`.permutation`), shared-prefix rows (:mod:`.packing`), token-budget micro-batches
(:mod:`.batching`), trainable units (:mod:`.units`) and the generator (:mod:`.generator`)."""
