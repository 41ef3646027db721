"""llama.cpp's pre-tokenizer fingerprint (``chkhsh``) and the old tokenizer's llama.cpp name.

llama.cpp's ``convert_hf_to_gguf.py`` recognises a BPE pre-tokenizer by hashing the token ids that the
tokenizer gives for a fixed probe string. A new vocabulary changes the ids, so that script would stop with
"BPE pre-tokenizer was not recognized". retok writes the GGUF itself (gguf_out.py): when the text splitting is
unchanged (extend mode) it keeps the OLD pre-tokenizer name, found here from the source GGUF or the hash.
"""

from __future__ import annotations

import json
from hashlib import sha256
from typing import Any

# The probe string of convert_hf_to_gguf.py (escaped so that invisible characters survive editors).
# Checked: SmolLM2's tokenizer hashes to llama.cpp's "smollm" entry below.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)

# A few of llama.cpp's known hashes (public facts), to name the old pre-tokenizer when no GGUF says it.
KNOWN_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
}


def chkhsh(tokenizer: Any) -> str:
    """The hash llama.cpp computes: sha256 of ``str(tokenizer.encode(CHKTXT))`` (transformers' default encode)."""
    return sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def _pipeline_part(tokenizer: Any, key: str) -> Any:
    """The normalizer or pre_tokenizer of a fast tokenizer as JSON (what decides how text is split)."""
    return json.loads(tokenizer.backend_tokenizer.to_str()).get(key)


def gguf_advice(old_tok: Any, new_tok: Any, old_pre: str | None, family: str | None = None) -> dict[str, Any]:
    """What llama.cpp needs to know about the new tokenizer: both hashes, whether the text splitting
    (normalizer + pre-tokenizer) is unchanged, and the old tokenizer's llama.cpp name.

    ``old_pre`` is the old tokenizer's llama.cpp name (from its GGUF's ``tokenizer.ggml.pre``) or None, in
    which case the known-hash table is tried. ``family`` is retok.core.tokens' family of the new tokenizer. When the
    split is unchanged, the GGUF retok writes keeps that name (export.gguf); no script needs patching.
    """
    old_hash, new_hash = chkhsh(old_tok), chkhsh(new_tok)
    same_split = all(
        _pipeline_part(old_tok, k) == _pipeline_part(new_tok, k) for k in ("normalizer", "pre_tokenizer")
    )
    return {
        "old_chkhsh": old_hash,
        "new_chkhsh": new_hash,
        "pre_tokenizer_unchanged": same_split,
        "pre_name": old_pre or KNOWN_HASHES.get(old_hash),
        "family": family,
    }
