"""Generate the tiny presets' bundled data: a small zh/en corpus, Alpaca-style examples and a byte-level BPE tokenizer.

    python tools/make_tiny_assets.py [--out configs/tiny]

Deterministic (fixed seed); its output is committed so the tiny presets run with no download.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SUBJECTS = ["北京", "上海", "人民", "学生", "工人", "农民", "科学家", "the city", "the team", "our school"]
VERBS = ["建设", "学习", "发展", "研究", "改革", "builds", "studies", "improves"]
OBJECTS = ["新的工厂", "现代化农业", "科学技术", "文化事业", "the new bridge", "a better future", "经济"]
TAILS = ["。", "，取得了很大成绩。", "，大家都很高兴。", ".", ", and everyone is glad."]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)}{rng.choice(['', ' '])}{rng.choice(VERBS)}{rng.choice(OBJECTS)}{rng.choice(TAILS)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="configs/tiny")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)

    docs = [" ".join(sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(400)]
    (out / "corpus.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    examples = []
    for _ in range(200):
        s = sentence(rng)
        subject = next(x for x in SUBJECTS if s.startswith(x))
        examples.append({"instruction": "找出句子的主语。", "input": s, "output": subject})
    (out / "sft.json").write_text(json.dumps(examples, ensure_ascii=False, indent=1), encoding="utf-8")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    from zhjax.data.templates import TEMPLATES

    # the prompt templates are in the training text, so prompts cost few tokens in the tiny presets
    tok.train_from_iterator(docs + [t for t in TEMPLATES.values()] * 50 + [e["instruction"] for e in examples], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out / "tokenizer")
    print(f"wrote {out}: {len(docs)} documents, {len(examples)} examples, vocab {len(fast)}")


if __name__ == "__main__":
    main()
