"""Side-by-side logits of zhjax and `transformers` on the same HF checkpoint: the parity report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_TEXTS = (
    "人民日报1998年1月1日：新年伊始，万象更新。The People's Daily greets the new year.",
    "Chinese-LLaMA extends the vocabulary with 中文词表 so that 每个汉字 costs fewer tokens.",
    "北京是中华人民共和国的首都，也是全国的政治、文化中心。",
)


@dataclass
class ParityReport:
    """Per-text max |logit difference| and argmax agreement between zhjax and transformers."""

    model_dir: str
    texts: list[str]
    tokens: list[int]
    max_abs_diff: list[float]
    argmax_agree: list[float]
    seconds: dict[str, float]

    def table(self) -> str:
        """A plain-text table for the terminal."""
        rows = [f"parity: zhjax vs transformers on {self.model_dir} (float32)", ""]
        rows.append(f"{'text':<44} {'tokens':>6} {'max |diff|':>11} {'argmax agree':>13}")
        for t, n, d, a in zip(self.texts, self.tokens, self.max_abs_diff, self.argmax_agree, strict=True):
            short = t if len(t) <= 42 else t[:41] + "…"
            rows.append(f"{short:<44} {n:>6} {d:>11.2e} {a:>12.1%}")
        rows.append("")
        rows.append(
            "load + first forward: zhjax {zhjax:.1f} s, transformers {transformers:.1f} s".format(**self.seconds)
        )
        return "\n".join(rows)


def compare_with_transformers(model_dir: str | Path, texts=DEFAULT_TEXTS) -> ParityReport:
    """Run both implementations on `texts` (one sequence each) and compare float32 logits."""
    import jax.numpy as jnp
    import torch
    import transformers

    from zhjax.convert.hf import load_pretrained

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    t0 = time.perf_counter()
    model = load_pretrained(model_dir, dtype="float32")
    t1 = time.perf_counter()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t2 = time.perf_counter()
    diffs, agree, lengths = [], [], []
    for text in texts:
        ids = np.asarray(tokenizer(text)["input_ids"])[None]
        ours = np.asarray(model(jnp.asarray(ids)))
        with torch.no_grad():
            ref = ref_model(torch.tensor(ids)).logits.float().numpy()
        diffs.append(float(np.abs(ours - ref).max()))
        agree.append(float((ours.argmax(-1) == ref.argmax(-1)).mean()))
        lengths.append(ids.shape[1])
    return ParityReport(str(model_dir), list(texts), lengths, diffs, agree, {"zhjax": t1 - t0, "transformers": t2 - t1})
