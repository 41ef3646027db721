"""train-io: train the input embedding and LM head with the body frozen (then, optionally, everything).

stage.py    the stage entry ``train_io(cfg, out)``: set-up, start or resume, finish
loop.py     the optimizer steps of a phase: evals, checkpoints, Ctrl-C, NaN checks, progress
loss.py     the objective: next-token loss through a chunked LM head (never the whole batch's logits)
params.py   what learns in each phase (io / all), the optimizer, the learning-rate schedule
state.py    TrainState and the resumable checkpoint in output_dir/train-state
packing.py  training blocks: documents -> token ids -> packed, shuffled, mixed over domains
report.py   train_report.json / .md and the loss/BPB curve
"""
