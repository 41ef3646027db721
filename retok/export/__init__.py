"""export and check: the final Hugging Face folder, and a checker for any model folder.

stage.py     the stage entry ``export_model(cfg, out)``: weights, configs, tokenizer, card, then check
shards.py    safetensors shards streamed tensor by tensor, with an optional dtype cast
card.py      the model card (README.md)
llamacpp.py  llama.cpp's pre-tokenizer hash (chkhsh) and the GGUF conversion advice
check.py     ``retok check FOLDER``: what a user or a server would run into, one row per check
"""
