"""DRO training: the loop (:mod:`.trainer`, paper Algorithm 1), the E-step (:mod:`.estep`), the M-step
(:mod:`.mstep`), the warm-up (:mod:`.warmup`), the equations (:mod:`.objective`), what a run records
(:mod:`.records`) and checkpoints (:mod:`.checkpoint`), what its parts share (:mod:`.session`), signals
(:mod:`.signals`), and the run folder (:mod:`.run_folder`)."""
