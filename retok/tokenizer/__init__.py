"""build-tokenizer: make the new tokenizer for model.path's model from data.train, measure it on data.eval.

extend.py  continued BPE on the OLD tokenizer's segmentation, appended after every old id (the default)
train.py   a new BPE trained from scratch with the old pipeline (normaliser, pre-tokenizer, specials)
report.py  compression.json / .md / .png: bytes per token old vs new, round trip, reachability, digits
stage.py   the stage entry ``build_tokenizer(cfg, out)``: text in, HF tokenizer folder + reports out
"""
