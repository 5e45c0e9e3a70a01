"""Bundle inference: ONNX Runtime vs PyTorch eager on the same inputs, with peak memory per case.

Cases, each timed for both engines on identical weights and inputs:

* image encoder (``MedFinder.embed_image``: backbone tokens -> fusion -> head -> L2), batch 1 and 4, for the
  CPU-sized backbone (``synthetic-cpu`` preset) and the paper-sized one (3D ResNet-50, 96x224x224 input,
  ``paper`` preset; RANDOM weights: speed does not depend on them);
* text encoder (all-MiniLM-L6-v2 + the trained head, tokenisation included) on 1 and 32 reports of 100 words.

A "prepare" child process exports the graphs and saves the weights; every measurement then runs in a fresh
child process of its own, so its peak RSS (``ru_maxrss``) belongs to that engine and case alone (the
onnxruntime children never import torch; the parent imports neither, since Linux carries a parent's RSS
high-water mark into a forked child). Warm-up 1 call, then ``--repeats`` timed calls (median reported;
``--paper-repeats`` for the paper-size backbone, minutes per call on 2 CPU cores). The ratio is PyTorch time /
onnxruntime time (> 1: onnxruntime is faster); ``cos`` is the worst cosine between the two engines' outputs.
With CUDA (torch and onnxruntime-gpu's CUDA provider) the same cases run on the GPU too; otherwise skipped.

    python -m benchmarks.bundle_inference [--threads 2] [--repeats 3] [--paper-repeats 1] [--no-paper]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEXT_REPORTS = (1, 32)
IMAGE_BATCHES = (1, 4)
REPORT_WORDS = 100
TEXT_FEATURE_DIM = 384  # all-MiniLM-L6-v2


def reports(count: int) -> list[str]:
    """``count`` deterministic 100-word reports (one text window each)."""
    words = ("the lungs show a small spiculated nodule in the right upper lobe without pleural effusion or "
             "consolidation the heart size is normal there is no mediastinal lymphadenopathy mild emphysema").split()
    return [" ".join((words[i % 7 :] + words * 8)[:REPORT_WORDS]) for i in range(count)]


def image_input(batch: int, shape: list[int]) -> Any:
    import numpy as np

    return np.random.default_rng(batch).random((batch, 1, *shape), dtype=np.float32)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(call: Any, repeats: int, synchronize: Any = None) -> tuple[float, Any]:
    """Median seconds per call over ``repeats`` calls after one warm-up call, and the last output.

    The median, not the mean: on a shared 2-core machine one call now and then is slowed by other work.
    """
    output = call()
    if synchronize:
        synchronize()
    seconds = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        output = call()
        if synchronize:
            synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), output


# ---------------------------------------------------------------------------------------------- children
def prepare(preset: str, work: Path, with_text: bool) -> dict[str, Any]:
    """Build the model (seeded, random weights), save its weights and export the graphs (child process)."""
    import torch

    from config import load_settings
    from trainer.export.onnx_export import export_image_encoder, export_text_encoder
    from trainer.model.medfinder import MedFinder

    settings = load_settings(preset)
    torch.manual_seed(0)
    shape = tuple(settings.preprocessing.target_shape)
    text_encoder = None
    if with_text:
        from trainer.model.text_encoders import build_text_encoder

        text_encoder = build_text_encoder(settings.model.text)
    model = MedFinder(settings.model, settings.loss, shape, TEXT_FEATURE_DIM, text_encoder=text_encoder).eval()
    torch.save(model.trainable_state_dict(), work / "weights.pt")
    started = time.perf_counter()
    export_image_encoder(model, work / "image.onnx", shape)
    seconds = {"image": time.perf_counter() - started}
    if with_text:
        started = time.perf_counter()
        export_text_encoder(model, work / "text.onnx")
        seconds["text"] = time.perf_counter() - started
        text_encoder.tokenizer_files(work)
    params = sum(p.numel() for name, p in model.named_parameters() if name.startswith("image_encoder."))
    return {"shape": list(shape), "export_seconds": seconds, "image_params_m": params / 1e6,
            "backbone": settings.model.image.backbone}


def measure_torch(preset: str, work: Path, case: str, size: int, threads: int, repeats: int, device: str) -> dict:
    import numpy as np
    import torch

    from config import load_settings
    from trainer.model.medfinder import MedFinder

    torch.set_num_threads(threads)
    settings = load_settings(preset)
    shape = tuple(settings.preprocessing.target_shape)
    text_encoder = None
    if case == "text":
        from trainer.model.text_encoders import build_text_encoder

        text_encoder = build_text_encoder(settings.model.text)
    model = MedFinder(settings.model, settings.loss, shape, TEXT_FEATURE_DIM, text_encoder=text_encoder)
    model.load_trainable_state_dict(torch.load(work / "weights.pt", map_location="cpu", weights_only=True))
    model = model.to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else None
    with torch.no_grad():
        if case == "image":
            volumes = torch.from_numpy(image_input(size, list(shape))).to(device)
            seconds, out = timed(lambda: model.embed_image(volumes), repeats, sync)
        else:
            texts = reports(size)

            def embed() -> torch.Tensor:
                ids, mask = model.text_encoder.tokenize(texts)
                return model.embed_text_features(model.text_encoder(ids.to(device), mask.to(device)))

            seconds, out = timed(embed, repeats, sync)
    np.save(work / f"torch-{case}-{size}-{device}.npy", out.float().cpu().numpy())
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu}


def measure_ort(preset: str, work: Path, case: str, size: int, threads: int, repeats: int, device: str) -> dict:
    """onnxruntime only: no torch import, so the peak RSS is the runtime's."""
    import numpy as np
    import onnxruntime as ort

    from config import load_settings

    settings = load_settings(preset)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = case != "image"  # as model_export.runtime does (volumes: no arena)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(work / f"{case}.onnx"), options, providers=providers)
    if case == "image":
        feeds = {"volume": image_input(size, list(settings.preprocessing.target_shape))}
        seconds, out = timed(lambda: session.run(None, feeds)[0], repeats)
    else:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(work / "tokenizer.json"))
        texts = reports(size)

        def embed() -> np.ndarray:
            encodings = tokenizer.encode_batch(texts)
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            return session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

        seconds, out = timed(embed, repeats)
    np.save(work / f"ort-{case}-{size}-{device}.npy", out)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": None,
            "providers": session.get_providers()}


def child_main(args: list[str]) -> dict[str, Any]:
    if args[0] == "cuda":
        ok, why = cuda_status()
        return {"ok": ok, "why": why}
    kind, preset, work, *rest = args
    if kind == "prepare":
        return prepare(preset, Path(work), rest[0] == "1")
    case, size, threads, repeats, device = rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4]
    measure = measure_torch if kind == "torch" else measure_ort
    return measure(preset, Path(work), case, size, threads, repeats, device)


# ---------------------------------------------------------------------------------------------- parent
def in_child(*args: str) -> dict[str, Any]:
    process = subprocess.run([sys.executable, "-m", "benchmarks.bundle_inference", "--child", *args],
                             capture_output=True, text=True)
    if process.returncode != 0:
        tail = (process.stderr or "").strip().splitlines()[-1:] or [f"exit code {process.returncode}"]
        return {"error": f"{tail[0][:120]} (exit {process.returncode}; killed for memory if -9)"}
    return json.loads(process.stdout.strip().splitlines()[-1])


def cuda_status() -> tuple[bool, str]:
    """Whether both torch and onnxruntime can use CUDA here, with the reason when not."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    try:
        import torch

        torch_cuda = torch.cuda.is_available()
    except ImportError:
        torch_cuda = False
    ok = torch_cuda and "CUDAExecutionProvider" in providers
    return ok, f"torch.cuda.is_available()={torch_cuda}, onnxruntime providers={providers}"


def cosine_min(work: Path, case: str, size: int, device: str) -> float | None:
    import numpy as np

    try:
        a = np.load(work / f"torch-{case}-{size}-{device}.npy").astype(np.float64)
        b = np.load(work / f"ort-{case}-{size}-{device}.npy").astype(np.float64)
    except FileNotFoundError:
        return None
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def run_suite(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    suites = [("synthetic-cpu", True, args.repeats)]
    if not args.no_paper:
        suites.append(("paper", False, args.paper_repeats))
    rows = []
    for preset, with_text, repeats in suites:
        with tempfile.TemporaryDirectory(prefix=f"medfinder-bench-{preset}-") as folder:
            work = Path(folder)
            info = in_child("prepare", preset, str(work), "1" if with_text else "0")
            if "error" in info:
                rows.append({"label": f"{preset}: export failed", "error": info["error"]})
                continue
            shape = "x".join(map(str, info["shape"]))
            label = f"image {info['backbone']} ({info['image_params_m']:.1f}M) {shape}"
            cases = [("image", batch, label) for batch in IMAGE_BATCHES]
            if with_text:
                cases += [("text", count, "text MiniLM-L6 + head, 100 words") for count in TEXT_REPORTS]
            for case, size, case_label in cases:
                child_args = (preset, str(work), case, str(size), str(args.threads), str(repeats), device)
                torch_result = in_child("torch", *child_args)
                ort_result = in_child("ort", *child_args)
                rows.append({"label": case_label, "preset": preset, "size": size, "case": case, "repeats": repeats,
                             "torch": torch_result, "ort": ort_result, "cos": cosine_min(work, case, size, device),
                             "export_seconds": info["export_seconds"].get(case)})
    return rows


def print_rows(rows: list[dict[str, Any]], device: str) -> None:
    print(f"{'model':44} {'batch':>5} {'engine':>11} {'s/call':>9} {'items/s':>8} {'peak MB':>8} "
          f"{'torch/ort':>9} {'cos':>10}")
    for row in rows:
        if "error" in row:
            print(f"{row['label']}: {row['error']}")
            continue
        torch_result, ort_result = row["torch"], row["ort"]
        for engine, result in (("torch", torch_result), ("onnxruntime", ort_result)):
            if "error" in result:
                print(f"{row['label']:44} {row['size']:5d} {engine:>11} failed: {result['error']}")
                continue
            memory = result["peak_gpu_mb"] or result["peak_rss_mb"]
            ratio = ""
            cos = ""
            if engine == "onnxruntime" and "error" not in torch_result:
                ratio = f"{torch_result['seconds'] / result['seconds']:.2f}x"
                cos = "" if row["cos"] is None else f"{row['cos']:.7f}"
            print(f"{row['label']:44} {row['size']:5d} {engine:>11} {result['seconds']:9.3f} "
                  f"{row['size'] / result['seconds']:8.2f} {memory:8.0f} {ratio:>9} {cos:>10}")
    exports = {f"{r['preset']} {r['case']}": r["export_seconds"] for r in rows
               if "error" not in r and r.get("export_seconds") is not None}
    if exports:
        print("export time (torch.onnx.export dynamo=True, s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in dict(sorted(exports.items())).items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch / onnxruntime intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case after 1 warm-up (default 3)")
    parser.add_argument("--paper-repeats", type=int, default=1, help="timed calls for the paper-size backbone")
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-size backbone (minutes on a CPU)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_main(args.child)))
        return 0

    # The parent imports neither torch nor onnxruntime: a child's ru_maxrss starts from its parent's RSS at fork
    # (Linux keeps the high-water mark across exec), so a heavy parent would inflate every child's figure.
    from importlib.metadata import version

    print(f"Bundle inference: onnxruntime {version('onnxruntime')} vs PyTorch {version('torch')} eager, "
          f"{args.threads} threads, warm-up 1 + median of {args.repeats} timed calls "
          f"({args.paper_repeats} for the paper size); "
          "paper-size backbone has random weights")
    print("CPU (CPUExecutionProvider)")
    print_rows(run_suite(args, "cpu"), "cpu")
    cuda = in_child("cuda")
    ok, why = bool(cuda.get("ok")), cuda.get("why", cuda.get("error"))
    if ok:
        print("CUDA (CUDAExecutionProvider vs torch on cuda)")
        print_rows(run_suite(args, "cuda"), "cuda")
    else:
        print(f"CUDA: skipped, not available here ({why})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
