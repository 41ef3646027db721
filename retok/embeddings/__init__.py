"""init-embeddings: rebuild the input embedding and LM head for a new tokenizer.

stage.py       the stage entry ``init_embeddings(cfg, out)``
(the token map, which old rows each new token comes from, is retok.core.tokenmap: train-io reads it too)
methods.py     the embedding math (pure tensor functions)
rows.py        the new matrices chunk by chunk (a TokenMap + a method)
checkpoint.py  safetensors shards in, shards out, tensor by tensor (find the embedding and head, write)
folder.py      config.json / generation_config.json / tokenizer files of the new folder, and their check
headshift.py   the optional head-shift calibration on the original model's hidden states
report.py      init_report.json / .md / pieces_histogram.png, held-out BPB of the original and new model
"""
