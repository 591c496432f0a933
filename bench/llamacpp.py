"""Batch-1 greedy decoding speed: llama.cpp on GGUF files (f16, q8_0, q4_k_m) beside `zhjax generate` (fp32).

    .venv/bin/python bench/llamacpp.py [--model assets/smollm2-135m] [--types f16,q8_0,q4_k_m]
        [--new-tokens 64] [--repeats 3] [--work-dir outputs/gguf-ppl]

The same prompts (bench/generate.py's eight) go to each system, one at a time; each system generates
`--new-tokens` tokens (no stop token) and, separately, 1 token, and decode speed is (new tokens - 1) over the
difference of the two times, so prompt processing cancels out. Systems alternate within every repeat (A B C A B
C), so all see the same load; the medians are printed with the machine's load average before and after, which
should be near 0 for numbers worth quoting (the README's were taken with load < 0.5 on this 2-core machine).
llama.cpp runs through llama-cpp-python's `Llama.eval` with an argmax per step (no sampler), on all CPU threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.generate import PROMPTS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "assets" / "smollm2-135m"), help="HF model dir")
    parser.add_argument("--types", default="f16,q8_0,q4_k_m", help="GGUF types for llama.cpp")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default=str(REPO / "outputs" / "gguf-ppl"))
    args = parser.parse_args(argv)

    from zhjax._extras import require

    require("llama_cpp", extra="llamacpp", why="bench/llamacpp.py", prog="llamacpp")
    import llama_cpp
    import transformers

    import zhjax
    from zhjax.convert.gguf import write_gguf
    from zhjax.infer.generate import Decoder, generate_ids

    load_before = os.getloadavg()
    model_dir = Path(args.model)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    n = args.new_tokens

    decoder = Decoder(zhjax.load_pretrained(model_dir, dtype="float32"))

    def run_zhjax(ids, steps):
        t = time.perf_counter()
        out = generate_ids(decoder, [ids], max_new_tokens=steps, greedy=True, repetition_penalty=1.0, eos_token_id=())
        assert len(out[0]) == steps
        return time.perf_counter() - t

    systems = {"zhjax generate (f32)": run_zhjax}
    for dtype in args.types.split(","):
        path = Path(args.work_dir) / f"{model_dir.name}-{dtype}.gguf"
        if not path.exists():
            write_gguf(model_dir, path, dtype=dtype)
        # logits_all: llama-cpp-python returns logits (Llama.scores) only with it; the prefill's extra rows cancel
        # out in the decode rate (the 1-token run has the same prefill)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=os.cpu_count(), logits_all=True,
                              verbose=False)

        def run_llama(ids, steps, llm=llm):
            t = time.perf_counter()
            llm.reset()
            llm.eval(ids)
            for _ in range(steps - 1):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            int(np.argmax(llm.scores[llm.n_tokens - 1]))
            return time.perf_counter() - t

        systems[f"llama.cpp {dtype}"] = run_llama

    for run in systems.values():  # warm up (zhjax compiles here)
        run(prompts[0], n)
        run(prompts[0], 1)
    rates = {name: [] for name in systems}
    for _ in range(args.repeats):
        for ids in prompts:
            for name, run in systems.items():
                rates[name].append((n - 1) / (run(ids, n) - run(ids, 1)))
    load_after = os.getloadavg()

    print(f"\n{model_dir.name}, batch 1, greedy, {n} new tokens, median of {args.repeats} x {len(prompts)} interleaved "
          f"prompts; {os.cpu_count()} CPUs; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| system | decode tokens/s |")
    print("| --- | ---: |")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
