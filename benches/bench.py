#!/usr/bin/env python3
"""Side-by-side throughput on one checkpoint and one machine: `gemma4 bench` in each
format, llama.cpp (`llama-bench`) on GGUF files made from the same checkpoint by its own
converter and quantizer, and transformers in bf16 (the reference, from
scripts/fixtures/requirements.txt).

    python benches/bench.py --model /tmp/gemma4-e2b-text       # makes the E2B checkpoint if missing
    python benches/bench.py --model /tmp/gemma4-e4b-text --size e4b
    python benches/bench.py --model /tmp/gemma4-26b-a4b-6l --size 26b-a4b --layers 6
    python benches/bench.py --model DIR --engines gemma4-q8_0 llamacpp-q8_0 --runs 5
    (gemma4-gguf-FMT: gemma4 on llama.cpp's own FMT file, e.g. gemma4-gguf-q4_k_m)
    python benches/bench.py --model /tmp/gemma4-e2b-text --batch 1 2 4 8 \
        --engines gemma4-q4_k llamacpp-q4_k_m gemma4-q8_0 llamacpp-q8_0 gemma4-bf16 llamacpp-bf16

With --batch, N sequences (each its own prompt) decode together: `gemma4 bench --batch N`
against `llama-batched-bench -npl N` (prompts not shared) from the same llama.cpp build,
aggregate and per-sequence decode tok/s per N.

llama.cpp comes from the `llama-cpp-python==0.3.36` source distribution on PyPI (its
`vendor/llama.cpp`), built once into --llama-dir with cmake/ninja from PyPI, with every
SIMD feature of this CPU but AMX (see `ggml_cpu_flags`); the checkpoint
gets a realistic tokenizer first (make_tokenizer.py), then `convert_hf_to_gguf.py --outtype
bf16` and `llama-quantize` to Q8_0 and Q4_K_M. Every engine gets the same prompt length,
number of generated tokens, thread count and number of measured runs after a warm-up; the
table shows medians. Each engine runs in its own process, so peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "gemma4"


QUANTS = {"q8_0", "q4_0", "q4_k", "q6_k"}
LLAMA_CPP = "llama-cpp-python==0.3.36"
# llama.cpp's file types for the formats compared (Q4_K_M: Q4_K with some Q6_K tensors).
LLAMA_FORMATS = {"bf16": None, "q8_0": "Q8_0", "q4_k_m": "Q4_K_M", "q4_0": "Q4_0", "q6_k": "Q6_K"}


def run_gemma4(model: Path, fmt: str, a, batch: int = 1) -> dict:
    flag = ["--dtype", fmt]
    if fmt.startswith("gguf-"):
        # llama.cpp's own file (`gguf-q8_0`: its Q8_0), read by gemma4 alone: config,
        # tokenizer and weights all from the GGUF, the same bytes llama-bench runs.
        gguf = llama_gguf(model, fmt[len("gguf-"):], a)
        gdir = a.llama_dir / f"{model.name}-as-{gguf.stem}"
        gdir.mkdir(parents=True, exist_ok=True)
        if not (gdir / gguf.name).exists():
            (gdir / gguf.name).symlink_to(gguf)
        model, flag = gdir, (["--dtype", "bf16"] if fmt == "gguf-bf16" else [])
    elif fmt in QUANTS:
        model, flag = gemma4_quantized(model, fmt, a), []
    out = subprocess.run(
        [str(BIN), "--threads", str(a.threads), "bench", "--model", str(model), *flag,
         "--prompt-len", str(a.prompt_len), "--gen", str(a.gen), "--runs", str(a.runs), "--batch", str(batch),
         "--json"],
        check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    return {"engine": "gemma4", "format": fmt, "batch": batch, "prefill_tok_s": r["prefill_tok_s"],
            "decode_tok_s": r["decode_tok_s"], "peak_rss_bytes": r["peak_rss_bytes"],
            "load_s": r["load_s"], "decode_fraction_of_bound": r["decode_fraction_of_bound"],
            "read_bandwidth_bytes_s": r["read_bandwidth_bytes_s"]}


def gemma4_quantized(model: Path, fmt: str, a) -> Path:
    """`model` quantized once with `gemma4 quantize`, as a user would, so load time and
    peak RSS are those of the quantized checkpoint (not of quantizing at load)."""
    qdir = a.llama_dir / f"{model.name}-gemma4-{fmt}"
    if not (qdir / "model.gguf").exists():
        subprocess.run([str(BIN), "quantize", "--model", str(model), "--quant", fmt, "--out", str(qdir)],
                       check=True)
    return qdir


def transformers_child(model: str, prompt_len: int, gen: int, runs: int, threads: int) -> None:
    """Runs in a subprocess: prints one JSON line."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t = time.time()
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    load_s = time.time() - t
    vocab = m.config.vocab_size
    state, ids = 0x9E3779B97F4A7C15, [2]
    while len(ids) < prompt_len:  # the same prompt as `gemma4 bench`
        state ^= (state << 13) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 7
        state ^= (state << 17) & 0xFFFFFFFFFFFFFFFF
        ids.append(3 + state % (vocab - 3))
    x = torch.tensor([ids])
    pre, dec = [], []
    with torch.no_grad():
        for i in range(runs + 1):
            t = time.time()
            out = m(input_ids=x, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tp = time.time() - t
            past = out.past_key_values
            t = time.time()
            for _ in range(gen):
                out = m(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            td = time.time() - t
            if i > 0:
                pre.append(prompt_len / tp)
                dec.append(gen / td)
    print(json.dumps({"engine": "transformers", "format": "bf16", "prefill_tok_s": statistics.median(pre),
                      "decode_tok_s": statistics.median(dec), "load_s": load_s,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_transformers(model: Path, a) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(model), str(a.prompt_len), str(a.gen), str(a.runs),
         str(a.threads)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ggml_cpu_flags() -> list[str]:
    """llama.cpp's x86 features, named one by one from /proc/cpuinfo with AMX off.
    `GGML_NATIVE` (-march=native) also turns on AMX where the CPU has it, and AMX tile
    instructions fault (SIGILL in `ggml_backend_amx_mul_mat`) in VMs that do not grant the
    tile state, as on this project's Sapphire Rapids machines."""
    try:
        line = next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        return ["-DGGML_NATIVE=ON"]
    have = set(line.split(":", 1)[1].split())
    features = {"GGML_SSE42": "sse4_2", "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_BMI2": "bmi2",
                "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f",
                "GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni",
                "GGML_AVX512_BF16": "avx512_bf16"}
    return (["-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if f in have else 'OFF'}" for k, f in features.items()]
            + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


def llama_cpp_source(a) -> Path:
    """The vendored llama.cpp of the pinned llama-cpp-python sdist, unpacked (once)."""
    src = a.llama_dir / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not src.exists():
        a.llama_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                        "--no-binary=llama-cpp-python", LLAMA_CPP, "-d", str(a.llama_dir)], check=True)
        subprocess.run(["tar", "xzf", str(next(a.llama_dir.glob("llama_cpp_python-*.tar.gz"))),
                        "-C", str(a.llama_dir)], check=True)
    return src


def llama_cpp_tree(a) -> Path:
    """The vendored llama.cpp of the pinned llama-cpp-python sdist, built (once)."""
    src = llama_cpp_source(a)
    if not (src / "build" / "bin" / "llama-batched-bench").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cmake", "ninja", "gguf", "sentencepiece"],
                       check=True)
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        subprocess.run(["cmake", "-B", "build", "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", *ggml_cpu_flags(),
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
                       cwd=src, env=env, check=True)
        subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count()), "--target", "llama-bench",
                        "llama-batched-bench", "llama-quantize"], cwd=src, env=env, check=True)
    return src


def llama_gguf(model: Path, fmt: str, a) -> Path:
    """`model` converted by llama.cpp's own tools to `fmt`, cached in --llama-dir."""
    src = llama_cpp_tree(a)
    bf16 = a.llama_dir / f"{model.name}-bf16.gguf"
    out = a.llama_dir / f"{model.name}-{fmt}.gguf"
    if LLAMA_FORMATS[fmt] is not None and out.exists():
        return out  # made before (the bf16 file it came from may be gone)
    if not bf16.exists():
        if not (model / "tokenizer.json").exists():
            subprocess.run([sys.executable, str(ROOT / "benches" / "make_tokenizer.py"), "--out", str(model)],
                           check=True)
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype", "bf16",
                        "--outfile", str(bf16)], env=env, check=True)
    if LLAMA_FORMATS[fmt] is None:
        return bf16
    out = a.llama_dir / f"{model.name}-{fmt}.gguf"
    if not out.exists():
        subprocess.run([str(src / "build" / "bin" / "llama-quantize"), str(bf16), str(out), LLAMA_FORMATS[fmt],
                        str(a.threads)], check=True)
    return out


def rss_child(cmd: list[str]) -> None:
    """Runs in a subprocess: runs `cmd`, passes its stdout through, then prints its peak RSS."""
    import resource

    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out)
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))


def run_llama_cpp(model: Path, fmt: str, a) -> dict:
    gguf = llama_gguf(model, fmt, a)
    bench = llama_cpp_tree(a) / "build" / "bin" / "llama-bench"
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(bench), "-m", str(gguf), "-p", str(a.prompt_len),
         "-n", str(a.gen), "-t", str(a.threads), "-r", str(a.runs), "-o", "json"],
        check=True, capture_output=True, text=True).stdout.strip().splitlines()
    rss = json.loads(out[-1])["peak_rss_bytes"]
    tests = json.loads("\n".join(out[:-1]))
    # llama-bench warms up before its repetitions; samples_ts are the per-run speeds.
    pre = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    dec = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    return {"engine": "llama.cpp", "format": fmt, "prefill_tok_s": statistics.median(pre["samples_ts"]),
            "decode_tok_s": statistics.median(dec["samples_ts"]), "peak_rss_bytes": rss,
            "file_bytes": gguf.stat().st_size}


def run_llama_batched(model: Path, fmt: str, a, batches: list[int]) -> list[dict]:
    """`llama-batched-bench` at every N of `batches` (prompts not shared), one process;
    its markdown table's rows: PP | TG | B | N_KV | T_PP | S_PP | T_TG | S_TG | T | S."""
    gguf = llama_gguf(model, fmt, a)
    bench = llama_cpp_tree(a) / "build" / "bin" / "llama-batched-bench"
    ctx = max(batches) * (a.prompt_len + a.gen) + 64
    rows = []
    for rep in range(a.runs):
        out = subprocess.run(
            [str(bench), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(a.prompt_len),
             "-ntg", str(a.gen), "-npl", ",".join(map(str, batches)), "-t", str(a.threads)],
            check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 10 and cells[0].isdigit():
                rows.append({"batch": int(cells[2]), "prefill_tok_s": float(cells[5]),
                             "decode_tok_s": float(cells[7])})
    out = []
    for n in batches:
        runs = [r for r in rows if r["batch"] == n]
        out.append({"engine": "llama.cpp", "format": fmt, "batch": n,
                    "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs),
                    "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs)})
    return out


def batched_table(a) -> None:
    """Aggregate decode per N for each engine of --engines (gemma4-FMT, llamacpp-FMT)."""
    rows = []
    for e in a.engines:
        print(f"running {e} at N = {a.batch} ...", file=sys.stderr)
        engine, fmt = e.split("-", 1)
        if engine == "gemma4":
            rows += [run_gemma4(a.model, fmt, a, n) for n in a.batch]
        elif engine == "llamacpp":
            rows += run_llama_batched(a.model, fmt, a, a.batch)
        for r in rows[-len(a.batch):]:
            print(json.dumps(r), file=sys.stderr)
    print(f"\n{a.model.name}: {a.prompt_len}-token prompt + {a.gen} generated per sequence, {a.threads} threads, "
          f"median of {a.runs} runs")
    print("| engine | format | N | decode tok/s (all) | per sequence | × own N=1 | our decode × |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        one = next(x for x in rows if x["engine"] == r["engine"] and x["format"] == r["format"] and x["batch"] == 1) \
            if 1 in a.batch else None
        scale = f"{r['decode_tok_s'] / one['decode_tok_s']:.2f}×" if one else "–"
        ours = None
        if r["engine"] == "llama.cpp":
            fmt = {"q4_k_m": "q4_k"}.get(r["format"], r["format"])
            ours = next((x for x in rows if x["engine"] == "gemma4" and x["format"] == fmt
                         and x["batch"] == r["batch"]), None)
        ratio = f"{ours['decode_tok_s'] / r['decode_tok_s']:.2f}×" if ours else "–"
        print(f"| {r['engine']} | {r['format']} | {r['batch']} | {r['decode_tok_s']:.2f} "
              f"| {r['decode_tok_s'] / r['batch']:.2f} | {scale} | {ratio} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


def counterpart(r: dict, rows: list[dict]) -> dict | None:
    """Our row in the same format as `r`: our own quantization (Q4_K_M is compared with
    our q4_k), else gemma4 on llama.cpp's own file of that format."""
    fmt = {"q4_k_m": "q4_k"}.get(r["format"], r["format"])
    for want in (fmt, f"gguf-{r['format']}"):
        same = [x for x in rows if x["engine"] == "gemma4" and x["format"] == want]
        if same:
            return same[0]
    return max((x for x in rows if x["engine"] == "gemma4"), key=lambda x: x["decode_tok_s"], default=None)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, model, p, g, r, t = sys.argv
        transformers_child(model, int(p), int(g), int(r), int(t))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True,
                    help="the checkpoint; made by make_checkpoint.py (--size, --layers) when missing")
    ap.add_argument("--size", default="e2b", help="make_checkpoint.py --size, when --model is missing")
    ap.add_argument("--layers", type=int, help="make_checkpoint.py --layers, when --model is missing")
    ap.add_argument("--engines", nargs="*", default=[
        "gemma4-bf16", "llamacpp-bf16", "gemma4-q8_0", "llamacpp-q8_0", "gemma4-gguf-q8_0", "gemma4-q4_k",
        "llamacpp-q4_k_m", "gemma4-gguf-q4_k_m", "gemma4-f32", "transformers-bf16"])
    ap.add_argument("--llama-dir", type=Path, default=Path("/tmp/gemma4-llamacpp"),
                    help="where llama.cpp is built and the GGUF files are kept")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, nargs="*",
                    help="sequences decoded together: a batched table (gemma4 and llama-batched-bench) instead")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "gemma4-cli"], cwd=ROOT, check=True)
    if not (a.model / "config.json").exists():
        print(f"making the {a.size} checkpoint in {a.model} ...", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "benches" / "make_checkpoint.py"), "--size", a.size,
                        *(["--layers", str(a.layers)] if a.layers else []), "--out", str(a.model)], check=True)
    if a.batch:
        batched_table(a)
        return
    rows = []
    for e in a.engines:
        print(f"running {e} ...", file=sys.stderr)
        engine, fmt = e.split("-", 1)
        if engine == "gemma4":
            rows.append(run_gemma4(a.model, fmt, a))
        elif engine == "llamacpp":
            rows.append(run_llama_cpp(a.model, fmt, a))
        else:
            rows.append(run_transformers(a.model, a))
        # Each row as it comes, so a failure later (e.g. a full disk) loses nothing.
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\n{a.model.name}: prompt {a.prompt_len}, {a.gen} generated, {a.threads} threads, "
          f"median of {a.runs} runs after 1 warm-up")
    print("| engine | format | prefill tok/s | decode tok/s | peak RSS | our prefill × | our decode × |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ours = counterpart(r, rows)
        if r["engine"] == "gemma4" or ours is None:
            ratios = "| – | –"
        else:
            ratios = (f"| {ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}× ({ours['format']}) "
                      f"| {ours['decode_tok_s'] / r['decode_tok_s']:.2f}×")
        print(f"| {r['engine']} | {r['format']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} "
              f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB {ratios} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
