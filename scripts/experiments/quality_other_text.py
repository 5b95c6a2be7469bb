"""The quality benchmark (``e8vllm.bench.quality``) on other text: 20 windows of the KV-side
licence texts that come after the 4,096 tokens the KV calibration uses (disjoint from them and from
the perplexity texts). A check of choices made on the benchmark's own tokens.

Usage (same arguments as the benchmark):
  python scripts/experiments/quality_other_text.py --out-dir /tmp/other --dtypes auto,e8_k3v3,e8_k4v4
"""

import sys

import e8vllm.bench.quality as q

CALIBRATION_TOKENS = 4096


def _tokens(max_tokens: int, window: int):
    from transformers import AutoTokenizer

    from e8vllm.kvdump import split_texts, text_token_ids
    from e8vllm.models import prepare_model

    model_dir = prepare_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    files = split_texts().kv
    ids = text_token_ids(tok, files).tolist()[CALIBRATION_TOKENS:]
    all_windows = [ids[j * window:(j + 1) * window] for j in range(len(ids) // window)]
    n_win = min(len(ids), max_tokens) // window
    return model_dir, files, all_windows[:n_win], all_windows, len(ids)


if __name__ == "__main__":
    q._tokens = _tokens
    q.main(sys.argv[1:])
