"""init-embeddings: rebuild the input embedding and LM head for a new tokenizer.

mapping.py  which old rows each new token comes from (by raw bytes; specials by role/content)
methods.py  the embedding math (pure tensor functions)
surgery.py  safetensors shards in, shards out, tensor by tensor; the stage entry ``init_embeddings``
report.py   init_report.json / .md / pieces_histogram.png, held-out BPB of the original and new model
"""
